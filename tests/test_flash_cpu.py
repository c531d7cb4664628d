"""The CPU flash fast path of the expanded attention equals the eager reference (outputs and gradients)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_model, randomize_mixing_head
from quietstar.attention import AttentionSettings, ThoughtLayout, eager
from quietstar.loss_config import OFFICIAL_LOSS
from quietstar.ops import flash_cpu

pytestmark = pytest.mark.skipif(flash_cpu._flash is None, reason="this torch has no CPU flash-attention op")


@pytest.mark.parametrize("B, H, Hkv, L, N, S, d", [(1, 4, 2, 13, 2, 5, 16), (2, 3, 3, 7, 3, 9, 8), (1, 2, 1, 33, 1, 2, 32)])
def test_flash_cpu_equals_eager(B, H, Hkv, L, N, S, d):
    generator = torch.Generator().manual_seed(0)
    n = L + N * L * S
    q = torch.randn(B, H, n, d, generator=generator, requires_grad=True)
    k = torch.randn(B, Hkv, n, d, generator=generator, requires_grad=True)
    v = torch.randn(B, Hkv, n, d, generator=generator, requires_grad=True)
    grad = torch.randn(B, n, H, d, generator=generator)
    layout = ThoughtLayout("expanded", torch.ones(B, L, dtype=torch.bool), N, branch_length=S, attention=AttentionSettings(attention_backend="auto"))
    assert flash_cpu.applies(q, layout.key_padding, 0.0)
    results = []
    for out in (eager.expanded_attention(q, k, v, layout, d ** -0.5),
                flash_cpu.expanded_attention(q, k, v, L, N, S, d ** -0.5)):
        grads = torch.autograd.grad(out, (q, k, v), grad)
        results.append((out, grads))
    (out_ref, grads_ref), (out, grads) = results
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for name, got, expected in zip("qkv", grads, grads_ref):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=f"d{name}")


def test_flash_cpu_does_not_apply_with_padding_or_dropout():
    q = torch.zeros(1, 2, 4 + 4 * 3, 8)
    padded, full = torch.tensor([[False, True, True, True]]), torch.ones(1, 4, dtype=torch.bool)
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
    """Every sampling step, over the branch slots 0..m filled so far (NaN past them, as a buffer the steps fill)."""
    generator = torch.Generator().manual_seed(L)
    k_text, v_text = (torch.randn(B, Hkv, L, d, generator=generator) for _ in range(2))
    key_padding = torch.ones(B, L, dtype=torch.bool)
    k_buffer, v_buffer = (torch.full((B, Hkv, N, L, T, d), float("nan")) for _ in range(2))
    for step in range(T):
        q = torch.randn(B, H, N * L, d, generator=generator)
        k_buffer[:, :, :, :, step], v_buffer[:, :, :, :, step] = (torch.randn(B, Hkv, N, L, d, generator=generator)
                                                                  for _ in range(2))
        seen = k_buffer[:, :, :, :, : step + 1], v_buffer[:, :, :, :, : step + 1]
        want = eager.sample_step_attention(q, k_text, v_text, *seen, key_padding, 0.3)
        got = flash_cpu.sample_step_attention(q, k_text, v_text, *seen, 0.3)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
