"""Oracle 1 (docs/design.md §5): the parallel thought computation equals running the plain model on each branch.

For a position j and sample n, the explicit sequence x_0..x_j, <sot>, c_1..c_T, <eot>, x_{j+1}..x_{j+A-1}
(real tokens only, so a left-padded row is unpadded) is run through the base model with transformers'
own eager attention; its logits must equal ours: the sampling logits (both the no-grad sampling phase
and the gradient pass), the thought logits and the base logits.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_model, padded_batch, transformers_eager
from quietstar.tiny import TINY_ARCHITECTURES
from quietstar.thoughts import expanded_pass, sample_thoughts

TOL = dict(rtol=1e-5, atol=1e-5)


def explicit_branch(model, ids, mask, thoughts, b, n, j):
    """The branch of (row b, sample n, real position j) as one explicit sequence, and where its slots start."""
    cfg = model.quietstar_config
    real = ids[b][mask[b].bool()]
    sot, eot = model.thought_token_ids
    lookahead = real[j + 1 : j + cfg.num_lookahead_tokens]
    sequence = torch.cat([real[: j + 1], torch.tensor([sot]), thoughts[b, n, j], torch.tensor([eot]), lookahead])
    return sequence, j + 1  # slot 0 (<sot>) sits at index j + 1


def plain_logits(model, sequence):
    with torch.no_grad(), transformers_eager(model):
        return model.base(inputs_embeds=model.embed(sequence[None])).logits[0]


@pytest.mark.parametrize("arch", sorted(TINY_ARCHITECTURES))
def test_parallel_equals_sequential(arch):
    model = make_model(arch)
    # Train-like state: thought embeddings that differ from the embedding rows they started as.
    with torch.no_grad():
        model.thought_embeddings.add_(torch.randn_like(model.thought_embeddings))
    cfg = model.quietstar_config
    T, A = cfg.num_thought_tokens, cfg.num_lookahead_tokens
    ids, mask = padded_batch(lengths=(11, 8))
    key_padding = mask.bool()
    thoughts, sampling_logits = sample_thoughts(model, ids, key_padding, return_logits=True)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, thoughts=thoughts)
        text_hidden, branch_hidden = expanded_pass(model, ids, key_padding, thoughts)
        grad_pass_sampling_logits = model.head_logits(branch_hidden[..., :T, :])

    checked = 0
    for b in range(ids.shape[0]):
        columns = mask[b].nonzero().flatten()  # column of each real position
        n_real = len(columns)
        base = plain_logits(model, ids[b][mask[b].bool()])
        torch.testing.assert_close(out.base_logits[b, columns], base, **TOL)
        for j in sorted({0, 1, n_real // 2, n_real - A, n_real - 1}):
            for n in range(cfg.num_thoughts):
                column = columns[j]
                sequence, start = explicit_branch(model, ids, mask, thoughts[:, :, columns], b, n, j)
                logits = plain_logits(model, sequence)
                # Slots 0..T-1 give the distributions c_1..c_T were drawn from (thought tokens masked there).
                expected = logits[start : start + T].clone()
                expected[..., list(model.thought_token_ids)] = float("-inf")
                torch.testing.assert_close(sampling_logits[b, n, column], expected, **TOL)
                torch.testing.assert_close(
                    grad_pass_sampling_logits[b, n, column], logits[start : start + T], **TOL
                )
                # Slots T+1.. give h^thought_{j,s}; only slots inside the explicit sequence exist there.
                n_thought = min(A, len(sequence) - (start + T + 1))
                torch.testing.assert_close(
                    out.thought_logits[b, n, column, :n_thought],
                    logits[start + T + 1 : start + T + 1 + n_thought],
                    **TOL,
                )
                checked += 1
    assert checked >= 16


def test_greedy_thoughts_follow_the_argmax_and_agree_across_samples():
    model = make_model("llama")
    ids, mask = padded_batch(lengths=(9, 9), left_padding_rows=())
    thoughts = model.sample_thoughts(ids, mask, greedy=True)
    assert torch.equal(thoughts[:, 0], thoughts[:, 1])
    sequence, start = explicit_branch(model, ids, mask, thoughts, 0, 0, 4)
    logits = plain_logits(model, sequence)
    logits[..., list(model.thought_token_ids)] = float("-inf")
    assert torch.equal(logits[start : start + model.quietstar_config.num_thought_tokens].argmax(-1), thoughts[0, 0, 4])


def test_sampling_is_reproducible_with_a_generator_and_never_emits_thought_tokens():
    model = make_model("llama", num_thought_tokens=6)
    ids, mask = padded_batch()
    first = model.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(3))
    second = model.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(3))
    third = model.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, second) and not torch.equal(first, third)
    assert not torch.isin(first, torch.tensor(model.thought_token_ids)).any()


def test_a_wrong_visibility_rule_would_be_caught():
    """Guard on the oracle itself: letting branches see one position further ahead changes the logits."""
    model = make_model("llama")
    ids, mask = padded_batch(lengths=(10, 10), left_padding_rows=())
    thoughts = model.sample_thoughts(ids, mask)
    sequence, start = explicit_branch(model, ids, mask, thoughts, 0, 0, 3)
    leaky = torch.cat([ids[0, :5], sequence[start:]])  # x_0..x_4 instead of x_0..x_3
    with torch.no_grad():
        out = model(ids, attention_mask=mask, thoughts=thoughts)
    T = model.quietstar_config.num_thought_tokens
    logits = plain_logits(model, leaky)
    assert not torch.allclose(out.thought_logits[0, 0, 3, 0], logits[5 + T + 1], **TOL)
