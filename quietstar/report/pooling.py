"""Pool the held-out comparisons of several runs (seeds) of one experiment, token by token.

Each run's report leaves ``heldout_tokens.npz`` (quietstar.report.heldout.save_token_nll): the per-token NLL of every
view and a fingerprint of the held-out set. Runs are pooled only when they were scored on the same tokens; the pooled
NLL of a view is the mean over runs per token, and its intervals resample documents (the same documents in every
run): they measure how much the verdict depends on which documents were drawn, not on which seed trained the model.
``across_seeds`` adds, for every difference, a Student-t interval over the seeds' own means: the spread a new seed
would show on these documents.
"""

from __future__ import annotations

import json
import os

import numpy as np

from .heldout import compare_views, load_token_nll, summarize
from .stats import across_seeds_interval

TOKENS_FILE = "heldout_tokens.npz"


def _run_seed(run_dir: str) -> str:
    path = os.path.join(run_dir, "run_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return str(json.load(f)["QuietStarTrainingArguments"]["seed"])
    return os.path.basename(os.path.normpath(run_dir))


def _views(nll: dict[str, np.ndarray], documents: np.ndarray, num_resamples: int, seed: int) -> dict:
    reference = "base" if "base" in nll else "no_thoughts"
    summary = summarize(nll, reference=reference)
    return {"nll_all": summary["mean"], "nll_hardest": summary["hardest_mean"], "tokens": summary["tokens"],
            "hardest_tokens": summary["hardest_tokens"],
            **compare_views(nll, documents, reference, num_resamples, seed=seed)}


def pool_runs(run_dirs: list[str], num_resamples: int = 2000, seed: int = 0) -> dict:
    """``{"heldout", "runs", "seeds": {seed: ...}, "pooled": ..., "across_seeds": ...}``: per run and pooled, the mean
    NLL of every view overall (``nll_all``) and on the hardest 10 % (``nll_hardest``), and the paired differences with
    95 % intervals over documents (``real_minus_null_all``, ``real_minus_null_hardest``, ...); with two runs or more,
    ``across_seeds`` has each difference's per-seed means and a t-interval over them. Refuses runs scored on
    different held-out sets."""
    if not run_dirs:
        raise ValueError("Give at least one run folder.")
    loaded = []
    for run_dir in run_dirs:
        path = os.path.join(run_dir, TOKENS_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: run scripts/report.py {run_dir} first.")
        loaded.append((run_dir, *load_token_nll(path)))
    first_dir, first_nll, documents, fingerprint = loaded[0]
    for run_dir, nll, _, other in loaded[1:]:
        if other != fingerprint:
            raise ValueError(f"{run_dir} was scored on another held-out set than {first_dir}: {other!r} vs "
                             f"{fingerprint!r}. Report every run on the same documents (same --heldout-data, "
                             "--heldout-documents and max_length) before pooling.")
        if set(nll) != set(first_nll):
            raise ValueError(f"{run_dir} has the views {sorted(nll)}, {first_dir} has {sorted(first_nll)}; "
                             "report them with the same options before pooling.")
        if "base" in nll and not np.allclose(nll["base"], first_nll["base"], atol=1e-4):
            raise ValueError(f"{run_dir} and {first_dir} started from different base models (their base-model NLL "
                             "differs); pool only seeds of one experiment.")
    seeds = {}
    for run_dir, nll, docs, _ in loaded:
        seeds[_run_seed(run_dir)] = _views(nll, docs, num_resamples, seed)
    pooled_nll = {view: np.mean([nll[view] for _, nll, _, _ in loaded], axis=0) for view in first_nll}
    result = {"heldout": fingerprint, "runs": list(run_dirs), "seeds": seeds,
              "pooled": _views(pooled_nll, documents, num_resamples, seed)}
    if len(seeds) >= 2:
        differences = [key for key, value in result["pooled"].items() if isinstance(value, dict) and "low" in value]
        result["across_seeds"] = {key: across_seeds_interval([values[key]["mean"] for values in seeds.values()])
                                  for key in differences}
    return result
