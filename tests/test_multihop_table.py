"""The multi-hop block of the results page: written by code from hand-made multihop_eval records with known numbers."""

from __future__ import annotations

import json

from quietstar.report.multihop_table import FOREST_PLOT, Arm, describe_arm, forest_rows, load_arms
from quietstar.report.pooling import save_bundle
from quietstar.report.tables import BUNDLE_SUFFIX, regenerate
from test_results_tables import synthetic_runs

COMPARISON_KEYS = ("learned - shuffled", "learned - null", "gold - null", "gold - gold_wrong", "learned - no_thoughts")


def interval(mean, low, high):
    return {"mean": mean, "low": low, "high": high}


def path_summary(base: float) -> dict:
    """A path whose comparison number i has mean base + i / 100 and interval +- 0.05 around it."""
    comparisons = {key: {"logp": interval(base + i / 100, base + i / 100 - 0.05, base + i / 100 + 0.05),
                         "accuracy": interval(0.0, -0.1, 0.1)} for i, key in enumerate(COMPARISON_KEYS)}
    return {"views": {"learned": {"logp": interval(-2.0, -2.2, -1.8), "accuracy": interval(0.25, 0.125, 0.375)}},
            "comparisons": comparisons, "gap_closed": None}


def record(hops_bases: dict[int, float], untrained=False) -> dict:
    hops = {}
    for hops_k, base in hops_bases.items():
        content = None if hops_k == 1 else {"intermediate - chance": interval(0.125, 0.0625, 0.1875)}
        hops[str(hops_k)] = {"num_documents": 7, "num_queries": 21, "mixed": path_summary(base),
                             "thought_path": path_summary(-base), "content": content,
                             "contains_answer": interval(0.0, 0.0, 0.0)}
    return {"settings": {"hops": list(hops_bases)}, "hops": hops, "model": "m", "untrained": untrained,
            "quietstar_config": {"num_thought_tokens": 5, "num_thoughts": 1, "thought_init_text": " ->"}}


def run_config(new_layout=True, **training) -> dict:
    """A run_config copy: the loss fields in their own section, or (an old save) inside QuietStarConfig."""
    loss = {"entropy_bonus_weight": 0.05, "contrastive_reward_weight": 0.0}
    config = {"num_thought_tokens": 9, "num_thoughts": 4, "thought_init_text": "---"}
    out = {"DataArguments": {"multihop_hops": 2},
           "QuietStarConfig": config if new_layout else config | loss,
           "QuietStarTrainingArguments": {"max_steps": 60, "seed": 3} | training}
    if new_layout:
        out["QuietStarLossConfig"] = loss
    return out


def write_results(tmp_path):
    results = tmp_path / "docs" / "results"
    multihop = results / "multihop"
    multihop.mkdir(parents=True)
    files = {"b-gold.json": record({2: 0.5}), "b-gold.run_config.json": run_config(gold_thought_steps=30),
             "a-old.json": record({1: 0.25, 2: -0.5}), "a-old.run_config.json": run_config(new_layout=False),
             "c-untrained.json": record({2: 1.5, 3: 2.0}, untrained=True),
             "not-a-record.json": {"hops": {"2": {}}}, "a-old.metrics.jsonl": None, "b-gold.md": None}
    for file, data in files.items():
        (multihop / file).write_text("{}\n" if data is None else json.dumps(data))
    page = tmp_path / "docs" / "results.md"
    page.write_text("# Results\n\n## The multi-hop task\n\nIntro.\n\n<!-- generated:multihop -->\nhand table\n"
                    "<!-- /generated:multihop -->\n\nProse stays.\n")
    return results, multihop, page


def table_rows(text: str, hops: int) -> list[list[str]]:
    section = text.split(f"k = {hops}:\n\n")[1].split("\n\n")[0].splitlines()[2:]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in section]


def test_arms_are_described_by_their_distinguishing_settings(tmp_path):
    _, multihop, _ = write_results(tmp_path)
    arms = {arm.name: arm for arm in load_arms(str(multihop))}
    assert sorted(arms) == ["a-old", "b-gold", "c-untrained"]  # not-a-record and run_config copies are skipped
    # N=4 and entropy are not the library defaults; T=9 and "---" are (so not said); absent gold_thought_steps: off.
    assert describe_arm(arms["a-old"], 2) == "N=4, entropy 0.05; 60 steps, seed 3"
    assert describe_arm(arms["a-old"], 1) == "N=4, entropy 0.05, trained at k=2; 60 steps, seed 3"
    assert describe_arm(arms["b-gold"], 2) == "N=4, entropy 0.05, gold warm start 30 steps; 60 steps, seed 3"
    # A checkpoint of a longer run says at which step it was scored; interleaved gold steps are part of the arm.
    checkpoint = Arm("d", dict(arms["b-gold"].record, model="runs/x/checkpoint-30/"),
                     run_config(gold_thought_steps=30, gold_thought_interval=2))
    assert describe_arm(checkpoint, 2) == ("N=4, entropy 0.05, gold warm start 30 steps, then a gold step every 2; "
                                           "step 30 of 60, seed 3")
    # No run_config: untrained, with the thought tokens it was scored with (N=1 is the scoring's, not said).
    assert describe_arm(arms["c-untrained"], 2) == 'untrained, T=5, thoughts start as " ->"'


