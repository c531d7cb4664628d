"""Does this CPU compute bf16 natively? The bf16 / fp32 time ratio of one matmul, and what ``bf16: auto`` picks.

    python bench/cpu_bf16.py [--rows 2048] [--inner 576] [--cols 1536] [--repeats 3] [--out bench_results/cpu_bf16.json]

The default shape is SmolLM2-135M's MLP up-projection over 2048 tokens. On a CPU with AMX or AVX512_BF16 the
ratio is below 1; without them PyTorch emulates bf16 and the ratio was about 100 on a Zen 3 (AVX2).
quietstar/bf16.py quotes that figure in the warning given for ``bf16: true`` on such a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from quietstar.bf16 import native_bf16


def matmul_seconds(a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    """The fastest of ``repeats`` timings of ``a @ b`` after one warm-up."""
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--inner", type=int, default=576)
    p.add_argument("--cols", type=int, default=1536)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench_results/cpu_bf16.json")
    args = p.parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(args.rows, args.inner, generator=generator)
    b = torch.randn(args.inner, args.cols, generator=generator)
    fp32 = matmul_seconds(a, b, args.repeats)
    bf16 = matmul_seconds(a.bfloat16(), b.bfloat16(), args.repeats)
    feature = native_bf16("cpu")
    result = {"capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": feature,
              "fp32_s": fp32, "bf16_s": bf16, "bf16_over_fp32": bf16 / fp32}
    print(f"{args.rows}x{args.inner} @ {args.inner}x{args.cols} on {torch.get_num_threads()} threads: fp32 "
          f"{fp32:.4f} s, bf16 {bf16:.4f} s, bf16/fp32 = {bf16 / fp32:.2f}. CPU capability "
          f"{result['capability']}; native bf16: {feature or 'none'} (bf16: auto trains in "
          f"{'bf16 autocast' if feature else 'fp32'}).")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"settings": vars(args), **result}, f, indent=2)
    return result


if __name__ == "__main__":
    main()
