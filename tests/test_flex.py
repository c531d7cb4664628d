"""The FlexAttention path of the gradient pass (quietstar/ops/flex.py) against the layout's rule and the eager reference.

On CPU: its mask_mod, element by element, equals the dense visibility that layout.py's functions give (the
rule eager applies); its BlockMask covers exactly the blocks holding a visible pair; its forward (FlexAttention
runs one, unfused, on CPU) equals eager. On CUDA (marked gpu): outputs and gradients equal eager's, fp32 and bf16.
Which layers it serves and which it refuses: tests/test_backend_matrix.py.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from quietstar.attention import ThoughtLayout, branch_visibility, eager, prefix_visibility
from quietstar.ops import flex


def dense_visibility(key_padding: torch.Tensor, num_thoughts: int, branch_length: int,
                     window: int | None = None) -> torch.Tensor:
    """``[B, n, n]`` bool from layout.py's two pieces, placed branch by branch: the mask eager applies."""
    B, L = key_padding.shape
    N, S = num_thoughts, branch_length
    n = L + N * L * S
    visible = torch.zeros(B, n, n, dtype=torch.bool)
    visible[:, :L, :L] = prefix_visibility(key_padding, window)  # [B, L, L]
    per_slot = prefix_visibility(key_padding, window, torch.arange(1, S + 1))  # [B, S, L, L]: slot s at pos_j + 1 + s
    for sample in range(N):
        for j in range(L):
            start = L + (sample * L + j) * S
            visible[:, start:start + S, :L] = per_slot[:, :, j]
            visible[:, start:start + S, start:start + S] = branch_visibility(S, key_padding.device, window)
    return visible


def key_padding_of(lengths, width, left_padded=()):
    """``[B, width]`` bool: row r holds lengths[r] real tokens, at the end if r is in ``left_padded``."""
    padding = torch.zeros(len(lengths), width, dtype=torch.bool)
    for row, length in enumerate(lengths):
        span = slice(width - length, width) if row in left_padded else slice(0, length)
        padding[row, span] = True
    return padding


# (real tokens per row, L, N, S, left-padded rows): odd sizes, S = 1, a single row, both paddings.
LAYOUTS = [((7,), 7, 1, 5, ()), ((5, 3), 6, 2, 3, (1,)), ((9, 9, 4), 9, 3, 1, (0,)), ((1, 11), 11, 2, 7, (0,))]


@pytest.mark.parametrize("window", [None, 1, 2, 4, 9], ids=lambda w: f"window={w}")
@pytest.mark.parametrize("lengths, L, N, S, left", LAYOUTS)
def test_mask_mod_equals_the_layout_rule(lengths, L, N, S, left, window):
    """Windows of 1 (itself only), shorter than a branch, and shorter than a row; left padding shifts positions."""
    key_padding = key_padding_of(lengths, L, left)
    n = L + N * L * S
    got = create_mask(flex.thought_mask_mod(key_padding, L, S, window), len(lengths), 1, n, n, device="cpu")
    want = dense_visibility(key_padding, N, S, window)
    assert got.shape == (len(lengths), 1, n, n)
    assert torch.equal(got[:, 0], want)
    if window is not None and window < L:
        assert not torch.equal(want, dense_visibility(key_padding, N, S))  # the window changes the mask


def test_block_masks_are_kept_per_window():
    layout = ThoughtLayout("expanded", key_padding_of((9,), 9), 1, branch_length=3)
    full, local = flex.block_mask(layout), flex.block_mask(layout, 4)
    assert flex.block_mask(layout) is full and flex.block_mask(layout, 4) is local
    n = layout.expected_length()
    for mask, window in ((full, None), (local, 4)):  # each layer gets the mask of its own window
        got = create_mask(mask.mask_mod, 1, 1, n, n, device="cpu")[:, 0]
        assert torch.equal(got, dense_visibility(layout.key_padding, 1, 3, window))


