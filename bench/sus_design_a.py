"""How sparse is the SUS mask on a real model, tile by tile? The measurement behind the backward design choice.

    python bench/sus_design_a.py                 # offline SmolLM2-135M, MATH text, n = 1024 and 2048

Design A (quietstar/ops/sus/README.md) recomputes Q K^T for every visible tile and skips the other
four backward matmuls of a tile only when no entry of it is kept. Its backward cost is therefore
set by the fraction of tiles holding at least one kept entry, which this script measures on the
attention probabilities of a real model (every layer and head; causal tiles only), next to the
mean kept entries per row (what a candidate-list backward, design C, touches).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from quietstar.assets import offline_smollm2
from quietstar.ops.sus import rng

from sus_variance import token_windows  # bench/sus_variance.py, a sibling


def tile_statistics(probs: torch.Tensor, c: float, tile: int, seed: int = 0) -> dict:
    """probs [H, n, n] (causal) -> fraction of causal tiles with a kept entry, kept per row, kept fraction."""
    H, n, _ = probs.shape
    rows, cols = torch.arange(n)[:, None], torch.arange(n)[None, :]
    u = rng.uniform(seed, torch.arange(H)[:, None, None], rows, cols)
    kept = (u < c * probs) & (cols <= rows)
    blocks = -(-n // tile)
    padded = torch.zeros(H, blocks * tile, blocks * tile, dtype=torch.bool)
    padded[:, :n, :n] = kept
    occupied = padded.view(H, blocks, tile, blocks, tile).any(dim=(2, 4))
    causal_tiles = torch.ones(blocks, blocks, dtype=torch.bool).tril()
    return dict(occupied_tiles=(occupied & causal_tiles).sum().item() / (H * causal_tiles.sum().item()),
                kept_per_row=kept.sum().item() / (H * n), kept_fraction=kept.sum().item() / (H * n * (n + 1) / 2))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="hub id or folder; default: the offline SmolLM2-135M")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--cs", type=float, nargs="+", default=[16, 32, 64])
    parser.add_argument("--tiles", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--documents", type=int, default=None)
    parser.add_argument("--out", default="bench_results/sus_design_a.json")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = args.model or offline_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    results = []
    for n in args.lengths:
        window = token_windows(tokenizer, 1, n, args.documents)[0]
        with torch.no_grad():
            attentions = model(input_ids=window[None], output_attentions=True).attentions  # per layer [1, H, n, n]
        for c in args.cs:
            for tile in args.tiles:
                stats = [tile_statistics(layer[0], c, tile) for layer in attentions]
                row = dict(n=n, c=c, tile=tile, **{k: sum(s[k] for s in stats) / len(stats) for k in stats[0]})
                results.append(row)
                print(f"n={n:5d} c={c:4g} tile={tile:3d}: tiles with a kept entry {100 * row['occupied_tiles']:5.1f}%  "
                      f"kept per row {row['kept_per_row']:6.2f}  kept {100 * row['kept_fraction']:6.3f}% of entries",
                      flush=True)
        del attentions
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(model=args.model or "SmolLM2-135M-Instruct (offline)", rows=results), f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
