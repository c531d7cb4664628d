"""How much work does SUS design C's backward open on a real model, against design A's tiles?

    python bench/sus_design_c.py                       # offline SmolLM2-135M, MATH text, n = 1k ... 16k

Design C (quietstar/ops/sus/design_c_reference.py) opens cell (row i, key tile t) with probability
pi_it = min(1, c m_it), m_it the row's softmax mass on the tile; its backward runs the tile math for
the opened cells only. Design A runs QK^T for every visible 64 x 64 tile and the other four
matmuls for tiles holding a kept entry. Per query row this script reports, exactly in expectation
(no sampling noise from the draws): kept entries sum_j min(1, c P_ij); design C's opened cells
sum_t pi_it and their share of the row's visible tiles; design A's share of visible 64 x 64 tiles
with a kept entry, 1 - prod over the tile of (1 - q_ij); and the backward matmul work of C
relative to A's (opened cells against occupied tiles, both counted in rows x 64 keys).

Every layer and head of the model (causal attention), one window of n tokens. The queries and keys
are caught after the rotary embedding by an attention function registered with transformers, which
computes the statistics and returns SDPA's output; no n x n tensor is built: the statistics are
computed for ``--row-blocks`` blocks of 64 query rows spread evenly over the window (all blocks
when there are fewer), a head at a time. SmolLM2-135M was trained to 8192 positions; 16k runs past
them (the attention of a long window is what the kernels see either way).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from quietstar.assets import offline_smollm2

from sus_variance import token_windows  # bench/sus_variance.py, a sibling

TILE = 64
ATTENTION_NAME = "sus_design_c_statistics"


def row_block_starts(n: int, row_blocks: int) -> list[int]:
    """First rows of ``row_blocks`` blocks of TILE rows spread evenly over n rows (every block if fewer)."""
    blocks = -(-n // TILE)
    if blocks <= row_blocks:
        return [b * TILE for b in range(blocks)]
    return [int((b + 0.5) * blocks / row_blocks) * TILE for b in range(row_blocks)]


def block_statistics(query: torch.Tensor, key: torch.Tensor, start: int, scale: float, cs) -> dict:
    """Sums over one block of query rows ``[rows, d]`` (keys ``[n, d]``, causal) for every c in ``cs``."""
    rows = torch.arange(start, start + query.shape[0])
    keys = int(rows[-1]) + 1
    scores = (query @ key[:keys].T).float() * scale
    scores = scores.masked_fill(torch.arange(keys)[None] > rows[:, None], float("-inf"))
    probs = torch.softmax(scores, -1)
    tiles = -(-keys // TILE)
    padded = F.pad(probs, (0, tiles * TILE - keys))
    mass = padded.view(len(rows), tiles, TILE).sum(-1)  # [rows, tiles]
    visible_tiles = torch.div(rows, TILE, rounding_mode="floor") + 1  # causal: tiles 0 .. i // 64
    out = dict(rows=len(rows), visible_tiles=visible_tiles.sum().item(), block_tiles=tiles)
    for c in cs:
        keep = torch.clamp(c * padded, max=1.0)
        opened = torch.clamp(c * mass, max=1.0).sum(-1)  # [rows]
        log_empty = torch.log1p(-keep.clamp(max=1 - 1e-7)).view(len(rows), tiles, TILE).sum((0, 2))
        log_empty = torch.where(keep.view(len(rows), tiles, TILE).amax((0, 2)) >= 1, float("-inf"), log_empty)
        out[c] = dict(kept=keep.sum().item(), opened=opened.sum().item(), opened_max=opened.max().item(),
                      opened_share=(opened / visible_tiles).sum().item(),
                      occupied=(1 - torch.exp(log_empty)).sum().item())
    return out


class Collector:
    """Attention function for transformers: accumulates the statistics of every layer and head, returns SDPA."""

    def __init__(self, cs, row_blocks):
        self.cs, self.row_blocks = cs, row_blocks
        self.totals = None

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        B, H, n, d = query.shape
        scale = d**-0.5 if scaling is None else scaling
        key_full = key.repeat_interleave(H // key.shape[1], dim=1)
        with torch.no_grad():
            for h in range(H):
                for start in row_block_starts(n, self.row_blocks):
                    self._add(block_statistics(query[0, h, start:start + TILE], key_full[0, h], start, scale, self.cs))
        out = F.scaled_dot_product_attention(query, key_full, value.repeat_interleave(H // value.shape[1], dim=1),
                                             is_causal=True, scale=scale)
        return out.transpose(1, 2), None

    def _add(self, block):
        if self.totals is None:
            self.totals = {"rows": 0, "visible_tiles": 0, "tile_blocks": 0, **{c: dict.fromkeys(block[c], 0.0) for c in self.cs}}
        self.totals["rows"] += block["rows"]
        self.totals["visible_tiles"] += block["visible_tiles"]
        self.totals["tile_blocks"] += block["block_tiles"]  # causal 64 x 64 tiles of this row block
        for c in self.cs:
            for name, value in block[c].items():
                self.totals[c][name] = max(self.totals[c][name], value) if name == "opened_max" else \
                    self.totals[c][name] + value


def summary(totals: dict, n: int, cs) -> list[dict]:
    rows = []
    for c in cs:
        t = totals[c]
        per_row = totals["rows"]
        occupied_share = t["occupied"] / totals["tile_blocks"]
        a_work = t["occupied"] * TILE / per_row  # occupied tiles x 64 rows, per row: the rows x 64 keys A multiplies
        rows.append(dict(n=n, c=c, kept_per_row=t["kept"] / per_row, opened_per_row=t["opened"] / per_row,
                         opened_max=t["opened_max"], opened_share=t["opened_share"] / per_row,
                         visible_tiles_per_row=totals["visible_tiles"] / per_row, a_occupied_share=occupied_share,
                         a_work_per_row=a_work, c_over_a=(t["opened"] / per_row) / a_work))
    return rows


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for c in sorted({r["c"] for r in results}):
        rows = [r for r in results if r["c"] == c]
        ns = [r["n"] for r in rows]
        left.plot(ns, [r["opened_per_row"] for r in rows], "o-", label=f"C: opened cells, c={c:g}")
        left.plot(ns, [r["a_work_per_row"] for r in rows], "s--", label=f"A: occupied tiles x 64 rows, c={c:g}")
        right.plot(ns, [100 * r["opened_share"] for r in rows], "o-", label=f"C: cells opened, c={c:g}")
        right.plot(ns, [100 * r["a_occupied_share"] for r in rows], "s--", label=f"A: tiles with a kept entry, c={c:g}")
    left.plot(ns, [r["visible_tiles_per_row"] for r in rows], "k:", label="visible tiles (exact backward)")
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("n (tokens)")
        axis.legend(fontsize=7)
    left.set_yscale("log")
    left.set_ylabel("(row, 64-key tile) units of backward work per row")
    right.set_ylabel("% of visible tiles")
    fig.suptitle("SUS backward work on SmolLM2-135M (all layers and heads, MATH text)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="hub id or folder; default: the offline SmolLM2-135M")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--cs", type=float, nargs="+", default=[16, 32, 64])
    parser.add_argument("--row-blocks", type=int, default=16, help="blocks of 64 query rows measured per head")
    parser.add_argument("--documents", type=int, default=None)
    parser.add_argument("--out", default="bench_results/sus_design_c.json", help="JSON; the PNG goes beside it")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    collector = Collector(args.cs, args.row_blocks)
    AttentionInterface.register(ATTENTION_NAME, collector)
    AttentionMaskInterface.register(ATTENTION_NAME, lambda *a, **kw: None)  # the collector masks causally itself
    path = args.model or offline_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=ATTENTION_NAME).eval()
    results = []
    print("| n | c | kept per row | C: opened cells per row (max) | C: share of visible cells | "
          "A: 64x64 tiles with a kept entry | A: tile rows per row | visible tiles per row | C / A |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.lengths:
        collector.totals = None
        window = token_windows(tokenizer, 1, n, args.documents)[0]
        with torch.no_grad():
            model.model(input_ids=window[None])  # the transformer only: no n x vocab logits
        for row in summary(collector.totals, n, args.cs):
            results.append(row)
            print(f"| {n} | {row['c']:g} | {row['kept_per_row']:.1f} | {row['opened_per_row']:.1f} "
                  f"({row['opened_max']:.0f}) | {100 * row['opened_share']:.1f} % | "
                  f"{100 * row['a_occupied_share']:.1f} % | {row['a_work_per_row']:.1f} | {row['visible_tiles_per_row']:.1f} | "
                  f"{row['c_over_a']:.2f} |",
                  flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(model=args.model or "SmolLM2-135M-Instruct (offline)", tile=TILE, row_blocks=args.row_blocks,
                       rows=results), f, indent=2)
    plot(results, os.path.splitext(args.out)[0] + ".png")
    print(f"wrote {args.out} and its .png")


if __name__ == "__main__":
    main()
