"""``report.md``: what was run, the before/after tables, the training summary and the plots."""

from __future__ import annotations

import os

from .stats import format_interval, verdict

TASK_TITLES = {"gsm8k": "GSM8K", "commonsense_qa": "CommonsenseQA"}
VIEWS = (("before", "base model, no thoughts"), ("after_no_thoughts", "trained, no thoughts"),
         ("after_thoughts", "trained, with thoughts"))
HELDOUT_VIEWS = (("base", "base model, no thoughts"), ("control", "equal-compute control, no thoughts"),
                 ("no_thoughts", "trained, no thoughts"), ("real", "trained, with its own thoughts"),
                 ("null", "trained, null thoughts (filler)"), ("shuffled", "trained, thoughts of other positions"))
DIFFERENCES = (("real_minus_null", "real − null thoughts", "thoughts carry information beyond the mixing path"),
               ("real_minus_shuffled", "real − shuffled thoughts", "thoughts carry information about their position"),
               ("real_minus_control", "real thoughts − equal-compute control", "thinking beats training without"),
               ("no_thoughts_minus_base", "trained without thoughts − base", "training did not hurt the LM"),
               ("null_minus_base", "null thoughts − base", "what the mixing path alone does"))


def heldout_section(heldout: dict) -> list[str]:
    """The held-out table and the paired differences with their intervals and verdicts."""
    rows = [[label, f"{heldout['mean'][view]:.4f}", f"{heldout['hardest_mean'][view]:.4f}"]
            for view, label in HELDOUT_VIEWS if view in heldout["mean"]]
    parts = [f"Held-out text ({heldout['tokens']} tokens; hardest 10 % = the {heldout['hardest_tokens']} tokens the "
             "base model finds hardest): mean NLL in nats per token, lower is better. One thought per position.", "",
             markdown_table(["model", "NLL, all tokens", "NLL, hardest 10 %"], rows), ""]
    differences = heldout.get("differences", {})
    if differences:
        rows = []
        for key, label, meaning in DIFFERENCES:
            if f"{key}_all" in differences:
                overall, hardest = differences[f"{key}_all"], differences[f"{key}_hardest"]
                rows.append([label, format_interval(overall), verdict(overall), format_interval(hardest),
                             verdict(hardest), meaning])
        control = heldout.get("control")
        parts += ["Paired differences (nats per token; below zero the first is better), with bootstrap 95 % "
                  "intervals over documents. 'better' / 'worse': the interval excludes zero."
                  + (f" Equal-compute control: {control}." if control else " No equal-compute control was given."),
                  "", markdown_table(["difference", "all tokens", "verdict", "hardest 10 %", "verdict", "a gain means"],
                                     rows), ""]
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


def _training_summary(entries: list[dict]) -> str:
    logs = [e for e in entries if "loss" in e]
    if not logs:
        return "No training logs."
    names = [n for n in ("loss", "base_nll", "mixed_nll_0", "thought_nll_loss", "reward_mean", "reward_std",
                         "positive_advantage_fraction", "tied_reward_fraction", "mixing_weight_mean",
                         "zero_mixing_weight_fraction", "mixing_head_live_units", "thought_entropy", "policy_loss",
                         "policy_weight") if n in logs[0]]
    window = max(1, len(logs) // 4)
    first, last = logs[:window], logs[-window:]
    mean = lambda part, n: sum(float(e[n]) for e in part) / len(part)  # noqa: E731
    rows = [[n, f"{mean(first, n):.4f}", f"{mean(last, n):.4f}"] for n in names]
    return (f"Means over the first and last quarter of the {len(logs)} training logs "
            f"(steps {first[0]['step']}–{first[-1]['step']} and {last[0]['step']}–{last[-1]['step']}).\n\n"
            + markdown_table(["metric", "first quarter", "last quarter"], rows))


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
    ``heldout``: quietstar.report.heldout.summarize output; plot and page paths are made relative to ``folder``."""
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
                    rows.append([TASK_TITLES.get(task, task), result.protocol, label, str(result.n),
                                 f"{result.score:.4f}", f"[{interval['low']:.4f}, {interval['high']:.4f}]",
                                 f"{format_interval(change, 4)} {verdict(change, lower_is_better=False)}" if change else ""])
        parts += ["Paper protocol: mean probability of the gold answer, renormalised over the valid answer tokens "
                  "(quietstar-eval, eval/run.py), one thought per position; bootstrap 95 % intervals over items, and "
                  "the paired change from the base model.", "",
                  markdown_table(["task", "protocol", "model", "items", "score", "95 % interval", "− base model"],
                                 rows), ""]
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
