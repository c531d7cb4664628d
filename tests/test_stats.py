"""The statistics of the reports (quietstar.report.stats): the paired bootstrap over documents (its mean, width and
coverage), Student-t quantiles and intervals over seeds against table values, what counts as a verdict, and the rank
correlation against an exact permutation test."""

from __future__ import annotations

import numpy as np
import pytest

from quietstar.report.stats import (across_seeds_interval, paired_bootstrap, rank_correlation, student_t_quantile,
                                    verdict)


def test_paired_bootstrap_mean_and_coverage():
    """The mean is the token-weighted mean; intervals over documents cover a true zero about 95 % of the time when
    tokens of a document share an effect (which a token-level bootstrap would under-cover)."""
    rng = np.random.default_rng(0)
    documents = np.repeat(np.arange(40), 20)
    difference = rng.normal(size=800)
    result = paired_bootstrap(difference, documents, num_resamples=500)
    assert result["mean"] == pytest.approx(difference.mean())
    # The interval is the spread of document-resampled means: about mean +- 1.96 * sd(document means) / sqrt(40).
    document_means = difference.reshape(40, 20).mean(axis=1)
    half = 1.96 * document_means.std(ddof=1) / np.sqrt(40)
    assert result["low"] == pytest.approx(result["mean"] - half, abs=0.3 * half)
    assert result["high"] == pytest.approx(result["mean"] + half, abs=0.3 * half)
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


def test_rank_correlation_is_spearmans_rho_with_a_permutation_p_value():
    """rho is Pearson's correlation of the ranks (ties: mean ranks, worked by hand); p matches the exact test that
    enumerates every permutation of 6 values."""
    import itertools

    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40])["rho"] == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [0.4, 0.3, 0.2, -5])["rho"] == pytest.approx(-1.0)
    # Ties: y's ranks are 1, 2.5, 2.5, 4 and x's 1, 2, 3, 4.
    tied_y = np.array([1.0, 2.5, 2.5, 4.0])
    expected = np.corrcoef([1.0, 2.0, 3.0, 4.0], tied_y)[0, 1]
    assert rank_correlation([5, 6, 7, 8], [0.1, 0.7, 0.7, 0.9])["rho"] == pytest.approx(expected)
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=6), rng.normal(size=6)
    rank = lambda v: np.argsort(np.argsort(v)).astype(float)  # noqa: E731 (no ties here)
    observed = np.corrcoef(rank(x), rank(y))[0, 1]
    exact = np.mean([abs(np.corrcoef(rank(x), np.array(order))[0, 1]) >= abs(observed) - 1e-12
                     for order in itertools.permutations(rank(y))])
    result = rank_correlation(x, y, num_permutations=20000)
    assert result["rho"] == pytest.approx(observed) and result["n"] == 6
    assert result["p"] == pytest.approx(exact, abs=0.02)
    with pytest.raises(ValueError, match="same length >= 3"):
        rank_correlation([1, 2], [1, 2])
    with pytest.raises(ValueError, match="not constant"):
        rank_correlation([1, 2, 3], [4, 4, 4])