def test_the_block_holds_the_records_numbers_and_check_mode_finds_hand_edits(tmp_path):
    results, multihop, page = write_results(tmp_path)
    stale = regenerate(str(results), str(page))
    assert set(stale) == {str(page), str(multihop / FOREST_PLOT)}
    assert (multihop / FOREST_PLOT).read_bytes().startswith(b"\x89PNG")
    assert regenerate(str(results), str(page), check=True) == []  # a second run changes nothing
    text = page.read_text()
    assert text.startswith("# Results\n\n## The multi-hop task\n\nIntro.\n\n<!-- generated:multihop -->\n")
    assert "<!-- /generated:multihop -->\n\nProse stays.\n" in text and "hand table" not in text
    assert "![learned − shuffled and gold − gold-wrong per arm, k = 2](results/multihop/arms.png)" in text
    assert [row[0] for row in table_rows(text, 1)] == ["`a-old`"]
    assert [row[0] for row in table_rows(text, 3)] == ["`c-untrained`"]
    rows = {row[0]: row for row in table_rows(text, 2)}
    assert list(rows) == ["`a-old`", "`b-gold`", "`c-untrained`"]
    # b-gold at k = 2: mixed comparisons at 0.50, 0.51, 0.52, 0.53 (+- 0.05); thought path at -0.50, -0.47.
    assert rows["`b-gold`"][1:11] == [
        "N=4, entropy 0.05, gold warm start 30 steps; 60 steps, seed 3", "7 / 21",
        "+0.500 [+0.450, +0.550] better", "+0.510 [+0.460, +0.560] better", "+0.520 [+0.470, +0.570] better",
        "+0.530 [+0.480, +0.580] better", "0.250 [0.125, 0.375]", "+0.125 [+0.062, +0.188] better",
        "-0.500 [-0.550, -0.450] worse", "-0.470 [-0.520, -0.420] worse"]
    assert rows["`b-gold`"][11] == ("[table](results/multihop/b-gold.md) · [json](results/multihop/b-gold.json) · "
                                    "[run_config](results/multihop/b-gold.run_config.json)")
    assert rows["`a-old`"][11].endswith("[metrics](results/multihop/a-old.metrics.jsonl)")
    assert rows["`c-untrained`"][3] == "+1.500 [+1.450, +1.550] better"
    assert table_rows(text, 1)[0][8] == "— (no intermediate at k = 1)"
    # A hand edit inside the block is found (the figure is redrawn with it) and undone.
    page.write_text(text.replace("+0.530 [+0.480, +0.580]", "+0.900 [+0.800, +1.000]"))
    assert regenerate(str(results), str(page), check=True) == [str(page), str(multihop / FOREST_PLOT)]
    regenerate(str(results), str(page))
    assert page.read_text() == text
    # A changed record makes the block stale; a missing figure is stale on its own, never compared byte by byte.
    changed = record({2: 0.75})
    (multihop / "b-gold.json").write_text(json.dumps(changed))
    assert str(page) in regenerate(str(results), str(page), check=True)
    regenerate(str(results), str(page))
    assert "+0.750 [+0.700, +0.800] better" in page.read_text()
    (multihop / FOREST_PLOT).unlink()
    assert regenerate(str(results), str(page), check=True) == [str(multihop / FOREST_PLOT)]


def test_forest_rows_are_the_k2_mixed_differences(tmp_path):
    _, multihop, _ = write_results(tmp_path)
    rows = forest_rows(load_arms(str(multihop)))
    assert [name for name, _ in rows] == ["a-old", "b-gold", "c-untrained"]
    assert rows[1][1] == {"learned − shuffled": interval(0.5, 0.5 - 0.05, 0.5 + 0.05),
                          "gold − gold-wrong": interval(0.5 + 3 / 100, 0.5 + 3 / 100 - 0.05, 0.5 + 3 / 100 + 0.05)}


def test_bundle_blocks_still_regenerate_beside_the_multihop_block(tmp_path):
    results, multihop, page = write_results(tmp_path)
    save_bundle(str(results / f"exp{BUNDLE_SUFFIX}"), synthetic_runs(seeds=("0",)))
    assert set(regenerate(str(results), str(page))) == {str(page), str(results / "exp.json"),
                                                        str(multihop / FOREST_PLOT)}
    text = page.read_text()
    assert "<!-- generated:exp -->" in text and "<!-- generated:provenance -->" in text and "`b-gold`" in text
    assert regenerate(str(results), str(page), check=True) == []


def test_an_arm_thinking_at_anchors_gets_its_deployed_line(tmp_path):
    """A record with a ``deployed`` summary (a q < 1 model) gets one line under the tables with its numbers; the others
    get none."""
    results, multihop, page = write_results(tmp_path)
    anchored = record({2: 0.5})
    anchored["hops"]["2"]["deployed"] = {"answer_at_anchor": interval(0.375, 0.25, 0.5),
                                         "logp - no_thoughts": interval(-0.02, -0.04, -0.005),
                                         "accuracy - no_thoughts": interval(0.0, -0.05, 0.05)}
    (multihop / "d-anchors.json").write_text(json.dumps(anchored))
    regenerate(str(results), str(page))
    text = page.read_text()
    lines = [line for line in text.splitlines() if line.startswith("- `")]
    assert lines == ["- `d-anchors`, k = 2: the rule chose 0.375 [0.250, 0.500] of the answer positions; as deployed − "
                     "no thoughts: log p -0.020 [-0.040, -0.005] worse, accuracy +0.000 [-0.050, +0.050] not "
                     "distinguishable."]
