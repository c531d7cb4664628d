"""The results tables are written by code from committed raw data: the committed page is what the generator writes,
and the generator reproduces every number from a raw-data bundle alone."""

from __future__ import annotations

import json
import os

import numpy as np

from quietstar.report.pooling import load_bundle, pool_bundle, save_bundle
from quietstar.report.stats import format_interval
from quietstar.report.tables import BUNDLE_SUFFIX, NUM_RESAMPLES, regenerate, replace_block

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_committed_results_page_and_files_are_what_the_generator_writes():
    stale = regenerate(os.path.join(REPO, "docs", "results"), os.path.join(REPO, "docs", "results.md"), check=True)
    assert stale == [], f"run python scripts/results_tables.py: stale {stale}"


def synthetic_runs(seeds=("0", "1", "2")) -> dict:
    rng = np.random.default_rng(0)
    documents = np.repeat(np.arange(30), 12)
    truth = rng.gamma(2.0, 1.0, size=len(documents))
    runs = {}
    for seed in seeds:
        noise = lambda scale=0.3: rng.normal(scale=scale, size=len(documents))  # noqa: E731
        real = truth - 0.05 + noise()
        other = real + 0.02 + noise(0.1)
        other[::17] = np.nan  # past the other document's end
        nll = {"base": truth + noise(), "finetune": truth - 0.03 + noise(), "no_thoughts": truth + noise(),
               "real": real, "other_document": other, "null": real + 0.1 + noise(0.1)}
        metrics = [{"step": step, "loss": 3.0 - step / 10, "mixing_weight_mean": step / 8} for step in range(1, 9)]
        runs[seed] = {"run": f"runs/exp-seed{seed}", "nll": nll, "weights": {"real": rng.uniform(size=len(documents))},
                      "controls": {"flops_factor": 15.0, "given": {}, "missing": ["finetune_flops", "null_trained"]},
                      "metrics": metrics}
    return {"fingerprint": "synthetic|30 documents", "documents": documents, "seeds": runs}


def test_tables_are_regenerated_from_a_bundle_alone(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    save_bundle(str(results / f"exp{BUNDLE_SUFFIX}"), synthetic_runs())
    page = tmp_path / "results.md"
    page.write_text("# Results\n\nHand-written text stays.\n")
    assert set(regenerate(str(results), str(page))) == {str(page), str(results / "exp.json")}
    assert regenerate(str(results), str(page), check=True) == []  # a second run changes nothing
    expected = pool_bundle(load_bundle(str(results / f"exp{BUNDLE_SUFFIX}")), NUM_RESAMPLES)
    assert json.loads((results / "exp.json").read_text()) == json.loads(json.dumps(expected))
    text = page.read_text()
    assert text.startswith("# Results\n\nHand-written text stays.\n")
    assert "<!-- generated:exp -->" in text and "<!-- /generated:exp -->" in text
    pooled = expected["pooled"]["differences"]["real_minus_other_document"]
    assert format_interval(pooled["all"]) in text and f"| {pooled['excluded']} |" in text
    assert pooled["reference"] == "base" and expected["pooled"]["scored"]["other_document"] < 360
    assert format_interval(expected["across_seeds"]["real_minus_finetune_all"]) in text
    assert "Missing, so not compared: plain-LM fine-tune, equal FLOPs" in text
    assert "- Raw data: `docs/results/exp.tokens.npz`." in text
    # The training claims come from the committed logs: w's mean over steps 1-2 and 7-8 of 8.
    assert "| mixing_weight_mean | 0.1875 → 0.9375 | 0.1875 → 0.9375 | 0.1875 → 0.9375 |" in text
    # A hand edit inside a generated block is found and undone.
    page.write_text(text.replace(format_interval(pooled["all"]), "+0.500 [+0.400, +0.600]"))
    assert regenerate(str(results), str(page), check=True) == [str(page)]
    regenerate(str(results), str(page))
    assert page.read_text() == text


def test_results_without_raw_data_are_named_and_have_no_hand_added_keys():
    results = os.path.join(REPO, "docs", "results")
    text = open(os.path.join(REPO, "docs", "results.md")).read()
    written_by_pooling = {"heldout", "runs", "controls", "seeds", "pooled", "across_seeds"}
    for file in os.listdir(results):
        if not file.endswith(".json"):
            continue
        with open(os.path.join(results, file)) as f:
            data = json.load(f)
        if "pooled" in data:
            assert set(data) <= written_by_pooling, f"{file} has keys no code writes: {set(data) - written_by_pooling}"
        if ({"pooled", "differences"} & set(data)) and not os.path.isfile(
                os.path.join(results, file.removesuffix(".json") + BUNDLE_SUFFIX)):
            assert f"`docs/results/{file}`: no committed raw data" in text


def test_replace_block_appends_or_replaces_only_its_own_block():
    text = replace_block("intro\n", "a", "one")
    assert text == "intro\n\n<!-- generated:a -->\none\n<!-- /generated:a -->\n"
    text = replace_block(text + "middle\n", "b", "two")
    text = replace_block(text, "a", "three")
    assert text == ("intro\n\n<!-- generated:a -->\nthree\n<!-- /generated:a -->\nmiddle\n\n"
                    "<!-- generated:b -->\ntwo\n<!-- /generated:b -->\n")
