"""Benchmark of SUS attention: forward and backward times and peak memory against PyTorch's flash SDPA.

    python bench/sus.py                       # on a GPU: n = 1k..32k, d = 64 and 128, c = 16, 32, 64
    python bench/sus.py --device cpu --lengths 256 512 --head-dims 64 --cs 16
                                              # CPU smoke run (PyTorch reference; no kernels)

Rows per (n, d): "sdpa" (PyTorch flash attention, exact), "flex" (PyTorch's compiled FlexAttention
with the causal mask as a BlockMask, exact; GPU only), "exact" (our Triton forward and exact backward)
and one "sus c=..." row per c (our forward, SUS backward of design A; c = 1e-9 and 1e30 bound it: nearly
nothing kept, everything kept), and "sus-C c=..." rows for design C (``--sus-designs``; its forward draws the
(row, key tile) cells, its backward visits the opened ones: quietstar/ops/sus/README.md). Causal, batch 1, bf16 on GPU
(fp32 on CPU). Times are medians of --repeats after --warmup runs, from CUDA events; the backward
is timed alone (the forward that feeds it is not counted). Peak memory is the highest allocation
during forward + backward, above the inputs. Targets at n = 16k, c = 32: SUS backward <= 0.5 x our
forward, and >= 4 x faster than the flash and the FlexAttention backward; our exact forward + backward
within 1.3 x of FlexAttention's. The JSON file is rewritten after every row, so a run cut short keeps its rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from quietstar.ops.sus import attention


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--cs", type=float, nargs="+", default=[16, 32, 64])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--sus-designs", nargs="+", default=["a", "c"], choices=["a", "c"],
                        help="SUS designs to time (sus_design of quietstar.ops.sus.attention)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench_results/sus.json")
    parser.add_argument("--plot", default="docs/bench_sus.png", help="PNG path ('' for none)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --device cpu for a smoke run of the PyTorch reference.")
    return args


class Timer:
    """Wall time of a region: CUDA events on a GPU, perf_counter on CPU."""

    def __init__(self, device):
        self.cuda = device == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            return start.elapsed_time(stop) / 1000
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started


def run_case(make_output, inputs, do, timer, warmup, repeats, device):
    """Median forward and backward seconds, and peak MB above the inputs, of one attention implementation."""
    forward_times, backward_times, peak = [], [], float("nan")
    for i in range(warmup + repeats):
        for t in inputs:
            t.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        box = {}
        forward = timer(lambda: box.setdefault("out", make_output()))
        backward = timer(lambda: box["out"].backward(do))
        if device == "cuda":
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        if i >= warmup:
            forward_times.append(forward)
            backward_times.append(backward)
        del box
    return statistics.median(forward_times), statistics.median(backward_times), peak


def flex_causal(q, k, v):
    """Compiled FlexAttention over the causal mask; the BlockMask is built here, outside the timed region."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n = q.shape[2]
    mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, n, n, device=q.device)
    compiled = torch.compile(flex_attention)
    return lambda: compiled(q, k, v, block_mask=mask)


SUS_ROWS = {"a": "sus", "c": "sus-C"}  # row names per design


def measure(args, on_row=lambda rows: None):
    """Every row of the grid, handing the rows so far to ``on_row`` after each."""
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    backend = "triton" if args.device == "cuda" else "torch"
    timer = Timer(args.device)
    rows = []
    for d in args.head_dims:
        for n in args.lengths:
            g = torch.Generator(device=args.device).manual_seed(n + d)
            q, k, v, do = (torch.randn(1, args.heads, n, d, device=args.device, dtype=dtype, generator=g)
                           for _ in range(4))
            inputs = [t.requires_grad_() for t in (q, k, v)]
            cases = [("sdpa", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))]
            if args.device == "cuda":  # FlexAttention has no backward on CPU
                cases.append(("flex", flex_causal(q, k, v)))
            cases.append(("exact", lambda: attention(q, k, v, c=None, backend=backend)))
            for design in args.sus_designs:
                cases += [(f"{SUS_ROWS[design]} c={c:g}", lambda c=c, design=design: attention(
                    q, k, v, c=c, seed=1, backend=backend, sus_design=design)) for c in args.cs]
            for name, fn in cases:
                if name == "sdpa" and args.device == "cuda":
                    from torch.nn.attention import SDPBackend, sdpa_kernel

                    def fn(f=fn):
                        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                            return f()
                fwd, bwd, peak = run_case(fn, inputs, do, timer, args.warmup, args.repeats, args.device)
                rows.append(dict(n=n, d=d, impl=name, forward_s=fwd, backward_s=bwd, peak_mb=peak))
                on_row(rows)
                print(f"n={n:6d} d={d:3d} {name:10s} fwd {fwd * 1e3:9.3f} ms  bwd {bwd * 1e3:9.3f} ms  "
                      f"peak {peak:9.1f} MB", flush=True)
            del q, k, v, do, inputs
    return rows


