"""The evaluation controls: the thought views (null, other-document, causal shuffle, w = 0), the trained controls
(finetune, null-trained), the hardest-tokens rule, pooling seeds and the raw-data bundle (the statistics themselves: tests/test_stats.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import make_model, padded_batch, randomize_mixing_head
from quietstar.report.controls import check_control, flops_factor, positions_per_step
from quietstar.report.heldout import (batches, binned_change, check_controls_differ, compare_pair, compare_views,
                                      controlled_scorers, difficulty_reference, fixed_windows, hardest_tokens,
                                      heldout_token_nll, save_token_nll, token_documents)
from quietstar.report.markdown import controls_text, heldout_section
from quietstar.report.pooling import load_bundle, load_runs, pool_bundle, pool_runs, save_bundle
from quietstar.report.stats import paired_bootstrap
from quietstar.scoring import (BaseScorer, ThoughtScorer, ThoughtSource, causal_sources, configure_for_scoring,
                               document_derangement, gather_thoughts, null_thoughts, other_document_sources,
                               weight_summary)

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "pool_seeds.py")
pool_seeds = importlib.util.module_from_spec(importlib.util.spec_from_file_location("pool_seeds", SCRIPT))
pool_seeds.__spec__.loader.exec_module(pool_seeds)


def test_null_thoughts_are_filler():
    model = make_model()
    ids, _ = padded_batch()
    thoughts = null_thoughts(model, ids)
    cfg = model.quietstar_config
    assert thoughts.shape == (ids.shape[0], cfg.num_thoughts, ids.shape[1], cfg.num_thought_tokens)
    assert model.filler_token_id == model.tokenizer("---", add_special_tokens=False).input_ids[0]
    assert bool((thoughts == model.filler_token_id).all())


# ------------------------------------------------------------------------------------------- thought views
def test_derangements_have_no_fixed_point_and_cover_every_one():
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(300):
        partner = document_derangement(4, generator)
        assert sorted(partner.tolist()) == [0, 1, 2, 3] and not (partner == torch.arange(4)).any()
        seen.add(tuple(partner.tolist()))
    assert len(seen) == 9  # all derangements of 4
    assert document_derangement(2, generator).tolist() == [1, 0]
    with pytest.raises(ValueError, match="batch_size >= 2"):
        document_derangement(1, generator)


def test_other_document_takes_the_same_text_position_of_another_row():
    ids, mask = padded_batch(lengths=(11, 6, 9, 11), left_padding_rows=(1, 3))
    key_padding = mask.bool()
    partner = torch.tensor([2, 3, 1, 0])
    sources = other_document_sources(key_padding, partner)
    for row in range(4):
        own = key_padding[row].nonzero().flatten().tolist()
        theirs = key_padding[int(partner[row])].nonzero().flatten().tolist()
        for column in range(ids.shape[1]):
            if column in own and own.index(column) < len(theirs):
                assert sources[row, column] == theirs[own.index(column)]  # the k-th token of the other document
            else:
                assert sources[row, column] == -1  # padding, or past the other document's end
    B, N, L, T = 4, 2, ids.shape[1], 3
    thoughts = torch.arange(B * N * L * T).view(B, N, L, T)  # every thought unique
    filler = torch.full_like(thoughts, -7)
    moved, usable = gather_thoughts(thoughts, partner, sources, filler)
    for row in range(B):
        for column in range(L):
            if sources[row, column] >= 0:
                assert torch.equal(moved[row, :, column], thoughts[int(partner[row]), :, int(sources[row, column])])
                assert not torch.equal(moved[row, :, column], thoughts[row, :, column])  # never its own
            else:
                assert not usable[row, column] and bool((moved[row, :, column] == -7).all())


def test_causal_shuffle_takes_a_thought_at_least_the_gap_earlier_uniformly():
    ids, mask = padded_batch(lengths=(12, 7), left_padding_rows=(1,))
    key_padding = mask.bool()
    generator = torch.Generator().manual_seed(0)
    gap = 3
    counts = np.zeros((2, 12, 12))
    for _ in range(400):
        sources = causal_sources(key_padding, gap, generator)
        for row in range(2):
            real = key_padding[row].nonzero().flatten().tolist()
            for rank, column in enumerate(real):
                source = int(sources[row, column])
                if rank < gap:
                    assert source == -1  # no thought that far back
                else:
                    assert source in real and real.index(source) <= rank - gap
                    counts[row, column, source] += 1
            assert all(int(sources[row, c]) == -1 for c in range(12) if c not in real)
    # Uniform over the allowed positions: the last position of row 0 draws from 12 - 3 = 9 positions.
    last = counts[0, 11, :9]
    assert last.sum() == 400 and last.min() > 400 / 9 * 0.5 and last.max() < 400 / 9 * 1.6
    with pytest.raises(ValueError, match="gap"):
        causal_sources(key_padding, 0)


def slow_view_log_probs(model, ids, mask, sampled, kind, partner=None, gap=None):
    """An independent computation of a view: per row, the thoughts assembled position by position in Python, one
    forward of that row alone, NaN where the view has no thought. ``partner``: the other_document rows; for the
    causal shuffle the source of each position is read back from the thoughts (any earlier-enough position whose
    sampled thought it is)."""
    B, L = ids.shape
    out = torch.full((B, L, model.lm_head.weight.shape[0]), float("nan"))
    for row in range(B):
        real = mask[row].bool().nonzero().flatten().tolist()
        thoughts = torch.full_like(sampled[row : row + 1], model.filler_token_id)
        usable = []
        for rank, column in enumerate(real):
            if kind == "other_document":
                other = mask[partner[row]].bool().nonzero().flatten().tolist()
                if rank < len(other):
                    thoughts[0, :, column] = sampled[partner[row], :, other[rank]]
                    usable.append(column)
        with torch.no_grad():
            logits = model(ids[row : row + 1], attention_mask=mask[row : row + 1], thoughts=thoughts).logits
        log_probs = logits[0, 0, :, 0].float().log_softmax(-1)
        out[row, usable] = log_probs[usable]
    return out


def test_views_score_what_an_independent_computation_scores_and_differ_from_real():
    model = make_model(num_thoughts=1)
    randomize_mixing_head(model, scale=3.0)
    configure_for_scoring(model)
    ids, mask = padded_batch(lengths=(12, 8, 10), left_padding_rows=())
    scorer_source = ThoughtSource(model, torch.Generator().manual_seed(3), causal_gap=2)
    replay = ThoughtSource(model, torch.Generator().manual_seed(3), causal_gap=2)  # the same draws, to read them
    real = ThoughtScorer(model, thoughts="sampled", source=scorer_source)(ids, mask)
    other = ThoughtScorer(model, thoughts="other_document", source=scorer_source)(ids, mask)
    sampled = replay.get("sampled")(ids, mask)[0]
    moved, usable = replay.get("other_document")(ids, mask)
    partner = [next(p for p in range(3) if p != row and torch.equal(moved[row, :, 0], sampled[p, :, 0]))
               for row in range(3)]
    expected = slow_view_log_probs(model, ids, mask, sampled, "other_document", partner)
    scored = mask.bool()
    torch.testing.assert_close(other[scored], expected[scored], rtol=1e-4, atol=1e-5, equal_nan=True)
    lengths = [12, 8, 10]
    assert int(torch.isnan(other[scored][:, 0]).sum()) == sum(max(0, lengths[row] - lengths[partner[row]])
                                                               for row in range(3))
    both = scored & usable
    text = torch.isfinite(real[both]) & torch.isfinite(other[both])
    assert (real[both] - other[both])[text].abs().max() > 1e-2  # the real view in its place would fail above
    # The causal shuffle: each scored position equals a forward with the thought it was given, never its own.
    causal = ThoughtScorer(model, thoughts="causal_shuffle", source=scorer_source)(ids, mask)
    moved, usable = replay.get("causal_shuffle")(ids, mask)
    for row in range(3):
        for column in mask[row].bool().nonzero().flatten().tolist():
            if column < 2:
                assert not usable[row, column] and torch.isnan(causal[row, column]).all()
                continue
            sources = [c for c in range(column - 1) if torch.equal(moved[row, :, column], sampled[row, :, c])]
            assert sources, "the thought comes from a position at least the gap earlier"
    with torch.no_grad():
        replayed = model(ids, attention_mask=mask, thoughts=moved).logits[:, 0, :, 0].float().log_softmax(-1)
    torch.testing.assert_close(causal[usable], replayed[usable], rtol=1e-4, atol=1e-5)


def test_zero_weight_is_the_trained_text_path_not_the_base_model():
    model = make_model(num_thoughts=1, text_path="train")
    original = make_model(num_thoughts=1).base
    randomize_mixing_head(model, scale=3.0)
    with torch.no_grad():  # "training" changed the text path
        model.base.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    configure_for_scoring(model)
    ids, mask = padded_batch(lengths=(9, 7), left_padding_rows=())
    zero = ThoughtScorer(model, zero_weight=True)(ids, mask)
    trained_lm = BaseScorer(model.base, model.thought_token_ids)(ids, mask)
    base = BaseScorer(original, model.thought_token_ids)(ids, mask)
    thoughts = ThoughtScorer(model, torch.Generator().manual_seed(0))(ids, mask)
    real, text = mask.bool(), torch.isfinite(trained_lm[mask.bool()])
    torch.testing.assert_close(zero[real][text], trained_lm[real][text], rtol=1e-4, atol=1e-5)
    assert (zero[real] - base[real])[text].abs().max() > 1e-3
    assert (zero[real] - thoughts[real])[text].abs().max() > 1e-3


def test_mixing_weights_are_recorded_at_the_scored_positions():
    model = make_model(num_thoughts=1)
    randomize_mixing_head(model, scale=3.0)
    configure_for_scoring(model)
    ids, mask = padded_batch(lengths=(9, 6), left_padding_rows=())
    source = ThoughtSource(model, torch.Generator().manual_seed(1))
    scorer = ThoughtScorer(model, source=source)
    scorer(ids, mask)
    with torch.no_grad():
        weights = model(ids, attention_mask=mask, thoughts=source.get("sampled")(ids, mask)[0]).mixing_weights
    expected = torch.cat([weights[0, 0, :8, 0], weights[1, 0, :5, 0]]).numpy()  # positions with a next token
    np.testing.assert_allclose(np.sort(np.concatenate(scorer.weights)), np.sort(expected), rtol=1e-5)
    summary = scorer.weight_summary()
    assert summary["positions"] == 13 and summary["mean"] == pytest.approx(expected.mean(), rel=1e-5)
    assert summary["q50"] == pytest.approx(np.median(expected), rel=1e-5)
    assert summary["q05"] <= summary["q25"] <= summary["q50"] <= summary["q75"] <= summary["q95"]
    assert weight_summary(np.zeros(0)) == {"positions": 0}


# --------------------------------------------------------------------------------------- the hardest tokens
def test_the_hardest_tokens_are_never_chosen_by_one_of_the_pair():
    rng = np.random.default_rng(0)
    views = {name: rng.normal(size=50) for name in ("base", "finetune", "no_thoughts", "real", "null")}
    for first in views:
        for second in views:
            if first != second:
                assert difficulty_reference(first, second, views) not in (first, second)
    assert difficulty_reference("real", "null", views) == "base"
    assert difficulty_reference("no_thoughts", "base", views) == "finetune"
    identical = {**views, "no_thoughts": views["base"].copy()}  # a protected text path: no_thoughts is base
    assert difficulty_reference("finetune", "base", identical) is None
    assert difficulty_reference("finetune", "base", views) == "no_thoughts"


def test_regression_to_the_mean_does_not_reach_the_hardest_tokens():
    """Two models with the same true difficulty and independent noise: chosen by one of them, its hardest tokens
    look better for the other (regression to the mean); chosen by a model outside the pair, they do not."""
    rng = np.random.default_rng(1)
    truth = rng.gamma(2.0, 1.0, size=4000)
    nll = {name: truth + rng.normal(scale=0.5, size=4000) for name in ("base", "no_thoughts", "finetune")}
    documents = np.repeat(np.arange(200), 20)
    result = compare_pair(nll, "no_thoughts", "base", documents, num_resamples=500)
    assert result["reference"] == "finetune"
    assert result["hardest"]["low"] < 0 < result["hardest"]["high"]
    by_base = hardest_tokens(nll["base"])  # the biased choice the rule forbids
    biased = paired_bootstrap(nll["no_thoughts"] - nll["base"], documents, by_base, 500)
    assert biased["high"] < -0.1  # a spurious gain the rule would have reported
    expected = paired_bootstrap(nll["no_thoughts"] - nll["base"], documents, hardest_tokens(nll["finetune"]), 500)
    assert result["hardest"] == expected
    alone = {key: nll[key] for key in ("no_thoughts", "base")}
    assert compare_pair(alone, "no_thoughts", "base", documents, 100)["hardest"] is None  # no model outside


def test_nan_tokens_are_left_out_of_a_comparison_and_counted():
    documents = np.repeat(np.arange(4), 5)
    real = np.arange(20, dtype=float)
    other = real + 1.0
    other[[0, 5, 6]] = np.nan
    result = compare_pair({"base": real * 2, "real": real, "other_document": other}, "real", "other_document",
                          documents, 100)
    assert (result["tokens"], result["excluded"]) == (17, 3)
    assert result["all"] == {"mean": -1.0, "low": -1.0, "high": -1.0}
    binned = binned_change({"base": real * 2, "real": real, "other_document": other}, num_bins=4)
    assert sum(binned["real_minus_other_document"]["bin_tokens"]) == 17
    assert binned["real_minus_other_document"]["reference"] == "base"


def test_batches_never_leave_one_window_alone():
    for count, size in [(5, 4), (9, 4), (8, 4), (13, 5), (7, 3), (2, 8)]:
        parts = batches(count, size)
        assert [i for part in parts for i in part] == list(range(count))
        assert all(2 <= len(part) <= size for part in parts)
    assert [len(part) for part in batches(5, 2)] == [3, 2]  # two per batch cannot hold an odd count
    assert [len(part) for part in batches(1, 4)] == [1]


# --------------------------------------------------------------------------------------- trained controls
def run_config(steps=100, batch=2, length=64, T=4, A=2, N=2, seed=0, control="none"):
    """A run folder's run_config.json; ``control``: its QuietStarTrainingArguments.control (None: not recorded, as
    before the field existed)."""
    training = {"max_steps": steps, "per_device_train_batch_size": batch, "gradient_accumulation_steps": 1,
                "seed": seed, "learning_rate": 1e-4}
    if control is not None:
        training["control"] = control
    return {"ModelArguments": {"model_name_or_path": "smollm2-135m"},
            "DataArguments": {"dataset": "offline-math", "max_length": length},
            "QuietStarConfig": {"num_thought_tokens": T, "num_lookahead_tokens": A, "num_thoughts": N},
            "QuietStarTrainingArguments": training}


def control_folder(tmp_path, name, config):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "run_config.json").write_text(json.dumps(config))
    return str(folder)


def test_equal_steps_and_equal_flops_controls_are_checked_against_the_run(tmp_path):
    run = run_config()
    # 1 + N·S gradient positions (S = T + A + 1) plus a third of the sampling pass's 1 + N·T, per text position
    assert flops_factor(run) == pytest.approx(1 + 2 * (4 + 2 + 1) + (1 + 2 * 4) / 3) == pytest.approx(18)
    assert positions_per_step(run, thinking=True) == pytest.approx(2 * 64 * 18)
    assert positions_per_step(run, thinking=False) == 128
    equal_steps = check_control("finetune", control_folder(tmp_path, "ft", run_config(control="finetune")), run)
    assert equal_steps.compute_ratio == pytest.approx(1 / 18)
    equal_flops = check_control("finetune_flops",
                                control_folder(tmp_path, "ftf", run_config(steps=1800, control="finetune")), run)
    assert equal_flops.compute_ratio == pytest.approx(1.0) and equal_flops.steps == 1800
    null = check_control("null_trained", control_folder(tmp_path, "null", run_config(control="null_thoughts")), run)
    assert null.compute_ratio == pytest.approx(1.0) and null.steps == 100  # the recipe itself, on filler thoughts
    with pytest.raises(ValueError, match="equal FLOPs needs 1800 steps"):
        check_control("finetune_flops", control_folder(tmp_path, "short", run_config(steps=100, control="finetune")),
                      run)
    with pytest.raises(ValueError, match="max_steps"):
        check_control("finetune", control_folder(tmp_path, "long", run_config(steps=1800, control="finetune")), run)
    with pytest.raises(ValueError, match="seed"):
        check_control("null_trained", control_folder(tmp_path, "seed", run_config(seed=1, control="null_thoughts")),
                      run)
    text = controls_text({"flops_factor": 18.0, "given": {"finetune": equal_steps.to_dict()},
                          "missing": ["finetune_flops", "null_trained"]})
    assert "Missing, so not compared: plain-LM fine-tune, equal FLOPs; trained with filler thoughts" in text
    assert "costs 18 plain-LM steps" in text and "ft`, 100 steps" in text


def test_a_control_folder_must_be_the_kind_of_control_its_view_needs(tmp_path):
    """Everything but QuietStarTrainingArguments.control matches the run, so only the kind check can refuse these."""
    run = run_config()
    for view, found, needed in [("finetune", "none", "finetune"), ("finetune_flops", "none", "finetune"),
                                ("finetune", "null_thoughts", "finetune"),
                                ("null_trained", "finetune", "null_thoughts"), ("null_trained", "none", "null_thoughts")]:
        steps = 1800 if view == "finetune_flops" else 100  # right for the view, so nothing else is wrong
        folder = control_folder(tmp_path, f"{view}-{found}", run_config(steps=steps, control=found))
        with pytest.raises(ValueError) as error:
            check_control(view, folder, run)
        message = str(error.value)
        assert (f"The {view} control {folder}" in message and f"trained with control: {found}" in message
                and f"needs control: {needed}" in message), message
    # written before the field existed: refused, naming the field, the folder and the fix
    for view, needed in [("finetune", "finetune"), ("null_trained", "null_thoughts")]:
        folder = control_folder(tmp_path, f"old-{view}", run_config(control=None))
        with pytest.raises(ValueError) as error:
            check_control(view, folder, run)
        message = str(error.value)
        assert ("QuietStarTrainingArguments.control" in message and folder in message
                and f"retrain it with `control: {needed}`" in message), message
    # a control cannot be reported as the run; a run recorded before the field existed is a plain run
    finetune = control_folder(tmp_path, "ft", run_config(control="finetune"))
    for kind in ("finetune", "null_thoughts"):
        with pytest.raises(ValueError, match=f"trained with control: {kind}, so it is itself a control"):
            check_control("finetune", finetune, run_config(control=kind))
    assert check_control("finetune", finetune, run_config(control=None)).steps == 100


def trained_controls():
    """A finetune LM (the base model's weights changed) and a model trained with filler thoughts."""
    finetune = make_model().base
    with torch.no_grad():
        finetune.model.layers[1].mlp.up_proj.weight.mul_(1.3)
    null_trained = make_model(text_path="frozen")
    randomize_mixing_head(null_trained, seed=9)
    configure_for_scoring(null_trained)
    return finetune, null_trained


WINDOW_DOCUMENTS = [f"{a} plus {b} is {a + b}. Then {a} times {b} is {a * b}." for a, b in
                    [(3, 4), (12, 7), (25, 31), (6, 9), (44, 2)]]


def heldout_run(tmp_path, name, seed, windows, source="text", controls=True):
    """A reported run folder with real per-token scores from a tiny protected-text-path model."""
    model = make_model(text_path="frozen")  # every seed starts from the same base model
    randomize_mixing_head(model, seed=seed + 1)
    configure_for_scoring(model)
    original = make_model().base
    finetune, null_trained = trained_controls() if controls else (None, None)
    scorers = controlled_scorers(model, original, torch.Generator().manual_seed(seed), causal_gap=2,
                                 finetune_lm=finetune, null_trained=null_trained)
    nll, weights = heldout_token_nll(windows, model.pad_token_id, scorers, batch_size=3)
    folder = tmp_path / name
    folder.mkdir()
    save_token_nll(str(folder / "heldout_tokens.npz"), nll, token_documents(windows), windows, source, weights,
                   {"flops_factor": 15.0, "given": {}, "missing": ["finetune_flops"]})
    (folder / "run_config.json").write_text(json.dumps({"QuietStarTrainingArguments": {"seed": seed}}))
    return str(folder), nll, scorers


def test_controls_are_the_models_given_never_the_base_model(tmp_path):
    model = make_model()
    windows = fixed_windows(WINDOW_DOCUMENTS, model.tokenizer, 24, min_tokens=3)
    _, nll, scorers = heldout_run(tmp_path, "seed0", 0, windows)
    assert list(scorers) == ["base", "finetune", "null_trained", "no_thoughts", "real", "other_document",
                             "causal_shuffle", "null"]
    finetune, null_trained = trained_controls()
    independent = {"finetune": BaseScorer(finetune, model.thought_token_ids),
                   "null_trained": ThoughtScorer(null_trained, thoughts="null")}
    expected, _ = heldout_token_nll(windows, model.pad_token_id, independent, batch_size=2)
    for view in independent:
        np.testing.assert_allclose(nll[view], expected[view], rtol=1e-5, atol=1e-6)
        assert np.abs(nll[view] - nll["base"]).max() > 1e-3  # a trained control, not the base model
        assert np.abs(nll[view] - nll["real"]).max() > 1e-3
    for control in ("finetune", "null_trained"):
        for stand_in in ("base", "real"):
            with pytest.raises(ValueError, match=f"{control} control scores every held-out token exactly as the "
                                                 f"{stand_in}"):
                check_controls_differ({**nll, control: nll[stand_in].copy()})
    # Without controls, none stands in: the views are missing and the report says so.
    _, without, scorers = heldout_run(tmp_path, "bare", 0, windows, controls=False)
    assert not {"finetune", "finetune_flops", "null_trained"} & set(scorers)
    differences = compare_views(without, token_documents(windows), num_resamples=50)
    assert "real_minus_finetune" not in differences and "real_minus_other_document" in differences


def test_controlled_views_and_pooling(tmp_path):
    model = make_model()
    windows = fixed_windows(WINDOW_DOCUMENTS, model.tokenizer, 24, min_tokens=3)
    run0, nll0, _ = heldout_run(tmp_path, "seed0", 0, windows)
    run1, _, _ = heldout_run(tmp_path, "seed1", 1, windows)
    documents = token_documents(windows)
    differences = compare_views(nll0, documents, num_resamples=200)
    # The hardest 10 % of real − null are chosen by the base model (outside the pair): the interval is exactly the
    # bootstrap of the difference on those tokens, so a wrong subset or statistic changes it.
    hard = hardest_tokens(nll0["base"])
    assert differences["real_minus_null"]["reference"] == "base"
    assert differences["real_minus_null"]["hardest"] == paired_bootstrap(nll0["real"] - nll0["null"], documents,
                                                                          hard, 200)
    assert differences["real_minus_null"]["hardest"]["mean"] == pytest.approx(
        (nll0["real"] - nll0["null"])[hard].mean())
    # A protected text path makes no_thoughts score exactly as the base model, so for finetune − base the rule passes
    # over it (it would be the base model choosing) to the next trained model.
    assert differences["finetune_minus_base"]["reference"] == "null_trained"
    assert differences["no_thoughts_minus_base"]["reference"] == "finetune"
    causal = differences["real_minus_causal_shuffle"]
    assert causal["excluded"] == 2 * len(windows)  # the first A + 1 = 2 positions of every window
    pooled = pool_runs([run0, run1], num_resamples=200)
    assert set(pooled["seeds"]) == {"0", "1"}
    for key in ("real_minus_null", "real_minus_other_document", "real_minus_finetune"):
        expected = np.mean([pooled["seeds"][s]["differences"][key]["all"]["mean"] for s in ("0", "1")])
        if pooled["pooled"]["differences"][key]["excluded"] == 0:
            assert pooled["pooled"]["differences"][key]["all"]["mean"] == pytest.approx(expected, abs=1e-6)
        # Two seeds: mean +- t(0.975, 1) * sd / sqrt(2) = mean +- 12.706 * |a - b| / 2.
        seed_means = [pooled["seeds"][s]["differences"][key]["all"]["mean"] for s in ("0", "1")]
        spread = pooled["across_seeds"][f"{key}_all"]
        assert spread["per_seed"] == pytest.approx(seed_means)
        half = 12.7062047 * abs(seed_means[0] - seed_means[1]) / 2
        assert (spread["low"], spread["high"]) == pytest.approx((np.mean(seed_means) - half,
                                                                 np.mean(seed_means) + half), abs=1e-6)
    # The committed raw data gives back every number.
    save_bundle(str(tmp_path / "x.tokens.npz"), load_runs([run0, run1]))
    assert pool_bundle(load_bundle(str(tmp_path / "x.tokens.npz")), 200) == pooled
    # scripts/pool_seeds.py writes the bundle and everything generated from it.
    results = tmp_path / "results"
    written = pool_seeds.main([run0, run1, "--name", "exp", "--results-dir", str(results),
                               "--page", str(tmp_path / "results.md")])
    assert set(written) == {str(results / "exp.json"), str(tmp_path / "results.md")}
    assert load_bundle(str(results / "exp.tokens.npz"))["seeds"]["1"]["run"] == run1
    text = "\n".join(heldout_section({**pooled["seeds"]["0"], "controls": pooled["controls"]["0"]}))
    assert "| real − other-document thoughts |" in text and "| plain-LM fine-tune, equal steps, no thoughts |" in text
    assert "Missing, so not compared: plain-LM fine-tune, equal FLOPs." in text
    # Runs scored on another held-out set are refused, naming both.
    other, _, _ = heldout_run(tmp_path, "other", 2, windows[:-1])
    with pytest.raises(ValueError, match="another held-out set than .*seed0"):
        pool_runs([run0, other])
    # --extend: a seed pooled on its own, then another added after its folder is gone, gives the bundle of both.
    extended = tmp_path / "extended"
    kept = tmp_path / "kept-seed0"
    shutil.copytree(run0, kept)
    pool_seeds.main([str(kept), "--name", "exp", "--results-dir", str(extended), "--page", str(tmp_path / "e.md")])
    shutil.rmtree(kept)
    pool_seeds.main([run1, "--name", "exp", "--results-dir", str(extended), "--page", str(tmp_path / "e.md"),
                     "--extend"])
    joined = load_bundle(str(extended / "exp.tokens.npz"))
    assert list(joined["seeds"]) == ["0", "1"] and joined["seeds"]["0"]["run"] == str(kept)
    assert pool_bundle(joined, 200) == pool_bundle(load_bundle(str(results / "exp.tokens.npz")), 200) | {
        "runs": [str(kept), run1]}
    # Extending refuses a seed already committed, another held-out set, and a bundle that is not there.
    for runs, message in (([run0], "seed 0 .* is already in"), ([other], "another held-out set than")):
        with pytest.raises(SystemExit, match=message):
            pool_seeds.main([*runs, "--name", "exp", "--results-dir", str(extended), "--extend"])
    with pytest.raises(SystemExit, match="does not exist; pool without --extend"):
        pool_seeds.main([run1, "--name", "absent", "--results-dir", str(extended), "--extend"])
