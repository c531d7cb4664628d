"""Triton SUS kernels with a sliding window and soft-capping, against the PyTorch reference; the tile runs.

As tests/test_sus_kernels.py: on CPU in Triton's interpreter (16 x 16 tiles) at tiny odd sizes, fp32 and fp16,
outputs poisoned with NaN, SUS with the same seed in both (identical masks). The sizes give every kind of tile: tiles
skipped below a band, boundary tiles, and inner tiles that run without the visibility mask.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

from quietstar.ops.sus import attention, common_kernels, design_a_kernels  # noqa: E402
from quietstar.ops.sus.design_a_launch import triton_backward, triton_forward  # noqa: E402
from quietstar.ops.sus.design_a_reference import attention_backward  # noqa: E402
from quietstar.ops.sus.reference import attention_forward, visible  # noqa: E402

from test_sus_kernels import DEVICE, EXACT_FP32, _compare, _dtypes, _poisoned, _problem  # noqa: E402

# (batch, heads, kv heads, head dim, L, N, S, causal, left padding), window, softcap
CASES = {
    "causal-band": ((1, 2, 1, 16, 77, 0, 0, True, 0), 40, None),  # skipped, boundary and inner tiles on both sides
    "causal-narrow": ((2, 2, 2, 16, 37, 0, 0, True, 3), 3, None),  # a band thinner than a tile, padding
    "thoughts-band": ((2, 2, 1, 16, 11, 2, 5, True, 2), 7, None),
    "long-branch": ((1, 1, 1, 16, 7, 1, 35, True, 1), 20, None),  # a branch past two tiles: inner branch tiles
    "softcap": ((2, 3, 1, 32, 19, 1, 3, True, 0), None, 0.5),
    "band-softcap": ((1, 2, 2, 16, 40, 1, 4, True, 3), 12, 1.0),
}


@pytest.mark.parametrize("dtype", _dtypes(), ids=str)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("c", [None, 3.0], ids=["exact", "sus"])
def test_kernels_match_reference_with_window_and_softcap(name, dtype, c):
    case, window, softcap = CASES[name]
    q, k, v, do, pattern, scale = _problem(case, dtype, seed=len(name))
    scale *= 4  # larger scores: the cap's saturated region and peaked rows
    pattern.update(window=window, softcap=softcap)
    o_ref, lse_ref = attention_forward(q, k, v, scale, **pattern)
    o, lse = _poisoned(q, lse_ref)
    triton_forward(q, k, v, scale, **pattern, out=(o, lse), **EXACT_FP32)
    _compare(o, o_ref, dtype)
    finite = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), finite)
    _compare(lse[finite], lse_ref[finite], dtype)
    grads_ref = attention_backward(q, k, v, o_ref, lse_ref, do, scale, **pattern, c=c, seed=99)
    grads = _poisoned(q, k, v)
    triton_backward(q, k, v, o_ref.to(dtype), lse_ref, do, scale, **pattern, c=c, seed=99, out=grads, **EXACT_FP32)
    for got, want in zip(grads, grads_ref):
        _compare(got, want, dtype)


def test_autograd_function_with_window_and_softcap_matches_reference():
    case, window, softcap = CASES["band-softcap"]
    q, k, v, do, pattern, _ = _problem(case, torch.float32, seed=8)
    results = []
    for backend in ("torch", "triton"):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = attention(*leaves, c=2.0, seed=5, backend=backend, window=window, softcap=softcap, **pattern,
                        **EXACT_FP32)
        results.append((out, *torch.autograd.grad(out, leaves, do)))
    for got, want in zip(*results):
        _compare(got, want, torch.float32)


@triton.jit
def _query_block_probe(OUT, text_blocks, n, num_text, branch_length, window, WINDOWED: tl.constexpr,
                       BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    runs = common_kernels.query_block(pid, text_blocks, n, num_text, branch_length, window, True, WINDOWED, BLOCK,
                                      BLOCK)
    for i in tl.static_range(10):
        tl.store(OUT + pid * 10 + i, runs[i])


@triton.jit
def _key_block_probe(OUT, text_key_blocks, n, num_text, branch_length, window, WINDOWED: tl.constexpr,
                     BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    start, stop, row_lo, row_hi, full_lo, full_hi, b_lo, b_hi, b_full_lo, b_full_hi = design_a_kernels._key_block(
        pid, text_key_blocks, n, num_text, branch_length, window, True, WINDOWED, BLOCK)
    lo, mid_lo, mid_hi = common_kernels.tile_split(row_lo, row_lo, row_hi, full_lo, full_hi, BLOCK)
    first = num_text  # the first sample's branch rows; the other samples' runs are these, shifted
    b_lo, b_mid_lo, b_mid_hi = common_kernels.tile_split(first + b_lo, first + b_lo, first + b_hi, first + b_full_lo,
                                                   first + b_full_hi, BLOCK)
    runs = (start, stop, lo, mid_lo, mid_hi, row_hi, b_lo, b_mid_lo, b_mid_hi, first + b_hi)
    for i in tl.static_range(10):
        tl.store(OUT + pid * 10 + i, runs[i])


def _runs_of(probe, L, N, S, window, block):
    """Per block of the probed kernel: [start, stop) and, for each of its two ranges, [(tile start, hi, masked)] of
    the tiles it visits."""
    n = L + N * L * S
    text_blocks = -(-L // block)
    total = text_blocks + -(-(n - L) // block)
    out = torch.full((total, 10), -1, dtype=torch.int32, device=DEVICE)
    probe[(total,)](out, text_blocks, n, L, max(S, 1), window or 0, window is not None, block)
    blocks = []
    for start, stop, *bounds in out.tolist():
        ranges = [[(t, hi, not lo <= mid_lo <= t < mid_hi) for t in range(lo, hi, block)]
                  for lo, mid_lo, mid_hi, hi in (bounds[:4], bounds[4:])]
        blocks.append((start, stop, ranges))
    return n, blocks


@pytest.mark.parametrize("L, N, S", [(77, 0, 0), (23, 2, 5), (9, 1, 37), (40, 1, 4), (19, 2, 3), (5, 3, 16)])
def test_tiles_cover_every_visible_pair_once_and_inner_tiles_need_no_mask(L, N, S):
    """The tile runs of every query block (forward, dQ) and key block (dK/dV), against reference.visible: each
    visible pair lies in exactly one visited tile, and a tile without the mask holds only visible pairs; windows of
    every size up to a tile and past, so band edges fall on every offset within a tile."""
    for window in [None, 1, 2, 3, 4, 7, 12, 15, 16, 17, 19, 24, 31, 33, L // 2, L + S + 2]:
        _check_query_tiles(L, N, S, window)
        _check_key_tiles(L, N, S, window)


def _check_key_tiles(L, N, S, window):
    block = 16
    n, blocks = _runs_of(_key_block_probe, L, N, S, window, block)
    index = torch.arange(n)
    seen = visible(index[:, None], index[None], L, S, window=window)  # [rows, cols]
    for start, stop, (own_rows, first_sample_rows) in blocks:
        counted = torch.zeros(n, stop - start, dtype=torch.int64)
        runs = [(tile, hi, masked, 0) for tile, hi, masked in own_rows]
        runs += [(tile, hi, masked, sample * L * S) for tile, hi, masked in first_sample_rows for sample in range(N)]
        for tile, hi, masked, shift in runs:
            rows = index[tile + shift:min(tile + block, hi) + shift]
            pairs = seen[rows, start:stop]
            counted[rows] += pairs.long()
            assert masked or pairs.all(), f"columns {start}..{stop}: inner row tile at {tile} holds invisible pairs"
        assert torch.equal(counted, seen[:, start:stop].long()), f"columns {start}..{stop}: a pair missed or twice"


def _check_query_tiles(L, N, S, window):
    block = 16
    n, blocks = _runs_of(_query_block_probe, L, N, S, window, block)
    index = torch.arange(n)
    seen = visible(index[:, None], index[None], L, S, window=window)
    inner_tiles = skipped = 0
    for start, stop, ranges in blocks:
        tiles = ranges[0] + ranges[1]
        counted = torch.zeros(stop - start, n, dtype=torch.int64)
        for tile, hi, masked in tiles:
            cols = index[tile:min(tile + block, hi, n)]
            pairs = seen[start:stop][:, cols]
            counted[:, cols] += pairs.long()
            if not masked:
                inner_tiles += 1
                assert pairs.all(), f"rows {start}..{stop}: inner tile at {tile} holds invisible pairs"
        assert torch.equal(counted, seen[start:stop].long()), f"rows {start}..{stop}: a visible pair is missed or twice"
        if N == 0 and window is not None:  # plain rows: the band is exact, so no visited tile is wholly invisible
            visited = [tile for tile, _, _ in tiles]
            assert all(seen[start:stop, t:t + block].any() for t in visited)
            skipped += -(-stop // block) - len(visited)
    if L > 4 * block and (window is None or window > 2 * block):
        assert inner_tiles > 0
    if N == 0 and window is not None and window < L - 2 * block:
        assert skipped > 0, "a band narrower than the row must leave tiles out"
