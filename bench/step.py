#!/usr/bin/env python
"""Seconds, peak memory and efficiency of one Quiet-STaR training step: ours vs the official dense scheme.

Model: a random Llama (hidden 256, 4 layers, 4 attention heads, 2 key/value heads (grouped-query
attention), intermediate 688, vocabulary 1024), fp32, on CPU with ``torch.set_num_threads(2)``
(``--threads``). Quiet-STaR: A = 4 lookahead tokens, N = 2 thoughts (flags), T and L vary; every
other setting is the QuietStarConfig default. Batch 1 (``--batch``) of random tokens, no padding.

Implementations, each timed over a full training step (forward + backward + AdamW step; the
median of ``--steps`` quiet steps after one warm-up step, see ``run_cell`` on other processes):

* ``ours``:  ``QuietStarForCausalLM.forward`` (no-grad sampling phase, then one expanded gradient
  pass through the quietstar attention), ``output_logits=False`` as in training;
* ``dense``: the official execution scheme (``quietstar/official_dense.py``): K = T + A + 2
  sequential passes over B*N rows with a growing KV cache and a growing dense mask, thoughts drawn
  inside the passes, transformers' ``sdpa`` attention (``--dense-attention``);
* ``plain``: the denominator of the efficiency, below.

Efficiency (docs/design.md §7) = seconds of a plain causal-LM training step over the same number of token
positions / seconds of one Quiet-STaR step. A Quiet-STaR step processes L * (1 + N*S) token
positions per row (S = T + A + 1: the text plus N branches of S tokens at each of the L
positions), so the plain step is an ordinary training step of the same model (transformers' sdpa
attention, labels = inputs) over B * (1 + N*S) rows of L random tokens. Ideal is about 1.

Peak memory: every (implementation, L, T) cell runs in a fresh subprocess. Just before the step loop
(model, optimizer and batch built) the child resets the kernel's peak-RSS counter (VmHWM, by writing
"5" to /proc/self/clear_refs) and notes its RSS; peak = VmHWM after the loop minus that RSS. This
is the memory the steps add (activations, gradients, AdamW state), and unlike ru_maxrss it cannot be
masked by a larger transient peak while the model was built. Where clear_refs is not writable the
child falls back to ru_maxrss minus the RSS before the loop, and says so in the results.

Guards: a cell whose predicted peak (``estimate_peak_bytes``) exceeds ``--memory-limit-gb`` is not
run ("oom-risk"); a running cell is killed when its RSS passes that limit ("oom-risk") or when its
warm-up step does not end within ``--time-budget`` seconds ("timeout"). Otherwise the child takes
only the timed steps that fit the budget (the warm-up step is the measurement when none fits, and
the results say so). A cell that failed is not retried at a larger size: every cell of the same
implementation with L and T both no smaller is marked the same way without running.

Usage:
    .venv/bin/python bench/step.py --impl both --out bench_results/results.json --plot bench_results/step.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

# Siblings in bench/, which `python bench/step.py` puts first on the import path.
from cells import MODEL, MODEL_DESCRIPTION, STEP_DEFAULTS, Cell, branch_length, build_step, positions_per_row
from machine_load import current_rss_bytes, machine_busy_cores, peak_rss_bytes, reset_peak_rss, rss_of, timed

PROCESS_START = time.monotonic()  # a child's time budget counts from here; torch is imported in build_step

MIB = 2**20
POLL_SECONDS = 0.1
ESTIMATE_SLACK = 1.5
DEFAULT_PLOT = Path("bench_results/step.png")


# ------------------------------------------------------------------------------------ memory estimate
def estimate_peak_bytes(args, impl: str, length: int, thought_tokens: int) -> int:
    """A rough prediction of a cell's peak memory (bytes), only to skip cells that cannot fit.

    Counts the dominant fp32 tensors kept for the backward: per token and layer about 8 D + 4 I
    activations of a Llama block, 4 copies of every scored logit row (logits, masked copy, log-softmax,
    gradient), and the attention-specific terms of each implementation (see the comments). These
    terms undercount the measured peaks of small cells (L <= 256) by 25-50 % (transients, allocator),
    hence ``ESTIMATE_SLACK``.
    """
    B, N, A = args.batch, args.num_thoughts, args.lookahead_tokens
    L, T, S = length, thought_tokens, branch_length(args, thought_tokens)
    D, I, V = MODEL["hidden_size"], MODEL["intermediate_size"], MODEL["vocab_size"]
    layers, H = MODEL["num_hidden_layers"], MODEL["num_attention_heads"]
    d = D // H
    per_token_layer = 8 * D + 4 * I
    floats = 0
    if impl == "plain":
        tokens = B * (1 + N * S) * L
        floats = tokens * (layers * per_token_layer + 4 * V)
    elif impl == "ours":
        tokens = B * L * (1 + N * S)
        scored = B * L * (1 + N * (T + A))
        # Scores of text-to-text and branch-to-(prefix + own branch): softmax output and mask saved per
        # layer, about 4 more copies alive while one layer's attention runs.
        scores = B * H * (L * L + N * L * S * (L + S))
        floats = tokens * layers * per_token_layer + 4 * scored * V + scores * (layers * 1.25 + 4)
    elif impl == "dense":
        rows = B * N
        passes = S + 1
        key_lengths = L * passes * (passes + 1) // 2  # sum over passes k of L * (k + 1)
        tokens = rows * L * passes
        scored = rows * L * (1 + T) + B * N * L * A
        floats = tokens * layers * per_token_layer + 4 * scored * V
        floats += rows * L * key_lengths  # the growing mask of every pass, kept by its attention call
        floats += layers * 2 * rows * H * d * key_lengths  # the (head-repeated) K/V of every pass
        if args.dense_attention == "eager":
            floats += layers * rows * H * L * key_lengths * 2  # attention probabilities, and their scores
    return int(floats * 4 * ESTIMATE_SLACK)


# ------------------------------------------------------------------------------------ the child side
def run_cell(args, cell: Cell) -> Cell:
    """Measure one cell in this process (a fresh subprocess): a warm-up step, then timed steps.

    Other processes on the machine slow a step down, so a timed step counts as quiet only when they
    used less than ``--max-foreign-load`` cores meanwhile; steps are taken until ``--steps`` quiet
    ones are in, at most 3 x ``--steps`` in all, within the time budget. The time is the median of
    the quiet steps, or of all steps (noted as contended) when none was quiet. When not even one
    timed step fits the budget after the warm-up, the warm-up step is the measurement (noted).
    """
    step = build_step(args, cell)
    reset_worked = reset_peak_rss()
    rss_before = current_rss_bytes()
    cell.memory_method = "VmHWM after clear_refs" if reset_worked else "ru_maxrss (peak could not be reset)"

    cell.warmup_seconds, warmup_foreign_cores = timed(step)
    while cell.quiet_steps < args.steps and len(cell.step_seconds) < 3 * args.steps:
        last = cell.step_seconds[-1] if cell.step_seconds else cell.warmup_seconds
        if time.monotonic() - PROCESS_START + last > args.time_budget:
            cell.note = f"time budget: {len(cell.step_seconds)} steps timed"
            break
        seconds, foreign = timed(step)
        cell.step_seconds.append(seconds)
        cell.foreign_cores.append(foreign)
        cell.quiet_steps += foreign < args.max_foreign_load
    cell.peak_bytes = peak_rss_bytes(reset_worked) - rss_before
    if not cell.step_seconds:
        cell.step_seconds, cell.foreign_cores = [cell.warmup_seconds], [warmup_foreign_cores]
        cell.quiet_steps = int(warmup_foreign_cores < args.max_foreign_load)
        cell.note = "time budget: only the warm-up step was timed"
    quiet = [t for t, f in zip(cell.step_seconds, cell.foreign_cores) if f < args.max_foreign_load]
    if cell.foreign_cores and not quiet:
        cell.note = (cell.note + "; " if cell.note else "") + (
            f"contended: other processes used {statistics.median(cell.foreign_cores):.2f} cores")
    cell.seconds = statistics.median(quiet or cell.step_seconds)
    cell.status = "ok"
    return cell


# ----------------------------------------------------------------------------------- the parent side


def wait_for_quiet(args) -> None:
    """Wait (at most ``--quiet-wait`` seconds) until other processes leave the CPUs to the benchmark."""
    deadline = time.monotonic() + args.quiet_wait
    busy = machine_busy_cores()
    if busy >= args.max_foreign_load:
        print(f"    waiting for other processes to finish ({busy:.2f} cores busy)", flush=True)
    while busy >= args.max_foreign_load and time.monotonic() < deadline:
        busy = machine_busy_cores(2.0)


def launch_cell(args, cell: Cell) -> Cell:
    """Run ``cell`` in a fresh subprocess, killing it past the time budget or the memory limit."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(asdict(cell)),
               *sys.argv[1:]]
    memory_limit = args.memory_limit_gb * 2**30
    deadline = time.monotonic() + args.time_budget + 10  # the child stops itself first when it can
    with tempfile.TemporaryFile("w+") as stdout_file, tempfile.TemporaryFile("w+") as stderr_file:
        child = subprocess.Popen(command, stdout=stdout_file, stderr=stderr_file, stdin=subprocess.DEVNULL)
        peak_seen = 0
        killed_for = None
        while child.poll() is None:
            peak_seen = max(peak_seen, rss_of(child.pid))
            if peak_seen > memory_limit:
                killed_for = "oom-risk"
            elif time.monotonic() > deadline:
                killed_for = "timeout"
            if killed_for:
                child.kill()
                break
            time.sleep(POLL_SECONDS)
        child.wait()
        stdout_file.seek(0)
        stderr_file.seek(0)
        stdout, stderr = stdout_file.read(), stderr_file.read()
    if killed_for == "oom-risk":
        cell.status, cell.note = "oom-risk", f"killed at {peak_seen / 2**30:.1f} GiB RSS"
    elif killed_for == "timeout":
        cell.status, cell.note = "timeout", f"killed after {args.time_budget:.0f} s"
    elif child.returncode != 0 or not stdout.strip():
        cell.status, cell.note = "error", (stderr.strip().splitlines() or ["no output"])[-1][:200]
    else:
        cell = Cell(**json.loads(stdout.strip().splitlines()[-1]))
    return cell


