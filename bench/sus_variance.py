"""The SUS paper's measurement, reproduced: how much gradient variance SUS backprop adds, on a real model.

    python bench/sus_variance.py                      # offline SmolLM2-135M on MATH solutions, ~25 min on 2 CPU cores
    python bench/sus_variance.py --lengths 256 --cs 5 30 --sequences 4   # a quick look

Definition (also in quietstar/ops/sus/README.md). For a window x of n tokens let g(x) be the exact
gradient of the mean next-token NLL over all parameters, and g~(x) a SUS gradient (exact forward,
SUS attention backward in every layer, fresh random mask). Then

    minibatch variance   V_mb  = E_x ||g(x) - E_x g||^2        (windows drawn from the text)
    SUS variance         V_sus = E_x E_mask ||g~(x) - g(x)||^2
    relative increase    V_sus / V_mb

SUS noise is independent of which windows form a batch, and both terms shrink as 1/(batch size),
so the ratio is the fractional increase of the total gradient variance of SGD at any batch size.
V_mb is estimated from ``--sequences`` windows (unbiased, K - 1 in the denominator), V_sus from
``--sus-sequences`` x ``--draws`` SUS gradients per c against the exact gradient of the same window.

Writes a JSON of all numbers, prints the table, and plots the ratio against c for every n.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
from tqdm import tqdm

from quietstar.assets import math_documents, offline_smollm2
from quietstar.attention import ATTENTION_NAME


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub id or folder; default: the offline SmolLM2-135M")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--cs", type=float, nargs="+", default=[5, 10, 20, 30, 50])
    parser.add_argument("--sequences", type=int, default=8, help="windows for the minibatch variance (K)")
    parser.add_argument("--sus-sequences", type=int, default=2, help="of those, windows that get SUS draws")
    parser.add_argument("--draws", type=int, default=1, help="SUS draws per window and c")
    parser.add_argument("--documents", type=int, default=None, help="use only the first N MATH documents")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default="bench_results/sus_variance.json")
    parser.add_argument("--plot", default="docs/sus_variance.png", help="PNG path ('' for none)")
    args = parser.parse_args(argv)
    if args.sequences < 2:
        parser.error("--sequences must be at least 2 (the minibatch variance needs two windows).")
    if not 1 <= args.sus_sequences <= args.sequences:
        parser.error("--sus-sequences must be between 1 and --sequences.")
    if any(c <= 0 for c in args.cs):
        parser.error("every c in --cs must be > 0.")
    return args


def token_windows(tokenizer, count: int, length: int, documents: int | None = None) -> list[torch.Tensor]:
    """``count`` windows of ``length`` tokens from the MATH text (documents joined by EOS), spread evenly over it."""
    stream = []
    for document in math_documents(documents):
        stream.extend(tokenizer(document, add_special_tokens=False).input_ids)
        stream.append(tokenizer.eos_token_id)
    stride = (len(stream) - length) // count
    if stride < length:
        raise ValueError(f"The text holds {len(stream)} tokens: too few for {count} windows of {length}.")
    return [torch.tensor(stream[i * stride:i * stride + length]) for i in range(count)]


def gradient(model, window: torch.Tensor, sus_c: float | None) -> list[torch.Tensor]:
    """The gradient of the mean NLL over ``window``, one tensor per parameter (SUS backward when ``sus_c``)."""
    model.zero_grad(set_to_none=True)
    ids = window[None]
    extra = {} if sus_c is None else {"sus_c": sus_c}
    model(input_ids=ids, labels=ids, **extra).loss.backward()
    return [p.grad for p in model.parameters() if p.grad is not None]


def squared_norm(tensors) -> float:
    return sum(torch.linalg.vector_norm(t, dtype=torch.float64).item() ** 2 for t in tensors)


def squared_distance(tensors, others) -> float:
    return sum(torch.linalg.vector_norm(t - o, dtype=torch.float64).item() ** 2 for t, o in zip(tensors, others))


def measure_length(model, tokenizer, length, args, progress) -> dict:
    windows = token_windows(tokenizer, args.sequences, length, args.documents)
    total, squares, exact = None, 0.0, []
    started = time.perf_counter()
    for k, window in enumerate(windows):
        grad = gradient(model, window, None)
        total = [g.clone() for g in grad] if total is None else [t.add_(g) for t, g in zip(total, grad)]
        squares += squared_norm(grad)
        if k < args.sus_sequences:
            exact.append([g.clone() for g in grad])
        progress.update(1)
    seconds_per_pass = (time.perf_counter() - started) / len(windows)
    K = len(windows)
    minibatch_variance = (squares - squared_norm(total) / K) / (K - 1)
    rows = []
    for c in args.cs:
        errors = []
        for k in range(args.sus_sequences):
            for _ in range(args.draws):
                errors.append(squared_distance(gradient(model, windows[k], c), exact[k]))
                progress.update(1)
        sus_variance = sum(errors) / len(errors)
        spread = (max(errors) - min(errors)) / 2 / minibatch_variance if len(errors) > 1 else float("nan")
        rows.append(dict(n=length, c=c, sus_variance=sus_variance, minibatch_variance=minibatch_variance,
                         relative_increase=sus_variance / minibatch_variance, half_range=spread,
                         draws=len(errors)))
    return dict(rows=rows, seconds_per_pass=seconds_per_pass, mean_gradient_norm=math.sqrt(squared_norm(total)) / K)


def print_table(results, cs) -> None:
    print("\nRelative gradient-variance increase of SUS over exact backprop, V_sus / V_mb, in %")
    print(f"{'n':>6} | " + " | ".join(f"c={c:<6g}" for c in cs) + " | s/pass")
    for length, entry in results.items():
        cells = " | ".join(f"{100 * row['relative_increase']:8.3f}" for row in entry["rows"])
        print(f"{length:>6} | {cells} | {entry['seconds_per_pass']:.1f}")


def plot(results, path, model_name) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for length, entry in results.items():
        cs = [row["c"] for row in entry["rows"]]
        ax.plot(cs, [100 * row["relative_increase"] for row in entry["rows"]], marker="o", label=f"n = {length}")
    ax.scatter([27.5], [1.0], marker="*", s=160, color="black", zorder=5,
               label="paper: ~1% at n~2000, c~25-30 (OPT-125m)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("c (expected kept attention weights per row, at most)")
    ax.set_ylabel("SUS variance, % of minibatch variance")
    ax.set_title(f"SUS backprop: {model_name.split(' (')[0]}, MATH text", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import quietstar.attention  # noqa: F401  (registers the attention that takes sus_c)

    path = args.model or offline_smollm2()
    model_name = args.model or "SmolLM2-135M-Instruct (offline GGUF, dequantised)"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=ATTENTION_NAME).eval()
    torch.manual_seed(0)
    passes = len(args.lengths) * (args.sequences + len(args.cs) * args.sus_sequences * args.draws)
    results = {}
    with tqdm(total=passes, desc="forward+backward passes", unit="pass") as progress:
        for length in args.lengths:
            results[length] = measure_length(model, tokenizer, length, args, progress)
            os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
            with open(args.out, "w") as f:  # after every length, so a long run that stops keeps what it measured
                json.dump(dict(model=model_name, settings=vars(args), results=results), f, indent=2)
    print_table(results, args.cs)
    print(f"V_mb from {args.sequences} windows per n; V_sus from {args.sus_sequences * args.draws} draws per (n, c).")
    print(f"wrote {args.out}")
    if args.plot:
        plot(results, args.plot, model_name)
    if any(not math.isfinite(row["relative_increase"]) for e in results.values() for row in e["rows"]):
        raise SystemExit("non-finite variance: see the JSON")


if __name__ == "__main__":
    main()
