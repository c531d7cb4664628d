"""Paired bootstrap intervals for NLL differences between two views of the same held-out tokens.

Tokens of one document are not independent (a hard document is hard throughout), so the unit resampled is the
document: each resample draws documents with replacement and takes the token-weighted mean difference over them.
"""

from __future__ import annotations

import math

import numpy as np


def paired_bootstrap(difference: np.ndarray, documents: np.ndarray, subset: np.ndarray | None = None,
                     num_resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Mean of ``difference`` (per token, ``[tokens]``) with a percentile bootstrap interval over documents.

    ``documents [tokens]``: the document index of each token; ``subset``: a boolean mask of the tokens to average
    (for example the hardest 10 %), None for all. Returns ``{"mean", "low", "high"}`` in the units of ``difference``.
    """
    difference, documents = np.asarray(difference, dtype=np.float64), np.asarray(documents)
    if difference.shape != documents.shape:
        raise ValueError(f"difference {difference.shape} and documents {documents.shape} must have the same shape.")
    keep = np.ones(len(difference), dtype=bool) if subset is None else np.asarray(subset, dtype=bool)
    _, index = np.unique(documents, return_inverse=True)
    num_documents = index.max() + 1 if len(index) else 0
    sums = np.bincount(index[keep], weights=difference[keep], minlength=num_documents)
    counts = np.bincount(index[keep], minlength=num_documents).astype(np.float64)
    if counts.sum() == 0:
        raise ValueError("No tokens to average: the subset is empty.")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, num_documents, size=(num_resamples, num_documents))
    means = sums[draws].sum(axis=1) / np.maximum(counts[draws].sum(axis=1), 1)
    tail = (1 - confidence) / 2
    return {"mean": float(sums.sum() / counts.sum()), "low": float(np.quantile(means, tail)),
            "high": float(np.quantile(means, 1 - tail))}


def format_interval(result: dict[str, float], digits: int = 3) -> str:
    """``-0.058 [-0.081, -0.038]``."""
    return f"{result['mean']:+.{digits}f} [{result['low']:+.{digits}f}, {result['high']:+.{digits}f}]"


def verdict(result: dict[str, float], lower_is_better: bool = True) -> str:
    """Which side of zero the interval puts a difference (first view − second) on: "better", "worse" or "not
    distinguishable". NLL differences: lower is better; scores (probabilities, accuracies): higher is. An interval
    within 1e-6 of zero is "identical up to rounding" (two views computing the same thing in other batch shapes)."""
    if max(abs(result["low"]), abs(result["high"])) < 1e-6:
        return "identical up to rounding"
    if result["high"] < 0:
        return "better" if lower_is_better else "worse"
    if result["low"] > 0:
        return "worse" if lower_is_better else "better"
    return "not distinguishable"


def student_t_quantile(probability: float, degrees_of_freedom: int) -> float:
    """The ``probability`` quantile of Student's t with ``degrees_of_freedom`` (numpy only: Simpson's rule on the
    density and bisection; accurate to ~1e-6 for the 0.9-0.999 quantiles an interval needs)."""
    if not 0.5 <= probability < 1 or degrees_of_freedom < 1:
        raise ValueError(f"Need 0.5 <= probability < 1 and degrees_of_freedom >= 1, got {probability}, "
                         f"{degrees_of_freedom}.")
    nu = float(degrees_of_freedom)
    log_norm = math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi)

    def cdf(x: float) -> float:
        grid = np.linspace(0.0, x, 4001)
        density = np.exp(log_norm - (nu + 1) / 2 * np.log1p(grid * grid / nu))
        step = x / 4000
        return 0.5 + step / 3 * (density[0] + density[-1] + 4 * density[1:-1:2].sum() + 2 * density[2:-1:2].sum())

    low, high = 0.0, 1.0
    while cdf(high) < probability:
        low, high = high, high * 2
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) < probability else (low, middle)
    return (low + high) / 2


def across_seeds_interval(values: list[float], confidence: float = 0.95) -> dict:
    """Mean of one number per seed with a Student-t interval over seeds: the spread a new seed would show, which a
    bootstrap over documents (same documents in every seed) does not see. Returns ``{"mean", "low", "high", "std",
    "per_seed"}``; needs at least two seeds."""
    values = [float(v) for v in values]
    if len(values) < 2:
        raise ValueError(f"An interval over seeds needs at least two seeds, got {len(values)}.")
    mean, std = float(np.mean(values)), float(np.std(values, ddof=1))
    half = student_t_quantile(1 - (1 - confidence) / 2, len(values) - 1) * std / math.sqrt(len(values))
    return {"mean": mean, "low": mean - half, "high": mean + half, "std": std, "per_seed": values}


def paired_bootstrap_ratio(numerator: np.ndarray, denominator: np.ndarray, documents: np.ndarray,
                           num_resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict[str, float]:
    """mean(numerator) / mean(denominator) over items (``[items]`` each, e.g. learned − null over gold − null: the
    fraction of a gap closed), with a percentile bootstrap interval that resamples documents (``documents [items]``)
    and takes both means over the same draw. Returns ``{"mean", "low", "high"}``; draws whose denominator is 0 are
    left out of the interval. Raises ValueError when the denominator's mean is 0 (no gap to close)."""
    numerator, denominator = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    documents = np.asarray(documents)
    if not numerator.shape == denominator.shape == documents.shape:
        raise ValueError(f"numerator {numerator.shape}, denominator {denominator.shape} and documents "
                         f"{documents.shape} must have the same shape.")
    if denominator.sum() == 0:
        raise ValueError("The denominator's mean is 0: there is no gap whose fraction could be closed.")
    _, index = np.unique(documents, return_inverse=True)
    num_documents = index.max() + 1
    top = np.bincount(index, weights=numerator, minlength=num_documents)
    bottom = np.bincount(index, weights=denominator, minlength=num_documents)
    draws = np.random.default_rng(seed).integers(0, num_documents, size=(num_resamples, num_documents))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = top[draws].sum(axis=1) / bottom[draws].sum(axis=1)
    ratios = ratios[np.isfinite(ratios)]
    tail = (1 - confidence) / 2
    return {"mean": float(top.sum() / bottom.sum()), "low": float(np.quantile(ratios, tail)),
            "high": float(np.quantile(ratios, 1 - tail))}


