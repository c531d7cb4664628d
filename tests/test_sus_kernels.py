"""Triton SUS kernels against the PyTorch reference: forward, exact backward, SUS backward.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1 without CUDA) at
tiny odd sizes; with CUDA the same cases run compiled, plus bf16 and larger sizes (marked gpu).
Output buffers are filled with NaN before every launch, so an element a kernel forgets to write
fails the comparison. SUS cases use the same seed in both, i.e. identical random numbers.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

from quietstar.ops.sus import attention, common_kernels, common_launch, rng  # noqa: E402
from quietstar.ops.sus.design_a_launch import triton_backward, triton_forward  # noqa: E402
from quietstar.ops.sus.design_a_reference import attention_backward  # noqa: E402
from quietstar.ops.sus.reference import attention_forward  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float16: dict(rtol=2e-2, atol=2e-2),
             torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}

# (batch, heads, kv heads, head dim, text tokens L, thoughts N, branch length S, causal, left padding)
CASES = {
    "causal-odd": (1, 2, 1, 16, 37, 0, 0, True, 0),
    "causal-gqa3": (2, 3, 1, 32, 19, 0, 0, True, 0),
    "noncausal": (1, 2, 2, 16, 29, 0, 0, False, 0),
    "single-token": (1, 1, 1, 16, 1, 0, 0, True, 0),
    "thoughts": (2, 4, 2, 16, 7, 2, 3, True, 2),
    "thoughts-long-branch": (1, 2, 1, 64, 5, 1, 19, True, 1),
    "head-dim-128": (1, 1, 1, 128, 18, 1, 2, True, 0),
}


def _problem(case, dtype, seed=0):
    B, H, Hkv, d, L, N, S, causal, pad = case
    n = L + N * L * S
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, d, generator=g).to(DEVICE, dtype) for h in (H, Hkv, Hkv))
    do = torch.randn(B, H, n, d, generator=g).to(DEVICE, dtype)
    key_valid = None
    if pad:
        key_valid = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
        key_valid[-1, :pad] = False
    pattern = dict(num_text=L, branch_length=S if N else 0, causal=causal, key_valid=key_valid)
    return q, k, v, do, pattern, d**-0.5


EXACT_FP32 = dict(fp32_precision="ieee")  # fp32 inputs compared with the fp32 reference: no tf32 rounding


def _poisoned(*tensors):
    return tuple(torch.full_like(t, float("nan")) for t in tensors)


def _compare(got, want, dtype):
    assert not torch.isnan(got).any(), "a kernel left part of its output unwritten"
    torch.testing.assert_close(got.float(), want.float(), **TOLERANCE[dtype])


def _dtypes():
    return [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", _dtypes(), ids=str)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("c", [None, 3.0], ids=["exact", "sus"])
def test_kernels_match_reference(name, dtype, c):
    q, k, v, do, pattern, scale = _problem(CASES[name], dtype)
    o_ref, lse_ref = attention_forward(q, k, v, scale, **pattern)
    o, lse = _poisoned(q, lse_ref)
    triton_forward(q, k, v, scale, **pattern, out=(o, lse), **EXACT_FP32)
    _compare(o, o_ref, dtype)
    finite = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), finite)  # rows that see nothing: lse = +inf in both
    _compare(lse[finite], lse_ref[finite], dtype)

    grads_ref = attention_backward(q, k, v, o_ref, lse_ref, do, scale, **pattern, c=c, seed=1234)
    grads = _poisoned(q, k, v)
    triton_backward(q, k, v, o_ref.to(dtype), lse_ref, do, scale, **pattern, c=c, seed=1234, out=grads, **EXACT_FP32)
    for got, want in zip(grads, grads_ref):
        _compare(got, want, dtype)


def test_autograd_function_matches_reference_end_to_end():
    q, k, v, do, pattern, _ = _problem(CASES["thoughts"], torch.float32, seed=3)
    results = []
    for backend in ("torch", "triton"):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = attention(*leaves, c=2.0, seed=77, backend=backend, **pattern, **EXACT_FP32)
        results.append((out, *torch.autograd.grad(out, leaves, do)))
    for got, want in zip(*results):
        _compare(got, want, torch.float32)


def test_huge_c_kernel_equals_exact_kernel_bit_for_bit():
    q, k, v, do, pattern, scale = _problem(CASES["causal-odd"], torch.float32, seed=2)
    o, lse = triton_forward(q, k, v, scale, **pattern, **EXACT_FP32)
    exact = triton_backward(q, k, v, o, lse, do, scale, **pattern, c=None, seed=0, **EXACT_FP32)
    huge = triton_backward(q, k, v, o, lse, do, scale, **pattern, c=1e30, seed=5, **EXACT_FP32)
    for a, b in zip(exact, huge):
        assert torch.equal(a, b)


def test_launch_configurations_cover_every_head_dim_dtype_and_arch():
    for arch in (80, 86, 89, 90, 100, 120):
        for kernel in common_launch.KERNELS:
            for head_dim in (16, 32, 64, 128):
                for dtype, precision in ((torch.bfloat16, "tf32"), (torch.float32, "tf32"), (torch.float32, "ieee")):
                    tiles = common_launch.tile_config(kernel, head_dim, dtype, precision, arch)
                    # tensor-core tiles: powers of two of at least 16 (tl.dot's smallest side)
                    assert all(size >= 16 and size & (size - 1) == 0 for size in (tiles.block_m, tiles.block_n)), tiles
                    assert tiles.num_warps in (4, 8) and tiles.num_stages in (1, 2, 3, 4), tiles
                assert common_launch.tile_config(kernel, head_dim, torch.float16, "ieee", arch) == \
                    common_launch.tile_config(kernel, head_dim, torch.bfloat16, "tf32", arch)  # 2-byte inputs ignore it
                assert common_launch.tile_config(kernel, head_dim, torch.float32, "ieee", None).block_m == 16
    assert [common_launch.tile_arch(arch) for arch in (80, 86, 89, 90, 100, 120)] == [80, 80, 80, 90, 90, 80]
    assert common_launch.dot_precision(torch.float32, "tf32") == "tf32"
    assert common_launch.dot_precision(torch.float32, "ieee") == "ieee"
    assert common_launch.dot_precision(torch.bfloat16, "ieee") == "tf32"  # 2-byte inputs have no fp32 products to keep


def test_a_head_past_32_bit_offsets_is_refused():
    q = torch.empty(1, 1, 2**24, 128, device="meta")  # 2^31 elements in one head; meta: nothing is allocated
    with pytest.raises(ValueError, match="2\\^31 per head"):
        triton_forward(q, q, q, 0.1, num_text=q.shape[2])
    common_launch.check_sizes(q[:, :, : 2**24 - 1])  # one row less fits


@triton.jit
def _uniform_probe(OUT, seed, bh, ROWS: tl.constexpr, COLS: tl.constexpr):
    rows = tl.arange(0, ROWS) * 37 + 3
    cols = tl.arange(0, COLS) * 1001
    u = common_kernels.uniform(common_kernels.row_keys_for(seed, bh, rows)[:, None], cols[None, :])
    tl.store(OUT + tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :], u)


def test_kernel_random_numbers_equal_the_pytorch_ones():
    """The kernels' hash against rng.uniform, bit for bit, through a probe kernel over (row, col)."""
    out = torch.full((16, 32), float("nan"), device=DEVICE)
    _uniform_probe[(1,)](out, 123456789, 5, ROWS=16, COLS=32)
    want = rng.uniform(123456789, torch.tensor(5), torch.arange(16)[:, None] * 37 + 3, torch.arange(32)[None] * 1001)
    assert torch.equal(out.cpu(), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n", [1000, 2049])
def test_kernels_match_reference_at_gpu_sizes(n):
    case = (2, 8, 2, 64, n, 0, 0, True, 0)
    for c in (None, 32.0):
        q, k, v, do, pattern, scale = _problem(case, torch.bfloat16, seed=n)
        results = []
        for backend in ("torch", "triton"):
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            out = attention(*leaves, c=c, seed=3, backend=backend, **pattern)
            results.append((out, *torch.autograd.grad(out, leaves, do)))
        for got, want in zip(*results):
            _compare(got, want, torch.bfloat16)