def dominated_by_failure(cell: Cell, failures: list[Cell]) -> Cell | None:
    """A failed cell of the same implementation that is no larger in both L and T, if any."""
    for failed in failures:
        if (failed.impl == cell.impl and failed.length <= cell.length
                and failed.thought_tokens <= cell.thought_tokens):
            return failed
    return None


def efficiency(cells: dict, impl: str, length: int, thought_tokens: int) -> float | None:
    plain, measured = cells.get(("plain", length, thought_tokens)), cells.get((impl, length, thought_tokens))
    if plain is None or measured is None or plain.status != "ok" or measured.status != "ok":
        return None
    return plain.seconds / measured.seconds


def describe(cell: Cell, cells: dict) -> str:
    head = f"{cell.impl:5s} L={cell.length:4d} T={cell.thought_tokens:3d}"
    if cell.status != "ok":
        return f"{head}: {cell.status} ({cell.note})"
    text = (f"{head}: {cell.seconds:8.3f} s/step ({cell.quiet_steps} quiet of {len(cell.step_seconds)} timed), "
            f"peak {cell.peak_bytes / MIB:8.1f} MiB")
    eff = efficiency(cells, cell.impl, cell.length, cell.thought_tokens) if cell.impl != "plain" else None
    text += f", efficiency {eff:.2f}" if eff is not None else ""
    return text + (f" [{cell.note}]" if cell.note else "")


