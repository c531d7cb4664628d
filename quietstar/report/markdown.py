"""``report.md``: what was run, the before/after tables, the training summary and the plots."""

from __future__ import annotations

import os

from .controls import CONTROL_TITLES, Control
from .stats import format_interval, verdict

TASK_TITLES = {"gsm8k": "GSM8K", "commonsense_qa": "CommonsenseQA"}
VIEWS = (("before", "base model, no thoughts"), ("after_no_thoughts", "trained, no thoughts"),
         ("after_w_zero", "trained, w = 0 (its text path)"), ("after_null", "trained, null thoughts (filler)"),
         ("after_thoughts", "trained, with thoughts"))
HELDOUT_VIEWS = {"base": "base model, no thoughts",
                 "finetune": "plain-LM fine-tune, equal steps, no thoughts",
                 "finetune_flops": "plain-LM fine-tune, equal FLOPs, no thoughts",
                 "null_trained": "trained with filler thoughts, scored with filler",
                 "no_thoughts": "trained, no thoughts",
                 "real": "trained, its own thoughts",
                 "other_document": "trained, another document's thought at the same position",
                 "causal_shuffle": "trained, its own thought from ≥ A + 1 positions earlier",
                 "null": "trained, null thoughts (filler)"}
DIFFERENCES = {
    "real_minus_other_document": ("real − other-document thoughts", "the thought says something about its own text"),
    "real_minus_causal_shuffle": ("real − causally shuffled thoughts",
                                  "the thought adds to what an earlier thought of the text says"),
    "real_minus_null": ("real − null thoughts", "only that filler is off-distribution for the mixing path"),
    "real_minus_finetune": ("real thoughts − plain fine-tune (equal steps)", "thinking beats training without it"),
    "real_minus_finetune_flops": ("real thoughts − plain fine-tune (equal FLOPs)",
                                  "thinking beats training without it on the same compute"),
    "real_minus_null_trained": ("real thoughts − filler-trained", "thinking beats the same recipe with filler"),
    "finetune_minus_base": ("plain fine-tune − base", "what plain fine-tuning alone does"),
    "no_thoughts_minus_base": ("trained without thoughts − base", "what training did to the LM"),
    "null_minus_base": ("null thoughts − base", "what the mixing path with filler does"),
}


def controls_text(controls: dict) -> str:
    """One paragraph on the trained controls: each given one (quietstar.report.controls.Control.describe), each
    missing one named as missing, and the equal-FLOPs factor."""
    given = [Control(**value).describe() for value in controls.get("given", {}).values()]
    missing = [CONTROL_TITLES[view] for view in controls.get("missing", [])]
    parts = [f"Trained controls: {'; '.join(given)}." if given else "No trained control was given."]
    if missing:
        parts.append(f"Missing, so not compared: {'; '.join(missing)}.")
    if "flops_factor" in controls:
        parts.append(f"One Quiet-STaR step costs {controls['flops_factor']:.4g} plain-LM steps of the same batch "
                     "(per text position: 1 + N·S gradient-pass positions, S = T + A + 1, plus a third of the "
                     "sampling pass's 1 + N·T; quietstar.training.compute).")
    return " ".join(parts)


def weights_text(weights: dict) -> str:
    """The mixing weight of the real view: mean and quantiles, or nothing when it was not recorded."""
    real = weights.get("real")
    if not real or not real.get("positions"):
        return ""
    return (f"Mixing weight w of the real thoughts over {real['positions']} positions: mean {real['mean']:.4f}; "
            f"quantiles 5/25/50/75/95 %: {real['q05']:.4f}, {real['q25']:.4f}, {real['q50']:.4f}, "
            f"{real['q75']:.4f}, {real['q95']:.4f}.")


def difference_rows(differences: dict) -> list[list]:
    """One table row per difference present: label, all tokens (interval, verdict), tokens left out, hardest 10 %
    (interval, verdict, the model that chose them), what a gain means."""
    rows = []
    for key, (label, meaning) in DIFFERENCES.items():
        if key not in differences:
            continue
        value = differences[key]
        hardest = value["hardest"]
        rows.append([label, f"{format_interval(value['all'])} {verdict(value['all'])}", value["excluded"],
                     f"{format_interval(hardest)} {verdict(hardest)}" if hardest else "—",
                     value["reference"] or "no model outside the pair", meaning])
    return rows


