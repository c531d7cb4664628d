"""The one rule for computing in "at least fp32": fp64 stays fp64 (gradient checks), anything narrower becomes fp32."""

from __future__ import annotations

import torch


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32, or as it is when it is fp64."""
    return x.to(wide_dtype(x.dtype))
