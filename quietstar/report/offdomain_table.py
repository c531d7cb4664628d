"""The off-domain tables (issue 21, item 4): GSM8K and CommonsenseQA scored under every view of a run report, from the
committed evaluation records alone.

An experiment is a folder ``docs/results/offdomain/<name>/`` with one subfolder per seed, ``seed<k>/``, holding the
run's ``eval/<task>_<view>.json`` records (quietstar.evaluation.EvalResult, one record per item; written by
scripts/report.py, copied by ``scripts/pool_seeds.py --offdomain``) and its ``run_config.json``. The table gives each
view's score with a bootstrap interval over items, its paired change from the base model and the mixing weight w,
and says whether the target holds: with thoughts no worse than the base model, the upper end of the interval of
(with thoughts − base) above :data:`TARGETS` (probability of the gold answer, paper protocol); a target met because w
is about 0 everywhere (:data:`SWITCHED_OFF`) is said to be met vacuously.

The block opens with the experiments side by side (:func:`render_comparison`): per seed its mixing mode and prior
weight (from ``run_config.json``), w at the end of training (from the bundle's training logs, else the
``metrics.jsonl`` copied beside the records), both targets, and, where the experiment's pooled MATH
bundle of the same name exists (``docs/results/<name>.tokens.npz``), the MATH gains the issue asks to keep: real −
null thoughts and real − the plain fine-tune at equal FLOPs, all held-out tokens. An experiment with two seeds or more
gets a pooled row (:func:`pooled_change`): per item, the seeds' mean change from the base model, with its bootstrap
interval over items (the target is checked on it), and, in its own line, a Student-t interval over the seeds' means:
the spread a new seed would show on these items.

How much each run loses is set beside how much it thinks on the task (:func:`w_change_points`): the figure
:data:`W_FIGURE` (drawn by quietstar.report.tables.regenerate) and Spearman's rank correlation of w with the change
over every seed whose thoughts are not switched off.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ..evaluation.result import EvalResult
from .evaluations import TASKS, with_item_intervals
from ..training.run_files import read_metrics
from .markdown import TASK_TITLES, VIEWS, markdown_table, training_quarters
from .stats import across_seeds_interval, format_interval, paired_bootstrap, rank_correlation, verdict

OFFDOMAIN_DIR = "offdomain"
TARGETS = {"gsm8k": -0.002, "commonsense_qa": -0.01}  # the bound on (with thoughts − base)
NUM_RESAMPLES = 2000
SWITCHED_OFF = 1e-3  # a 95 % quantile of w below this: the thoughts are switched off, the target holds vacuously
W_FIGURE = "w_vs_change.png"


def experiments(folder: str) -> list[str]:
    """The experiment names under ``folder`` (sorted; none when it is missing)."""
    if not os.path.isdir(folder):
        return []
    return sorted(name for name in os.listdir(folder) if os.path.isdir(os.path.join(folder, name)))


def load_seed(folder: str) -> dict[str, dict[str, EvalResult]]:
    """``{task: {view: EvalResult}}`` from the ``<task>_<view>.json`` records of one seed's folder."""
    results: dict[str, dict[str, EvalResult]] = {}
    for task in TASKS:
        for view, _ in VIEWS:
            path = os.path.join(folder, f"{task}_{view}.json")
            if os.path.isfile(path):
                results.setdefault(task, {})[view] = EvalResult.load(path)
    return results


def seed_views(folder: str) -> dict[str, dict[str, dict]]:
    """``{seed folder name: {task: ViewEvaluations by view}}`` of one experiment's folder, seeds with records only."""
    out = {}
    for seed in sorted(os.listdir(folder)):
        results = load_seed(os.path.join(folder, seed))
        if results:
            out[seed] = {task: with_item_intervals(task_results, NUM_RESAMPLES, seed=0)
                         for task, task_results in results.items()}
    return out


def switched_off(views: dict) -> bool:
    """Whether w is below :data:`SWITCHED_OFF` at 95 % of the with-thoughts view's scored positions."""
    w = views["after_thoughts"].result.mixing_weight
    return bool(w) and w["q95"] < SWITCHED_OFF


