"""The official dense execution scheme (quietstar/official_dense.py) computes the same loss and gradients as ours.

The dense scheme runs K = T + A + 2 sequential passes of the plain model with transformers' own
attention, a growing KV cache and a growing dense mask; ours runs one expanded pass through the
quietstar attention. Given the same thoughts, both must give the same loss, metrics and gradients of
every parameter, with padding and batch > 1, and with a non-zero mixing head so rewards and the
policy loss are non-zero. That makes the dense scheme an independent oracle for the fast path and
the benchmark's comparison (bench/step.py) a comparison of equal computations.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_model, padded_batch, randomize_mixing_head
from quietstar.loss_config import OFFICIAL_LOSS
from quietstar.official_dense import dense_forward, plain_attention

# The official scheme with the official loss (its tolerances assume raw advantages; the recipe's normalised ones are
# checked against the slow reference in fp64, tests/test_losses.py), at lambda = 1 so the RL term is of NLL size.
OFFICIAL = {**OFFICIAL_LOSS, "policy_weight": 1.0}

LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4


def gradients(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def assert_same_gradients(ours: dict, dense: dict) -> None:
    assert ours.keys() == dense.keys()
    for name, expected in ours.items():
        scale = expected.abs().max().item()
        torch.testing.assert_close(dense[name], expected, rtol=GRAD_RTOL, atol=1e-6 * scale, msg=name)


def ours_and_dense(model, ids, mask, thoughts, attention):
    ours = model(ids, attention_mask=mask, labels=ids, thoughts=thoughts)
    ours_grads = gradients(model, ours.loss)
    with plain_attention(model, attention):
        dense = dense_forward(model, ids, mask, labels=ids, thoughts=thoughts)
    dense_grads = gradients(model, dense.loss)
    return ours, ours_grads, dense, dense_grads


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "deepseek_v3"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_dense_scheme_equals_ours(arch, attention, padding_side):
    model = make_model(arch, num_thought_tokens=3, num_lookahead_tokens=3, num_thoughts=2, **OFFICIAL)
    randomize_mixing_head(model)
    with torch.no_grad():  # train-like thought embeddings, distinct from the rows they started as
        model.thought_embeddings.add_(torch.randn_like(model.thought_embeddings))
    ids, mask = padded_batch(lengths=(8, 11), left_padding_rows=(0,) if padding_side == "left" else ())
    thoughts = model.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(0))

    ours, ours_grads, dense, dense_grads = ours_and_dense(model, ids, mask, thoughts, attention)

    assert ours.metrics["policy_loss"] != 0.0 and ours.metrics["reward_std"] > 0.0  # the RL path is exercised
    torch.testing.assert_close(dense.loss, ours.loss, rtol=LOSS_RTOL, atol=0.0)
    assert dense.metrics.keys() == ours.metrics.keys()
    for name, value in ours.metrics.items():
        assert dense.metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert len(ours_grads) == len(list(model.parameters()))  # every parameter, thought embeddings and head included
    assert_same_gradients(ours_grads, dense_grads)


@pytest.mark.parametrize("arch", ["gemma2", "mistral_window", "gemma3_text", "gpt_oss"])
def test_dense_scheme_equals_ours_with_sliding_windows(arch):
    """Windows shorter than a row and a branch (Mistral on every layer; Gemma local and global layers mixed, Gemma 2
    with soft-capped scores, GPT-OSS with sinks): the dense passes hand each layer its own windowed mask, on positions
    as the family does.
    """
    model = make_model(arch, num_thought_tokens=3, num_lookahead_tokens=3, num_thoughts=2, **OFFICIAL)
    randomize_mixing_head(model)
    ids, mask = padded_batch(lengths=(8, 11), left_padding_rows=(0,))
    thoughts = model.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(3))

    ours, ours_grads, dense, dense_grads = ours_and_dense(model, ids, mask, thoughts, "eager")

    torch.testing.assert_close(dense.loss, ours.loss, rtol=LOSS_RTOL, atol=0.0)
    assert_same_gradients(ours_grads, dense_grads)


def test_dense_windows_matter():
    """The check above can fail: the same dense passes without the windows give another loss."""
    model = make_model("mistral_window", num_thought_tokens=3, num_lookahead_tokens=3, num_thoughts=2, **OFFICIAL)
    ids, mask = padded_batch(lengths=(8, 11))
    thoughts = model.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, labels=ids, thoughts=thoughts)
        model.base.config.sliding_window = None
        with plain_attention(model, "eager"):
            unwindowed = dense_forward(model, ids, mask, labels=ids, thoughts=thoughts)
    assert not torch.allclose(unwindowed.loss, ours.loss, rtol=1e-3)


def test_dense_scheme_equals_ours_with_logprob_mixing():
    model = make_model("llama", num_thought_tokens=4, num_lookahead_tokens=2, num_thoughts=3, mixing="logprobs",
                       **OFFICIAL)
    randomize_mixing_head(model)
    ids, mask = padded_batch(lengths=(9, 12))
    thoughts = model.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(1))

    ours, ours_grads, dense, dense_grads = ours_and_dense(model, ids, mask, thoughts, "eager")

    torch.testing.assert_close(dense.loss, ours.loss, rtol=LOSS_RTOL, atol=0.0)
    assert_same_gradients(ours_grads, dense_grads)


def test_dense_scheme_draws_thoughts_that_ours_replays():
    """Drawing inside the passes (as the official code does) yields valid thoughts; replaying them gives our loss."""
    model = make_model("llama", **OFFICIAL)
    randomize_mixing_head(model)
    ids, mask = padded_batch(lengths=(10, 7))
    with plain_attention(model, "sdpa"):
        dense = dense_forward(model, ids, mask, labels=ids, generator=torch.Generator().manual_seed(2))
    dense.loss.backward()  # drawing inside the graph must not disturb what the backward needs
    cfg = model.quietstar_config
    assert dense.thoughts.shape == (2, cfg.num_thoughts, ids.shape[1], cfg.num_thought_tokens)
    assert not torch.isin(dense.thoughts, torch.tensor(model.thought_token_ids)).any()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, labels=ids, thoughts=dense.thoughts)
    torch.testing.assert_close(dense.loss, ours.loss, rtol=LOSS_RTOL, atol=0.0)


def test_dense_forward_refuses_the_quietstar_attention():
    model = make_model("llama")
    ids, mask = padded_batch()
    with pytest.raises(ValueError, match="plain_attention"):
        dense_forward(model, ids, mask, labels=ids)