# ------------------------------------------------------------------------------------------ reporting
def header(args) -> str:
    return (f"Quiet-STaR training step (forward + backward + AdamW), {MODEL_DESCRIPTION}, "
            f"{args.threads} threads, batch {args.batch}, A = {args.lookahead_tokens}, N = {args.num_thoughts}; "
            f"seconds = median of {args.steps} quiet steps after 1 warm-up; peak = peak RSS added by the steps "
            f"(fresh process per cell).\nEfficiency = plain step / Quiet-STaR step, where the plain step is an "
            f"ordinary causal-LM training step (sdpa attention) over B*(1 + N*S) rows of L tokens, i.e. the same "
            f"L*(1 + N*S) token positions per row, S = T + A + 1. Dense = the official scheme "
            f"(quietstar/official_dense.py, {args.dense_attention} attention).")


def fmt(value, spec: str, cell: Cell | None = None) -> str:
    if cell is not None and cell.status != "ok":
        return cell.status
    return "-" if value is None else format(value, spec)


def fmt_seconds(cell: Cell | None) -> str:
    """Seconds per step; a * marks a time taken while other processes were using the CPUs."""
    if cell is None:
        return "-"
    contended = cell.status == "ok" and "contended" in cell.note
    return fmt(cell.seconds, ".3f", cell) + ("*" if contended else "")


