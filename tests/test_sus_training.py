"""SUS attention inside Quiet-STaR: the gradient pass through quietstar.ops.sus (Triton or reference).

The Triton cases run in the interpreter on CPU (conftest), compiled on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_model, padded_batch, randomize_mixing_head
from quietstar import AttentionSettings, QuietStarConfig, QuietStarForCausalLM
from quietstar.attention import dispatch
from quietstar.loss_config import OFFICIAL_LOSS
from quietstar.ops.sus import attention
from quietstar.tiny import byte_tokenizer, tiny_model
from quietstar.training import QuietStarTrainer
from test_training import tiny_quietstar, training_args, window_dataset

pytest.importorskip("triton")

# Models on the GPU where there is one: outside the interpreter (CPU only) the kernels need CUDA tensors.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _loss_and_grads(model, ids, mask, thoughts, seed=0):
    model.zero_grad()
    torch.manual_seed(seed)  # the per-call SUS seeds come from torch's generator
    out = model(ids, attention_mask=mask, labels=ids, thoughts=thoughts)
    out.loss.backward()
    return out.loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _with_backend(model, backend, sus_c=None):
    # ieee: compared with fp32 eager attention, no tf32 rounding
    model.set_attention(attention_backend=backend, sus_c=sus_c, triton_fp32_precision="ieee")
    return model


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    # Raw advantages: normalised ones divide fp32 rounding differences by a small spread, which would
    # swamp the comparison of two exact computations (the recipe's loss is checked in fp64, test_losses.py).
    model = make_model("llama", num_thought_tokens=2, num_lookahead_tokens=2,
                       **{**OFFICIAL_LOSS, "policy_weight": 5.0})
    randomize_mixing_head(model)
    model.to(DEVICE)
    ids, mask = (t.to(DEVICE) for t in padded_batch(lengths=(9, 6)))
    thoughts = model.sample_thoughts(ids, mask)
    loss, grads = _loss_and_grads(_with_backend(model, "eager"), ids, mask, thoughts)
    return model, ids, mask, thoughts, loss, grads


def _assert_grads_close(got, want, **tolerance):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name, **tolerance)


def test_triton_backend_gives_the_eager_loss_and_gradients(problem):
    model, ids, mask, thoughts, loss, grads = problem
    got_loss, got = _loss_and_grads(_with_backend(model, "triton"), ids, mask, thoughts)
    torch.testing.assert_close(got_loss, loss, rtol=1e-5, atol=1e-6)
    _assert_grads_close(got, grads, rtol=1e-4, atol=1e-6)


def test_sus_keeps_the_loss_changes_the_gradients_and_huge_c_is_exact(problem):
    model, ids, mask, thoughts, loss, grads = problem
    sus_loss, sus_grads = _loss_and_grads(_with_backend(model, "eager", sus_c=1.0), ids, mask, thoughts)
    torch.testing.assert_close(sus_loss, loss, rtol=1e-5, atol=1e-6)  # the forward stays exact
    body = "base.model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(sus_grads[body], grads[body], rtol=1e-3)
    _, huge = _loss_and_grads(_with_backend(model, "eager", sus_c=1e30), ids, mask, thoughts)
    _assert_grads_close(huge, grads, rtol=1e-4, atol=1e-6)


def test_triton_and_reference_draw_the_same_sus_gradients(problem):
    model, ids, mask, thoughts, _, _ = problem
    _, reference = _loss_and_grads(_with_backend(model, "eager", sus_c=2.0), ids, mask, thoughts, seed=5)
    _, kernels = _loss_and_grads(_with_backend(model, "triton", sus_c=2.0), ids, mask, thoughts, seed=5)
    _assert_grads_close(kernels, reference, rtol=1e-4, atol=1e-6)
    _, other_seed = _loss_and_grads(_with_backend(model, "eager", sus_c=2.0), ids, mask, thoughts, seed=6)
    body = "base.model.layers.1.self_attn.k_proj.weight"
    assert not torch.equal(other_seed[body], reference[body])


def test_sus_under_activation_checkpointing_replays_the_same_mask(problem):
    model, ids, mask, thoughts, _, _ = problem
    _with_backend(model, "eager", sus_c=2.0)
    _, plain = _loss_and_grads(model, ids, mask, thoughts, seed=9)
    model.activation_checkpointing_enable()
    try:
        _, checkpointed = _loss_and_grads(model, ids, mask, thoughts, seed=9)
    finally:
        model.activation_checkpointing_disable()
    _assert_grads_close(checkpointed, plain, rtol=1e-5, atol=1e-7)


def test_trainer_trains_with_sus(tmp_path):
    model = tiny_quietstar()
    model.set_attention(sus_c=8.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = QuietStarTrainer(model=model, args=training_args(tmp_path, max_steps=2),
                               train_dataset=window_dataset(model.tokenizer))
    trainer.train()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("value", [0.0, -3.0, True])
def test_bad_sus_c_is_refused(value):
    with pytest.raises(ValueError, match="sus_c must be > 0"):
        AttentionSettings(sus_c=value)


def test_any_causal_lm_can_train_with_sus_through_the_attention_keyword(monkeypatch):
    model = make_model("qwen2")
    # Right padding: with left padding the first real token is predicted from a padding query, whose
    # output is arbitrary (finite garbage in eager, zero in the SUS path).
    ids, mask = padded_batch(lengths=(12, 9), left_padding_rows=())

    def grads(**kwargs):
        model.zero_grad()
        out = model.base(inputs_embeds=model.embed(ids), attention_mask=mask, labels=ids.masked_fill(mask == 0, -100),
                         **kwargs)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.base.named_parameters() if p.grad is not None}

    loss, exact = grads()
    huge_loss, huge = grads(sus_c=1e30)
    torch.testing.assert_close(huge_loss, loss)
    _assert_grads_close(huge, exact, rtol=1e-4, atol=1e-6)
    _, sparse = grads(sus_c=1.0)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(sparse[name], exact[name], rtol=1e-3)
    # The keyword reaches design C too (every layer's SUS call draws with it): exact at a huge c, sparse at c = 1.
    designs = []
    monkeypatch.setattr(dispatch.sus, "attention",
                        lambda *a, **kw: designs.append(kw["sus_design"]) or attention(*a, **kw))
    _, huge_c = grads(sus_c=1e30, sus_design="c")
    _assert_grads_close(huge_c, exact, rtol=1e-4, atol=1e-6)
    _, design_c = grads(sus_c=1.0, sus_design="c")
    assert not torch.allclose(design_c[name], exact[name], rtol=1e-3)
    assert designs == ["c"] * (2 * model.base.config.num_hidden_layers)


def test_sus_refuses_attention_dropout_in_training():
    tokenizer = byte_tokenizer()
    base = tiny_model("llama", vocab_size=len(tokenizer), attention_dropout=0.1)
    model = QuietStarForCausalLM.from_base(base, tokenizer, QuietStarConfig(num_thought_tokens=2,
                                                                            num_lookahead_tokens=2)).train()
    ids, mask = padded_batch(lengths=(8, 8))
    with pytest.raises(ValueError, match="dropout"):
        model.base(inputs_embeds=model.embed(ids), labels=ids, sus_c=4.0)
    model.set_attention(sus_c=4.0)
    with pytest.raises(ValueError, match="dropout"):
        model(ids, labels=ids)


def test_sus_design_c_in_quiet_star_draws_the_same_gradients_in_kernels_and_reference(problem):
    model, ids, mask, thoughts, loss, _ = problem
    try:
        model.set_attention(sus_design="c")
        design_c_loss, reference = _loss_and_grads(_with_backend(model, "eager", sus_c=2.0), ids, mask, thoughts, seed=5)
        _, kernels = _loss_and_grads(_with_backend(model, "triton", sus_c=2.0), ids, mask, thoughts, seed=5)
    finally:
        model.set_attention(sus_design="a")
    torch.testing.assert_close(design_c_loss, loss, rtol=1e-5, atol=1e-6)  # the forward stays exact
    _assert_grads_close(kernels, reference, rtol=1e-4, atol=1e-6)
    _, design_a = _loss_and_grads(_with_backend(model, "eager", sus_c=2.0), ids, mask, thoughts, seed=5)
    body = "base.model.layers.1.self_attn.k_proj.weight"
    assert not torch.equal(design_a[body], reference[body])  # another sample of the same marginals


def test_bad_sus_design_is_refused():
    with pytest.raises(ValueError, match="sus_design must be one of"):
        AttentionSettings(sus_design="b")
