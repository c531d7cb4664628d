"""Issue 21's recipe mechanisms as pure functions (docs/design.md §1, "Losses"): the entropy bonus L_ent and the
position-contrastive reward; the whole loss with them is checked against the slow reference in test_losses.py."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_model, padded_batch, randomize_mixing_head
from quietstar import QuietStarLossConfig
from quietstar.losses import advantages, contrastive_rewards, entropy_loss, lookahead_base_nll, moved_gains
from quietstar.training import (QuietStarTrainer, QuietStarTrainingArguments, build_window_dataset,
                                synthetic_arithmetic_documents)


def random_sample_logits(shape=(2, 3, 5, 4, 11), seed=0):
    """fp64 logits ``[B, N, L, T, V]`` with the two thought-token columns at -inf, as the model gives them."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=generator, dtype=torch.float64) * 2
    logits[..., [3, 7]] = float("-inf")
    return logits


def independent_entropy_loss(logits, temperature, valid):
    """-mean over valid (j, n, m) of H, with torch.distributions (its own handling of -inf logits)."""
    entropy = torch.distributions.Categorical(logits=logits / temperature).entropy()  # [B, N, L, T]
    weights = valid[:, None, :, None].expand_as(entropy)
    return -entropy[weights].mean()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_entropy_loss_value_and_gradient_match_an_independent_computation(temperature):
    valid = torch.tensor([[True, False, True, True, False], [True, True, True, False, False]])
    logits = random_sample_logits().requires_grad_(True)
    loss = entropy_loss(logits, temperature, valid)
    (grad,) = torch.autograd.grad(loss, logits)
    reference_logits = logits.detach().clone().requires_grad_(True)
    reference = independent_entropy_loss(reference_logits, temperature, valid)
    (reference_grad,) = torch.autograd.grad(reference, reference_logits)
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(grad).all() and (grad[..., [3, 7]] == 0).all()  # masked tokens: no NaN, no gradient
    assert (grad[0, :, [1, 4]] == 0).all() and (grad[1, :, 3:] == 0).all()  # invalid positions take no part
    assert (grad[0, :, [0, 2, 3]] != 0).any(dim=-1).all()
    finite = logits.detach().masked_fill(torch.isinf(logits.detach()), 0).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: entropy_loss(z, temperature, valid), (finite,))


def entropy_after_a_descent_step(loss_fn, step: float = 20.0) -> tuple[float, float]:
    """Mean entropy of random logits before and after one gradient-descent step on ``loss_fn``."""
    valid = torch.ones(2, 5, dtype=torch.bool)
    logits = random_sample_logits(seed=3).requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(logits, 1.0, valid), logits)
    with torch.no_grad():
        before = -entropy_loss(logits, 1.0, valid).item()
        after = -entropy_loss(torch.where(torch.isinf(logits), logits, logits - step * grad), 1.0, valid).item()
    return before, after


def test_a_descent_step_on_the_entropy_bonus_raises_entropy_and_a_wrong_sign_would_not():
    before, after = entropy_after_a_descent_step(entropy_loss)
    assert after > before + 0.01
    wrong_before, wrong_after = entropy_after_a_descent_step(lambda *a: -entropy_loss(*a))  # an entropy penalty
    assert wrong_after < wrong_before - 0.01  # the check above would catch it


def slow_moved_gains(moved_nll, base_nll, target_valid, shift):
    """G^moved by loops: gain of column j + shift's moved thought, credited to position j."""
    B, N, L, A = moved_nll.shape
    gains, partner = torch.zeros(B, N, L, dtype=moved_nll.dtype), torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        for j in range(L):
            here = j + shift
            if here >= L or not target_valid[b, here].all():
                continue
            partner[b, j] = True
            for n in range(N):
                gains[b, n, j] = sum(base_nll[b, here + s] - moved_nll[b, n, here, s] for s in range(A))
    return gains, partner


@pytest.mark.parametrize("shift", [3, 4])
def test_moved_gains_match_a_loop(shift):
    generator = torch.Generator().manual_seed(2)
    B, N, L, A = 2, 3, 11, 3
    moved_nll = torch.rand(B, N, L, A, generator=generator, dtype=torch.float64) * 5
    base_nll = torch.rand(B, L, generator=generator, dtype=torch.float64) * 5
    label_valid = torch.ones(B, L, dtype=torch.bool)
    label_valid[0, 8] = False  # an ignored label inside the row
    label_valid[1, :2] = False  # left padding
    columns = torch.arange(L)[:, None] + torch.arange(1, A + 1)
    target_valid = (columns < L) & label_valid[:, columns.clamp(max=L - 1)] & label_valid[:, :, None]
    gains, partner = moved_gains(moved_nll, base_nll, target_valid, shift)
    expected_gains, expected_partner = slow_moved_gains(moved_nll, base_nll, target_valid, shift)
    assert torch.equal(partner, expected_partner) and partner.any() and not partner.all()
    torch.testing.assert_close(gains, expected_gains, rtol=1e-12, atol=1e-12)


