"""Launches of the Triton kernels of :mod:`.kernels`: tile configurations, grids, and keyword arguments.

Same signatures as :func:`.reference.attention_forward` / :func:`.reference.attention_backward`, plus
``out``, buffers to fill (tests poison them with NaN), and ``fp32_precision``. Inputs must be contiguous:
K and V share one set of strides, and so do Q, dO, O and their gradients.

Each ``*_launch`` function returns (kernel, grid, keyword arguments) without launching, so the compile
check (``scripts/compile_check.py``) compiles exactly what :func:`triton_forward` and
:func:`triton_backward` launch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from . import kernels
from .function import FP32_PRECISIONS
MAX_HEAD_ELEMENTS = 2**31  # offsets inside one head's [n, d] slice are 32-bit; batch/head bases are 64-bit


@dataclass(frozen=True)
class TileConfig:
    """Tiles of one kernel launch: query rows per tile, key columns per tile, warps, software-pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Compiled tiles per (kernel, head dim, 2-byte or fp32 inputs), fixed per head dim and dtype (no autotuning on n),
# chosen from the compile check's registers, spills and tensor-core instructions on sm_90 (README.md holds the table).
_COMPILED_TILES = {
    ("forward", 16, "half"): TileConfig(128, 64, 4, 3),
    ("forward", 32, "half"): TileConfig(128, 64, 4, 3),
    ("forward", 64, "half"): TileConfig(128, 64, 8, 3),
    ("forward", 128, "half"): TileConfig(128, 64, 8, 2),
    ("dq", 16, "half"): TileConfig(128, 64, 8, 2),
    ("dq", 32, "half"): TileConfig(128, 64, 8, 2),
    ("dq", 64, "half"): TileConfig(128, 64, 8, 2),
    ("dq", 128, "half"): TileConfig(128, 64, 8, 2),
    # dK/dV works transposed: BLOCK_N keys per program are the dots' M side, BLOCK_M query rows per step.
    ("dkdv", 16, "half"): TileConfig(64, 128, 8, 2),
    ("dkdv", 32, "half"): TileConfig(64, 128, 8, 2),
    ("dkdv", 64, "half"): TileConfig(32, 128, 8, 2),
    ("dkdv", 128, "half"): TileConfig(16, 128, 8, 2),
}
_INTERPRETED_TILES = TileConfig(16, 16, 4, 1)  # the interpreter: small tiles keep tiny tests fast
KERNELS = ("forward", "dq", "dkdv")


