#!/usr/bin/env python
"""Efficiency (docs/design.md §7) measured in pairs: a plain step and a Quiet-STaR step taken back to back, many times.

    .venv/bin/python bench/efficiency.py --cells 256:9 [512:9 ...] --rounds 9 [--out results.json]
    python bench/efficiency.py --device cuda --attention-backend flex --cells 256:9 1024:9 2048:9 --rounds 3

``bench/step.py`` times every cell in its own process, one after the other, which is right for
peak memory but lets a change of machine load between the plain cell and the Quiet-STaR cell move
their ratio (on a shared machine the plain step alone has moved by 35 % between runs). Here one
process builds both steps of a cell (same model, same settings as bench/step.py) and alternates them:
round r times a plain step and a Quiet-STaR step (the order alternating), and its efficiency is their ratio. Drift
slower than a round cancels out. The table gives the median over rounds and the lowest and highest
round; the spread is the measurement's noise, not the implementation's. ``--device cuda`` runs the
same model in bf16 on a GPU, where ``--attention-backend`` picks the gradient pass's exact attention
("eager", "flex", "triton"; "auto" is flex there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from cells import Cell, build_step, model_description, step_settings  # bench/cells.py, a sibling
from quietstar.attention.settings import ATTENTION_BACKENDS


def parse_cell(text: str) -> tuple[int, int]:
    try:
        length, thought_tokens = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a cell is L:T, for example 256:9; got {text!r}") from None
    return length, thought_tokens


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=parse_cell, nargs="+", default=[(256, 9)], help="L:T pairs to measure")
    parser.add_argument("--rounds", type=int, default=9, help="timed (plain, Quiet-STaR) pairs per cell")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="auto",
                        help="the Quiet-STaR step's attention_backend")
    parser.add_argument("--out", type=Path, help="write every round's seconds as JSON here")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device here")
    return args


def seconds(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def measure(length: int, thought_tokens: int, rounds: int, threads: int, device: str = "cpu",
            attention_backend: str = "auto") -> dict:
    """Alternate plain and Quiet-STaR steps; one warm-up step of each first."""
    settings = step_settings(threads=threads)
    plain = build_step(settings, Cell("plain", length, thought_tokens), device)
    ours = build_step(settings, Cell("ours", length, thought_tokens), device, attention_backend)
    plain(), ours()
    pairs = []
    for number in range(rounds):
        if number % 2:  # alternate which goes first, so neither always inherits the other's leftovers
            pair = {"ours": seconds(ours), "plain": seconds(plain)}
        else:
            pair = {"plain": seconds(plain), "ours": seconds(ours)}
        pair["efficiency"] = pair["plain"] / pair["ours"]
        pairs.append(pair)
        print(f"  L={length} T={thought_tokens} round {number + 1}/{rounds}: plain {pair['plain']:.3f} s, "
              f"Quiet-STaR {pair['ours']:.3f} s, efficiency {pair['efficiency']:.2f}", flush=True)
    ratios = [pair["efficiency"] for pair in pairs]
    return {"length": length, "thought_tokens": thought_tokens, "rounds": pairs,
            "median_efficiency": statistics.median(ratios), "min_efficiency": min(ratios),
            "max_efficiency": max(ratios),
            "median_plain_seconds": statistics.median(pair["plain"] for pair in pairs),
            "median_ours_seconds": statistics.median(pair["ours"] for pair in pairs)}


def main(argv=None) -> None:
    args = parse_args(argv)
    print(f"{model_description(args.device)}, {args.threads} threads, attention_backend {args.attention_backend}; "
          f"A = 4, N = 2, batch 1; {args.rounds} rounds per cell", flush=True)
    results = [measure(length, T, args.rounds, args.threads, args.device, args.attention_backend)
               for length, T in args.cells]
    print("\n| L | T | plain s/step (median) | Quiet-STaR s/step (median) | efficiency: median | lowest | highest |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['length']} | {r['thought_tokens']} | {r['median_plain_seconds']:.3f} | "
              f"{r['median_ours_seconds']:.3f} | {r['median_efficiency']:.2f} | {r['min_efficiency']:.2f} | "
              f"{r['max_efficiency']:.2f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": model_description(args.device), "threads": args.threads, "device": args.device,
                                        "attention_backend": args.attention_backend, "cells": results}, indent=2))


if __name__ == "__main__":
    main()
