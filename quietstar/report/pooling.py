"""Pool the held-out comparisons of several runs (seeds) of one experiment, token by token.

Each run's report leaves ``heldout_tokens.npz`` (quietstar.report.heldout.save_token_nll): the per-token NLL of every
view, the mixing weight per token, the document of every token and a fingerprint of the held-out set. Runs are
pooled only when they were scored on the same tokens, with the same views, from the same base model.
:func:`bundle_runs` gathers them into one compressed file (the raw data a results page is computed from, small
enough to commit); :func:`pool_bundle` computes everything from that file alone: the pooled NLL of a view is the
mean over runs per token (NaN where any run does not score the token), its intervals resample documents (the same
documents in every run): they measure how much the verdict depends on which documents were drawn, not on which seed
trained the model. ``across_seeds`` adds, for every difference, a Student-t interval over the seeds' own means: the
spread a new seed would show on these documents.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ..training.run_files import read_metrics
from .heldout import check_controls_differ, compare_views, load_token_nll, summarize, weight_summaries
from .markdown import training_quarters
from .stats import across_seeds_interval

TOKENS_FILE = "heldout_tokens.npz"


def run_seed(run_dir: str) -> str:
    """The seed a run was trained with (its run_config.json), else its folder's name."""
    path = os.path.join(run_dir, "run_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return str(json.load(f)["QuietStarTrainingArguments"]["seed"])
    return os.path.basename(os.path.normpath(run_dir))


def check_poolable(label: str, data: dict, first_label: str, first: dict) -> None:
    """Refuse to pool ``data`` (named ``label``) with ``first``: a ValueError naming both when they were scored on
    different held-out sets, with different views, or from different base models."""
    if data["fingerprint"] != first["fingerprint"]:
        raise ValueError(f"{label} was scored on another held-out set than {first_label}: {data['fingerprint']!r} "
                         f"vs {first['fingerprint']!r}. Report every run on the same documents (same "
                         "--heldout-data, --heldout-documents and max_length) before pooling.")
    if set(data["nll"]) != set(first["nll"]):
        raise ValueError(f"{label} has the views {sorted(data['nll'])}, {first_label} has {sorted(first['nll'])}; "
                         "report them with the same options (and controls) before pooling.")
    if "base" in data["nll"] and not np.allclose(data["nll"]["base"], first["nll"]["base"], atol=1e-4):
        raise ValueError(f"{label} and {first_label} started from different base models (their base-model NLL "
                         "differs); pool only seeds of one experiment.")


def load_runs(run_dirs: list[str]) -> dict:
    """The per-token data of every run, checked to be poolable (:func:`check_poolable`): ``{"fingerprint",
    "documents", "seeds": {seed: {"run", "nll", "weights", "controls", "metrics"}}}`` (``metrics``: the run's
    training logs, metrics.jsonl)."""
    if not run_dirs:
        raise ValueError("Give at least one run folder.")
    loaded = []
    for run_dir in run_dirs:
        path = os.path.join(run_dir, TOKENS_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: run quietstar-report (scripts/report.py) {run_dir} first.")
        loaded.append((run_dir, load_token_nll(path)))
    first_dir, first = loaded[0]
    for run_dir, data in loaded[1:]:
        check_poolable(run_dir, data, first_dir, first)
    seeds = {}
    for run_dir, data in loaded:
        seed = run_seed(run_dir)
        if seed in seeds:
            raise ValueError(f"{run_dir} and {seeds[seed]['run']} have the same seed {seed}; pool different seeds.")
        seeds[seed] = {"run": run_dir, "nll": data["nll"], "weights": data["weights"], "controls": data["controls"],
                       "metrics": [entry for entry in read_metrics(run_dir) if "loss" in entry]}
    return {"fingerprint": first["fingerprint"], "documents": first["documents"], "seeds": seeds}


def extend_runs(committed: dict, committed_label: str, added: dict) -> dict:
    """``committed`` (:func:`load_bundle` data, named ``committed_label``) with the seeds of ``added``
    (:func:`load_runs` data) joined to it: seeds trained and reported on other machines or in other sessions pool
    with those already committed, whose run folders need not exist any more. Refuses what :func:`load_runs` refuses,
    and a seed that is in both."""
    for seed, run in added["seeds"].items():
        if seed in committed["seeds"]:
            raise ValueError(f"seed {seed} ({run['run']}) is already in {committed_label}; pool different seeds, or "
                             "pool every run again without extending.")
        check_poolable(run["run"], {"fingerprint": added["fingerprint"], "nll": run["nll"]}, committed_label,
                       {"fingerprint": committed["fingerprint"],
                        "nll": next(iter(committed["seeds"].values()))["nll"]})
    return {**committed, "seeds": {**committed["seeds"], **added["seeds"]}}


def save_bundle(path: str, runs: dict) -> None:
    """Write :func:`load_runs`'s data as one compressed ``.npz`` (float32 per token; the training logs as JSON): the
    committed raw data."""
    arrays = {"fingerprint": np.array(runs["fingerprint"]), "documents": runs["documents"].astype(np.int32),
              "meta": np.array(json.dumps({seed: {"run": run["run"], "controls": run["controls"],
                                                  "metrics": run["metrics"]}
                                           for seed, run in runs["seeds"].items()}))}
    for seed, run in runs["seeds"].items():
        arrays |= {f"{seed}/nll/{view}": values.astype(np.float32) for view, values in run["nll"].items()}
        arrays |= {f"{seed}/weight/{view}": values.astype(np.float32) for view, values in run["weights"].items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez_compressed(path, **arrays)


def load_bundle(path: str) -> dict:
    """What :func:`save_bundle` wrote, in :func:`load_runs`'s shape."""
    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
        seeds = {}
        for seed, info in meta.items():
            part = lambda kind: {key.split("/", 2)[2]: data[key] for key in data.files  # noqa: E731
                                 if key.startswith(f"{seed}/{kind}/")}
            seeds[seed] = {"run": info["run"], "controls": info["controls"], "metrics": info["metrics"],
                           "nll": part("nll"), "weights": part("weight")}
        return {"fingerprint": str(data["fingerprint"]), "documents": data["documents"], "seeds": seeds}


def _views(nll: dict[str, np.ndarray], weights: dict[str, np.ndarray], documents: np.ndarray, num_resamples: int,
           seed: int) -> dict:
    check_controls_differ(nll)
    summary = summarize(nll)
    return {"nll": summary["mean"], "tokens": summary["tokens"], "scored": summary["scored"],
            "mixing_weight": weight_summaries(weights),
            "differences": compare_views(nll, documents, num_resamples, seed=seed)}


def pool_bundle(runs: dict, num_resamples: int = 2000, seed: int = 0) -> dict:
    """``{"heldout", "runs", "controls", "training", "seeds": {seed: ...}, "pooled": ..., "across_seeds": ...}`` from
    :func:`load_runs` / :func:`load_bundle` data: per run and pooled, the mean NLL of every view (``nll``), the
    tokens each view scores, the mixing-weight summaries and the paired differences (heldout.compare_views: all
    tokens, the hardest 10 % chosen by a model outside the pair, 95 % intervals over documents); with two runs or
    more, ``across_seeds`` has each difference's per-seed means and a t-interval over them. ``training``: per seed,
    the training metrics' means over the first and last quarter of its logs (markdown.training_quarters)."""
    documents, seeds = runs["documents"], runs["seeds"]
    result = {"heldout": runs["fingerprint"], "runs": [run["run"] for run in seeds.values()],
              "controls": {s: run["controls"] for s, run in seeds.items()},
              "training": {s: training_quarters(run["metrics"]) for s, run in seeds.items()},
              "seeds": {s: _views(run["nll"], run["weights"], documents, num_resamples, seed)
                        for s, run in seeds.items()}}
    views = list(next(iter(seeds.values()))["nll"])
    pooled_nll = {view: np.mean([run["nll"][view] for run in seeds.values()], axis=0) for view in views}
    pooled_weights = {view: np.concatenate([run["weights"][view] for run in seeds.values()])
                      for view in next(iter(seeds.values()))["weights"]}
    result["pooled"] = _views(pooled_nll, {}, documents, num_resamples, seed)
    result["pooled"]["mixing_weight"] = weight_summaries(pooled_weights)
    if len(seeds) >= 2:
        across = {}
        for key, pooled in result["pooled"]["differences"].items():
            for subset in ("all", "hardest"):
                per_seed = [values["differences"][key][subset] for values in result["seeds"].values()]
                if pooled[subset] is not None and all(value is not None for value in per_seed):
                    across[f"{key}_{subset}"] = across_seeds_interval([value["mean"] for value in per_seed])
        result["across_seeds"] = across
    return result


def pool_runs(run_dirs: list[str], num_resamples: int = 2000, seed: int = 0) -> dict:
    """:func:`pool_bundle` of the runs in ``run_dirs`` (each reported by quietstar-report)."""
    return pool_bundle(load_runs(run_dirs), num_resamples, seed)
