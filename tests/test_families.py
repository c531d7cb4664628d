"""Every causal-LM family of the installed transformers: computed exactly, or refused with a reason; never wrong.

The survey (tests/families_survey.py) is also the record behind the table of docs/families.md; this test
checks that the table is the survey's, for the transformers version it was made with.
"""

from __future__ import annotations

import json

import pytest
import transformers

import families_survey

pytestmark = pytest.mark.slow

# Families the project maintains (quietstar.tiny builds them): each must agree, scaled and soft-capped logits included.
MAINTAINED = ("llama", "qwen2", "qwen3", "gemma", "olmo2", "phi3", "gpt_neox", "gpt2", "granite", "cohere")


@pytest.fixture(scope="module")
def record():
    return families_survey.survey()


def test_no_family_is_accepted_and_computed_wrongly(record):
    wrong = [row for row in record["families"] if row["status"] == "DISAGREES"]
    assert not wrong, f"accepted but computed wrongly (refuse them or fix them): {wrong}"
    failed = {row["family"]: families_survey.short_reason(row)
              for row in record["families"] if row["status"] == "failed"}
    assert not failed, f"neither computed nor refused: quietstar failed on them (fix it or refuse them): {failed}"
    statuses = {row["family"]: row["status"] for row in record["families"]}
    assert all(statuses[family] == "agrees" for family in MAINTAINED), {f: statuses[f] for f in MAINTAINED}
    refused = [row for row in record["families"] if row["status"] == "refused"]
    assert all(row["detail"].strip() for row in refused), "every refusal names its reason"


def test_every_family_that_can_run_alone_is_built(record):
    # The tiny configs (tests/family_configs.py) must build every family whose model runs on its own here: what is
    # left is a draft model that needs its target's states, or a package this environment lacks.
    not_built = [row for row in record["families"] if row["status"] == "not built"]
    standalone = [row for row in not_built if row["family"] not in families_survey.NOT_STANDALONE]
    unexpected = [row for row in standalone if not row["detail"].startswith("ImportError")]
    assert not unexpected, f"the tiny config of these families does not build or run: {unexpected}"


def test_the_families_page_table_is_the_surveys(record):
    with open(families_survey.RECORD_FILE) as f:
        recorded = json.load(f)
    if recorded["transformers"] != transformers.__version__:
        pytest.skip(f"docs/families.json was surveyed on transformers {recorded['transformers']}, this is "
                    f"{transformers.__version__}: re-run `python tests/families_survey.py --write` to update it.")
    with open(families_survey.TABLE_FILE) as f:
        table = families_survey.page_table(f.read())
    assert table == families_survey.render_table(recorded), (
        "docs/families.md's table out of date: run tests/families_survey.py --write")
    verdicts = [(row["family"], row["status"], families_survey.short_reason(row)) for row in record["families"]]
    recorded_verdicts = [(row["family"], row["status"], families_survey.short_reason(row)) for row in recorded["families"]]
    assert recorded_verdicts == verdicts, (  # errors' digits vary with thread counts; verdicts and reasons may not
        "the survey changed: run `python tests/families_survey.py --write` and commit docs/families.json and "
        "docs/families.md")


def test_a_crash_of_the_library_is_reported_as_failed_not_refused(monkeypatch):
    # The probe turns whatever the decoder raises into a refusal; a crash inside the quietstar attention must still
    # read as a failure of ours, and a family whose structure the probe rejects must still read as refused.
    import quietstar.attention.dispatch as dispatch

    assert families_survey.survey_family("modernbert-decoder")["status"] == "refused"  # its decoder is not the probe's split

    def broken(*args, **kwargs):
        raise IndexError("a bug in the quietstar attention")

    monkeypatch.setattr(dispatch, "prefix_attention", broken)
    row = families_survey.survey_family("llama")
    assert row["status"] == "failed" and "a bug in the quietstar attention" in row["detail"], row


def test_an_off_by_one_branch_would_be_reported(monkeypatch):
    # Guard on the survey's oracle: hand each position the branch of its left neighbour (a plausible indexing bug).
    import quietstar.modeling as modeling

    original = modeling.expanded_pass

    def shifted(*args, **kwargs):
        text_hidden, branch_hidden = original(*args, **kwargs)
        return text_hidden, branch_hidden.roll(1, dims=2)  # [B, N, L, S, D]: along L

    monkeypatch.setattr(modeling, "expanded_pass", shifted)
    assert families_survey.survey_family("llama")["status"] == "DISAGREES"