def implementation_table(args, cells: dict, impl: str) -> list[str]:
    lines = [f"### {impl}", "",
             "| L | T | positions/row L(1+NS) | plain s/step | s/step | efficiency | peak MiB |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for length in args.lengths:
        for T in args.thought_tokens:
            cell, plain = cells.get((impl, length, T)), cells.get(("plain", length, T))
            if cell is None:
                continue
            lines.append(
                f"| {length} | {T} | {positions_per_row(args, length, T)} "
                f"| {fmt_seconds(plain)} | {fmt_seconds(cell)} "
                f"| {fmt(efficiency(cells, impl, length, T), '.2f', cell)} "
                f"| {fmt(cell.peak_bytes and cell.peak_bytes / MIB, '.0f', cell)} |")
    return lines


def comparison_table(args, cells: dict) -> list[str]:
    lines = ["### ours vs dense", "",
             "| L | T | ours s/step | dense s/step | dense/ours time | ours peak MiB | dense peak MiB "
             "| dense/ours memory |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for length in args.lengths:
        for T in args.thought_tokens:
            ours, dense = cells.get(("ours", length, T)), cells.get(("dense", length, T))
            if ours is None or dense is None:
                continue
            both = ours.status == "ok" and dense.status == "ok"
            time_ratio = dense.seconds / ours.seconds if both else None
            memory_ratio = dense.peak_bytes / ours.peak_bytes if both else None
            lines.append(
                f"| {length} | {T} | {fmt_seconds(ours)} | {fmt_seconds(dense)} "
                f"| {fmt(time_ratio, '.1f')} | {fmt(ours.peak_bytes and ours.peak_bytes / MIB, '.0f', ours)} "
                f"| {fmt(dense.peak_bytes and dense.peak_bytes / MIB, '.0f', dense)} | {fmt(memory_ratio, '.1f')} |")
    return lines


def linearity_lines(args, cells: dict, impl: str) -> list[str]:
    """Least-squares line through peak memory vs T at each L, and the largest deviation from it."""
    lines = []
    for length in args.lengths:
        points = [(T, cells[(impl, length, T)].peak_bytes / MIB) for T in args.thought_tokens
                  if (impl, length, T) in cells and cells[(impl, length, T)].status == "ok"]
        if len(points) < 3:
            continue
        mean_t = statistics.fmean(t for t, _ in points)
        mean_m = statistics.fmean(m for _, m in points)
        slope = (sum((t - mean_t) * (m - mean_m) for t, m in points)
                 / sum((t - mean_t) ** 2 for t, _ in points))
        intercept = mean_m - slope * mean_t
        deviation = max(abs(m - (intercept + slope * t)) / m for t, m in points)
        lines.append(f"- {impl}, L = {length}: peak ≈ {intercept:.0f} + {slope:.1f}·T MiB, "
                     f"largest deviation from the line {100 * deviation:.1f} %")
    return lines


def markdown_report(args, cells: dict) -> str:
    lines = [header(args).replace("\n", "\n\n"), "",
             "A * marks a time taken while other processes used the CPUs (no quiet step could be had).", ""]
    for impl in ("ours", "dense"):
        if impl in args.impls:
            lines += implementation_table(args, cells, impl) + [""]
    if {"ours", "dense"} <= set(args.impls):
        lines += comparison_table(args, cells) + [""]
    linearity = [line for impl in ("ours", "dense") if impl in args.impls
                 for line in linearity_lines(args, cells, impl)]
    if linearity:
        lines += ["### peak memory vs T", ""] + linearity + [""]
    return "\n".join(lines)


def plot(args, cells: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {"ours": dict(linestyle="-", marker="o"), "dense": dict(linestyle="--", marker="s")}
    for index, length in enumerate(args.lengths):
        for impl in [i for i in ("ours", "dense") if i in args.impls]:
            points = [cells[(impl, length, T)] for T in args.thought_tokens
                      if (impl, length, T) in cells and cells[(impl, length, T)].status == "ok"]
            if not points:
                continue
            ts = [c.thought_tokens for c in points]
            style = dict(color=colors[index % len(colors)], label=f"{impl} L={length}", **styles[impl])
            time_axis.plot(ts, [c.seconds for c in points], **style)
            memory_axis.plot(ts, [c.peak_bytes / MIB for c in points], **style)
    time_axis.set_yscale("log")  # times span two decades; memory is drawn linear so linear growth in T shows
    for axis, label in ((time_axis, "seconds per training step (log)"), (memory_axis, "peak memory added (MiB)")):
        axis.set_xlabel("thought tokens T")
        axis.set_ylabel(label)
        axis.set_xticks(args.thought_tokens)
        axis.grid(True, which="both", alpha=0.3)
    time_axis.legend(fontsize=7, ncol=2)
    figure.suptitle(f"Quiet-STaR step, ours (solid) vs official dense scheme (dashed); {MODEL_DESCRIPTION}",
                    fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512], help="text lengths L")
    parser.add_argument("--thought-tokens", type=int, nargs="+", default=[4, 9, 16], help="thought lengths T")
    parser.add_argument("--impl", choices=["ours", "dense", "both"], default="both")
    parser.add_argument("--steps", type=int, default=3, help="quiet timed steps per cell, after one warm-up step")
    parser.add_argument("--max-foreign-load", type=float, default=0.25,
                        help="a timed step is quiet when other processes used fewer CPU cores than this meanwhile")
    parser.add_argument("--quiet-wait", type=float, default=300.0,
                        help="before each cell, wait up to this many seconds for other processes to leave the CPUs")
    parser.add_argument("--batch", type=int, default=STEP_DEFAULTS["batch"], help="text rows per step (B)")
    parser.add_argument("--lookahead-tokens", type=int, default=STEP_DEFAULTS["lookahead_tokens"], help="A")
    parser.add_argument("--num-thoughts", type=int, default=STEP_DEFAULTS["num_thoughts"], help="N")
    parser.add_argument("--threads", type=int, default=STEP_DEFAULTS["threads"], help="torch.set_num_threads")
    parser.add_argument("--dense-attention", choices=["sdpa", "eager"], default=STEP_DEFAULTS["dense_attention"],
                        help="transformers attention of the dense scheme (the official code ran sdpa)")
    parser.add_argument("--time-budget", type=float, default=120.0, help="seconds per cell, model build included")
    parser.add_argument("--memory-limit-gb", type=float, default=16.0,
                        help="skip a cell whose steps are predicted to add more than this many GiB, kill one whose "
                        "process RSS passes it (oom-risk)")
    parser.add_argument("--seed", type=int, default=STEP_DEFAULTS["seed"])
    parser.add_argument("--out", type=Path, help="results JSON; a Markdown table goes next to it (.md)")
    parser.add_argument("--plot", nargs="?", const="", metavar="PNG",
                        help="plot seconds and peak memory vs T, ours vs dense; without a path, next to --out "
                        f"(or {DEFAULT_PLOT})")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: measure this cell (JSON) and print it
    args = parser.parse_args(argv)
    args.impls = ["ours", "dense"] if args.impl == "both" else [args.impl]
    if args.plot == "":
        args.plot = args.out.with_suffix(".png") if args.out else DEFAULT_PLOT
    elif args.plot is not None:
        args.plot = Path(args.plot)
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        cell = run_cell(args, Cell(**json.loads(args.child)))
        print(json.dumps(asdict(cell)))
        return

    print(header(args), flush=True)
    plan = [Cell(impl, length, T) for length in args.lengths for T in args.thought_tokens
            for impl in ["plain", *args.impls]]
    cells: dict = {}
    failures: list[Cell] = []
    for number, cell in enumerate(plan, 1):
        cell.predicted_peak_bytes = estimate_peak_bytes(args, cell.impl, cell.length, cell.thought_tokens)
        failed = dominated_by_failure(cell, failures)
        if failed is not None:
            cell.status = failed.status
            cell.note = f"not run: L={failed.length} T={failed.thought_tokens} was {failed.status}"
        elif cell.predicted_peak_bytes > args.memory_limit_gb * 2**30:
            cell.status = "oom-risk"
            cell.note = f"not run: predicted {cell.predicted_peak_bytes / 2**30:.1f} GiB"
        else:
            wait_for_quiet(args)
            cell = launch_cell(args, cell)
        if cell.status in ("timeout", "oom-risk"):
            failures.append(cell)
        cells[cell.key] = cell
        print(f"[{number:2d}/{len(plan)}] {describe(cell, cells)}", flush=True)

    report = markdown_report(args, cells)
    print("\n" + report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"}
        settings["model"] = MODEL
        args.out.write_text(json.dumps({"settings": settings, "header": header(args),
                                        "cells": [asdict(c) for c in cells.values()]}, indent=2))
        args.out.with_suffix(".md").write_text(report + "\n")
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(args, cells, args.plot)


if __name__ == "__main__":
    main()