def target_outcome(task: str, views: dict) -> str | None:
    """"met", "met, vacuously" or "missed" for ``task`` (``views``: ViewEvaluations of one seed); None when the
    with-thoughts or base view is missing."""
    if "after_thoughts" not in views or views["after_thoughts"].minus_before is None:
        return None
    if views["after_thoughts"].minus_before["high"] <= TARGETS[task]:
        return "missed"
    return "met, vacuously" if switched_off(views) else "met"


def target_text(task: str, views: dict) -> str:
    """Whether the with-thoughts view meets the target on ``task`` (``views``: ViewEvaluations of one seed)."""
    outcome = target_outcome(task, views)
    if outcome is None:
        return f"{TASK_TITLES[task]}: no with-thoughts and base views, target not checked."
    change = views["after_thoughts"].minus_before
    text = (f"{TASK_TITLES[task]}: with thoughts − base = {format_interval(change, 4)}; the target (upper end above "
            f"{TARGETS[task]}) is {outcome.split(',')[0]}")
    if outcome == "met, vacuously":
        text += (f", vacuously: w is below {SWITCHED_OFF:g} at 95 % of the scored positions, so the model is the base "
                 "model there and thinking is switched off")
    return text + "."


def pooled_change(task: str, seeds: dict) -> dict | None:
    """``{"seeds", "items", "across_seeds", "outcome"}`` for ``task`` over the seeds of one experiment that have its
    with-thoughts and base views (``seeds``: :func:`seed_views`); None with fewer than two. ``items``: the mean over
    seeds of each item's (with thoughts − base) with a bootstrap interval over items; ``across_seeds``: a t-interval
    over the seeds' mean changes; ``outcome``: the target checked on ``items`` (vacuously met when every seed's
    thoughts are switched off). Raises ValueError when the seeds were scored on different items or from different
    base models."""
    usable = {seed: tasks[task] for seed, tasks in seeds.items()
              if task in tasks and tasks[task].get("after_thoughts") and tasks[task]["after_thoughts"].minus_before}
    if len(usable) < 2:
        return None
    changes, first = [], None
    for seed, views in usable.items():
        items = views["after_thoughts"].result.items
        base = np.array([item["score"] for item in views["before"].result.items])
        indices = [item["index"] for item in items]
        if first is None:
            first = (seed, indices, base)
        elif indices != first[1] or not np.allclose(base, first[2], atol=1e-6):
            raise ValueError(f"{task}: {seed} was scored on other items or from another base model than {first[0]}; "
                             "pool only seeds of one experiment evaluated on the same items.")
        changes.append(np.array([item["score"] for item in items]) - base)
    per_item = np.mean(changes, axis=0)
    interval = paired_bootstrap(per_item, np.arange(len(per_item)), num_resamples=NUM_RESAMPLES, seed=0)
    return {"seeds": len(usable), "items": interval,
            "across_seeds": across_seeds_interval([float(change.mean()) for change in changes]),
            "outcome": ("missed" if interval["high"] <= TARGETS[task] else
                        "met, vacuously" if all(switched_off(views) for views in usable.values()) else "met")}


def w_change_points(views_by_name: dict) -> list[dict]:
    """One point per experiment, seed and task whose with-thoughts view records w and has a base view:
    ``{"experiment", "seed", "task", "w", "change", "switched_off"}``; ``w``: the mean mixing weight over the task's
    scored positions, ``change``: with thoughts − base with its interval over items (``views_by_name``:
    :func:`seed_views` of each experiment)."""
    points = []
    for name, seeds in views_by_name.items():
        for seed, tasks in seeds.items():
            for task, views in tasks.items():
                thoughts = views.get("after_thoughts")
                if thoughts is None or thoughts.minus_before is None or not thoughts.result.mixing_weight:
                    continue
                points.append({"experiment": name, "seed": seed.removeprefix("seed"), "task": task,
                               "w": float(thoughts.result.mixing_weight["mean"]), "change": thoughts.minus_before,
                               "switched_off": switched_off(views)})
    return points


