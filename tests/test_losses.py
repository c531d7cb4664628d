"""Oracles 2 and 3 (docs/design.md §5): the no-thought identity, and the loss and gradients against a slow reference.

The reference runs the plain model (transformers' own eager attention) on every explicit branch
sequence and computes L_NLL, rewards, advantages and L_RL with Python loops straight from docs/design.md §1.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import ARCHITECTURES, make_model, padded_batch, randomize_mixing_head, transformers_eager
from quietstar import QuietStarLossConfig, modeling
from quietstar.loss_config import OFFICIAL_LOSS
from quietstar.losses import quietstar_loss, total_loss


def masked(logits, model):
    logits = logits.clone()
    logits[..., list(model.thought_token_ids)] = float("-inf")
    return logits


def thought_reward(model, h_base, real, at, thought):
    """R of ``thought`` inserted after real[: at + 1] (mixed or thought path), None where a target is missing; the
    explicit branch's hidden states; the mixed and thought-path NLLs and the prior's w * max(0, thought - base NLL)
    of each target there is."""
    cfg, loss = model.quietstar_config, model.loss_config
    T, A = cfg.num_thought_tokens, cfg.num_lookahead_tokens
    sot, eot = model.thought_token_ids
    sequence = torch.cat([real[: at + 1], torch.tensor([sot]), thought, torch.tensor([eot]), real[at + 1 : at + A]])
    h = model.body(inputs_embeds=model.embed(sequence[None])).last_hidden_state[0]
    reward, mixed_nlls, thought_nlls, prior_terms = 0.0, [], [], []
    for s in range(A):
        if at + 1 + s >= len(real):
            return None, h, mixed_nlls, thought_nlls, prior_terms
        h_thought = h[at + 1 + T + 1 + s]
        w = model.mixing_head(h_base[at + s], h_thought)
        base_logits, thought_logits = model.lm_head(h_base[at + s]), model.lm_head(h_thought)
        if cfg.mixing == "logits":
            z = (1 - w) * base_logits + w * thought_logits
        elif cfg.mixing == "bounded":
            w = 1 / (1 + torch.exp(-(w + math.log(0.01 / 0.99))))
            z = (1 - w) * base_logits + w * thought_logits
        else:
            w = torch.sigmoid(w)
            z = (1 - w) * torch.log_softmax(base_logits, -1) + w * torch.log_softmax(thought_logits, -1)
        nll = F.cross_entropy(masked(z, model), real[at + 1 + s])
        thought_nll = F.cross_entropy(masked(thought_logits, model), real[at + 1 + s])
        mixed_nlls.append(nll)
        thought_nlls.append(thought_nll)
        base_nll = F.cross_entropy(masked(base_logits, model), real[at + 1 + s])
        compared = thought_nll if loss.mixing_prior_reference == "thought" else nll
        prior_terms.append(w * (compared - base_nll).detach().clamp(min=0))
        reward = reward - (thought_nll if loss.reward_source == "thought" else nll).detach()
    return reward, h, mixed_nlls, thought_nlls, prior_terms


def reference_loss(model, ids, mask, thoughts):
    """L = L_NLL + gamma L_thought + lambda L_RL + (the mixing prior's weight) L_prior + eta L_ent computed one
    position, sample and step at a time."""
    cfg, loss = model.quietstar_config, model.loss_config
    T, A, N = cfg.num_thought_tokens, cfg.num_lookahead_tokens, cfg.num_thoughts
    shift = cfg.num_lookahead_tokens if loss.contrastive_shift is None else loss.contrastive_shift
    base_terms, mixed_terms, thought_terms = [], [[] for _ in range(A)], [[] for _ in range(A)]
    scored = []  # (advantage before normalisation, logprobs of the thought's T tokens)
    entropies = []  # entropy of each thought token's sampling distribution, at the positions of L_RL
    prior_terms = []  # w * max(0, thought (or mixed) NLL - base NLL) of every valid target
    with transformers_eager(model):
        for b in range(ids.shape[0]):
            columns = mask[b].nonzero().flatten()
            real = ids[b, columns]
            n_real = len(real)
            h_base = model.body(inputs_embeds=model.embed(real[None])).last_hidden_state[0]
            for j in range(n_real):
                if j + 1 < n_real:
                    base_terms.append(F.cross_entropy(masked(model.lm_head(h_base[j]), model), real[j + 1]))
                rewards, logprob_rows, entropy_rows = [], [], []
                for n in range(N):
                    c = thoughts[b, n, columns[j]]
                    reward, h, mixed_nlls, thought_nlls, priors = thought_reward(model, h_base, real, j, c)
                    for s, (nll, thought_nll) in enumerate(zip(mixed_nlls, thought_nlls)):
                        mixed_terms[s].append(nll)
                        thought_terms[s].append(thought_nll)
                    prior_terms.extend(priors)
                    sampling = masked(model.lm_head(h[j + 1 : j + 1 + T]), model)
                    logprob_rows.append(torch.log_softmax(sampling / loss.reinforce_temperature, -1)[torch.arange(T), c])
                    p = torch.softmax(sampling / cfg.thought_temperature, -1)
                    entropy_rows.append(-(p * torch.log(torch.where(p > 0, p, 1))).sum(-1))
                    if reward is not None and loss.contrastive_reward_weight > 0:
                        # R' = R - alpha * (R at j' = j + shift - the base model's reward there)
                        moved = thought_reward(model, h_base, real, j + shift, c)[0]
                        if moved is None:
                            reward = None
                        else:
                            base_moved = -sum(F.cross_entropy(masked(model.lm_head(h_base[j + shift + s]), model),
                                                              real[j + shift + 1 + s]) for s in range(A)).detach()
                            reward = reward - loss.contrastive_reward_weight * (moved - base_moved)
                    rewards.append(reward)
                if rewards[0] is None:
                    continue
                mean_reward = sum(rewards) / N
                scored.extend((rewards[n] - mean_reward, logprob_rows[n]) for n in range(N))
                entropies.extend(entropy_rows)
    spread = 1.0
    if loss.advantage_normalization == "batch_std":
        spread = max(float(torch.stack([a for a, _ in scored]).square().mean().sqrt()), loss.advantage_std_floor)
    policy_terms = []
    for advantage, logprobs in scored:
        advantage = advantage / spread
        if loss.clip_negative_advantage:
            advantage = max(advantage, 0.0)
        policy_terms.extend(-advantage * logprobs)
    nll = loss.base_loss_weight * torch.stack(base_terms).mean() + (1 - loss.base_loss_weight) * sum(
        torch.stack(terms).mean() for terms in mixed_terms
    ) / A
    thought = sum(torch.stack(terms).mean() for terms in thought_terms) / A
    policy = torch.stack(policy_terms).mean()
    prior = torch.stack(prior_terms).mean()
    entropy = -torch.cat(entropies).mean()
    total = (nll + loss.thought_nll_weight * thought + loss.policy_weight * policy + loss.mixing_prior_weight * prior
             + loss.entropy_bonus_weight * entropy)
    return total, policy


def gradients(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


RECIPES = {
    "official": OFFICIAL_LOSS,
    "default": {},  # the recipe: thought rewards, batch-normalised centred advantages, thought NLL
    "mixed_reward_normalised": dict(reward_source="mixed", advantage_normalization="batch_std", thought_nll_weight=0.0),
    "thought_reward_clipped": dict(reward_source="thought", clip_negative_advantage=True, reinforce_temperature=2.0,
                                   advantage_normalization="none", thought_nll_weight=1.5),
    # issue 21's mechanisms: an entropy bonus at a sampling temperature other than 1, position-contrastive rewards
    "entropy_contrastive": dict(entropy_bonus_weight=0.7, thought_temperature=0.8, contrastive_reward_weight=0.6),
    "entropy_contrastive_mixed": dict(entropy_bonus_weight=0.3, reward_source="mixed", contrastive_reward_weight=1.3,
                                      contrastive_shift=3),
    # the prior against the mixed prediction (with a bounded w; on "logits" mixing no prior is added)
    "prior_on_mixed": dict(mixing_prior_reference="mixed"),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("mixing", ["logits", "logprobs", "bounded"])
def test_loss_and_gradients_match_slow_reference(arch, mixing, recipe):
    # fp64: normalised advantages divide differences of nearly equal rewards by their spread, which in fp32 leaves
    # only three or four digits to compare.
    prior = {"mixing_prior_weight": 2.0} if mixing != "logits" else {}  # the prior needs a bounded weight
    model = make_model(arch, mixing=mixing, num_lookahead_tokens=2, **{**RECIPES[recipe], "policy_weight": 3.0, **prior})
    model.double()
    randomize_mixing_head(model)
    ids, mask = padded_batch(lengths=(9, 7))
    thoughts = model.sample_thoughts(ids, mask)
    labels = ids.masked_fill(mask == 0, -100)

    out = model(ids, attention_mask=mask, labels=labels, thoughts=thoughts)
    out.loss.backward()
    fast = gradients(model)
    model.zero_grad()
    loss, policy = reference_loss(model, ids, mask, thoughts)
    loss.backward()
    slow = gradients(model)

    assert policy.item() != 0.0, "the test needs a non-zero policy loss to check it"
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(out.metrics["policy_loss"], dtype=torch.float64), policy.detach(),
                               rtol=1e-5, atol=1e-10)
    assert fast.keys() == slow.keys()
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-4, atol=1e-6, msg=name)


def test_unclipped_advantages_match_reference():
    model = make_model("llama", **{**OFFICIAL_LOSS, "clip_negative_advantage": False, "policy_weight": 2.0},
                       num_lookahead_tokens=2)
    randomize_mixing_head(model)
    ids, mask = padded_batch(lengths=(8, 8), left_padding_rows=())
    thoughts = model.sample_thoughts(ids, mask)
    out = model(ids, attention_mask=mask, labels=ids, thoughts=thoughts)
    loss, _ = reference_loss(model, ids, mask, thoughts)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_no_thought_identity(arch):
    """Last mixing layer at zero: mixed logits are the base logits and, with rewards from the mixed prediction,
    L_RL is exactly 0."""
    model = make_model(arch, reward_source="mixed")
    ids, mask = padded_batch()
    out = model(ids, attention_mask=mask, labels=ids)
    A = model.quietstar_config.num_lookahead_tokens
    L = ids.shape[1]
    for s in range(A):
        base = masked(out.base_logits[:, s:], model)  # base logits at j + s predict x_{j+1+s}
        torch.testing.assert_close(out.logits[:, :, : L - s, s], base[:, None].expand_as(out.logits[:, :, : L - s, s]),
                                   rtol=1e-6, atol=1e-6)
    assert out.metrics["policy_loss"] == 0.0
    assert out.metrics["mixing_weight_mean"] == 0.0
    assert out.metrics["positive_advantage_fraction"] == 0.0
    assert abs(out.metrics["mixed_nll_0"] - out.metrics["base_nll"]) < 1e-5
    # ... and it is the head, not an accident, that makes it so.
    randomize_mixing_head(model)
    moved = model(ids, attention_mask=mask, labels=ids, thoughts=out.thoughts)
    assert moved.metrics["policy_loss"] != 0.0
    assert not torch.allclose(moved.logits[:, :, :, 0], out.logits[:, :, :, 0])


def test_logprobs_mode_starts_at_an_even_mix():
    model = make_model("llama", mixing="logprobs")
    ids, mask = padded_batch()
    out = model(ids, attention_mask=mask)
    assert torch.allclose(out.mixing_weights, torch.full_like(out.mixing_weights, 0.5))


def test_losses_ignore_what_labels_ignore():
    """A -100 label removes exactly its targets: the loss changes, and stays finite."""
    model = make_model("llama")
    randomize_mixing_head(model)
    ids, mask = padded_batch(lengths=(10, 10), left_padding_rows=())
    thoughts = model.sample_thoughts(ids, mask)
    full = model(ids, attention_mask=mask, labels=ids, thoughts=thoughts)
    labels = ids.clone()
    labels[:, 5:] = -100
    partial = model(ids, attention_mask=mask, labels=labels, thoughts=thoughts)
    truncated = model(ids[:, :5], attention_mask=mask[:, :5], labels=ids[:, :5], thoughts=thoughts[:, :, :5])
    assert partial.metrics["base_nll"] != full.metrics["base_nll"]
    # Targets up to x_4 only: the base NLL equals that of the row cut after x_4.
    assert abs(partial.metrics["base_nll"] - truncated.metrics["base_nll"]) < 1e-5


def test_one_set_of_loss_defaults_one_sum_and_a_loss_config_per_call(monkeypatch):
    """Called directly, the loss function weighs as a model call does by default (the recipe: one set of defaults);
    the weighted terms sum to the loss (one owner); a call's loss_config replaces the model's for that call only."""
    model = make_model("llama", num_lookahead_tokens=2)
    randomize_mixing_head(model)
    ids, mask = padded_batch(lengths=(9, 7))
    thoughts = model.sample_thoughts(ids, mask)
    calls = []
    monkeypatch.setattr(modeling, "quietstar_loss", lambda *a, **kw: calls.append((a, kw)) or quietstar_loss(*a, **kw))
    out = model(ids, attention_mask=mask, labels=ids, thoughts=thoughts)
    ((args, kwargs),) = calls
    assert args[7] is model.loss_config and model.loss_config == QuietStarLossConfig()
    direct, metrics, terms = quietstar_loss(*args[:7], **kwargs)  # no loss config: the function's own default
    torch.testing.assert_close(direct, out.loss)
    assert metrics["policy_loss"] == out.metrics["policy_loss"] and metrics["loss"] == out.metrics["loss"]
    torch.testing.assert_close(total_loss(out.loss_terms), out.loss)
    torch.testing.assert_close(out.loss_terms["policy"] / model.loss_config.policy_weight,
                               torch.tensor(out.metrics["policy_loss"]))
    official = QuietStarLossConfig.official(policy_weight=3.0)
    per_call = model(ids, attention_mask=mask, labels=ids, thoughts=thoughts, loss_config=official)
    assert model.loss_config == QuietStarLossConfig()  # the model's stays
    assert not torch.allclose(per_call.loss, out.loss)
    torch.testing.assert_close(total_loss(per_call.loss_terms), per_call.loss)
    torch.testing.assert_close(per_call.loss_terms["thought_nll"], per_call.loss.new_zeros(()))  # gamma = 0
    model.loss_config = official
    torch.testing.assert_close(model(ids, attention_mask=mask, labels=ids, thoughts=thoughts).loss, per_call.loss)
