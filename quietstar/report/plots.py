"""PNG plots of a run: training curves from ``metrics.jsonl`` and the NLL change by token difficulty."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed
import matplotlib.pyplot as plt  # noqa: E402

from .markdown import DIFFERENCES  # noqa: E402


def training_series(entries: list[dict], name: str) -> tuple[list[int], list[float]]:
    """(steps, values) of metric ``name`` over the training logs (entries with a ``loss``)."""
    points = [(e["step"], float(e[name])) for e in entries if "loss" in e and name in e]
    return [p[0] for p in points], [p[1] for p in points]


def moving_average(values: list[float], window: int) -> list[float]:
    """Mean of each value and up to ``window - 1`` values before it."""
    return [sum(values[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def _smoothed(axis, steps, values, color, label=None):
    """The logged values, faint, and their moving average over ~1/10 of the logs (small batches are noisy)."""
    window = max(1, len(values) // 10)
    axis.plot(steps, values, color=color, alpha=0.25 if window > 1 else 1.0, linewidth=1)
    axis.plot(steps, moving_average(values, window), color=color, label=label)


def _save(figure, path: str) -> str:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_nll(entries: list[dict], path: str) -> str:
    """Base NLL and mixed NLL (one line per lookahead step) over training steps."""
    figure, axis = plt.subplots(figsize=(6.5, 4))
    _smoothed(axis, *training_series(entries, "base_nll"), label="base, token j+1 (no thought)", color="black")
    step = 0
    while any(f"mixed_nll_{step}" in e for e in entries):
        _smoothed(axis, *training_series(entries, f"mixed_nll_{step}"), label=f"mixed, token j+{step + 1}",
                  color=f"C{step}")
        step += 1
    axis.set(xlabel="optimizer step", ylabel="NLL (nats/token)", title="Training NLL: base vs after thoughts")
    axis.legend()
    return _save(figure, path)


def plot_rewards(entries: list[dict], path: str) -> str:
    """Mean reward and the fraction of thoughts with a positive advantage over training steps."""
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(6.5, 5), sharex=True)
    _smoothed(top, *training_series(entries, "reward_mean"), color="tab:green")
    top.set(ylabel="mean reward", title="REINFORCE signal")
    _smoothed(bottom, *training_series(entries, "positive_advantage_fraction"), color="tab:purple")
    bottom.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    bottom.set(xlabel="optimizer step", ylabel="positive-advantage fraction")
    return _save(figure, path)


def plot_mixing(entries: list[dict], path: str) -> str:
    """Mean mixing weight (the weight on the thought-conditioned prediction) over training steps."""
    figure, axis = plt.subplots(figsize=(6.5, 3.5))
    _smoothed(axis, *training_series(entries, "mixing_weight_mean"), color="tab:blue")
    axis.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
    axis.set(xlabel="optimizer step", ylabel="mean mixing weight", title="How much the model trusts its thoughts")
    return _save(figure, path)


def plot_diagnostics(entries: list[dict], path: str) -> str:
    """Gradient norms per parameter group and per loss term, thought entropy, zero-weight and tied-reward fractions,
    and live mixing-head units over training steps: what tells a healthy run from a dead mixing path."""
    figure, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    names = sorted({k for e in entries if "loss" in e for k in e if k.startswith("grad_norm/")})
    for i, name in enumerate(names):
        steps, values = training_series(entries, name)
        _smoothed(axes[0, 0], steps, values, color=f"C{i}", label=name.removeprefix("grad_norm/"))
    axes[0, 0].set(yscale="log", ylabel="gradient norm", title="Gradient norm per group and per loss term")
    if names:
        axes[0, 0].legend(fontsize=7)
    _smoothed(axes[0, 1], *training_series(entries, "thought_entropy"), color="tab:orange")
    axes[0, 1].set(ylabel="nats", title="Entropy of the thought-token distribution")
    for i, (name, label) in enumerate((("zero_mixing_weight_fraction", "w exactly 0"),
                                       ("tied_reward_fraction", "rewards tied"))):
        _smoothed(axes[1, 0], *training_series(entries, name), color=f"C{i + 3}", label=label)
    axes[1, 0].set(xlabel="optimizer step", ylabel="fraction of positions", ylim=(-0.05, 1.05),
                   title="Dead-path indicators")
    axes[1, 0].legend(fontsize=7)
    _smoothed(axes[1, 1], *training_series(entries, "mixing_head_live_units"), color="tab:green")
    axes[1, 1].set(xlabel="optimizer step", ylabel="fraction", ylim=(-0.05, 1.05), title="Live mixing-head units")
    return _save(figure, path)


def plot_difficulty(binned: dict, path: str) -> str:
    """Mean NLL difference of each comparison per difficulty bin (the paper's figure, heldout.binned_change): the
    tokens are binned by a model outside each compared pair, so regression to the mean moves no line. Below zero the
    first view is better."""
    figure, axis = plt.subplots(figsize=(6.5, 4))
    references = sorted({value["reference"] for value in binned.values()})
    for name, value in binned.items():
        label = DIFFERENCES.get(name, (name,))[0]
        axis.plot(value["bin_mean_nll"], value["change"], marker="o",
                  label=label if len(references) == 1 else f"{label} (bins: {value['reference']})")
    axis.axhline(0.0, color="grey", linewidth=0.8)
    axis.set(xlabel=f"NLL of the token under {' / '.join(references)} (bin mean; easy → hard)",
             ylabel="NLL difference (nats)", title="Held-out NLL differences by token difficulty")
    axis.legend(fontsize=7)
    return _save(figure, path)


def plot_all(entries: list[dict], binned: dict | None, folder: str) -> dict[str, str]:
    """Every plot the report shows, as {name: path} under ``folder``."""
    plots = {}
    if any("loss" in e for e in entries):
        plots["nll"] = plot_nll(entries, os.path.join(folder, "nll.png"))
        plots["rewards"] = plot_rewards(entries, os.path.join(folder, "rewards.png"))
        plots["mixing"] = plot_mixing(entries, os.path.join(folder, "mixing_weight.png"))
        if any("thought_entropy" in e for e in entries):
            plots["diagnostics"] = plot_diagnostics(entries, os.path.join(folder, "diagnostics.png"))
    if binned:
        plots["difficulty"] = plot_difficulty(binned, os.path.join(folder, "nll_by_difficulty.png"))
    return plots


def plot_multihop_arms(rows: list[tuple[str, dict[str, dict]]], title: str, path: str) -> str:
    """A forest plot: per arm (``rows``: ``[(arm, {difference: {"mean", "low", "high"}})]``, top to bottom) each
    difference as a point with its interval, against a zero line (quietstar.report.multihop_table.forest_rows)."""
    labels = list(rows[0][1]) if rows else []
    figure, axis = plt.subplots(figsize=(7, 1.2 + 0.55 * len(rows) * max(1, len(labels))))
    spacing = 1.0 / (len(labels) + 1)
    for number, label in enumerate(labels):
        offset = 0.5 - (number + 1) * spacing  # the first difference on top
        ys = [len(rows) - 1 - row + offset for row in range(len(rows))]
        means = [r[1][label]["mean"] for r in rows]
        errors = [[m - r[1][label]["low"] for m, r in zip(means, rows)],
                  [r[1][label]["high"] - m for m, r in zip(means, rows)]]
        axis.errorbar(means, ys, xerr=errors, fmt="o", color=f"C{number}", capsize=3, label=label)
    axis.axvline(0.0, color="grey", linewidth=0.8, linestyle="--")
    axis.set_yticks(range(len(rows)), [r[0] for r in reversed(rows)])
    axis.set(xlabel="difference of the answer's log p (nats), 95 % interval over documents", title=title)
    axis.legend(loc="best", fontsize="small")
    return _save(figure, path)


def plot_offdomain_w(points: list[dict], targets: dict[str, float], titles: dict[str, str], path: str) -> str:
    """One panel per task of ``targets``: each run's (with thoughts − base) with its interval against its mean w on
    the task (``points``: quietstar.report.offdomain_table.w_change_points), one colour per experiment, hollow where the
    thoughts are switched off; a solid line at 0 and a dashed one at the task's target."""
    names = sorted({p["experiment"] for p in points})
    figure, axes = plt.subplots(1, len(targets), figsize=(5.5 * len(targets), 4.2), squeeze=False)
    for axis, (task, target) in zip(axes[0], targets.items()):
        for number, name in enumerate(names):
            chosen = [p for p in points if p["task"] == task and p["experiment"] == name]
            for point in chosen:
                change = point["change"]
                axis.errorbar([point["w"]], [change["mean"]], yerr=[[change["mean"] - change["low"]],
                                                                   [change["high"] - change["mean"]]],
                              fmt="o", color=f"C{number}", capsize=3,
                              markerfacecolor="none" if point["switched_off"] else f"C{number}",
                              label=name if point is chosen[0] else None)
        axis.axhline(0.0, color="grey", linewidth=0.8)
        axis.axhline(target, color="red", linewidth=0.8, linestyle="--")
        axis.set(xlabel="mean mixing weight w on the task", ylabel="with thoughts − base (p of the gold answer)",
                 title=titles.get(task, task))
    axes[0][0].legend(loc="lower left", fontsize="small")
    return _save(figure, path)