def w_correlation_text(points: list[dict]) -> str:
    """A sentence per task: Spearman's rho of w with (with thoughts − base) over the points that think (their
    thoughts not switched off), with its permutation p-value; tasks with fewer than 3 such points are skipped."""
    lines = []
    for task in TASKS:
        thinking = [p for p in points if p["task"] == task and not p["switched_off"]]
        if len(thinking) < 3 or len({p["w"] for p in thinking}) < 2:
            continue
        result = rank_correlation([p["w"] for p in thinking], [p["change"]["mean"] for p in thinking])
        lines.append(f"- {TASK_TITLES[task]}: Spearman's ρ(w, with thoughts − base) = {result['rho']:+.2f} over "
                     f"{result['n']} runs (permutation p = {result['p']:.3f}; below 0: the more the model thinks on "
                     "the task, the more it loses).")
    return "\n".join(lines)


def run_settings(seed_folder: str) -> tuple[str, str]:
    """``(mixing mode, prior)`` as text from the seed's ``run_config.json``: the prior's weight, and the prediction it
    compares with the base one when that is not the thought path ("—" for what is missing)."""
    path = os.path.join(seed_folder, "run_config.json")
    if not os.path.isfile(path):
        return "—", "—"
    with open(path) as f:
        config = json.load(f)
    loss = config.get("QuietStarLossConfig", {})
    weight = loss.get("mixing_prior_weight")
    prior = "—" if weight is None else f"{weight:g}"
    if weight and loss.get("mixing_prior_reference", "thought") != "thought":
        prior += f" (against the {loss['mixing_prior_reference']} prediction)"
    return str(config.get("QuietStarConfig", {}).get("mixing", "—")), prior


def _target_cell(task: str, tasks: dict) -> str:
    views = tasks.get(task)
    outcome = None if views is None else target_outcome(task, views)
    if outcome is None:
        return "—"
    return f"{format_interval(views['after_thoughts'].minus_before, 4)} {outcome}"


def _math_cell(differences: dict, key: str) -> str:
    entry = differences.get(key)
    return f"{format_interval(entry['all'])} {verdict(entry['all'])}" if entry else "—"


def render_comparison(folder: str, views_by_name: dict, pooled_by_name: dict, results: dict) -> str:
    """The experiments side by side (module docstring); ``views_by_name``: :func:`seed_views` of each experiment,
    ``pooled_by_name``: its :func:`pooled_change` by task, ``results``: the pooled MATH bundles by name
    (quietstar.report.tables.pooled_results)."""
    rows = []
    for name, seeds in views_by_name.items():
        bundle = results.get(name, {})
        weights = []
        for seed, tasks in seeds.items():
            key = seed.removeprefix("seed")
            differences = bundle.get("seeds", {}).get(key, {}).get("differences", {})
            training = bundle.get("training", {}).get(key) or training_quarters(
                read_metrics(os.path.join(folder, name, seed)))  # a seed reported off-domain only
            w = (training or {}).get("last", {}).get("mixing_weight_mean")
            weights.append(w)
            rows.append([name, key, *run_settings(os.path.join(folder, name, seed)),
                         "—" if w is None else f"{w:.3g}", _target_cell("gsm8k", tasks),
                         _target_cell("commonsense_qa", tasks), _math_cell(differences, "real_minus_null"),
                         _math_cell(differences, "real_minus_finetune_flops")])
        pooled = pooled_by_name[name]
        if any(pooled.values()):
            count = max(entry["seeds"] for entry in pooled.values() if entry)
            math_seeds = len(bundle.get("seeds", {}))
            math = bundle["pooled"]["differences"] if math_seeds >= 2 else {}
            note = f" ({math_seeds} seeds)" if math and math_seeds != count else ""
            rows.append([name, f"pooled ({count} seeds)", *run_settings(os.path.join(folder, name, next(iter(seeds)))),
                         "—" if None in weights else f"{np.mean(weights):.3g} (seeds' mean)",
                         *[f"{format_interval(entry['items'], 4)} {entry['outcome']}" if entry else "—"
                           for entry in pooled.values()],
                         *[_math_cell(math, key) + (note if key in math else "")
                           for key in ("real_minus_null", "real_minus_finetune_flops")]])
    return markdown_table(["experiment", "seed", "mixing", "prior weight", "w, last quarter of training",
                           "GSM8K: with thoughts − base", "CommonsenseQA: with thoughts − base",
                           "MATH: real − null thoughts", "MATH: real − plain fine-tune (equal FLOPs)"], rows)


