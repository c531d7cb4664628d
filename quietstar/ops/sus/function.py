"""Entry points of SUS attention: input checks, backend choice, and the Triton autograd Function.

Shapes: q ``[B, H, n, d]``, k/v ``[B, Hkv, n, d]`` with H a multiple of Hkv (grouped-query
attention); the output is ``[B, H, n, d]``. ``num_text``/``branch_length`` select the pattern (see
:mod:`.reference`); ``key_valid`` ``[B, num_text]`` bool marks real (non-padding) text keys.
"""

from __future__ import annotations

import os

import torch

from .reference import ReferenceSusAttention, _check_pattern

BACKENDS = ("auto", "torch", "triton")
HEAD_DIMS = (16, 32, 64, 128)
SEED_MASK = 0x7FFFFFFF  # the kernels take the seed as a 32-bit signed integer


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _block_sizes(device: torch.device, head_dim: int) -> tuple[int, int]:
    if device.type != "cuda":  # the interpreter: small tiles keep tiny tests fast
        return 16, 16
    return (64, 64) if head_dim <= 64 else (64, 32)


def _num_blocks(count: int, block: int) -> int:
    return -(-count // block)


def _launch_geometry(n, num_text, block):
    text_blocks = _num_blocks(num_text, block)
    return text_blocks, text_blocks + _num_blocks(n - num_text, block)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def triton_forward(q, k, v, key_valid, scale, num_text, branch_length, causal, out=None):
    """Launch the forward kernel on contiguous q, k, v; ``out`` = (o, lse) buffers to fill, else new ones."""
    from . import kernels

    B, H, n, d = q.shape
    if out is None:
        out = torch.empty_like(q), torch.empty(B, H, n, device=q.device, dtype=torch.float32)
    o, lse = out
    block_m, block_n = _block_sizes(q.device, d)
    text_blocks, total = _launch_geometry(n, num_text, block_m)
    has_key_valid = key_valid is not None
    key_valid_arg = key_valid.to(torch.int8).contiguous() if has_key_valid else lse
    kernels.forward_kernel[(total, B * H)](
        q, k, v, o, lse, key_valid_arg,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        n, num_text, max(branch_length, 1), H, H // k.shape[1], text_blocks, scale,
        CAUSAL=causal, HAS_KEY_VALID=has_key_valid, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=d,
        PRECISION=_precision(q.dtype),
    )
    return o, lse


def triton_backward(q, k, v, o, lse, do, key_valid, scale, num_text, branch_length, causal, c, seed, out=None):
    """Launch the two backward kernels; ``out`` = (dq, dk, dv) buffers to fill, else new ones."""
    from . import kernels

    B, H, n, d = q.shape
    hkv = k.shape[1]
    do = do.contiguous()
    delta = (do.float() * o.float()).sum(-1)  # D from the exact output, never from P~ (that would bias dQ)
    dq, dk, dv = out if out is not None else (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    block_m, block_n = _block_sizes(q.device, d)
    has_key_valid = key_valid is not None
    key_valid_arg = key_valid.to(torch.int8).contiguous() if has_key_valid else lse
    sus = c is not None
    common = dict(CAUSAL=causal, HAS_KEY_VALID=has_key_valid, SUS=sus, HEAD_DIM=d, PRECISION=_precision(q.dtype))
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    S = max(branch_length, 1)
    c_arg = float(c) if sus else 1.0
    text_blocks, total = _launch_geometry(n, num_text, block_m)
    kernels.backward_dq_kernel[(total, B * H)](
        q, k, v, do, dq, lse, delta, key_valid_arg, *strides,
        n, num_text, S, H, H // hkv, text_blocks, scale, c_arg, seed,
        BLOCK_M=block_m, BLOCK_N=block_n, **common,
    )
    text_key_blocks, total_keys = _launch_geometry(n, num_text, block_n)
    kernels.backward_dkdv_kernel[(total_keys, B * hkv)](
        q, k, v, do, dk, dv, lse, delta, key_valid_arg, *strides,
        n, num_text, S, H, H // hkv, text_key_blocks, scale, c_arg, seed,
        BLOCK_M=block_m, BLOCK_N=block_n, **common,
    )
    return dq, dk, dv


class TritonSusAttention(torch.autograd.Function):
    """Autograd Function over the Triton kernels: exact forward, exact or SUS backward; one gradient per input."""

    @staticmethod
    def forward(ctx, q, k, v, key_valid, scale, num_text, branch_length, causal, c, seed):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse = triton_forward(q, k, v, key_valid, scale, num_text, branch_length, causal)
        ctx.save_for_backward(q, k, v, o, lse, key_valid)
        ctx.settings = (scale, num_text, branch_length, causal, c, seed)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, key_valid = ctx.saved_tensors
        scale, num_text, branch_length, causal, c, seed = ctx.settings
        dq, dk, dv = triton_backward(q, k, v, o, lse, do, key_valid, scale, num_text, branch_length, causal, c, seed)
        return dq, dk, dv, None, None, None, None, None, None, None


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA with Triton installed, else 'torch'; checks forced choices."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
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


def check_inputs(q, k, v, c, num_text, branch_length, key_valid, backend):
    if c is not None and not (isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0):
        raise ValueError(f"c must be a positive number (or None for the exact backward), got {c!r}.")
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
    _check_pattern(n, num_text, branch_length)
    if key_valid is not None and tuple(key_valid.shape) != (B, num_text):
        raise ValueError(f"key_valid must be [batch, num_text] = {(B, num_text)}, got {tuple(key_valid.shape)}.")
    if backend == "triton":
        if d not in HEAD_DIMS:
            raise ValueError(f"The Triton kernels support head dims {HEAD_DIMS}, got {d}; use backend='torch'.")
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"The Triton kernels take fp16, bf16 or fp32, got {q.dtype}.")


def attention(q, k, v, *, c=None, scale=None, seed=0, backend="auto", causal=True, num_text=None,
              branch_length=0, key_valid=None):
    """Exact attention forward with an exact (``c=None``) or SUS backward, for any supported pattern."""
    num_text = q.shape[2] if num_text is None else num_text
    backend = resolve_backend(backend, q.device)
    check_inputs(q, k, v, c, num_text, branch_length, key_valid, backend)
    if not causal and branch_length:
        raise ValueError("The thought layout is causal; causal=False applies to plain attention only.")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    seed = int(seed) & SEED_MASK
    key_valid = None if key_valid is None else key_valid.bool()
    fn = TritonSusAttention if backend == "triton" else ReferenceSusAttention
    return fn.apply(q, k, v, key_valid, scale, num_text, branch_length, causal, c, seed)


def sus_attention(q, k, v, c, causal=True, scale=None, seed=0, backend="auto"):
    """Attention with an exact forward and a SUS backward (DESIGN §3, §4).

    q ``[B, H, n, d]``, k/v ``[B, Hkv, n, d]`` -> ``[B, H, n, d]``. Every attention weight P enters
    the backward with probability min(1, c P), rescaled to max(P, 1/c): an unbiased gradient for
    O(n c) backward work. ``c=None`` gives the exact backward. ``seed`` (low 31 bits) fixes the
    mask: u(seed, batch * H + head, row, col) from a counter-based hash. ``backend``: "auto"
    (Triton on CUDA, the PyTorch reference elsewhere), "torch" or "triton".
    """
    return attention(q, k, v, c=c, scale=scale, seed=seed, backend=backend, causal=causal)
