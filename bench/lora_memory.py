"""Peak training memory and step time: LoRA (peft) against full fine-tuning, each in a fresh process.

    python bench/lora_memory.py [--model smollm2-135m] [--steps 3] [--out bench_results/lora_memory.json]

Each mode trains ``--steps`` optimizer steps (AdamW) of batch ``--batch-size`` x ``--max-length`` tokens of the
offline MATH text with Quiet-STaR (T, A, N as given). Peak memory: on CUDA the allocator's peak; on CPU the
process's peak resident set size, of which ``after load`` is the part taken before training (weights, libraries).
Seconds per step: the median over the steps after the first.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def peak_mib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(args) -> dict:
    """One mode, in this process."""
    import torch

    from quietstar import QuietStarConfig
    from quietstar.assets import math_documents
    from quietstar.bf16 import resolve_bf16
    from quietstar.training import ModelArguments, build_model

    torch.manual_seed(0)
    device = torch.device(args.device)
    bf16 = resolve_bf16(args.bf16, device.type)
    for line in (bf16.note, bf16.warning):
        if line:
            print(line, file=sys.stderr)
    model_args = ModelArguments(model_name_or_path=args.model, peft=LORA if args.mode == "lora" else None)
    config = QuietStarConfig(num_thought_tokens=args.thought_tokens, num_lookahead_tokens=args.lookahead,
                             num_thoughts=args.thoughts)
    model = build_model(model_args, config).to(device).train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loaded = peak_mib(device)
    tokenizer = model.tokenizer
    windows = [ids[: args.max_length] for ids in tokenizer(math_documents(limit=200, split="train"))["input_ids"]
               if len(ids) >= args.max_length]
    batch = torch.tensor(windows[: args.batch_size], device=device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16.enabled):
            loss = model(batch, labels=batch, output_logits=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return {"mode": args.mode, "bf16": bf16.enabled, "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total_parameters": sum(p.numel() for p in model.parameters()), "after_load_mib": loaded,
            "peak_mib": peak_mib(device), "seconds_per_step": statistics.median(times[1:] or times)}


def main(argv=None) -> list[dict]:
    from quietstar.bf16 import parse_bf16

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--mode", choices=("full", "lora"), help="Measure one mode in this process (used internally).")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--thought-tokens", type=int, default=4)
    p.add_argument("--lookahead", type=int, default=2)
    p.add_argument("--thoughts", type=int, default=2)
    p.add_argument("--bf16", type=parse_bf16, nargs="?", const=True, default=False,
                   help="bf16 autocast (fp32 weights): true (bare --bf16), false, or auto (where the device computes "
                        "bf16 natively, as training's bf16: auto).")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="bench_results/lora_memory.json")
    args = p.parse_args(argv)
    if args.mode:
        print(json.dumps(measure(args)))
        return []
    rows = []
    settings = ["--model", args.model, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                "--max-length", str(args.max_length), "--thought-tokens", str(args.thought_tokens), "--lookahead",
                str(args.lookahead), "--thoughts", str(args.thoughts), "--device", args.device]
    for mode in ("full", "lora"):
        result = subprocess.run([sys.executable, os.path.abspath(__file__), *settings, "--bf16", str(args.bf16),
                                 "--mode", mode], capture_output=True, text=True, check=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(f"measured {mode}", flush=True)
    print(f"\n{args.model}, batch {args.batch_size} x {args.max_length} tokens, T = {args.thought_tokens}, "
          f"A = {args.lookahead}, N = {args.thoughts}, {args.device}{', bf16 autocast' if rows[0]['bf16'] else ''}\n")
    print("| mode | trainable params | peak MiB | after load MiB | peak - load MiB | s/step |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['trainable_parameters'] / 1e6:.2f} M of {r['total_parameters'] / 1e6:.1f} M | "
              f"{r['peak_mib']:.0f} | {r['after_load_mib']:.0f} | {r['peak_mib'] - r['after_load_mib']:.0f} | "
              f"{r['seconds_per_step']:.2f} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"settings": vars(args), "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
