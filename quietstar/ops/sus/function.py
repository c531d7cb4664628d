"""Entry points of SUS attention: input checks, the backend choice, and the one autograd Function.

Shapes: q ``[B, H, n, d]``, k/v ``[B, Hkv, n, d]`` with H a multiple of Hkv (grouped-query
attention); the output is ``[B, H, n, d]``. ``num_text``/``branch_length`` select the pattern (see
:mod:`.reference`); ``key_valid`` ``[B, num_text]`` bool marks real (non-padding) text keys.
"""

from __future__ import annotations

import os
import warnings

import torch

from ...attention.settings import SUS_DESIGNS
from . import reference

BACKENDS = ("auto", "torch", "triton")
HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP32_PRECISIONS = ("tf32", "ieee")
SEED_MASK = 0x7FFFFFFF  # the kernels take the seed as a 32-bit signed integer


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernel_limitation(head_dim: int | None, dtype: torch.dtype | None) -> str | None:
    """Why the Triton kernels cannot take this head dim or dtype, or None if they can (None arguments: unchecked)."""
    if head_dim is not None and head_dim not in HEAD_DIMS:
        return f"the Triton kernels support head dims {HEAD_DIMS}, got {head_dim}"
    if dtype is not None and dtype not in DTYPES:
        return f"the Triton kernels take fp16, bf16 or fp32, got {dtype}"
    return None