def test_block_mask_covers_exactly_the_visible_blocks_and_is_built_once():
    L, N, S = 21, 2, 5
    key_padding = key_padding_of((21, 13), L, left_padded=(1,))
    layout = ThoughtLayout("expanded", key_padding, N, branch_length=S)
    mask = flex.block_mask(layout)
    assert flex.block_mask(layout) is mask  # every later layer reuses the first layer's mask
    n = layout.expected_length()
    visible = dense_visibility(key_padding, N, S)
    blocks = -(-n // 128)
    padded = torch.zeros(2, blocks * 128, blocks * 128, dtype=torch.bool)
    padded[:, :n, :n] = visible
    want = padded.view(2, blocks, 128, blocks, 128).any(dim=(2, 4))
    assert mask.BLOCK_SIZE == (128, 128)
    assert blocks > 1 and torch.equal(mask.to_dense()[:, 0].bool(), want)


def _problem(lengths, L, N, S, left, H, Hkv, d, dtype, device, seed=0, window=None):
    generator = torch.Generator().manual_seed(seed)
    n = L + N * L * S
    B = len(lengths)
    q, k, v = (torch.randn(B, h, n, d, generator=generator).to(device=device, dtype=dtype) for h in (H, Hkv, Hkv))
    layout = ThoughtLayout("expanded", key_padding_of(lengths, L, left).to(device), N, branch_length=S)
    sees_something = dense_visibility(layout.key_padding.cpu(), N, S, window).any(-1).to(device)  # [B, n]
    return q, k, v, layout, sees_something


RULES = [dict(), dict(window=3), dict(softcap=0.5), dict(window=5, softcap=1.0)]


@pytest.mark.parametrize("rule", RULES, ids=str)
@pytest.mark.parametrize("lengths, L, N, S, left", LAYOUTS[1:3])
def test_cpu_forward_equals_eager(lengths, L, N, S, left, rule):
    """FlexAttention's (unfused) CPU forward, with grouped-query heads, sliding windows and soft-capping; rows that
    see nothing (the first case's left padding) are zero."""
    q, k, v, layout, sees = _problem(lengths, L, N, S, left, H=4, Hkv=2, d=16, dtype=torch.float32, device="cpu",
                                     window=rule.get("window"))
    with torch.no_grad():
        got = flex.expanded_attention(q, k, v, layout, 0.3, **rule)
        want = eager.expanded_attention(q, k, v, layout, 0.3, **rule)
    assert got.shape == want.shape == (len(lengths), q.shape[2], 4, 16)
    torch.testing.assert_close(got[sees], want[sees], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[~sees], torch.zeros_like(got[~sees]))


def test_refusals_name_the_problem():
    q, k, v, layout, _ = _problem((3,), 3, 1, 2, (), H=2, Hkv=1, d=16, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="needs CUDA for the gradient pass"):
        flex.expanded_attention(q.requires_grad_(), k, v, layout, 0.25)
    with pytest.raises(ValueError, match="dropout"):
        flex.check_inputs(q.detach(), k, v, 0.1)
    with pytest.raises(ValueError, match="head dims of at least 16"):
        flex.check_inputs(q.detach()[..., :8], k[..., :8], v[..., :8], 0.0)
    assert not flex.applies(q, 0.0)  # CPU: auto keeps the CPU paths


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths, L, N, S, left, H, Hkv, d, rule", [
    ((37, 20), 37, 2, 6, (1,), 4, 2, 64, {}), ((300,), 300, 2, 13, (), 9, 3, 64, {}),
    ((50, 7, 50), 50, 1, 9, (1,), 8, 8, 128, {}), ((300,), 300, 2, 13, (), 9, 3, 64, dict(window=40)),
    ((37, 20), 37, 2, 6, (1,), 4, 2, 64, dict(window=7, softcap=1.0)),
])
def test_cuda_forward_and_gradients_equal_eager(dtype, lengths, L, N, S, left, H, Hkv, d, rule):
    """Compiled FlexAttention against eager run in fp32 on the same inputs (the truth for both dtypes)."""
    q, k, v, layout, sees = _problem(lengths, L, N, S, left, H, Hkv, d, dtype, "cuda", seed=L,
                                     window=rule.get("window"))
    grad = torch.randn(q.shape[0], q.shape[2], H, d, device="cuda", dtype=dtype) * sees[..., None, None]
    results = []
    for run, inputs in ((flex.expanded_attention, (q, k, v)), (eager.expanded_attention, (q.float(), k.float(), v.float()))):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = run(*leaves, layout, d ** -0.5, **rule)
        results.append((out, torch.autograd.grad(out, leaves, grad.to(out.dtype))))
    (out, grads), (out_ref, grads_ref) = results
    tolerance = dict(rtol=2e-4, atol=2e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.float()[sees], out_ref[sees], **tolerance)
    for name, got, want in zip("qkv", grads, grads_ref):
        assert torch.isfinite(got).all(), f"d{name} holds NaN or inf"
        scale = want.abs().max().item()
        torch.testing.assert_close(got.float() / scale, want / scale, **tolerance, msg=f"d{name}")
