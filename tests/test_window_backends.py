"""Families with sliding windows and soft-capping on the SUS attention and FlexAttention, through the model.

Tiny Gemma-2 (soft-capped scores, a 5-token window on its local layer, a global layer) and Mistral with a 4-token
window (shorter than a branch), rows longer than the window, left- and right-padded rows. The gradient pass runs in
the SUS reference, the Triton kernels (Triton's interpreter on CPU) and FlexAttention (its CPU forward), each
against the eager path, which test_backend_matrix.py checks against a dense definition (and every backend against
eager, layer by layer).
"""

from __future__ import annotations

import functools

import pytest
import torch

from conftest import make_model, padded_batch, randomize_mixing_head
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
