"""Hindsight proposals (docs/design.md §7): thoughts sampled with a view of the next text tokens, reweighted to the
policy by importance weights.

Of the N thoughts of each position j, the first K are drawn from the hindsight proposal q: the same model, whose
branch at j also reads x_{j+1..j+h} and starts after them (position ids pos_j + h + 1 + m), as if it thought after
seeing what comes. The other N - K are drawn from the policy p (the normal view). A thought t gets the
balance-heuristic weight of this stratified mixture (Veach & Guibas 1995),

    rho(t) = N p(t) / (K q(t) + (N - K) p(t))    in [0, N / (N - K)],

so that for any f, E[(1/N) sum_n rho(t_n) f(t_n)] = E_p[f]: every loss term weighted by rho estimates the policy's
own without bias, and the weights stay bounded because the policy keeps N - K of the draws. p and q of every thought
come from two gradient-free sampling runs over one text pass: the draws, then a replay of the same thoughts with each
sample's view swapped.

Shapes: B batch, L text tokens, N thoughts per position, T thought tokens.
"""

from __future__ import annotations

import math

import torch

from .thoughts import _sampling_steps, _text_pass


def hindsight_reach(key_padding: torch.Tensor, tokens: int) -> torch.Tensor:
    """How many text tokens after each position a hindsight proposal reads: ``[B, L]`` = min(``tokens``, the real
    tokens after j), 0 at padding. ``key_padding [B, L]`` bool (real tokens contiguous in a row)."""
    real = key_padding.long()
    after = real.flip(-1).cumsum(-1).flip(-1) - real
    return after.clamp(max=tokens) * real


def balance_log_weights(policy_logprob: torch.Tensor, proposal_logprob: torch.Tensor, num_hindsight: int,
                        num_thoughts: int) -> torch.Tensor:
    """log rho = log N + log p - log(K q + (N - K) p) for thoughts whose log-probabilities under the policy and the
    proposal are ``policy_logprob`` and ``proposal_logprob`` (any shape, the same); K = ``num_hindsight`` < N."""
    if not 0 < num_hindsight < num_thoughts:
        raise ValueError(f"Hindsight proposals need 0 < hindsight_thoughts < num_thoughts, got {num_hindsight} of "
                         f"{num_thoughts}.")
    mixture = torch.logaddexp(proposal_logprob + math.log(num_hindsight),
                              policy_logprob + math.log(num_thoughts - num_hindsight))
    return math.log(num_thoughts) + policy_logprob - mixture


@torch.no_grad()
def sample_hindsight_thoughts(model, input_ids, key_padding, tokens: int, num_hindsight: int, *, temperature=1.0,
                              generator=None):
    """N thoughts of T tokens at every position, the first ``num_hindsight`` of each drawn with a view of the next
    ``tokens`` text tokens: thoughts ``[B, N, L, T]`` and their importance weights rho ``[B, N, L]`` (module doc),
    both at the sampling ``temperature``; no gradient. ``key_padding [B, L]`` bool."""
    layout, positions, _ = _text_pass(model, input_ids, key_padding)
    N = layout.num_thoughts
    reach = hindsight_reach(key_padding, tokens)[:, None]  # [B, 1, L]
    is_proposal = (torch.arange(N, device=input_ids.device) < num_hindsight)[None, :, None]  # [1, N, 1]
    thoughts, drawn = _sampling_steps(model, layout, positions, temperature, False, generator, False,
                                      reach=reach * is_proposal, return_logprobs=True)
    _, replayed = _sampling_steps(model, layout, positions, temperature, False, None, False,
                                  reach=reach * ~is_proposal, forced=thoughts, return_logprobs=True)
    drawn, replayed = drawn.sum(dim=-1), replayed.sum(dim=-1)  # [B, N, L]
    proposal_logprob = torch.where(is_proposal, drawn, replayed)
    policy_logprob = torch.where(is_proposal, replayed, drawn)
    return thoughts, balance_log_weights(policy_logprob, proposal_logprob, num_hindsight, N).exp()
