"""The before/after evaluations of the run report: GSM8K and CommonsenseQA, paper protocol, on the first items of
each, for the base model (``before``), the trained LM without thoughts, the trained model with the mixing weight
forced to 0 (its own text path inside the Quiet-STaR forward: the base model only when the text path was protected),
with null thoughts (filler) and with its own thoughts; each score with a bootstrap interval over items and, beside
the base model's, the paired change. The thinking views record the mixing weight w (mean and quantiles)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..evaluation import EvalInputs, EvalResult, EvalSettings, evaluate
from ..evaluation.data import load_task
from ..padding import ensure_pad_token
from .stats import paired_bootstrap

TASKS = ("gsm8k", "commonsense_qa")


@dataclass
class ViewEvaluation:
    """One view's result with its bootstrap 95 % interval over items (``paired_bootstrap``'s mean, low, high) and,
    for a view other than ``before`` when the base model was evaluated, the paired difference from it."""

    result: EvalResult
    interval: dict[str, float]
    minus_before: dict[str, float] | None = None


def with_item_intervals(results: dict[str, EvalResult], num_resamples: int, seed: int) -> dict[str, ViewEvaluation]:
    """``{view: result}`` of one task (the same items in every view) with their intervals over items."""
    scores = {view: np.array([item["score"] for item in result.items]) for view, result in results.items()}
    views = {}
    for view, result in results.items():
        items = np.arange(len(scores[view]))
        interval = paired_bootstrap(scores[view], items, num_resamples=num_resamples, seed=seed)
        change = (paired_bootstrap(scores[view] - scores["before"], items, num_resamples=num_resamples, seed=seed)
                  if view != "before" and "before" in scores else None)
        views[view] = ViewEvaluation(result, interval, change)
    return views


def run_evaluations(run_dir: str, trained, original_lm, original_tokenizer, items: dict[str, int], seed: int,
                    batch_size: int, device: str, num_resamples: int) -> dict[str, dict[str, ViewEvaluation]]:
    """``{task: {view: ViewEvaluation}}`` on the first ``items[task]`` items of each task (0: skipped); every
    result is written to ``run_dir/eval/<task>_<view>.json``. ``original_lm`` None: no ``before`` view."""
    evaluations = {}
    for task in TASKS:
        if items.get(task, 0) <= 0:
            continue
        rows, source = load_task(task, items[task])
        trained_view = (run_dir, trained, trained.base, trained.tokenizer)
        views = {"after_thoughts": (*trained_view, {}), "after_null": (*trained_view, {"thoughts": "null"}),
                 "after_w_zero": (*trained_view, {"zero_weight": True}),
                 "after_no_thoughts": (*trained_view, {"baseline": True})}
        if original_lm is not None:
            views["before"] = (original_lm.name_or_path, None, original_lm, original_tokenizer, {"baseline": True})
        results = {}
        for view, (name, model, lm, tokenizer, options) in views.items():
            ensure_pad_token(tokenizer)
            settings = EvalSettings(model=name, task=task, protocol="paper", limit=items[task], seed=seed,
                                    batch_size=batch_size, device=device,
                                    output=os.path.join(run_dir, "eval", f"{task}_{view}.json"), **options)
            results[view] = evaluate(settings, EvalInputs(rows, source, model, lm, tokenizer))
            print(f"{task} {view}: {results[view].score:.4f}")
        evaluations[task] = with_item_intervals(results, num_resamples, seed)
    return evaluations
