"""What the launches of both SUS designs share: the tiles per kernel, head dim, dtype and arch, the keyword arguments
every kernel takes, the GPU a launch compiles for, and :class:`LaunchedKernel`, how a launch module registers its
kernels with the compile check (``scripts/compile_check.py``).

Inputs must be contiguous: K and V share one set of strides, and so do Q, dO, O and their gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .limits import FP32_PRECISIONS, HEAD_DIMS

MAX_HEAD_ELEMENTS = 2**31  # offsets inside one head's [n, d] slice are 32-bit; batch/head bases are 64-bit


@dataclass(frozen=True)
class TileConfig:
    """Tiles of one kernel launch: query rows per tile, key columns per tile, warps, software-pipeline stages, and
    the registers per thread ptxas may use. Left to itself, ptxas often holds a block of 4 or 8 warps to 128
    registers (room for two or more blocks per SM) and spills the rest; the tiles are sized to fit in 255."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    max_registers: int = 255


_T = TileConfig
# Compiled tiles per (kernel, inputs, arch), one per head dim of HEAD_DIMS (16, 32, 64, 128), fixed per head dim and
# dtype (no autotuning on n; design C's forward takes the forward's). Inputs: "half" (fp16, bf16), "tf32" (fp32 through
# tf32 tensor cores), "ieee" (exact fp32 on FMA units: the kernel tests' oracle setting). Arch 90: H100/H200 (wgmma, 227
# KiB of shared memory per block); arch 80: A100, under 99 KiB so that the 8.6/8.9/12.x parts fit too. Each is the
# largest tensor-core tile that the compile check (scripts/compile_check.py; README.md holds its table) finds free of
# register spills and within shared memory. dK/dV works transposed: its BLOCK_N keys are the dots' M side, BLOCK_M query
# rows per step.
_COMPILED_TILES = {
    ("forward", "half", 90): (_T(128, 64, 4, 3), _T(128, 64, 4, 3), _T(128, 64, 8, 3), _T(128, 64, 8, 2)),
    ("dq", "half", 90): (_T(128, 64, 8, 2),) * 4,
    ("dkdv", "half", 90): (_T(64, 128, 8, 2), _T(64, 128, 8, 2), _T(32, 128, 8, 2), _T(16, 128, 8, 2)),
    # mma.sync keeps the dots' operands and accumulators in registers: at d 128, 128 x 64 reaches 255 and spills.
    ("forward", "half", 80): (_T(128, 64, 4, 3), _T(128, 64, 4, 3), _T(128, 64, 8, 3), _T(128, 32, 8, 3)),
    # d 16: 4 warps, fewer instructions per score than 8; d 64 and 128: the SUS hash and keep test take 128 x 64 past
    # 255 registers.
    ("dq", "half", 80): (_T(128, 64, 4, 2), _T(128, 64, 8, 2), _T(128, 32, 8, 2), _T(64, 64, 8, 2)),
    # dK and dV accumulate [keys, d] in fp32 beside K and V: 32 keys at d 64 and 128; small query steps leave room for
    # the boundary-tile and band loops of sliding windows.
    ("dkdv", "half", 80): (_T(32, 128, 8, 2), _T(32, 128, 8, 2), _T(32, 32, 4, 2), _T(16, 32, 4, 2)),
    # fp32 operands are twice the registers and shared memory of fp16: 32 key columns, 4 warps where 8 would split a
    # 64 x 32 tile too thinly (twice the instructions per score).
    ("forward", "tf32", 90): (_T(64, 32, 4, 3), _T(64, 32, 4, 3), _T(128, 32, 8, 2), _T(128, 32, 8, 2)),
    ("dq", "tf32", 90): (_T(128, 32, 8, 2),) * 4,
    # d 128: dK, dV, K and V of 64 keys in fp32 spill whatever the warps; 32 keys run on mma.sync instead of wgmma.
    ("dkdv", "tf32", 90): (_T(32, 64, 4, 2), _T(32, 64, 4, 2), _T(32, 64, 4, 2), _T(32, 32, 8, 2)),
    ("forward", "tf32", 80): (_T(64, 32, 4, 3), _T(64, 32, 4, 3), _T(128, 32, 8, 3), _T(128, 32, 8, 2)),
    ("dq", "tf32", 80): (_T(64, 32, 4, 2), _T(64, 32, 4, 2), _T(128, 32, 8, 2), _T(32, 32, 4, 2)),
    ("dkdv", "tf32", 80): (_T(32, 64, 8, 2), _T(16, 64, 8, 2), _T(32, 32, 4, 2), _T(32, 32, 8, 2)),
    # Exact fp32 (FMA dots) keeps spills on every tile tried, worst at d 128; it serves the tests, not training speed.
    ("forward", "ieee", 90): (_T(64, 32, 4, 3), _T(64, 32, 4, 3), _T(64, 32, 8, 3), _T(64, 32, 8, 2)),
    ("dq", "ieee", 90): (_T(64, 32, 8, 2),) * 4,
    ("dkdv", "ieee", 90): (_T(32, 64, 8, 2), _T(32, 64, 8, 2), _T(16, 64, 8, 2), _T(16, 64, 8, 2)),
    ("forward", "ieee", 80): (_T(64, 32, 4, 3), _T(64, 32, 4, 3), _T(64, 32, 8, 3), _T(64, 32, 8, 2)),
    ("dq", "ieee", 80): (_T(64, 32, 8, 2), _T(64, 32, 8, 2), _T(64, 32, 8, 2), _T(32, 32, 4, 2)),
    ("dkdv", "ieee", 80): (_T(32, 64, 8, 2), _T(32, 64, 8, 2), _T(16, 64, 8, 2), _T(16, 64, 8, 2)),
}
_INTERPRETED_TILES = TileConfig(16, 16, 4, 1)  # the interpreter: small tiles keep tiny tests fast
KERNELS = ("forward", "dq", "dkdv")


