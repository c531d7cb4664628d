"""The CPU flash fast path of the expanded attention equals the eager reference (outputs and gradients)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_model, randomize_mixing_head
from quietstar.config import OFFICIAL_LOSS
from quietstar.attention import ThoughtLayout, eager, flash_cpu

pytestmark = pytest.mark.skipif(flash_cpu._flash is None, reason="this torch has no CPU flash-attention op")


@pytest.mark.parametrize("B, H, Hkv, L, N, S, d", [(1, 4, 2, 13, 2, 5, 16), (2, 3, 3, 7, 3, 9, 8), (1, 2, 1, 33, 1, 2, 32)])
def test_flash_cpu_equals_eager(B, H, Hkv, L, N, S, d):
    generator = torch.Generator().manual_seed(0)
    n = L + N * L * S
    q = torch.randn(B, H, n, d, generator=generator, requires_grad=True)
    k = torch.randn(B, Hkv, n, d, generator=generator, requires_grad=True)
    v = torch.randn(B, Hkv, n, d, generator=generator, requires_grad=True)
    grad = torch.randn(B, n, H, d, generator=generator)
    layout = ThoughtLayout("expanded", torch.ones(B, L, dtype=torch.bool), N, S)
    assert flash_cpu.applies(q, layout, 0.0)
    results = []
    for implementation in (eager.expanded_attention, flash_cpu.expanded_attention):
        out = implementation(q, k, v, layout, d ** -0.5)
        grads = torch.autograd.grad(out, (q, k, v), grad)
        results.append((out, grads))
    (out_ref, grads_ref), (out, grads) = results
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for name, got, expected in zip("qkv", grads, grads_ref):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=f"d{name}")


def test_flash_cpu_does_not_apply_with_padding_or_dropout():
    q = torch.zeros(1, 2, 4 + 4 * 3, 8)
    padded = ThoughtLayout("expanded", torch.tensor([[False, True, True, True]]), 1, 3)
    full = ThoughtLayout("expanded", torch.ones(1, 4, dtype=torch.bool), 1, 3)
    assert not flash_cpu.applies(q, padded, 0.0)
    assert not flash_cpu.applies(q, full, 0.1)
    assert flash_cpu.applies(q, full, 0.0)


def test_model_loss_and_gradients_agree_between_backends():
    """End to end through a model: 'auto' (flash path, unpadded rows) equals 'eager'."""
    results = []
    for backend in ("eager", "auto"):
        # Raw advantages: normalised ones divide fp32 rounding differences by a small spread, which would
        # swamp the comparison of two exact computations (the recipe's loss is checked in fp64, test_losses.py).
        model = make_model("qwen2", attention_backend=backend, **{**OFFICIAL_LOSS, "policy_weight": 2.0})
        randomize_mixing_head(model)
        ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(3))
        thoughts = model.sample_thoughts(ids, generator=torch.Generator().manual_seed(4))
        out = model(ids, labels=ids, thoughts=thoughts)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_eager, grads_eager), (loss_auto, grads_auto) = results
    torch.testing.assert_close(loss_auto, loss_eager, rtol=1e-5, atol=1e-6)
    for name in grads_eager:
        torch.testing.assert_close(grads_auto[name], grads_eager[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("B,H,Hkv,N,L,T,d", [(2, 4, 2, 2, 13, 5, 16), (1, 3, 1, 3, 7, 2, 8)])
def test_flash_sampling_step_equals_eager(B, H, Hkv, N, L, T, d):
    """Every sampling step, through the same branch buffers as the sampling loop fills them."""
    generator = torch.Generator().manual_seed(L)
    k_text, v_text = (torch.randn(B, Hkv, L, d, generator=generator) for _ in range(2))
    layout = ThoughtLayout("sample", torch.ones(B, L, dtype=torch.bool), N, T)
    buffers = {name: tuple(torch.full((B, Hkv, N, L, T, d), float("nan")) for _ in range(2)) for name in ("e", "f")}
    for step in range(T):
        layout.step = step
        q = torch.randn(B, H, N * L, d, generator=generator)
        k_new, v_new = (torch.randn(B, Hkv, N * L, d, generator=generator) for _ in range(2))
        want = eager.sample_step_attention(q, k_new, v_new, *buffers["e"], k_text, v_text, layout, 0.3)
        got = flash_cpu.sample_step_attention(q, k_new, v_new, *buffers["f"], k_text, v_text, layout, 0.3)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
