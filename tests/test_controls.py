"""The evaluation controls: null and shuffled thoughts, paired bootstrap intervals, pooling seeds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import make_model, padded_batch, randomize_mixing_head
from quietstar.report.heldout import (compare_views, controlled_scorers, fixed_windows, heldout_token_nll,
                                      save_token_nll, token_documents)
from quietstar.report.pooling import pool_runs
from quietstar.report.stats import across_seeds_interval, paired_bootstrap, student_t_quantile, verdict
from quietstar.scoring import ThoughtScorer, ThoughtSource, configure_for_scoring, null_thoughts, shuffle_positions


def test_null_thoughts_are_filler():
    model = make_model()
    ids, _ = padded_batch()
    thoughts = null_thoughts(model, ids)
    cfg = model.quietstar_config
    assert thoughts.shape == (ids.shape[0], cfg.num_thoughts, ids.shape[1], cfg.num_thought_tokens)
    assert model.filler_token_id == model.tokenizer("---", add_special_tokens=False).input_ids[0]
    assert bool((thoughts == model.filler_token_id).all())


def test_shuffle_moves_every_thought_within_its_row_and_keeps_padding():
    generator = torch.Generator().manual_seed(0)
    ids, mask = padded_batch(lengths=(11, 8))
    B, N, L, T = ids.shape[0], 2, ids.shape[1], 3
    thoughts = torch.arange(B * N * L * T).view(B, N, L, T)  # every thought unique
    shuffled = shuffle_positions(thoughts, mask.bool(), generator)
    for row in range(B):
        real = mask[row].bool()
        assert torch.equal(shuffled[row][:, ~real], thoughts[row][:, ~real])  # padding positions untouched
        before = {tuple(t.flatten().tolist()) for t in thoughts[row][:, real].transpose(0, 1)}
        after = {tuple(t.flatten().tolist()) for t in shuffled[row][:, real].transpose(0, 1)}
        assert before == after  # the same thoughts, only moved (the N samples of a position move together)
        assert not (shuffled[row][:, real] == thoughts[row][:, real]).all(dim=(0, 2)).any()  # none stays put


def test_sampled_and_shuffled_views_share_one_draw_and_differ_from_null():
    model = make_model()
    randomize_mixing_head(model, scale=2.0)
    configure_for_scoring(model)
    ids, mask = padded_batch(lengths=(9, 9), left_padding_rows=())
    source = ThoughtSource(model, torch.Generator().manual_seed(0))
    sampled = source.get("sampled")(ids, mask)
    assert source.get("sampled")(ids, mask) is sampled  # cached for the same batch: paired views
    shuffled = source.get("shuffled")(ids, mask)
    assert sorted(shuffled.flatten().tolist()) == sorted(sampled.flatten().tolist())
    scores = {kind: ThoughtScorer(model, thoughts=kind, source=source)(ids, mask) for kind in ("sampled", "null")}
    assert (scores["sampled"] - scores["null"])[..., :-2].abs().max() > 1e-3  # the last two: thought tokens, -inf
    with pytest.raises(ValueError, match="Unknown thought source"):
        source.get("random")


def test_paired_bootstrap_mean_and_coverage():
    """The mean is the token-weighted mean; intervals over documents cover a true zero about 95 % of the time when
    tokens of a document share an effect (which a token-level bootstrap would under-cover)."""
    rng = np.random.default_rng(0)
    documents = np.repeat(np.arange(40), 20)
    difference = rng.normal(size=800)
    result = paired_bootstrap(difference, documents, num_resamples=500)
    assert result["mean"] == pytest.approx(difference.mean())
    assert result["low"] < result["mean"] < result["high"]
    assert paired_bootstrap(np.full(800, 0.25), documents) == {"mean": 0.25, "low": 0.25, "high": 0.25}
    covered = 0
    for trial in range(200):
        effect = rng.normal(size=40)[documents] + rng.normal(size=800) * 0.5  # documents share an effect, mean 0
        interval = paired_bootstrap(effect, documents, num_resamples=400, seed=trial)
        covered += interval["low"] <= 0 <= interval["high"]
    assert 0.88 <= covered / 200 <= 0.99
    subset = np.zeros(800, dtype=bool)
    subset[:100] = True
    assert paired_bootstrap(difference, documents, subset)["mean"] == pytest.approx(difference[:100].mean())
    assert verdict({"mean": -1, "low": -2, "high": -0.5}) == "better"
    assert verdict({"mean": 0, "low": -1, "high": 1}) == "not distinguishable"


def heldout_run(tmp_path, name, seed, windows, source="text"):
    """A reported run folder with real per-token scores from a tiny protected-text-path model."""
    model = make_model(text_path="frozen")  # every seed starts from the same base model
    randomize_mixing_head(model, seed=seed + 1)
    configure_for_scoring(model)
    original = make_model().base
    scorers = controlled_scorers(model, original, torch.Generator().manual_seed(seed))
    assert set(scorers) == {"base", "control", "no_thoughts", "real", "null", "shuffled"}
    nll = heldout_token_nll(windows, model.pad_token_id, scorers, batch_size=3)
    folder = tmp_path / name
    folder.mkdir()
    save_token_nll(str(folder / "heldout_tokens.npz"), nll, token_documents(windows), windows, source)
    (folder / "run_config.json").write_text(json.dumps({"QuietStarTrainingArguments": {"seed": seed}}))
    return str(folder), nll


def test_controlled_views_and_pooling(tmp_path):
    model = make_model()
    documents = [f"{a} plus {b} is {a + b}. Then {a} times {b} is {a * b}." for a, b in
                 [(3, 4), (12, 7), (25, 31), (6, 9), (44, 2)]]
    windows = fixed_windows(documents, model.tokenizer, 24, min_tokens=3)
    run0, nll0 = heldout_run(tmp_path, "seed0", 0, windows)
    run1, _ = heldout_run(tmp_path, "seed1", 1, windows)
    # A protected text path: the trained LM alone is the base model, so no_thoughts == base == control exactly.
    assert np.array_equal(nll0["no_thoughts"], nll0["base"]) and np.array_equal(nll0["control"], nll0["base"])
    differences = compare_views(nll0, token_documents(windows), num_resamples=200)
    assert differences["no_thoughts_minus_base_all"] == {"mean": 0.0, "low": 0.0, "high": 0.0}
    assert differences["real_minus_null_hardest"]["low"] <= differences["real_minus_null_hardest"]["high"]
    pooled = pool_runs([run0, run1], num_resamples=200)
    assert set(pooled["seeds"]) == {"0", "1"}
    for key in ("real_minus_null_all", "real_minus_shuffled_hardest", "real_minus_control_all"):
        assert set(pooled["pooled"][key]) == {"mean", "low", "high"}
        expected = np.mean([pooled["seeds"][s][key]["mean"] for s in ("0", "1")])
        assert pooled["pooled"][key]["mean"] == pytest.approx(expected, abs=1e-6)  # same tokens in both runs
        # Two seeds: mean +- t(0.975, 1) * sd / sqrt(2) = mean +- 12.706 * |a - b| / 2.
        seed_means = [pooled["seeds"][s][key]["mean"] for s in ("0", "1")]
        spread = pooled["across_seeds"][key]
        assert spread["per_seed"] == pytest.approx(seed_means)
        half = 12.7062047 * abs(seed_means[0] - seed_means[1]) / 2
        assert (spread["low"], spread["high"]) == pytest.approx((expected - half, expected + half), abs=1e-6)
    # Runs scored on another held-out set are refused, naming both.
    other, _ = heldout_run(tmp_path, "other", 2, windows[:-1])
    with pytest.raises(ValueError, match="another held-out set than .*seed0"):
        pool_runs([run0, other])


def test_student_t_quantiles_and_seed_intervals():
    # Reference values from statistical tables.
    for probability, dof, expected in [(0.975, 1, 12.7062047), (0.975, 2, 4.3026527), (0.975, 10, 2.2281389),
                                       (0.995, 4, 4.6040949), (0.975, 1000, 1.9623391)]:
        assert student_t_quantile(probability, dof) == pytest.approx(expected, abs=1e-6)
    spread = across_seeds_interval([1.0, 2.0, 6.0])  # mean 3, sd sqrt(7)
    half = 4.3026527 * np.sqrt(7.0) / np.sqrt(3.0)
    assert (spread["mean"], spread["low"], spread["high"]) == pytest.approx((3.0, 3.0 - half, 3.0 + half))
    with pytest.raises(ValueError, match="at least two seeds"):
        across_seeds_interval([1.0])


def test_rounding_differences_are_not_verdicts():
    assert verdict({"mean": 2e-8, "low": 5e-9, "high": 4e-8}, lower_is_better=False) == "identical up to rounding"
    assert verdict({"mean": 0.01, "low": 0.005, "high": 0.02}, lower_is_better=False) == "better"
    assert verdict({"mean": 0.01, "low": 0.005, "high": 0.02}) == "worse"