def tile_arch(arch: int) -> int:
    """The tile table an arch (compute capability major * 10 + minor) takes: 90 for Hopper and the data-centre
    Blackwells (9.x, 10.x: at least 227 KiB of shared memory), 80 for the rest (8.x, 12.x)."""
    return 90 if 90 <= arch < 120 else 80


def tile_config(kernel: str, head_dim: int, dtype: torch.dtype, fp32_precision: str, arch: int | None) -> TileConfig:
    """The tiles of ``kernel`` ("forward", "dq", "dkdv") for this head dim, input dtype and GPU arch (None: the
    interpreter)."""
    if arch is None:
        return _INTERPRETED_TILES
    inputs = fp32_precision if dtype == torch.float32 else "half"
    return _COMPILED_TILES[(kernel, inputs, tile_arch(arch))][HEAD_DIMS.index(head_dim)]


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


def launch_geometry(n: int, num_text: int, block: int) -> tuple[int, int]:
    """(blocks over the text, blocks over the whole row): text and branch blocks are numbered separately."""
    text_blocks = -(-num_text // block)
    return text_blocks, text_blocks + -(-(n - num_text) // block)


def shared_arguments(q, k, key_valid, lse, num_text, branch_length, causal, fp32_precision, tiles, window=None,
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
        maxnreg=tiles.max_registers,
        CAUSAL=causal, HAS_KEY_VALID=has_key_valid, HEAD_DIM=d, PRECISION=dot_precision(q.dtype, fp32_precision),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        WINDOWED=window is not None, window=min(window, n + 1) if window is not None else 0,
        SOFTCAP=softcap is not None, softcap=float(softcap) if softcap is not None else 1.0,
    )


@dataclass(frozen=True)
class LaunchedKernel:
    """A kernel a design's launches use, as the compile check (``scripts/compile_check.py``) builds it for each arch,
    input dtype and head dim (exact and SUS where ``backward``; SUS alone where ``sus_only``). ``example(q, k, v, lse,
    c, seed, num_text, branch_length, causal, key_valid, fp32_precision, arch[, window, softcap])`` returns the
    (kernel, grid, keyword arguments) its module launches for those inputs (``c`` None: exact); BLOCK_M x the
    keyword argument named ``key_block`` are the scores of one iteration of the kernel's tile loop. ``windowed``:
    the kernel takes a sliding window and soft-capping. Each design's launch module lists its own:
    ``design_a_launch.LAUNCHED_KERNELS``, ``design_c_launch.LAUNCHED_KERNELS``."""

    name: str
    backward: bool
    example: Callable
    key_block: str = "BLOCK_N"
    sus_only: bool = False
    windowed: bool = True


def device_arch(device: torch.device) -> int | None:
    """The compute capability the kernels compile for on ``device``; None on CPU (the interpreter)."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def on_device(device: torch.device):
    """Launch on the tensors' GPU, not on the current one (a second GPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
