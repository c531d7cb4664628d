"""Hindsight proposals (quietstar.hindsight, docs/design.md §7): thoughts drawn with a view of the next h text tokens,
reweighted to the policy by balance-heuristic importance weights, on tiny random fp32 models of odd sizes.

Oracles: the reach against a loop; the weights' unbiasedness by exact enumeration over a small categorical (and a
naive p/q weight failing it); every thought's weight against log-probabilities of the plain model on the explicit
sequences text[:j + 1 + reach] + <sot> + thought (windows, soft-capping and sinks included); the weighted loss
against the unweighted loss of the thoughts whose weight is not zero.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import make_model, padded_batch, randomize_mixing_head, transformers_eager
from quietstar import QuietStarLossConfig
from quietstar.hindsight import balance_log_weights, hindsight_reach, sample_hindsight_thoughts
from quietstar.losses import advantages, quietstar_loss
from quietstar.training import (QuietStarTrainer, QuietStarTrainingArguments, build_window_dataset,
                                synthetic_arithmetic_documents)


def hindsight_model(arch="llama", **settings):
    model = make_model(arch, **settings)
    randomize_mixing_head(model)
    with torch.no_grad():  # train-like thought embeddings, unlike the rows they started as
        model.thought_embeddings.add_(torch.randn_like(model.thought_embeddings))
    return model


# ---------------------------------------------------------------------------------------------------- reach
@pytest.mark.parametrize("tokens", [0, 1, 3])
def test_reach_counts_the_real_tokens_after_each_position_up_to_h(tokens):
    ids, mask = padded_batch(lengths=(9, 6, 4), left_padding_rows=(1,))
    reach = hindsight_reach(mask.bool(), tokens)
    for b in range(3):
        columns = mask[b].nonzero().flatten().tolist()
        for c in range(mask.shape[1]):
            want = min(tokens, len(columns) - 1 - columns.index(c)) if c in columns else 0
            assert reach[b, c] == want, (b, c)


# ---------------------------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("num_thoughts,num_hindsight", [(2, 1), (3, 1), (3, 2), (4, 3)])
def test_balance_weights_are_unbiased_for_the_policy_and_bounded(num_thoughts, num_hindsight):
    """K draws from q and N - K from p, each weighted rho: (1/N) sum_n E[rho f] = E_p[f], exactly, by enumeration;
    the plain ratio p/q on every draw is not (it is only right for the draws from q)."""
    generator = torch.Generator().manual_seed(num_thoughts * 10 + num_hindsight)
    p = torch.softmax(torch.randn(7, generator=generator, dtype=torch.float64) * 2, 0)
    q = torch.softmax(torch.randn(7, generator=generator, dtype=torch.float64) * 2, 0)
    f = torch.randn(7, generator=generator, dtype=torch.float64)
    N, K = num_thoughts, num_hindsight
    rho = balance_log_weights(p.log(), q.log(), K, N).exp()
    estimate = (K * (q * rho * f).sum() + (N - K) * (p * rho * f).sum()) / N
    torch.testing.assert_close(estimate, (p * f).sum())
    assert (rho >= 0).all() and (rho <= N / (N - K) + 1e-12).all()
    naive = p / q
    assert not torch.allclose((K * (q * naive * f).sum() + (N - K) * (p * naive * f).sum()) / N, (p * f).sum())


def test_balance_weights_refuse_no_policy_draws():
    with pytest.raises(ValueError, match="0 < hindsight_thoughts < num_thoughts"):
        balance_log_weights(torch.zeros(3), torch.zeros(3), 2, 2)


def masked_logprob(logits, token, sot, eot, temperature):
    logits = logits.clone()
    logits[[sot, eot]] = float("-inf")
    return torch.log_softmax(logits / temperature, dim=-1)[token]


@pytest.mark.parametrize("arch", ["llama", "mistral_window", "gemma2", "gpt_oss"])
def test_weights_match_the_plain_model_on_explicit_sequences(arch):
    """Every thought's log p (the policy: text[:j + 1], <sot>, its tokens) and log q (the proposal: text[:j + 1 +
    reach], <sot>, its tokens) from the plain model give the weights sample_hindsight_thoughts returns: the proposal's
    view, its position ids and the replay under the swapped view are all right (left and right padding, windows
    shorter than a branch, soft-capping, sinks)."""
    model = hindsight_model(arch, num_thoughts=3, thought_temperature=0.8)
    cfg = model.quietstar_config
    N, K, h, tau = cfg.num_thoughts, 2, 3, cfg.thought_temperature
    ids, mask = padded_batch(lengths=(11, 8), left_padding_rows=(1,))
    thoughts, rho = sample_hindsight_thoughts(model, ids, mask.bool(), h, K, temperature=tau,
                                              generator=torch.Generator().manual_seed(3))
    assert thoughts.shape == (2, N, 11, cfg.num_thought_tokens) and rho.shape == (2, N, 11)
    sot, eot = model.thought_token_ids
    changed = 0
    for b in range(2):
        columns = mask[b].nonzero().flatten().tolist()
        real = ids[b][mask[b].bool()]
        for j, column in enumerate(columns):
            reach = min(h, len(columns) - 1 - j)
            for n in range(N):
                thought = thoughts[b, n, column]
                logprob = {}
                for view, seen in (("p", j + 1), ("q", j + 1 + reach)):
                    sequence = torch.cat([real[:seen], torch.tensor([sot]), thought[:-1]])
                    with torch.no_grad(), transformers_eager(model):
                        logits = model.base(inputs_embeds=model.embed(sequence[None])).logits[0, seen:]  # <sot> on
                    logprob[view] = sum(masked_logprob(logits[m], thought[m], sot, eot, tau)
                                        for m in range(len(thought)))
                want = N * math.exp(logprob["p"]) / (K * math.exp(logprob["q"]) + (N - K) * math.exp(logprob["p"]))
                torch.testing.assert_close(rho[b, n, column].item(), want, rtol=1e-4, atol=1e-6)
                changed += abs(want - 1) > 1e-3
    assert changed > 10  # the proposal reads the future: its weights are not all 1


# ---------------------------------------------------------------------------------------------------- the loss
def test_weighted_advantages_match_a_loop():
    generator = torch.Generator().manual_seed(5)
    reward = torch.randn(2, 3, 6, generator=generator, dtype=torch.float64)
    rho = torch.rand(2, 3, 6, generator=generator, dtype=torch.float64) * 1.5
    valid = torch.rand(2, 6, generator=generator) > 0.3
    got = advantages(reward, False, "batch_std", 0.01, valid, rho)
    centred = torch.empty_like(reward)
    for b in range(2):
        for j in range(6):
            mean = sum(rho[b, n, j] * reward[b, n, j] for n in range(3)) / sum(rho[b, n, j] for n in range(3))
            centred[b, :, j] = reward[b, :, j] - mean
    squares = [rho[b, n, j] * centred[b, n, j] ** 2 for b in range(2) for n in range(3) for j in range(6) if valid[b, j]]
    torch.testing.assert_close(got, centred / math.sqrt(sum(squares) / len(squares)))


def random_loss_inputs(N=3, B=2, L=7, A=2, T=3, V=13, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    sample_logits = rand(B, N, L, T, V)
    return dict(base_logits=rand(B, L, V), mixed_logits=rand(B, N, L, A, V), sample_logits=sample_logits,
                thoughts=torch.randint(0, V, (B, N, L, T), generator=generator),
                mixing_weights=torch.rand(B, N, L, A, generator=generator, dtype=torch.float64),
                labels=torch.randint(0, V, (B, L), generator=generator),
                position_valid=torch.tensor([[True] * L, [False] * 2 + [True] * (L - 2)]),
                thought_logits=rand(B, N, L, A, V))


def test_a_thought_of_weight_zero_drops_out_and_the_rest_weigh_as_their_mean():
    """rho = (0, 3/2, 3/2) on N = 3 thoughts is, term by term and in every gradient, the unweighted loss of the last
    two thoughts alone: each term is weighted (an unweighted baseline, spread or NLL would differ)."""
    config = QuietStarLossConfig(mixing_prior_weight=0.5, entropy_bonus_weight=0.1)
    inputs = random_loss_inputs()
    for name in ("mixed_logits", "sample_logits", "thought_logits", "mixing_weights"):
        inputs[name].requires_grad_(True)
    rho = torch.tensor([0.0, 1.5, 1.5], dtype=torch.float64).view(1, 3, 1).expand(2, 3, 7)
    loss, _, terms = quietstar_loss(**{k: v for k, v in inputs.items() if k != "thought_logits"}, loss_config=config,
                                    thought_logits=inputs["thought_logits"], proposal_weights=rho)
    two = {k: (v[:, 1:] if v.dim() > 2 and k not in ("base_logits",) else v) for k, v in inputs.items()}
    two = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in two.items()}
    want, _, want_terms = quietstar_loss(**{k: v for k, v in two.items() if k != "thought_logits"},
                                         loss_config=config, thought_logits=two["thought_logits"])
    assert set(terms) == set(want_terms) == {"nll", "thought_nll", "policy", "mixing_prior", "entropy"}
    for name in terms:
        torch.testing.assert_close(terms[name], want_terms[name], msg=name)
    loss.backward()
    want.backward()
    for name in ("mixed_logits", "sample_logits", "thought_logits", "mixing_weights"):
        assert inputs[name].grad[:, 0].abs().max() == 0, name
        torch.testing.assert_close(inputs[name].grad[:, 1:], two[name].grad, msg=name)
    unweighted, _, _ = quietstar_loss(**{k: v for k, v in inputs.items() if k != "thought_logits"},
                                      loss_config=config, thought_logits=inputs["thought_logits"])
    assert not torch.allclose(unweighted, want)


def test_unit_weights_are_the_plain_loss():
    config = QuietStarLossConfig(mixing_prior_weight=0.5)
    inputs = random_loss_inputs(N=2)
    plain, plain_metrics, _ = quietstar_loss(**inputs, loss_config=config)
    weighted, metrics, _ = quietstar_loss(**inputs, loss_config=config, proposal_weights=torch.ones(2, 2, 7,
                                                                                                  dtype=torch.float64))
    torch.testing.assert_close(weighted, plain)
    assert metrics["hindsight_weight_mean"] == 1 and metrics["hindsight_effective_fraction"] == pytest.approx(1)
    assert "hindsight_weight_mean" not in plain_metrics


# ---------------------------------------------------------------------------------------------------- the model
def test_a_training_call_draws_proposals_and_an_evaluation_call_does_not(monkeypatch):
    model = hindsight_model(hindsight_tokens=2)
    ids, mask = padded_batch()
    out = model(ids, attention_mask=mask, labels=ids, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert 0 < out.metrics["hindsight_effective_fraction"] <= 1
    assert 0 <= out.metrics["hindsight_weight_mean"] <= 2 and 0 <= out.metrics["hindsight_policy_thought_weight_mean"] <= 2
    calls = []
    monkeypatch.setattr("quietstar.modeling.sample_hindsight_thoughts", lambda *a, **k: calls.append(a))
    model(ids, attention_mask=mask)  # no labels: nothing to reweight, thoughts from the policy
    model(ids, attention_mask=mask, labels=ids, thoughts=out.thoughts)  # given thoughts are replayed
    assert not calls


@pytest.mark.parametrize("settings,message", [
    (dict(hindsight_tokens=2, hindsight_thoughts=2), "hindsight_thoughts = 2 must be below num_thoughts = 2"),
    (dict(hindsight_tokens=2, thought_fraction=0.5), "thought_fraction = 0.5 thinks at anchors only"),
])
def test_the_model_refuses_proposals_it_cannot_weigh(settings, message):
    model = hindsight_model(**settings)
    ids, mask = padded_batch()
    with pytest.raises(ValueError, match=message):
        model(ids, attention_mask=mask, labels=ids)


@pytest.mark.parametrize("field,value", [("hindsight_tokens", -1), ("hindsight_tokens", True),
                                         ("hindsight_thoughts", 0), ("hindsight_tokens", 1.5)])
def test_the_config_refuses_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        QuietStarLossConfig(**{field: value})


def test_the_eager_sampling_serves_proposals_where_auto_would_take_the_cpu_flash_path():
    """On CPU 'auto' samples with the flash path, which does not implement hindsight: the capability table hands the
    proposals' sampling steps to the eager attention instead."""
    from quietstar.attention.backends import BACKENDS, LayerFeatures, choose, missing_features
    assert missing_features(BACKENDS["flash_cpu"], LayerFeatures(hindsight=True)) == ["hindsight"]
    query = torch.zeros(1, 2, 4, 8)
    assert choose(("flash_cpu", "eager"), LayerFeatures(hindsight=True), query, torch.ones(1, 4, dtype=torch.bool)
                  ).name == "eager"


def test_trainer_trains_with_proposals_and_logs_them(tmp_path):
    model = make_model(num_thought_tokens=2, num_lookahead_tokens=2, hindsight_tokens=2).train()
    args = QuietStarTrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
        use_cpu=True, report_to="none", disable_tqdm=True, save_strategy="no", logging_steps=1, seed=0)
    dataset = build_window_dataset(synthetic_arithmetic_documents(8), model.tokenizer, 24, 4)
    QuietStarTrainer(model=model, args=args, train_dataset=dataset).train()
    logs = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in line]
    assert len(logs) == 2
    for entry in logs:
        assert {"hindsight_weight_mean", "hindsight_effective_fraction", "hindsight_reward_gain"} <= set(entry)