def print_table(rows, cs) -> None:
    print("\nms (forward / backward); ratios use our forward and the flash (and flex) backward of the same (n, d)")
    for d in sorted({r["d"] for r in rows}):
        print(f"\nhead dim {d}")
        flex = any(r["impl"] == "flex" for r in rows)
        header = f"{'n':>6} | {'sdpa fwd/bwd':>17} | " + (f"{'flex fwd/bwd':>17} | {'exact/flex':>10} | " if flex else "")
        designs = [name for name in SUS_ROWS.values() if any(r["impl"].startswith(name + " ") for r in rows)]
        header += f"{'exact fwd/bwd':>17} | " + " | ".join(
            f"{'%s c=%g bwd' % (name, c):>15} {'/fwd':>5} {'x':>5}" + (f" {'x flex':>6}" if flex else "")
            for name in designs for c in cs)
        print(header)
        for n in sorted({r["n"] for r in rows}):
            get = {r["impl"]: r for r in rows if r["n"] == n and r["d"] == d}
            if not all(name in get for name in ("sdpa", "exact", *(f"{d} c={c:g}" for d in designs for c in cs))):
                continue  # a run cut short
            sdpa, exact = get["sdpa"], get["exact"]
            line = f"{n:>6} | {sdpa['forward_s'] * 1e3:8.3f}/{sdpa['backward_s'] * 1e3:8.3f} | "
            if flex:
                f = get["flex"]
                both = (exact["forward_s"] + exact["backward_s"]) / (f["forward_s"] + f["backward_s"])
                line += f"{f['forward_s'] * 1e3:8.3f}/{f['backward_s'] * 1e3:8.3f} | {both:10.2f} | "
            line += f"{exact['forward_s'] * 1e3:8.3f}/{exact['backward_s'] * 1e3:8.3f} | "
            cells = []
            for sus in (get[f"{name} c={c:g}"] for name in designs for c in cs):
                cell = (f"{sus['backward_s'] * 1e3:15.3f} {sus['backward_s'] / exact['forward_s']:5.2f} "
                        f"{sdpa['backward_s'] / sus['backward_s']:5.2f}")
                cells.append(cell + (f" {get['flex']['backward_s'] / sus['backward_s']:6.2f}" if flex else ""))
            print(line + " | ".join(cells))
    print("\n/fwd: SUS backward (design A: sus, design C: sus-C) over our forward (target <= 0.5 at n=16k, c=32); x: flash backward over SUS "
          "backward (target >= 4); x flex: the same against FlexAttention; exact/flex: our exact forward + backward "
          "over FlexAttention's (target <= 1.3)")


def plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = sorted({r["d"] for r in rows})
    fig, axes = plt.subplots(1, len(dims), figsize=(6 * len(dims), 4.2), squeeze=False)
    for ax, d in zip(axes[0], dims):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            sel = sorted((r for r in rows if r["d"] == d and r["impl"] == impl), key=lambda r: r["n"])
            ax.plot([r["n"] for r in sel], [r["backward_s"] * 1e3 for r in sel], marker="o", label=f"{impl} backward")
        sel = sorted((r for r in rows if r["d"] == d and r["impl"] == "exact"), key=lambda r: r["n"])
        ax.plot([r["n"] for r in sel], [r["forward_s"] * 1e3 for r in sel], "k--", label="our forward")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("n (tokens)")
        ax.set_ylabel("ms")
        ax.set_title(f"causal attention, head dim {d}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None) -> None:
    args = parse_args(argv)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)

    def save(rows):
        staging = f"{args.out}.partial"
        with open(staging, "w") as f:
            json.dump(dict(device=device_name, settings=vars(args), rows=rows), f, indent=2)
        os.replace(staging, args.out)

    rows = measure(args, save)
    print(f"\ndevice: {device_name}, heads {args.heads}, batch 1, causal")
    print_table(rows, args.cs)
    print(f"wrote {args.out}")
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
