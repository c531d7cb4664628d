"""Launches of design C's kernels (:mod:`.design_c_kernels`), and the list of opened cells between them.

The forward returns (o, lse, cell_pi): cell_pi ``[B, H, n, tiles]`` fp32 holds pi_it for each opened (row, key
tile) cell and 0 for a closed one (level 1, drawn in the forward's epilogue). The backward lists, per (head, key
tile), the rows that opened it, sorted by head, tile and row: ROWS (int32) with their pi (PI, fp32), CELL_FIRST /
CELL_COUNT per cell. Memory: cell_pi 4 * ceil(n / 64) bytes per row and head, kept from forward to backward (16 MiB
per head at n = 16k); the lists 8 bytes per opened cell, during the backward. Each ``*_launch`` function returns
(kernel, grid, keyword arguments) without launching, as :mod:`.design_a_launch` does, for the compile check
(``scripts/compile_check.py``), which compiles the kernels of :data:`LAUNCHED_KERNELS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import design_c_kernels, design_c_reference
from .common_launch import (LaunchedKernel, TileConfig, check_sizes, device_arch, on_device, shared_arguments,
                            tile_config)


@dataclass(frozen=True)
class OpenedCells:
    """Level 1's outcome in the backward kernel's layout (module docstring)."""

    rows: torch.Tensor  # [opened cells] int32
    pi: torch.Tensor  # [opened cells] fp32
    first: torch.Tensor  # [B * H * tiles] int64
    count: torch.Tensor  # [B * H * tiles] int32


# Backward tiles per (head dim, 2-byte or fp32 inputs): gathered query rows per step (the dots' N side next to the
# 64-key tile), warps, stages. From the compile check on sm_90: wgmma and no spills, except fp32 at head dim 128
# (104/88 bytes; 8 warps spill more); 8 warps or more rows spill at head dim 64 and 128 (dK, dV and K, V of the
# tile stay in registers).
_BACKWARD_TILES = {
    (16, "half"): (64, 4, 2), (32, "half"): (64, 4, 2), (64, "half"): (32, 4, 2), (128, "half"): (16, 4, 2),
    (16, "fp32"): (32, 4, 2), (32, "fp32"): (32, 4, 2), (64, "fp32"): (32, 4, 2), (128, "fp32"): (16, 4, 2),
}


def backward_tiles(head_dim: int, dtype: torch.dtype, arch: int | None) -> TileConfig:
    """The backward's tiles: block_m gathered rows, block_n the key tile (set by the estimator, not here); ``arch``
    None: the interpreter."""
    if arch is None:
        return TileConfig(16, design_c_reference.TILE, 4, 1)
    block_m, num_warps, num_stages = _BACKWARD_TILES[(head_dim, "fp32" if dtype == torch.float32 else "half")]
    return TileConfig(block_m, design_c_reference.TILE, num_warps, num_stages)


def check_tile_sizes(n: int, num_tiles: int) -> None:
    if n * num_tiles >= 2**31:
        raise ValueError(f"Design C stores n * key tiles = {n} * {num_tiles} tile log-sum-exps per head, past the "
                         "kernels' 32-bit offsets; split the sequence or use sus_design='a'.")


def _drop_unused(arguments: dict) -> None:
    """Design C's kernels take no window and no soft-capping (function.check_inputs refuses them), and their key
    block is the estimator's tile, not a tile configuration's BLOCK_N."""
    for key in ("BLOCK_N", "WINDOWED", "window", "SOFTCAP", "softcap"):
        del arguments[key]


def forward_launch(q, k, v, o, lse, cell_pi, scale, num_text, branch_length, causal, key_valid, c, seed,
                   fp32_precision, arch, tile=design_c_reference.TILE):
    B, H, n, d = q.shape
    tiles = tile_config("forward", d, q.dtype, fp32_precision, arch)
    text_blocks = -(-num_text // tiles.block_m)
    total = text_blocks + -(-(n - num_text) // tiles.block_m)
    arguments = shared_arguments(q, k, key_valid, lse, num_text, branch_length, causal, fp32_precision, tiles)
    _drop_unused(arguments)
    arguments.update(Q=q, K=k, V=v, O=o, LSE=lse, CELL_PI=cell_pi, text_blocks=text_blocks,
                     text_tiles=-(-num_text // tile), num_tiles=design_c_reference.num_key_tiles(n, num_text, tile),
                     scale=scale, c=float(c), seed=seed, TILE=tile)
    return design_c_kernels.forward_kernel, (total, B * H), arguments


def backward_launch(q, k, v, do, lse, delta, dq32, dk, dv, cells, scale, num_text, branch_length, causal, key_valid,
                    c, seed, fp32_precision, arch, tile=design_c_reference.TILE):
    B, H, n, d = q.shape
    tiles = backward_tiles(d, q.dtype, arch)
    num_tiles = design_c_reference.num_key_tiles(n, num_text, tile)
    arguments = shared_arguments(q, k, key_valid, lse, num_text, branch_length, causal, fp32_precision, tiles)
    _drop_unused(arguments)
    arguments.update(Q=q, K=k, V=v, DO=do, DQ=dq32, DK=dk, DV=dv, LSE=lse, DELTA=delta, ROWS=cells.rows, PI=cells.pi,
                     CELL_FIRST=cells.first, CELL_COUNT=cells.count, text_tiles=-(-num_text // tile),
                     num_tiles=num_tiles, scale=scale, c=float(c), seed=seed, TILE=tile)
    return design_c_kernels.backward_kernel, (num_tiles, B * k.shape[1]), arguments


def _forward_example(q, k, v, lse, c, seed, **pattern):
    B, H, n, d = q.shape
    cell_pi = torch.empty(B, H, n, design_c_reference.num_key_tiles(n, pattern["num_text"]))
    return forward_launch(q, k, v, torch.empty_like(q), lse, cell_pi, d**-0.5, c=c, seed=seed, **pattern)


def _backward_example(q, k, v, lse, c, seed, **pattern):
    """The launch with no opened cell (one dummy row, zero counts): the lists are data, not part of the compiled
    kernel."""
    B, H, n, d = q.shape
    cells_per_head = B * H * design_c_reference.num_key_tiles(n, pattern["num_text"])
    cells = OpenedCells(rows=torch.zeros(1, dtype=torch.int32), pi=torch.zeros(1),
                        first=torch.zeros(cells_per_head, dtype=torch.int64),
                        count=torch.zeros(cells_per_head, dtype=torch.int32))
    return backward_launch(q, k, v, torch.empty_like(q), lse, torch.empty_like(lse), q.float(), torch.empty_like(k),
                           torch.empty_like(v), cells, d**-0.5, c=c, seed=seed, **pattern)


# Both kernels always sample (no exact variant) and key blocks are one estimator tile (TILE, not BLOCK_N).
LAUNCHED_KERNELS = (
    LaunchedKernel("design_c_forward", False, _forward_example, key_block="TILE", sus_only=True, windowed=False),
    LaunchedKernel("design_c_backward", False, _backward_example, key_block="TILE", sus_only=True, windowed=False))


def triton_forward(q, k, v, scale, num_text, branch_length=0, causal=True, key_valid=None, c=1.0, seed=0, out=None,
                   fp32_precision="tf32", tile=design_c_reference.TILE):
    """Exact attention and level 1: (o ``[B, H, n, d]``, lse ``[B, H, n]``, cell_pi ``[B, H, n, tiles]`` fp32, pi of
    each opened cell, 0 for closed ones); ``out`` = (o, lse, cell_pi) to fill (cell_pi is zeroed here)."""
    B, H, n, d = q.shape
    check_sizes(q)
    num_tiles = design_c_reference.num_key_tiles(n, num_text, tile)
    check_tile_sizes(n, num_tiles)
    if out is None:
        out = (torch.empty_like(q), torch.empty(B, H, n, device=q.device, dtype=torch.float32),
               torch.empty(B, H, n, num_tiles, device=q.device, dtype=torch.float32))
    o, lse, cell_pi = out
    cell_pi.zero_()  # cells of tiles a row's block never visits stay closed
    kernel, grid, arguments = forward_launch(q, k, v, o, lse, cell_pi, scale, num_text, branch_length, causal,
                                             key_valid, c, seed, fp32_precision, device_arch(q.device), tile)
    with on_device(q.device):
        kernel[grid](**arguments)
    return o, lse, cell_pi


def opened_cells(cell_pi: torch.Tensor) -> OpenedCells:
    """The forward's level-1 outcome listed per (head, tile)."""
    B, H, n, num_tiles = cell_pi.shape
    by_tile = cell_pi.view(B * H, n, num_tiles).transpose(1, 2)  # [BH, tiles, n]
    cell_open = by_tile > 0
    count = cell_open.sum(-1, dtype=torch.int32).flatten()
    first = torch.cumsum(count, 0, dtype=torch.int64) - count
    rows = cell_open.nonzero()[:, 2].to(torch.int32)  # sorted by (head, tile, row), the order of ``first``
    pi = by_tile[cell_open]
    if rows.numel() == 0:  # nothing opened: the kernel still needs valid pointers
        rows, pi = rows.new_zeros(1), pi.new_zeros(1)
    return OpenedCells(rows=rows, pi=pi, first=first, count=count)


def triton_backward(q, k, v, o, lse, cell_pi, do, scale, num_text, branch_length=0, causal=True, key_valid=None,
                    c=1.0, seed=0, out=None, fp32_precision="tf32", tile=design_c_reference.TILE):
    """Design C's SUS gradients (dq, dk, dv) in the inputs' dtypes, for the cells the forward opened (``cell_pi``,
    drawn with the same ``c`` and ``seed``); ``out`` = (dq, dk, dv) to fill."""
    check_sizes(q)
    do = do.contiguous()
    delta = (do.float() * o.float()).sum(-1)  # D from the exact output, never from P~ (that would bias dQ)
    dq, dk, dv = out if out is not None else (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    dq32 = torch.zeros(q.shape, device=q.device, dtype=torch.float32)  # the atomics' accumulator
    cells = opened_cells(cell_pi)
    kernel, grid, arguments = backward_launch(q, k, v, do, lse, delta, dq32, dk, dv, cells, scale, num_text,
                                              branch_length, causal, key_valid, c, seed, fp32_precision,
                                              device_arch(q.device), tile)
    with on_device(q.device):
        kernel[grid](**arguments)
    dq.copy_(dq32)
    return dq, dk, dv
