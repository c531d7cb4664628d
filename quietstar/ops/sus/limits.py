"""What SUS attention accepts: its designs, how its kernels multiply fp32, the head dims and dtypes its Triton
kernels are built for, and the width of its seeds. The config (``QuietStarConfig.sus_design``,
``triton_fp32_precision``), the entry points and the launches all read them here."""

from __future__ import annotations

import torch

SUS_DESIGNS = ("a", "c")  # a: each weight drawn alone (design_a_*.py); c: per (row, key tile) first (design_c_*.py)
FP32_PRECISIONS = ("tf32", "ieee")  # fp32 dots through tf32 tensor cores, or exact fp32 on FMA units
HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SEED_MASK = 0x7FFFFFFF  # the kernels take the seed as a 32-bit signed integer


def kernel_limitation(head_dim: int | None, dtype: torch.dtype | None) -> str | None:
    """Why the Triton kernels cannot take this head dim or dtype, or None if they can (None arguments: unchecked)."""
    if head_dim is not None and head_dim not in HEAD_DIMS:
        return f"the Triton kernels support head dims {HEAD_DIMS}, got {head_dim}"
    if dtype is not None and dtype not in DTYPES:
        return f"the Triton kernels take fp16, bf16 or fp32, got {dtype}"
    return None
