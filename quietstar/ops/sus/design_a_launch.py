"""Launches of design A's Triton kernels (:mod:`.design_a_kernels`): grids and keyword arguments, with the tiles of
:mod:`.common_launch`.

Same signatures as :func:`.reference.attention_forward` / :func:`.design_a_reference.attention_backward`, plus
``out``, buffers to fill (tests poison them with NaN), and ``fp32_precision``. Inputs must be contiguous:
K and V share one set of strides, and so do Q, dO, O and their gradients.

Each ``*_launch`` function returns (kernel, grid, keyword arguments) without launching, so the compile
check (``scripts/compile_check.py``) compiles exactly what :func:`triton_forward` and
:func:`triton_backward` launch; it compiles every kernel of :data:`LAUNCHED_KERNELS` (and of design C's
``design_c_launch.LAUNCHED_KERNELS``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import design_a_kernels
from .common_launch import (LaunchedKernel, check_sizes, device_arch, launch_geometry, on_device, shared_arguments,
                            tile_config)


def forward_launch(q, k, v, o, lse, scale, num_text, branch_length, causal, key_valid, fp32_precision, arch,
                   window=None, softcap=None):
    """(kernel, grid, keyword arguments) of the forward; ``arch``: the GPU's compute capability (80, 90, ...), None
    under the interpreter."""
    B, H, n, d = q.shape
    tiles = tile_config("forward", d, q.dtype, fp32_precision, arch)
    text_blocks, total = launch_geometry(n, num_text, tiles.block_m)
    arguments = dict(Q=q, K=k, V=v, O=o, LSE=lse, text_blocks=text_blocks, scale=scale,
                     **shared_arguments(q, k, key_valid, lse, num_text, branch_length, causal, fp32_precision, tiles,
                                         window, softcap))
    return design_a_kernels.forward_kernel, (total, B * H), arguments


def backward_launches(q, k, v, do, lse, delta, dq, dk, dv, scale, num_text, branch_length, causal, key_valid, c, seed,
                      fp32_precision, arch, window=None, softcap=None):
    """[(kernel, grid, keyword arguments)] of the dQ and the dK/dV kernels; ``arch`` as in :func:`forward_launch`."""
    B, H, n, d = q.shape
    common = dict(Q=q, K=k, V=v, DO=do, LSE=lse, DELTA=delta, scale=scale, c=float(c) if c is not None else 1.0,
                  seed=seed, SUS=c is not None)
    launches = []
    tiles = tile_config("dq", d, q.dtype, fp32_precision, arch)
    text_blocks, total = launch_geometry(n, num_text, tiles.block_m)
    launches.append((design_a_kernels.backward_dq_kernel, (total, B * H), dict(
        DQ=dq, text_blocks=text_blocks, **common,
        **shared_arguments(q, k, key_valid, lse, num_text, branch_length, causal, fp32_precision, tiles, window,
                            softcap))))
    tiles = tile_config("dkdv", d, q.dtype, fp32_precision, arch)
    text_key_blocks, total_keys = launch_geometry(n, num_text, tiles.block_n)
    launches.append((design_a_kernels.backward_dkdv_kernel, (total_keys, B * k.shape[1]), dict(
        DK=dk, DV=dv, text_key_blocks=text_key_blocks, **common,
        **shared_arguments(q, k, key_valid, lse, num_text, branch_length, causal, fp32_precision, tiles, window,
                            softcap))))
    return launches


def _forward_example(q, k, v, lse, c, seed, **pattern):
    return forward_launch(q, k, v, torch.empty_like(q), lse, q.shape[-1] ** -0.5, **pattern)


def _backward_example(index: int) -> Callable:
    def example(q, k, v, lse, c, seed, **pattern):
        return backward_launches(q, k, v, torch.empty_like(q), lse, torch.empty_like(lse), torch.empty_like(q),
                                 torch.empty_like(k), torch.empty_like(v), q.shape[-1] ** -0.5, c=c, seed=seed,
                                 **pattern)[index]
    return example


LAUNCHED_KERNELS = (LaunchedKernel("forward", False, _forward_example),
                    LaunchedKernel("dq", True, _backward_example(0)),
                    LaunchedKernel("dkdv", True, _backward_example(1)))


def triton_forward(q, k, v, scale, num_text, branch_length=0, causal=True, key_valid=None, out=None,
                   fp32_precision="tf32", window=None, softcap=None):
    """Exact attention: (o ``[B, H, n, d]`` in q's dtype, lse ``[B, H, n]`` fp32); ``out`` = (o, lse) to fill."""
    B, H, n, d = q.shape
    check_sizes(q)
    if out is None:
        out = torch.empty_like(q), torch.empty(B, H, n, device=q.device, dtype=torch.float32)
    o, lse = out
    kernel, grid, arguments = forward_launch(q, k, v, o, lse, scale, num_text, branch_length, causal, key_valid,
                                             fp32_precision, arch=device_arch(q.device), window=window,
                                             softcap=softcap)
    with on_device(q.device):
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
                                 c, seed, fp32_precision, arch=device_arch(q.device), window=window,
                                 softcap=softcap)
    with on_device(q.device):
        for kernel, grid, arguments in launches:
            kernel[grid](**arguments)
    return dq, dk, dv
