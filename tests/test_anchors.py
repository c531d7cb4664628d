"""Thinking where it matters (docs/design.md §7): thoughts at the ceil(q * n) positions of highest base next-token
entropy only (``thought_fraction`` q < 1), on tiny random fp32 models of odd sizes (L = 13, T = 3, N = 2, q = 0.3).

Oracles: the anchors against an entropy computed independently (transformers' own eager attention on each row's real
tokens); each anchored branch against the plain model on the explicit sequence text[:anchor + 1] + branch; the NLL
term against a slow per-position sum in which positions without thoughts take the base prediction.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_model, padded_batch, randomize_mixing_head, transformers_eager
from quietstar import AttentionSettings, QuietStarConfig
from quietstar.anchors import UNUSED, equal_compute_thought_tokens
from quietstar.losses import IGNORE_INDEX
from quietstar.scoring import BaseScorer, ThoughtScorer, ThoughtSource, configure_for_scoring
from quietstar.thoughts import expanded_pass, sample_anchored_thoughts
from quietstar.training.checks import check_thought_fraction
from quietstar.training.compute import positions_per_row
from quietstar.training.memory import estimate_training_bytes

Q = 0.3
TOL = dict(rtol=1e-5, atol=1e-5)
REFUSAL = "thought_fraction < 1 runs on the eager attention backend; set attention backend to eager"


def anchored_model(arch="llama", **settings):
    model = make_model(arch, thought_fraction=Q, **settings)
    randomize_mixing_head(model)  # thoughts matter
    with torch.no_grad():  # train-like thought embeddings, unlike the rows they started as
        model.thought_embeddings.add_(torch.randn_like(model.thought_embeddings))
    return model


def batch():
    """Row 0: 13 real tokens, right end; row 1: 9 real tokens, left-padded (so it chooses fewer anchors)."""
    return padded_batch(lengths=(13, 9), left_padding_rows=(1,))


def plain_logits(model, sequence):
    with torch.no_grad(), transformers_eager(model):
        return model.base(inputs_embeds=model.embed(sequence[None])).logits[0]


def used_slots(anchors, b):
    return [(m, int(c)) for m, c in enumerate(anchors[b].tolist()) if c != UNUSED]


# --------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("fraction", [0, 0.0, -0.2, 1.5, True, "0.5"])
def test_config_refuses_a_fraction_outside_0_1(fraction):
    with pytest.raises(ValueError, match="thought_fraction"):
        QuietStarConfig(thought_fraction=fraction)


def test_config_takes_fractions_in_0_1_and_old_saves_think_everywhere():
    assert QuietStarConfig(thought_fraction=Q).thought_fraction == Q
    assert QuietStarConfig.from_dict({"num_thought_tokens": 3}).thought_fraction == 1.0


# -------------------------------------------------------------------------------------------------- anchors
def test_anchors_are_the_top_entropy_real_positions_never_padding():
    model = anchored_model()
    A = model.quietstar_config.num_lookahead_tokens
    ids, mask = batch()
    anchors, thoughts = model.sample_anchored_thoughts(ids, mask)
    assert thoughts.shape == (2, 2, anchors.shape[1], 3)
    for b in range(ids.shape[0]):
        columns = mask[b].nonzero().flatten()
        n = len(columns)
        logits = plain_logits(model, ids[b][mask[b].bool()])
        keep = [v for v in range(logits.shape[-1]) if v not in model.thought_token_ids]
        entropy = torch.distributions.Categorical(logits=logits[:, keep].double()).entropy()
        eligible = list(range(n - A))  # x_{j+1}..x_{j+A} all real
        count = math.ceil(round(Q * n, 9))
        expected = sorted(sorted(eligible, key=lambda j: -entropy[j].item())[:count])
        chosen = used_slots(anchors, b)
        assert [c for _, c in chosen] == [int(columns[j]) for j in expected], b
        assert all(mask[b, c] for _, c in chosen)
        assert (anchors[b, len(chosen):] == UNUSED).all()
    assert anchors.shape[1] == math.ceil(round(Q * 13, 9))  # row 0 has the most anchors


def test_anchors_skip_positions_whose_targets_are_not_scored():
    model = anchored_model()
    ids, mask = padded_batch(lengths=(13,), left_padding_rows=())
    labels = ids.clone()
    labels[0, 5:10] = IGNORE_INDEX  # positions 2..8 have an ignored target among their A = 3
    anchors, _ = model.sample_anchored_thoughts(ids, mask, labels=labels)
    assert anchors.tolist() == [[0, 1, 9]]  # ceil(0.3 * 13) = 4 wanted; only 0, 1 and 9 (of 0..9) are eligible


def test_thoughts_given_without_anchors_run_at_every_position():
    """Scoring and evaluation hand the model thoughts at every position: a q < 1 model computes them all (the scorer
    then keeps the anchors' predictions)."""
    model = anchored_model()
    ids, mask = batch()
    with torch.no_grad():
        thoughts = model.sample_thoughts(ids, mask)
        out = model(ids, attention_mask=mask, thoughts=thoughts)
    assert out.anchors is None and out.logits.shape[2] == ids.shape[1]
    with pytest.raises(ValueError, match="thoughts must have shape"):
        model(ids, attention_mask=mask, thoughts=thoughts, anchors=torch.zeros(2, 4, dtype=torch.long))


# ----------------------------------------------------------------------------------- q = 1: the same path
def test_q_1_is_the_every_position_path_bit_for_bit():
    results = []
    for settings in ({}, {"thought_fraction": 1.0}):
        model = make_model(**settings)
        randomize_mixing_head(model)
        ids, mask = batch()
        out = model(ids, attention_mask=mask, labels=ids, generator=torch.Generator().manual_seed(5))
        out.loss.backward()
        assert out.anchors is None and out.thoughts.shape[2] == ids.shape[1]
        results.append((out.loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (loss, grads), (loss_1, grads_1) = results
    assert torch.equal(loss, loss_1) and all(torch.equal(g, h) for g, h in zip(grads, grads_1))


def test_anchors_at_every_position_give_the_every_position_loss_and_gradients():
    """The anchored machinery with M = L anchors (every position) computes the full path's loss and gradients (both on
    eager: the advantages' normalisation magnifies the rounding differences of another backend)."""
    model = make_model(entropy_bonus_weight=0.1, attention_backend="eager")
    randomize_mixing_head(model)
    ids, mask = padded_batch(lengths=(13, 13), left_padding_rows=())
    full = model(ids, attention_mask=mask, labels=ids, generator=torch.Generator().manual_seed(5))
    full.loss.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    everywhere = torch.arange(13).expand(2, 13)
    anchored = model(ids, attention_mask=mask, labels=ids, thoughts=full.thoughts, anchors=everywhere)
    anchored.loss.backward()
    torch.testing.assert_close(anchored.loss, full.loss, **TOL)
    for name, terms in full.loss_terms.items():
        torch.testing.assert_close(anchored.loss_terms[name], terms, **TOL, msg=name)
    for (name, p), g in zip(model.named_parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6, msg=name)


# -------------------------------------------------------------------- anchored attention = explicit sequences
@pytest.mark.parametrize("arch", ["llama", "mistral_window", "gemma2", "gpt_oss"])
def test_anchored_branches_equal_the_plain_model_on_explicit_sequences(arch):
    """Sampling steps and the gradient pass, at anchors only (windows shorter than a branch, soft-capping and sinks
    included): each branch equals the plain model on text[:anchor + 1], <sot>, its thought, <eot>, its lookahead."""
    model = anchored_model(arch)
    cfg = model.quietstar_config
    T, A, S = cfg.num_thought_tokens, cfg.num_lookahead_tokens, cfg.branch_length
    ids, mask = batch()
    key_padding = mask.bool()
    eligible = torch.zeros_like(key_padding)
    for b in range(2):
        eligible[b, mask[b].nonzero().flatten()[: -A]] = True
    anchors, thoughts, sampling_logits = sample_anchored_thoughts(model, ids, key_padding, eligible,
                                                                  return_logits=True)
    with torch.no_grad():
        text_hidden, branch_hidden = expanded_pass(model, ids, key_padding, thoughts, anchors)
        branch_logits = model.head_logits(branch_hidden)  # [B, N, M, S, V]
    sot, eot = model.thought_token_ids
    checked = 0
    for b in range(2):
        columns = mask[b].nonzero().flatten().tolist()
        real = ids[b][mask[b].bool()]
        torch.testing.assert_close(model.head_logits(text_hidden[b, columns]), plain_logits(model, real), **TOL)
        for m, column in used_slots(anchors, b):
            j = columns.index(column)
            for n in range(cfg.num_thoughts):
                sequence = torch.cat([real[: j + 1], torch.tensor([sot]), thoughts[b, n, m], torch.tensor([eot]),
                                      real[j + 1 : j + A]])
                logits = plain_logits(model, sequence)[j + 1 :]  # the S branch slots
                assert len(logits) == S
                torch.testing.assert_close(branch_logits[b, n, m], logits, **TOL)
                expected = logits[:T].clone()
                expected[..., [sot, eot]] = float("-inf")
                torch.testing.assert_close(sampling_logits[b, n, m], expected, **TOL)
                checked += 1
    assert checked == 2 * (4 + 3)


@pytest.mark.parametrize("left_padding_rows", [(1,), ()], ids=["left", "right"])
def test_unused_anchor_slots_change_nothing(left_padding_rows):
    """Row 1 has fewer anchors than row 0: whatever its unused slot holds, the loss and the gradients are the same
    (right-padded, the column an unused slot reads is a real position with scored targets)."""
    model = anchored_model()
    ids, mask = padded_batch(lengths=(13, 9), left_padding_rows=left_padding_rows)
    out = model(ids, attention_mask=mask, labels=ids, generator=torch.Generator().manual_seed(2))
    out.loss.backward()
    want = [p.grad.clone() for p in model.parameters()]
    unused = out.anchors == UNUSED
    assert unused.any()
    model.zero_grad()
    other = out.thoughts.clone()
    other[unused[:, None].expand(-1, 2, -1)] = 65  # another thought in the unused slots
    again = model(ids, attention_mask=mask, labels=ids, thoughts=other, anchors=out.anchors)
    again.loss.backward()
    assert torch.equal(again.loss, out.loss)
    for p, g in zip(model.parameters(), want):
        assert torch.equal(p.grad, g)


# ------------------------------------------------------------------------------------------------- losses
def slow_nll_term(model, out, ids, mask):
    """L_NLL from its definition, position by position: the mixed prediction of the A targets of a position with
    thoughts (an anchor), the base prediction x_{j+s} -> x_{j+1+s} elsewhere (w = 0 there)."""
    A, beta = model.quietstar_config.num_lookahead_tokens, model.loss_config.base_loss_weight
    base = out.base_logits.clone()
    base[..., list(model.thought_token_ids)] = float("-inf")
    ce = lambda logits, target: F.cross_entropy(logits[None], target.view(1)).item()  # noqa: E731
    base_terms, mixed_terms = [], [[] for _ in range(A)]
    B, L = ids.shape
    for b in range(B):
        slot = {c: m for m, c in used_slots(out.anchors, b)}
        for j in range(L):
            for s in range(A):
                if not (mask[b, j] and j + 1 + s < L and mask[b, j + 1 + s]):
                    continue
                target = ids[b, j + 1 + s]
                if s == 0:
                    base_terms.append(ce(base[b, j], target))
                for n in range(model.quietstar_config.num_thoughts):
                    logits = out.logits[b, n, slot[j], s] if j in slot else base[b, j + s]
                    mixed_terms[s].append(ce(logits, target))
    mixed = sum(sum(terms) / len(terms) for terms in mixed_terms) / A
    return beta * sum(base_terms) / len(base_terms) + (1 - beta) * mixed


def test_positions_without_thoughts_take_the_base_prediction_whatever_the_thoughts():
    model = anchored_model()
    ids, mask = batch()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=ids, generator=torch.Generator().manual_seed(2))
        other = model(ids, attention_mask=mask, labels=ids, anchors=out.anchors,
                      thoughts=torch.randint(0, 256, out.thoughts.shape, generator=torch.Generator().manual_seed(9)))
    assert torch.equal(out.base_logits, other.base_logits)  # text never sees a branch
    assert not torch.allclose(out.logits, other.logits)  # the anchors' mixed predictions do depend on the thoughts
    for result in (out, other):
        assert result.loss_terms["nll"].item() == pytest.approx(slow_nll_term(model, result, ids, mask), rel=1e-5)


def test_the_policy_gradient_flows_through_the_anchor_thoughts_only():
    """The sampling logits exist at anchors only; the policy term's gradient reaches every used anchor slot whose
    targets are all scored and no unused one."""
    model = anchored_model()
    ids, mask = batch()
    out = model(ids, attention_mask=mask, labels=ids, generator=torch.Generator().manual_seed(2))
    sample_logits = []
    hook = lambda module, args, output: sample_logits.append(output)  # noqa: E731
    # Replay, catching the logits the policy term scores (the head's output over the branch slots).
    handle = model.lm_head.register_forward_hook(hook)
    try:
        again = model(ids, attention_mask=mask, labels=ids, thoughts=out.thoughts, anchors=out.anchors,
                      output_logits=False)
    finally:
        handle.remove()
    M, T, V = out.anchors.shape[1], model.quietstar_config.num_thought_tokens, out.logits.shape[-1]
    branch = next(x for x in sample_logits if x.shape[0] == 2 * 2 * M * T)  # [B * N * M * T, V]
    grad = torch.autograd.grad(again.loss_terms["policy"], branch, retain_graph=True)[0].view(2, 2, M, T, V)
    reaches = grad.abs().sum(dim=(1, 3, 4)) > 0  # [B, M]
    assert torch.equal(reaches, out.anchors != UNUSED)


def test_contrastive_rewards_are_refused_with_anchors():
    model = anchored_model(contrastive_reward_weight=1.0)
    ids, mask = batch()
    with pytest.raises(ValueError, match="contrastive_reward_weight"):
        model(ids, attention_mask=mask, labels=ids)


# ------------------------------------------------------------------------------------------------ backends
@pytest.mark.parametrize("settings", [dict(attention_backend="flex"), dict(attention_backend="eager", sus_c=1e30)],
                         ids=["flex", "sus"])
def test_other_backends_refuse_anchors_naming_the_fix(settings):
    model = anchored_model(**settings)
    ids, mask = padded_batch(lengths=(13, 13), left_padding_rows=())
    with pytest.raises(ValueError, match=REFUSAL):
        model(ids, attention_mask=mask, labels=ids)
    with pytest.raises(ValueError, match=REFUSAL):
        check_thought_fraction(model, "cpu")


def test_auto_runs_anchors_on_eager():
    ids, mask = padded_batch(lengths=(13, 13), left_padding_rows=())
    losses = []
    for backend in ("auto", "eager"):
        model = anchored_model(attention_backend=backend)
        check_thought_fraction(model, "cpu")
        losses.append(model(ids, attention_mask=mask, labels=ids, generator=torch.Generator().manual_seed(1)).loss)
    assert torch.equal(*losses)
    model.set_attention(**AttentionSettings(attention_backend="flex").to_dict())
    model.quietstar_config = QuietStarConfig(num_thought_tokens=3, num_lookahead_tokens=3)
    check_thought_fraction(model, "cpu")  # q = 1: any backend


# -------------------------------------------------------------------------------------------- equal compute
def test_equal_compute_thought_tokens():
    assert equal_compute_thought_tokens(4, 4, 1.0) == 4
    assert equal_compute_thought_tokens(4, 4, 0.25) == 31  # (4 + 4 + 1) / 0.25 = 36 = 31 + 4 + 1
    assert equal_compute_thought_tokens(9, 4, 0.5) == 23
    with pytest.raises(ValueError):
        equal_compute_thought_tokens(4, 4, 0)
    L = 96
    full = positions_per_row("none", L, 2, 4, 4)
    longer = positions_per_row("none", L, 2, equal_compute_thought_tokens(4, 4, 0.25), 4, 0.25)
    assert full[0] == L + 2 * L * 9 and longer[0] == L + 2 * 24 * 36 == full[0]
    assert positions_per_row("none", L, 2, 4, 4, 0.25) == (L + 2 * 24 * 9, L + 2 * 24 * 4)


def test_the_memory_estimate_counts_the_branches_at_anchors():
    model = make_model()
    full = estimate_training_bytes(model, 2, 40, torch.float32, False)
    quarter = estimate_training_bytes(model, 2, 40, torch.float32, False, QuietStarConfig(
        num_thought_tokens=3, num_lookahead_tokens=3, thought_fraction=0.25))
    S = 3 + 3 + 1
    assert quarter["activations"] * (40 + 2 * 40 * S) == full["activations"] * (40 + 2 * 10 * S)


# -------------------------------------------------------------------------------------------------- scoring
def test_scoring_thinks_at_the_anchors_training_chooses_and_reads_the_text_path_elsewhere():
    """A q < 1 model is scored as it trains: with its thought at the ceil(q n) positions of highest text-path entropy
    among those with a real next token, and with the plain LM's prediction (w = 0) everywhere else."""
    model = anchored_model()
    configure_for_scoring(model)
    ids, mask = batch()
    source = ThoughtSource(model, torch.Generator().manual_seed(3))
    scorer = ThoughtScorer(model, source=source)
    scored = scorer(ids, mask)
    text = BaseScorer(model.base, model.thought_token_ids)(ids, mask)
    anchored_config = model.quietstar_config
    model.quietstar_config = dataclasses.replace(anchored_config, thought_fraction=1.0)
    everywhere = ThoughtScorer(model, source=source)(ids, mask)  # the same thoughts, mixed at every position
    model.quietstar_config = anchored_config
    for b in range(ids.shape[0]):
        columns = mask[b].nonzero().flatten().tolist()
        n = len(columns)
        logits = plain_logits(model, ids[b][mask[b].bool()])
        keep = [v for v in range(logits.shape[-1]) if v not in model.thought_token_ids]
        entropy = torch.distributions.Categorical(logits=logits[:, keep].double()).entropy()
        count = math.ceil(round(Q * n, 9))
        expected = sorted(columns[j] for j in sorted(range(n - 1), key=lambda j: -entropy[j].item())[:count])
        assert scorer.last_anchors[b].nonzero().flatten().tolist() == expected, b
        others = [c for c in columns[:-1] if c not in expected]
        torch.testing.assert_close(scored[b, expected], everywhere[b, expected], **TOL)
        torch.testing.assert_close(scored[b, others], text[b, others], **TOL)
        # The check can fail: where the model does not think, a thought would have changed its prediction.
        assert not torch.allclose(everywhere[b, others], text[b, others], **TOL)
        assert (scorer.last_weights[b, others] == 0).all() and (scorer.last_weights[b, expected] != 0).all()


def test_scoring_a_filler_trained_q_below_1_model_thinks_everywhere():
    """A model trained with filler thoughts chose no anchors in training, so it is scored with thoughts everywhere."""
    model = anchored_model(thoughts="filler")
    configure_for_scoring(model)
    ids, mask = batch()
    scorer = ThoughtScorer(model, thoughts="null")
    scorer(ids, mask)
    assert scorer.last_anchors is None
    assert (scorer.last_weights[0, :-1] != 0).all()