DIFFERENCE_HEADER = ["difference", "all tokens", "tokens left out", "hardest 10 %", "hardest chosen by",
                     "a gain means"]


def heldout_section(heldout: dict) -> list[str]:
    """The held-out table, the controls and the paired differences with their intervals and verdicts."""
    rows = [[label, f"{heldout['nll'][view]:.4f}", heldout["scored"][view]]
            for view, label in HELDOUT_VIEWS.items() if view in heldout["nll"]]
    parts = [f"Held-out text ({heldout['tokens']} tokens): mean NLL in nats per token over the tokens a view scores, "
             "lower is better. One thought per position.", "",
             markdown_table(["model", "NLL", "tokens scored"], rows), "", controls_text(heldout.get("controls", {})),
             ""]
    weights = weights_text(heldout.get("mixing_weight", {}))
    if weights:
        parts += [weights, ""]
    if heldout.get("differences"):
        parts += ["Paired differences (nats per token; below zero the first is better) over the tokens both views "
                  "score, with bootstrap 95 % intervals over documents; 'better' / 'worse': the interval excludes "
                  "zero. The hardest 10 % are chosen by a model outside the pair (never one of the two compared), so "
                  "regression to the mean favours neither.", "",
                  markdown_table(DIFFERENCE_HEADER, difference_rows(heldout["differences"])), ""]
    return parts


def _cell(value) -> str:
    """A table cell: text as given, None as a dash, floats to 4 significant digits; ``|`` escaped."""
    if value is None:
        text = "—"
    elif isinstance(value, float):
        text = f"{value:.4g}"
    else:
        text = str(value)
    return text.replace("|", "\\|")


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A markdown table of ``header`` and ``rows`` (cells as :func:`_cell` writes them); the one table writer of the
    run report and the model card."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


TRAINING_METRICS = ("loss", "base_nll", "mixed_nll_0", "thought_nll_loss", "reward_mean", "reward_std",
                    "positive_advantage_fraction", "tied_reward_fraction", "mixing_weight_mean",
                    "zero_mixing_weight_fraction", "mixing_head_live_units", "thought_entropy", "policy_loss",
                    "policy_weight",
                    # the mechanisms' own, where a run logs them
                    "entropy_loss", "own_gain_mean", "moved_gain_mean", "hindsight_reward_gain",
                    "hindsight_weight_mean", "hindsight_effective_fraction")