def resolve_backend(backend: str, device: torch.device, head_dim: int | None = None,
                    dtype: torch.dtype | None = None) -> str:
    """'auto' -> 'triton' on CUDA with Triton installed for a head dim and dtype the kernels take, else 'torch'
    (with a one-line warning when only the head dim or dtype stands in the way); checks forced choices.

    The one place "auto" becomes Triton or not; quietstar.attention.dispatch asks it too.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if backend == "auto":
        if device.type != "cuda" or not triton_available():
            return "torch"
        reason = kernel_limitation(head_dim, dtype)
        if reason is not None:
            warnings.warn(f"SUS attention falls back to the PyTorch reference: {reason}.", stacklevel=2)
            return "torch"
        return "triton"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package (pip install triton); use backend='torch'.")
        if device.type != "cuda" and not _interpreting():
            raise ValueError(
                f"backend='triton' needs CUDA tensors, got {device.type} tensors. Move q, k, v to a GPU, use "
                "backend='torch', or set TRITON_INTERPRET=1 before importing quietstar to run the kernels in "
                "Triton's (slow) interpreter."
            )
    return backend


def _implementation(backend: str, design: str):
    """(forward, backward) of a resolved backend and SUS design; both share the signatures of the reference's,
    except that design C's kernel forward takes c and seed and returns one tensor more (cell_pi, its level-1 draw),
    which its backward takes after lse."""
    if design == "c":
        from . import row_tiles

        if backend == "triton":
            from . import row_tiles_launch

            return row_tiles_launch.triton_forward, row_tiles_launch.triton_backward
        return reference.attention_forward, row_tiles.attention_backward
    if backend == "triton":
        from . import launch  # imports triton, which only this backend needs

        return launch.triton_forward, launch.triton_backward
    return reference.attention_forward, reference.attention_backward


class SusAttention(torch.autograd.Function):
    """Exact forward, exact (``c=None``) or SUS backward, by the Triton kernels or the PyTorch reference;
    one gradient per input (q, k, v) and None for the settings."""

    @staticmethod
    def forward(ctx, q, k, v, key_valid, scale, num_text, branch_length, causal, c, seed, backend, fp32_precision,
                window, softcap, sus_design):
        kernel_options = {}
        if backend == "triton":
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            kernel_options = dict(fp32_precision=fp32_precision)
        design = sus_design if c is not None else "a"
        ctx.implementation = _implementation(backend, design)
        if design == "a":
            pattern_options = dict(window=window, softcap=softcap)
        else:  # no window or soft-capping in design C (check_inputs refuses them); its kernel forward draws level 1
            pattern_options = dict(c=c, seed=seed) if backend == "triton" else {}
        o, lse, *level1 = ctx.implementation[0](q, k, v, scale=scale, num_text=num_text, branch_length=branch_length,
                                                causal=causal, key_valid=key_valid, **kernel_options, **pattern_options)
        ctx.save_for_backward(q, k, v, o, lse, key_valid, *level1)
        ctx.settings = dict(scale=scale, num_text=num_text, branch_length=branch_length, causal=causal, c=c, seed=seed,
                            **kernel_options, **(dict(window=window, softcap=softcap) if design == "a" else {}))
        return o.to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, key_valid, *level1 = ctx.saved_tensors
        dq, dk, dv = ctx.implementation[1](q, k, v, o, lse, *level1, do, key_valid=key_valid, **ctx.settings)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *[None] * 12


def check_inputs(q, k, v, c, num_text, branch_length, key_valid, backend, fp32_precision="tf32", causal=True,
                 window=None, softcap=None, sus_design="a"):
    if c is not None and not (isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0):  # NaN fails c > 0
        raise ValueError(f"c must be a positive number (or None for the exact backward), got {c!r}.")
    if fp32_precision not in FP32_PRECISIONS:
        raise ValueError(f"fp32_precision must be one of {FP32_PRECISIONS}, got {fp32_precision!r}.")
    if sus_design not in SUS_DESIGNS:
        raise ValueError(f"sus_design must be one of {SUS_DESIGNS}, got {sus_design!r}.")
    if sus_design == "c" and c is not None and (window is not None or softcap is not None):
        raise ValueError("sus_design='c' does not implement sliding windows or soft-capping; use sus_design='a' "
                         "for this layer.")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [batch, heads, n, head_dim]; got shapes {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}.")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}.")
    B, H, n, d = q.shape
    if k.shape[0] != B or k.shape[2] != n or k.shape[3] != d:
        raise ValueError(f"k/v shape {tuple(k.shape)} does not match q {tuple(q.shape)} in batch, length or head dim.")
    if H % k.shape[1]:
        raise ValueError(f"{H} query heads are not a multiple of {k.shape[1]} key/value heads.")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}.")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}.")
    reference.check_pattern(n, num_text, branch_length, causal, window, softcap)
    if key_valid is not None and tuple(key_valid.shape) != (B, num_text):
        raise ValueError(f"key_valid must be [batch, num_text] = {(B, num_text)}, got {tuple(key_valid.shape)}.")
    if backend == "triton":
        reason = kernel_limitation(d, q.dtype)
        if reason is not None:
            raise ValueError(f"backend='triton': {reason}; use backend='torch' (or 'auto', which falls back).")


def attention(q, k, v, *, c=None, scale=None, seed=0, backend="auto", causal=True, num_text=None,
              branch_length=0, key_valid=None, fp32_precision="tf32", window=None, softcap=None, sus_design="a"):
    """Exact attention forward with an exact (``c=None``) or SUS backward, for any supported pattern.

    ``window``: a sliding window on position ids (:mod:`.reference`; causal only); ``softcap``: scaled scores s
    become softcap * tanh(s / softcap) (Gemma 2's attention-logit soft-capping). None: off.

    ``fp32_precision``: how the Triton kernels multiply fp32 inputs, "tf32" (tensor cores) or "ieee" (exact fp32).
    ``sus_design``: how SUS draws its mask, "a" (each entry on its own) or "c" (each (row, key tile) first, then
    its entries; the backward visits the opened cells only; row_tiles.py). Both keep each entry with probability
    min(1, cP); their samples differ.
    """
    num_text = q.shape[2] if num_text is None else num_text
    backend = resolve_backend(backend, q.device, q.shape[-1], q.dtype)
    check_inputs(q, k, v, c, num_text, branch_length, key_valid, backend, fp32_precision, causal, window, softcap,
                 sus_design)
    if not causal and branch_length:
        raise ValueError("The thought layout is causal; causal=False applies to plain attention only.")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    seed = int(seed) & SEED_MASK
    key_valid = None if key_valid is None else key_valid.bool()
    return SusAttention.apply(q, k, v, key_valid, scale, num_text, branch_length, causal, c, seed, backend,
                              fp32_precision, window, None if softcap is None else float(softcap), sus_design)


def sus_attention(q, k, v, c, causal=True, scale=None, seed=0, backend="auto", fp32_precision="tf32", sus_design="a"):
    """Attention with an exact forward and a SUS backward (docs/design.md §3, §4).

    q ``[B, H, n, d]``, k/v ``[B, Hkv, n, d]`` -> ``[B, H, n, d]``. Every attention weight P enters
    the backward with probability min(1, c P), rescaled to max(P, 1/c): an unbiased gradient for
    O(n c) backward work. ``c=None`` gives the exact backward. ``seed`` (low 31 bits) fixes the
    mask: u(seed, batch * H + head, row, col) from a counter-based hash. ``backend``: "auto"
    (Triton on CUDA for head dims 16, 32, 64, 128 and fp16/bf16/fp32, the PyTorch reference elsewhere), "torch" or
    "triton". ``fp32_precision``: fp32 inputs in the kernels through "tf32" tensor cores or exact "ieee".
    ``sus_design``: "a" (default) or "c" (two-level sampling per (row, key tile), a backward that visits only the
    opened cells; see :func:`attention`).
    """
    return attention(q, k, v, c=c, scale=scale, seed=seed, backend=backend, causal=causal,
                     fp32_precision=fp32_precision, sus_design=sus_design)
