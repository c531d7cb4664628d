"""Families with sliding windows and soft-capping on the SUS attention and FlexAttention, through the model.

Tiny Gemma-2 (soft-capped scores, a 5-token window on its local layer, a global layer) and Mistral with a 4-token
window (shorter than a branch), rows longer than the window, left- and right-padded rows. The gradient pass runs in
the SUS reference, the Triton kernels (Triton's interpreter on CPU) and FlexAttention (its CPU forward), each
against the eager path, which test_window_softcap.py checks against a dense definition.
"""

from __future__ import annotations

import functools

import pytest
import torch

from conftest import make_model, padded_batch, randomize_mixing_head
from quietstar.attention import AttentionSettings, ThoughtLayout, dispatch, eager
from quietstar.loss_config import OFFICIAL_LOSS
from test_sus_training import DEVICE, _assert_grads_close, _loss_and_grads, _with_backend

pytest.importorskip("triton")


@functools.cache
def _problem(arch):
    torch.manual_seed(0)
    model = make_model(arch, num_thought_tokens=2, num_lookahead_tokens=2, **{**OFFICIAL_LOSS, "policy_weight": 5.0})
    randomize_mixing_head(model)
    if model.config.initializer_range < 0.1:  # tiny Gemma-2 starts at 0.2 (quietstar.tiny)
        with torch.no_grad():  # scores of order 1 (random init gives ~0.01): soft-capping and windows change the result
            for layer in model.base.model.layers:
                layer.self_attn.q_proj.weight.mul_(10)
                layer.self_attn.k_proj.weight.mul_(10)
    model.to(DEVICE)
    ids, mask = (t.to(DEVICE) for t in padded_batch(lengths=(9, 6, 7), left_padding_rows=(1,)))
    thoughts = model.sample_thoughts(ids, mask)
    loss, grads = _loss_and_grads(_with_backend(model, "eager"), ids, mask, thoughts)
    return model, ids, mask, thoughts, loss, grads


@pytest.fixture(params=["gemma2", "mistral_window"])
def problem(request):
    return _problem(request.param)


def test_sus_keeps_the_loss_and_huge_c_gives_the_exact_gradients(problem):
    """The SUS reference on the family's layers: an exact forward, a changed backward at c = 1, the exact backward
    at huge c (a backend that dropped the window or the cap would differ from eager in both)."""
    model, ids, mask, thoughts, loss, grads = problem
    sus_loss, sus_grads = _loss_and_grads(_with_backend(model, "eager", sus_c=1.0), ids, mask, thoughts)
    torch.testing.assert_close(sus_loss, loss, rtol=1e-5, atol=1e-6)
    body = "base.model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(sus_grads[body], grads[body], rtol=1e-3)
    _, huge = _loss_and_grads(_with_backend(model, "eager", sus_c=1e30), ids, mask, thoughts)
    _assert_grads_close(huge, grads, rtol=1e-4, atol=1e-6)


def test_triton_kernels_give_the_eager_gradients_and_the_references_sus_draws():
    """Gemma-2 alone (both rules, local and global layers): in the interpreter a model call takes about 20 s."""
    model, ids, mask, thoughts, loss, grads = _problem("gemma2")
    got_loss, got = _loss_and_grads(_with_backend(model, "triton"), ids, mask, thoughts)
    torch.testing.assert_close(got_loss, loss, rtol=1e-5, atol=1e-6)
    _assert_grads_close(got, grads, rtol=1e-4, atol=1e-6)
    _, reference = _loss_and_grads(_with_backend(model, "eager", sus_c=2.0), ids, mask, thoughts, seed=5)
    _, kernels = _loss_and_grads(_with_backend(model, "triton", sus_c=2.0), ids, mask, thoughts, seed=5)
    _assert_grads_close(kernels, reference, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(DEVICE == "cuda", reason="the CUDA case is the gradient test of test_flex.py")
def test_flex_forward_gives_the_eager_loss(problem):
    """FlexAttention has a forward only on CPU: the model's loss without gradient."""
    model, ids, mask, thoughts, loss, _ = problem
    _with_backend(model, "flex")
    with torch.no_grad():
        flex_loss = model(ids, attention_mask=mask, labels=ids, thoughts=thoughts).loss
    torch.testing.assert_close(flex_loss, loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window, softcap", [(3, None), (None, 0.5), (4, 1.0)])
def test_plain_calls_with_sus_c_keep_the_window_and_the_cap(window, softcap):
    """Ordinary causal attention with a SUS backward (sus_c on a model call without thoughts), padded keys: the
    exact forward and, at huge c, the exact gradients of eager's causal attention."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 11, 16, generator=generator, requires_grad=True) for h in (4, 2, 2))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :3] = 0  # left padding, as generation pads
    grad = torch.randn(2, 11, 4, 16, generator=generator) * mask[..., None, None]
    results = []
    for sus_c in (None, 1e30):
        out = dispatch.plain_attention(q, k, v, mask, 0.5, 0.0, sus_c, window=window, softcap=softcap)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    real = mask.bool()
    (out_ref, *grads_ref), (out, *grads) = results
    torch.testing.assert_close(out[real], out_ref[real], rtol=1e-5, atol=1e-6)
    for name, got, want in zip("qkv", grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=f"d{name}")
    unwindowed = eager.causal_attention(q, k, v, mask, 0.5, softcap=softcap)
    assert window is None or not torch.allclose(out[real], unwindowed[real])


@pytest.mark.parametrize("sus_c, expected", [(None, "flex"), (32.0, "sus_triton")])
def test_auto_routes_windowed_and_soft_capped_layers_on_cuda_as_any_other(sus_c, expected):
    """On CUDA "auto" no longer steers these layers away from FlexAttention and the Triton kernels."""
    from test_flex import _query_on

    layout = ThoughtLayout("expanded", torch.ones(1, 2, dtype=torch.bool), 1, branch_length=3,
                           attention=AttentionSettings(sus_c=sus_c))
    for rule in (dict(window=5), dict(softcap=1.0), dict(window=5, softcap=1.0)):
        assert dispatch.resolve_backend(layout, _query_on("cuda", 64), 0.0, **rule) == expected