def training_quarters(entries: list[dict]) -> dict | None:
    """Means of the training metrics over the first and the last quarter of the training logs (entries with a
    ``loss``): ``{"logs", "first_steps", "last_steps", "first": {metric: mean}, "last": {...}}``; None without logs."""
    logs = [e for e in entries if "loss" in e]
    if not logs:
        return None
    names = [n for n in TRAINING_METRICS if n in logs[0]]
    window = max(1, len(logs) // 4)
    first, last = logs[:window], logs[-window:]
    mean = lambda part, n: sum(float(e[n]) for e in part) / len(part)  # noqa: E731
    return {"logs": len(logs), "first_steps": [first[0]["step"], first[-1]["step"]],
            "last_steps": [last[0]["step"], last[-1]["step"]], "first": {n: mean(first, n) for n in names},
            "last": {n: mean(last, n) for n in names}}


def _training_summary(entries: list[dict]) -> str:
    quarters = training_quarters(entries)
    if quarters is None:
        return "No training logs."
    rows = [[n, f"{quarters['first'][n]:.4f}", f"{quarters['last'][n]:.4f}"] for n in quarters["first"]]
    (a, b), (c, d) = quarters["first_steps"], quarters["last_steps"]
    return (f"Means over the first and last quarter of the {quarters['logs']} training logs "
            f"(steps {a}–{b} and {c}–{d}).\n\n" + markdown_table(["metric", "first quarter", "last quarter"], rows))


def training_precision(model: dict, training: dict) -> str:
    """How the run computed, from its run_config sections: ``bf16`` there is what ``auto`` resolved to at start."""
    if training.get("bf16"):
        return f"bf16 autocast over {model['dtype']} weights"
    if training.get("fp16"):
        return f"fp16 autocast over {model['dtype']} weights"
    return f"{model['dtype']} without autocast"


def render_report(name: str, run_config: dict, train_metrics: dict, evaluations: dict, heldout: dict | None,
                  entries: list[dict], plots: dict[str, str], folder: str, thoughts_page: str | None) -> str:
    """The markdown text of the report. ``evaluations``: {task: {view: ViewEvaluation}} (quietstar.report.evaluations);
    ``heldout``: the held-out results (:func:`heldout_section`); plot and page paths are made relative to ``folder``."""
    model = run_config["ModelArguments"]
    data = run_config["DataArguments"]
    thoughts = run_config["QuietStarConfig"]
    training = run_config["QuietStarTrainingArguments"]
    parts = [f"# Run report: {name}", ""]
    parts.append(
        f"Model `{model['model_name_or_path'] or 'random: ' + str(model['model_config'])}`, data `{data['dataset']}` "
        f"(windows of {data['max_length']} tokens), T = {thoughts['num_thought_tokens']} thought tokens, "
        f"A = {thoughts['num_lookahead_tokens']} lookahead, N = {thoughts['num_thoughts']} thoughts, "
        f"{training['max_steps']} steps of batch {training['per_device_train_batch_size']} x "
        f"{training['gradient_accumulation_steps']} accumulation, learning rate {training['learning_rate']}, "
        f"trained in {training_precision(model, training)}; the evaluations below run in float32."
    )
    if train_metrics:
        runtime = train_metrics.get("train_runtime")
        parts.append(f"Training took {runtime / 60:.1f} minutes." if runtime else "")
    parts += ["", "## Evaluation before and after", ""]
    if evaluations:
        rows = []
        for task, views in evaluations.items():
            for view, label in VIEWS:
                if view in views:
                    result, interval, change = views[view].result, views[view].interval, views[view].minus_before
                    w = result.mixing_weight
                    rows.append([TASK_TITLES.get(task, task), result.protocol, label, str(result.n),
                                 f"{result.score:.4f}", f"[{interval['low']:.4f}, {interval['high']:.4f}]",
                                 f"{format_interval(change, 4)} {verdict(change, lower_is_better=False)}"
                                 if change else "",
                                 f"{w['mean']:.3f} ({w['q05']:.3f} … {w['q95']:.3f})" if w else None])
        parts += ["Paper protocol: mean probability of the gold answer, renormalised over the valid answer tokens "
                  "(quietstar-eval, eval/run.py), one thought per position; bootstrap 95 % intervals over items, and "
                  "the paired change from the base model. w = 0 is the trained model's own text path (the base model "
                  "only when the text path was protected). w: the mixing weight over the scored positions, mean "
                  "(5 % … 95 % quantiles).", "",
                  markdown_table(["task", "protocol", "model", "items", "score", "95 % interval", "− base model",
                                  "w"], rows), ""]
    if heldout is not None:
        parts += heldout_section(heldout)
    parts += ["## Training", "", _training_summary(entries), ""]
    titles = {"nll": "Base vs mixed NLL", "rewards": "Reward and positive-advantage fraction",
              "mixing": "Mean mixing weight", "diagnostics": "Diagnostics",
              "difficulty": "Held-out NLL change by token difficulty"}
    for key, path in plots.items():
        parts += [f"### {titles.get(key, key)}", "", f"![{key}]({os.path.relpath(path, folder)})", ""]
    if thoughts_page:
        parts += ["## Thoughts", "", f"Sample text with the thought behind every token: "
                  f"[{os.path.relpath(thoughts_page, folder)}]({os.path.relpath(thoughts_page, folder)}).", ""]
    return "\n".join(parts)