def test_a_thought_that_helps_equally_everywhere_earns_no_contrastive_advantage():
    generator = torch.Generator().manual_seed(4)
    B, N, L = 2, 4, 7
    base_reward = -torch.rand(B, 1, L, generator=generator, dtype=torch.float64) * 9  # -sum_s l^base at j
    gain = torch.randn(B, N, L, generator=generator, dtype=torch.float64)  # each thought's gain, here and moved alike
    reward = base_reward + gain
    valid = torch.ones(B, L, dtype=torch.bool)
    assert advantages(reward, False, "none", position_valid=valid).abs().max() > 0.1
    contrastive = contrastive_rewards(reward, gain, 1.0)
    torch.testing.assert_close(contrastive, base_reward.expand_as(reward))
    assert advantages(contrastive, False, "none", position_valid=valid).abs().max() < 1e-12
    # A thought that helps only where it was thought keeps its whole advantage; alpha = 0 changes nothing.
    local = contrastive_rewards(reward, torch.zeros_like(gain), 1.0)
    torch.testing.assert_close(advantages(local, False, "none"), advantages(reward, False, "none"))
    assert torch.equal(contrastive_rewards(reward, gain, 0.0), reward)


def test_lookahead_base_nll_sums_the_valid_targets():
    base_nll = torch.tensor([[1.0, 2.0, 4.0, 8.0, 16.0]])
    valid = torch.tensor([[[True, True], [True, False], [True, True], [True, True], [False, False]]])
    assert lookahead_base_nll(base_nll, valid).tolist() == [[3.0, 2.0, 12.0, 24.0, 0.0]]


def test_config_validates_the_mechanisms():
    with pytest.raises(ValueError, match="entropy_bonus_weight must be >= 0"):
        QuietStarLossConfig(entropy_bonus_weight=-0.1)
    with pytest.raises(ValueError, match="contrastive_reward_weight must be >= 0"):
        QuietStarLossConfig(contrastive_reward_weight=-1.0)
    with pytest.raises(ValueError, match="contrastive_shift must be a positive integer"):
        QuietStarLossConfig(contrastive_shift=0)
    with pytest.raises(ValueError, match="contrastive_shift = 3 is below num_lookahead_tokens = 4"):
        QuietStarLossConfig(contrastive_shift=3).contrastive_distance(4)
    assert QuietStarLossConfig().contrastive_distance(4) == 4
    assert QuietStarLossConfig(contrastive_shift=7).contrastive_distance(4) == 7


def test_mechanisms_off_change_nothing_and_run_no_extra_pass(monkeypatch):
    """alpha = 0 and eta = 0 (the defaults): the loss is today's bit for bit and no moved pass runs."""
    model = make_model("llama")
    randomize_mixing_head(model)
    ids, mask = padded_batch()
    thoughts = model.sample_thoughts(ids, mask)
    calls = []
    monkeypatch.setattr("quietstar.modeling.moved_thought_nll", lambda *a: calls.append(a))
    out = model(ids, attention_mask=mask, labels=ids, thoughts=thoughts)
    assert not calls and "entropy_loss" not in out.metrics and "moved_gain_mean" not in out.metrics
    assert "entropy" not in out.loss_terms
    monkeypatch.undo()
    mechanisms = QuietStarLossConfig(**{**model.loss_config.to_dict(), "contrastive_reward_weight": 1.0,
                                        "entropy_bonus_weight": 0.5})
    on = model(ids, attention_mask=mask, labels=ids, thoughts=thoughts, loss_config=mechanisms)
    assert on.metrics["policy_loss"] != out.metrics["policy_loss"]
    assert on.metrics["nll_loss"] == out.metrics["nll_loss"]  # the mechanisms touch rewards and L_ent only
    assert {"entropy_loss", "own_gain_mean", "moved_gain_mean"} <= set(on.metrics)
    # loss terms are weighted: only the policy term changes, and the weighted entropy term is added
    torch.testing.assert_close(on.loss, out.loss - out.loss_terms["policy"] + on.loss_terms["policy"]
                               + on.loss_terms["entropy"])
    torch.testing.assert_close(on.loss_terms["entropy"], 0.5 * torch.tensor(on.metrics["entropy_loss"],
                                                                            dtype=on.loss.dtype))


def test_trainer_keeps_the_entropy_term_and_logs_the_mechanisms(tmp_path):
    """The trainer's scheduled loss config scales lambda alone: eta * L_ent stays in the loss it trains on."""
    model = make_model(num_thought_tokens=2, num_lookahead_tokens=2, entropy_bonus_weight=0.5,
                       contrastive_reward_weight=1.0).train()
    args = QuietStarTrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
        use_cpu=True, report_to="none", disable_tqdm=True, save_strategy="no", logging_steps=1, seed=0,
        loss_term_grad_norm_steps=1)
    dataset = build_window_dataset(synthetic_arithmetic_documents(8), model.tokenizer, 24, 4)
    trainer = QuietStarTrainer(model=model, args=args, train_dataset=dataset)
    batch = next(iter(trainer.get_train_dataloader()))
    out = model(**batch, output_logits=False)
    assert out.loss_terms["entropy"].requires_grad
    scheduled = trainer.scheduled_loss_config()
    assert (scheduled.entropy_bonus_weight, scheduled.contrastive_reward_weight) == (0.5, 1.0)
    trainer.train()
    logs = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in line]
    assert len(logs) == 2
    for entry in logs:
        assert {"entropy_loss", "own_gain_mean", "moved_gain_mean"} <= set(entry)
        assert entry["entropy_loss"] < 0
    assert any(entry.get("grad_norm/entropy", 0) > 0 for entry in logs)