def rank_correlation(x, y, num_permutations: int = 10000, seed: int = 0) -> dict:
    """Spearman's rank correlation of ``x`` and ``y`` (``[n]`` each, n >= 3; ties get their mean rank) with a two-sided
    permutation p-value: the share of ``num_permutations`` seeded shuffles of y whose |rho| reaches the observed one
    (the observed pairing counted once, so p > 0). Returns ``{"rho", "p", "n"}``."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 3:
        raise ValueError(f"A rank correlation needs two 1-d arrays of the same length >= 3, got {x.shape} and "
                         f"{y.shape}.")

    def ranks(values):
        order = values.argsort(kind="stable")
        rank = np.empty(len(values))
        rank[order] = np.arange(len(values), dtype=np.float64)
        for value in np.unique(values):  # ties: their mean rank
            tied = values == value
            rank[tied] = rank[tied].mean()
        return rank - rank.mean()

    rx, ry = ranks(x), ranks(y)
    scale = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    if scale == 0:
        raise ValueError("A rank correlation needs x and y that are not constant.")
    rho = float(rx @ ry / scale)
    shuffles = np.random.default_rng(seed).permuted(np.tile(ry, (num_permutations, 1)), axis=1)
    reached = int((np.abs(shuffles @ rx / scale) >= abs(rho) - 1e-12).sum())
    return {"rho": rho, "p": (reached + 1) / (num_permutations + 1), "n": len(x)}
