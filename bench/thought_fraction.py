"""Seconds per training step when thinking at a fraction q of the positions (``thought_fraction``, docs/design.md §7).

    python bench/thought_fraction.py [--length 96] [--thought-tokens 4] [--fractions 1 0.5 0.25] [--out FILE]

One step is the forward and backward of the Quiet-STaR loss (sampling included, no optimizer) of a tiny random
Llama on ``--batch-size`` random rows of ``--length`` tokens, on the eager attention (the one that runs q < 1), for
each q, and for the smallest q again with the thoughts of equal compute (T' from
quietstar.anchors.equal_compute_thought_tokens: N M (T' + A + 1) = N L (T + A + 1) branch tokens). Reported: the
median seconds over ``--repeats`` steps after one warm-up step, its ratio to q = 1, the branch tokens per row of
the gradient pass, and the memory the forward saves for the backward (distinct tensor storages, MiB), the part of the
step's peak that thinking at fewer positions shrinks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def saved_mib(run) -> tuple[object, float]:
    """``run()``'s result and the MiB of the distinct storages autograd saved for the backward while it ran."""
    import torch

    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    return result, sum(storages.values()) / 2**20


def measure(fraction: float, num_thought_tokens: int, args) -> dict:
    """One cell: a fresh model with ``thought_fraction`` q and T thought tokens, timed over ``args.repeats`` steps."""
    import torch

    from quietstar import AttentionSettings, QuietStarConfig, QuietStarForCausalLM
    from quietstar.anchors import anchors_per_row
    from quietstar.tiny import byte_tokenizer, tiny_model

    torch.manual_seed(0)
    tokenizer = byte_tokenizer()
    base = tiny_model("llama", vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=args.layers)
    config = QuietStarConfig(num_thought_tokens=num_thought_tokens, num_lookahead_tokens=args.lookahead,
                             num_thoughts=args.thoughts, thought_fraction=fraction)
    model = QuietStarForCausalLM.from_base(base, tokenizer, config,
                                           attention=AttentionSettings(attention_backend="eager")).train()
    ids = torch.randint(0, 256, (args.batch_size, args.length), generator=torch.Generator().manual_seed(1))
    times, saved = [], 0.0
    for _ in range(args.repeats + 1):
        start = time.perf_counter()
        out, saved = saved_mib(lambda: model(ids, labels=ids, output_logits=False))
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    M = anchors_per_row(args.length, fraction)
    return {"thought_fraction": fraction, "num_thought_tokens": num_thought_tokens, "anchors_per_row": M,
            "branch_tokens_per_row": args.thoughts * M * config.branch_length, "seconds_per_step":
            statistics.median(times[1:]), "saved_for_backward_mib": saved}


def table(rows: list[dict]) -> str:
    full = rows[0]["seconds_per_step"]
    lines = ["|    q |  T |  M | branch tokens / row | s / step | vs q = 1 | saved for backward (MiB) |",
             "|-----:|---:|---:|--------------------:|---------:|---------:|-------------------------:|"]
    for row in rows:
        lines.append(f"| {row['thought_fraction']:4.2f} | {row['num_thought_tokens']:2d} | {row['anchors_per_row']:2d} "
                     f"| {row['branch_tokens_per_row']:19d} | {row['seconds_per_step']:8.3f} "
                     f"| {row['seconds_per_step'] / full:7.2f}x | {row['saved_for_backward_mib']:24.1f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=96, help="L: tokens per row")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--thought-tokens", type=int, default=4, help="T at q = 1")
    p.add_argument("--lookahead", type=int, default=4, help="A")
    p.add_argument("--thoughts", type=int, default=2, help="N")
    p.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.25],
                   help="the values of q, the first the baseline (1 for the ratio to mean 'vs every position')")
    p.add_argument("--hidden", type=int, default=256, help="the tiny Llama's hidden size")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per cell, after one warm-up step")
    p.add_argument("--out", help="write the rows as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    from quietstar.anchors import equal_compute_thought_tokens

    args = parse_args(argv)
    cells = [(q, args.thought_tokens) for q in args.fractions]
    smallest = min(args.fractions)
    longer = equal_compute_thought_tokens(args.thought_tokens, args.lookahead, smallest)
    if smallest < 1 and longer != args.thought_tokens:
        cells.append((smallest, longer))
    rows = [measure(q, T, args) for q, T in cells]
    print(f"L = {args.length}, A = {args.lookahead}, N = {args.thoughts}, batch {args.batch_size}, "
          f"hidden {args.hidden}, {args.layers} layers, eager attention; median of {args.repeats} steps "
          "(forward + backward)")
    print(table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"arguments": vars(args), "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