def render_experiment(name: str, link: str, seeds: dict, pooled: dict) -> str:
    """The markdown of one experiment: over its seeds when it has two or more (``pooled``: :func:`pooled_change` by
    task), then per seed, every task and view (``seeds``: its :func:`seed_views`)."""
    parts = [f"#### {name}", ""]
    lines = [f"- {TASK_TITLES[task]}, {entry['seeds']} seeds: with thoughts − base = "
             f"{format_interval(entry['items'], 4)} (seeds' mean per item, interval over items; the target is "
             f"{entry['outcome']}); over seeds (Student t on the seeds' means "
             f"{', '.join(f'{value:+.4f}' for value in entry['across_seeds']['per_seed'])}): "
             f"{format_interval(entry['across_seeds'], 4)}." for task, entry in pooled.items() if entry]
    if lines:
        parts += ["Pooled over seeds:", "", *lines, ""]
    for seed, tasks in seeds.items():
        rows, targets = [], []
        for task, views in tasks.items():
            for view, label in VIEWS:
                if view not in views:
                    continue
                result, interval, change = views[view].result, views[view].interval, views[view].minus_before
                w = result.mixing_weight
                rows.append([TASK_TITLES.get(task, task), label, str(result.n), f"{result.score:.4f}",
                             f"[{interval['low']:.4f}, {interval['high']:.4f}]",
                             f"{format_interval(change, 4)} {verdict(change, lower_is_better=False)}" if change else "",
                             f"{w['mean']:.3f} ({w['q05']:.3f} … {w['q95']:.3f})" if w else "—"])
            targets.append(target_text(task, views))
        parts += [f"{seed} ([records]({link}/{name}/{seed})):", "",
                  markdown_table(["task", "model", "items", "score", "95 % interval", "− base model",
                                  "w mean (5 % … 95 %)"], rows), "", *[f"- {line}" for line in targets], ""]
    return "\n".join(parts).rstrip() + "\n"


def render_block(folder: str, link: str, results: dict | None = None) -> str:
    """The generated block: the experiments of ``folder`` side by side, then each in full (``link``: the folder
    relative to the page; ``results``: the pooled MATH bundles by name, for the comparison's MATH columns)."""
    names = experiments(folder)
    head = (f"Generated by `python scripts/results_tables.py` from the evaluation records in `{link}/` (paper "
            "protocol: the mean probability of the gold answer renormalised over the valid answer tokens, one thought "
            "per position; bootstrap 95 % intervals over items, and the paired change from the base model).")
    if not names:
        return head + "\n\nNo records yet.\n"
    views = {name: seed_views(os.path.join(folder, name)) for name in names}
    comparison = ("Side by side (the MATH columns: the experiment's pooled bundle of the same name, per seed, all "
                  "held-out tokens, nats per token, bootstrap 95 % intervals over documents; w: the training logs' "
                  "mean over the last quarter of the run):")
    pooled = {name: {task: pooled_change(task, seeds) for task in TASKS} for name, seeds in views.items()}
    points = w_change_points(views)
    figure = []
    if points:
        figure = ["How much each run loses against how much it thinks on the task (every experiment and seed; w: the "
                  "mean over the task's scored positions; switched-off runs hollow; dashed: the target):", "",
                  f"![with thoughts − base against w]({link}/{W_FIGURE})", ""]
        correlation = w_correlation_text(points)
        if correlation:
            figure += ["Over the runs whose thoughts are not switched off:", "", correlation, ""]
    return "\n".join([head, "", comparison, "", render_comparison(folder, views, pooled, results or {}), "",
                      *figure, *[render_experiment(name, link, views[name], pooled[name]) for name in names]])
