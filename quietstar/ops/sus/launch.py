"""Launches of the Triton kernels of :mod:`.kernels`: tile sizes, grids, and keyword arguments.

Same signatures as :func:`.reference.attention_forward` / :func:`.reference.attention_backward`, plus
``out``, buffers to fill (tests poison them with NaN). Inputs must be contiguous: K and V share one
set of strides, and so do Q, dO, O and their gradients.
"""

from __future__ import annotations

import torch

from . import kernels


def _block_sizes(device: torch.device, head_dim: int) -> tuple[int, int]:
    if device.type != "cuda":  # the interpreter: small tiles keep tiny tests fast
        return 16, 16
    return (64, 64) if head_dim <= 64 else (64, 32)


def _launch_geometry(n: int, num_text: int, block: int) -> tuple[int, int]:
    """(blocks over the text, blocks over the whole row): text and branch blocks are numbered separately."""
    text_blocks = -(-num_text // block)
    return text_blocks, text_blocks + -(-(n - num_text) // block)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _shared_arguments(q, k, key_valid, lse, num_text, branch_length, causal) -> dict:
    """Keyword arguments every kernel takes: strides, sizes, the pattern, and the key_valid pointer (a dummy
    tensor, never read, when there is no padding)."""
    B, H, n, d = q.shape
    has_key_valid = key_valid is not None
    return dict(
        KEY_VALID=key_valid.to(torch.int8).contiguous() if has_key_valid else lse,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qn=q.stride(2),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2),
        n=n, num_text=num_text, branch_length=max(branch_length, 1), num_heads=H, group=H // k.shape[1],
        CAUSAL=causal, HAS_KEY_VALID=has_key_valid, HEAD_DIM=d, PRECISION=_precision(q.dtype),
    )


def triton_forward(q, k, v, scale, num_text, branch_length=0, causal=True, key_valid=None, out=None):
    """Exact attention: (o ``[B, H, n, d]`` in q's dtype, lse ``[B, H, n]`` fp32); ``out`` = (o, lse) to fill."""
    B, H, n, d = q.shape
    if out is None:
        out = torch.empty_like(q), torch.empty(B, H, n, device=q.device, dtype=torch.float32)
    o, lse = out
    block_m, block_n = _block_sizes(q.device, d)
    text_blocks, total = _launch_geometry(n, num_text, block_m)
    kernels.forward_kernel[(total, B * H)](
        Q=q, K=k, V=v, O=o, LSE=lse, text_blocks=text_blocks, scale=scale, BLOCK_M=block_m, BLOCK_N=block_n,
        **_shared_arguments(q, k, key_valid, lse, num_text, branch_length, causal),
    )
    return o, lse


def triton_backward(q, k, v, o, lse, do, scale, num_text, branch_length=0, causal=True, key_valid=None, c=None,
                    seed=0, out=None):
    """Gradients (dq, dk, dv) in the inputs' dtypes, exact (``c=None``) or SUS; ``out`` = (dq, dk, dv) to fill."""
    B, H, n, d = q.shape
    hkv = k.shape[1]
    do = do.contiguous()
    delta = (do.float() * o.float()).sum(-1)  # D from the exact output, never from P~ (that would bias dQ)
    dq, dk, dv = out if out is not None else (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    block_m, block_n = _block_sizes(q.device, d)
    common = dict(Q=q, K=k, V=v, DO=do, LSE=lse, DELTA=delta, scale=scale, c=float(c) if c is not None else 1.0,
                  seed=seed, SUS=c is not None, BLOCK_M=block_m, BLOCK_N=block_n,
                  **_shared_arguments(q, k, key_valid, lse, num_text, branch_length, causal))
    text_blocks, total = _launch_geometry(n, num_text, block_m)
    kernels.backward_dq_kernel[(total, B * H)](DQ=dq, text_blocks=text_blocks, **common)
    text_key_blocks, total_keys = _launch_geometry(n, num_text, block_n)
    kernels.backward_dkdv_kernel[(total_keys, B * hkv)](DK=dk, DV=dv, text_key_blocks=text_key_blocks, **common)
    return dq, dk, dv