def tile_config(kernel: str, head_dim: int, dtype: torch.dtype, compiled: bool) -> TileConfig:
    """The tiles of ``kernel`` ("forward", "dq", "dkdv") for this head dim and input dtype."""
    if not compiled:
        return _INTERPRETED_TILES
    width = "fp32" if dtype == torch.float32 else "half"
    if width == "fp32":  # fp32 tiles are twice the bytes: halve the rows to stay within registers and shared memory
        half = _COMPILED_TILES[(kernel, head_dim, "half")]
        return TileConfig(max(half.block_m // 2, 16), max(half.block_n // 2, 16), half.num_warps, half.num_stages)
    return _COMPILED_TILES[(kernel, head_dim, width)]


def dot_precision(dtype: torch.dtype, fp32_precision: str) -> str:
    """``input_precision`` of the kernels' dots: fp32 inputs as asked ("tf32" tensor cores or exact "ieee")."""
    if fp32_precision not in FP32_PRECISIONS:
        raise ValueError(f"fp32_precision must be one of {FP32_PRECISIONS}, got {fp32_precision!r}.")
    return fp32_precision if dtype == torch.float32 else "tf32"  # 2-byte inputs ignore it


def check_sizes(q: torch.Tensor) -> None:
    """Offsets within one head are 32-bit in the kernels; refuse a head slice that would overflow them."""
    n, d = q.shape[-2:]
    if n * d >= MAX_HEAD_ELEMENTS:
        raise ValueError(f"One head holds n * head_dim = {n} * {d} elements, past the kernels' 2^31 per head; "
                         "split the sequence or use backend='torch'.")


def _launch_geometry(n: int, num_text: int, block: int) -> tuple[int, int]:
    """(blocks over the text, blocks over the whole row): text and branch blocks are numbered separately."""
    text_blocks = -(-num_text // block)
    return text_blocks, text_blocks + -(-(n - num_text) // block)


def _shared_arguments(q, k, key_valid, lse, num_text, branch_length, causal, fp32_precision, tiles, window=None,
                      softcap=None) -> dict:
    """Keyword arguments every kernel takes: strides, sizes, the pattern, the tiles, and the key_valid pointer (a dummy
    tensor, never read, when there is no padding). A window past every gap (n + 1) changes nothing and keeps the
    kernels' bound arithmetic within 32 bits."""
    B, H, n, d = q.shape
    has_key_valid = key_valid is not None
    return dict(
        KEY_VALID=key_valid.to(torch.int8).contiguous() if has_key_valid else lse,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qn=q.stride(2),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2),
        n=n, num_text=num_text, branch_length=max(branch_length, 1), num_heads=H, group=H // k.shape[1],
        CAUSAL=causal, HAS_KEY_VALID=has_key_valid, HEAD_DIM=d, PRECISION=dot_precision(q.dtype, fp32_precision),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        WINDOWED=window is not None, window=min(window, n + 1) if window is not None else 0,
        SOFTCAP=softcap is not None, softcap=float(softcap) if softcap is not None else 1.0,
    )


def forward_launch(q, k, v, o, lse, scale, num_text, branch_length, causal, key_valid, fp32_precision, compiled,
                   window=None, softcap=None):
    """(kernel, grid, keyword arguments) of the forward."""
    B, H, n, d = q.shape
    tiles = tile_config("forward", d, q.dtype, compiled)
    text_blocks, total = _launch_geometry(n, num_text, tiles.block_m)
    arguments = dict(Q=q, K=k, V=v, O=o, LSE=lse, text_blocks=text_blocks, scale=scale,
                     **_shared_arguments(q, k, key_valid, lse, num_text, branch_length, causal, fp32_precision, tiles,
                                         window, softcap))
    return kernels.forward_kernel, (total, B * H), arguments


def backward_launches(q, k, v, do, lse, delta, dq, dk, dv, scale, num_text, branch_length, causal, key_valid, c, seed,
                      fp32_precision, compiled, window=None, softcap=None):
    """[(kernel, grid, keyword arguments)] of the dQ and the dK/dV kernels."""
    B, H, n, d = q.shape
    common = dict(Q=q, K=k, V=v, DO=do, LSE=lse, DELTA=delta, scale=scale, c=float(c) if c is not None else 1.0,
                  seed=seed, SUS=c is not None)
    launches = []
    tiles = tile_config("dq", d, q.dtype, compiled)
    text_blocks, total = _launch_geometry(n, num_text, tiles.block_m)
    launches.append((kernels.backward_dq_kernel, (total, B * H), dict(
        DQ=dq, text_blocks=text_blocks, **common,
        **_shared_arguments(q, k, key_valid, lse, num_text, branch_length, causal, fp32_precision, tiles, window,
                            softcap))))
    tiles = tile_config("dkdv", d, q.dtype, compiled)
    text_key_blocks, total_keys = _launch_geometry(n, num_text, tiles.block_n)
    launches.append((kernels.backward_dkdv_kernel, (total_keys, B * k.shape[1]), dict(
        DK=dk, DV=dv, text_key_blocks=text_key_blocks, **common,
        **_shared_arguments(q, k, key_valid, lse, num_text, branch_length, causal, fp32_precision, tiles, window,
                            softcap))))
    return launches


def _on_device(device: torch.device):
    """Launch on the tensors' GPU, not on the current one (a second GPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def triton_forward(q, k, v, scale, num_text, branch_length=0, causal=True, key_valid=None, out=None,
                   fp32_precision="tf32", window=None, softcap=None):
    """Exact attention: (o ``[B, H, n, d]`` in q's dtype, lse ``[B, H, n]`` fp32); ``out`` = (o, lse) to fill."""
    B, H, n, d = q.shape
    check_sizes(q)
    if out is None:
        out = torch.empty_like(q), torch.empty(B, H, n, device=q.device, dtype=torch.float32)
    o, lse = out
    kernel, grid, arguments = forward_launch(q, k, v, o, lse, scale, num_text, branch_length, causal, key_valid,
                                             fp32_precision, compiled=q.device.type == "cuda", window=window,
                                             softcap=softcap)
    with _on_device(q.device):
        kernel[grid](**arguments)
    return o, lse


def triton_backward(q, k, v, o, lse, do, scale, num_text, branch_length=0, causal=True, key_valid=None, c=None,
                    seed=0, out=None, fp32_precision="tf32", window=None, softcap=None):
    """Gradients (dq, dk, dv) in the inputs' dtypes, exact (``c=None``) or SUS; ``out`` = (dq, dk, dv) to fill."""
    check_sizes(q)
    do = do.contiguous()
    delta = (do.float() * o.float()).sum(-1)  # D from the exact output, never from P~ (that would bias dQ)
    dq, dk, dv = out if out is not None else (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    launches = backward_launches(q, k, v, do, lse, delta, dq, dk, dv, scale, num_text, branch_length, causal, key_valid,
                                 c, seed, fp32_precision, compiled=q.device.type == "cuda", window=window,
                                 softcap=softcap)
    with _on_device(q.device):
        for kernel, grid, arguments in launches:
            kernel[grid](**arguments)
    return dq, dk, dv
