"""The mixing head: how much to trust the thought-conditioned prediction (docs/design.md §1, "Mixing head")."""

from __future__ import annotations

import math

import torch
from torch import nn

from .ops.precision import at_least_fp32


class MixingHead(nn.Module):
    """w = MLP([h_base ; h_thought]): Linear(2D, D) -> ReLU -> Linear(D, D) -> ReLU -> Linear(D, 1, bias=False).

    The last layer starts at zero, so w = 0 and training starts exactly at the base model.
    Input ``[..., D]`` twice; output ``[...]``.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2 * hidden_size, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, 1, bias=False),
        )
        nn.init.zeros_(self.net[-1].weight)

    def forward(self, base_hidden: torch.Tensor, thought_hidden: torch.Tensor) -> torch.Tensor:
        head_dtype = self.net[0].weight.dtype
        features = torch.cat([base_hidden, thought_hidden], dim=-1).to(head_dtype)
        return self.net(features).squeeze(-1)

    @torch.no_grad()
    def live_unit_fraction(self, base_hidden: torch.Tensor, thought_hidden: torch.Tensor, max_rows: int = 1024) -> float:
        """Fraction of the 2D hidden ReLU units that are positive for at least one of (up to ``max_rows``) inputs.
        A unit that is never positive passes no gradient: when all are dead, w is stuck at its bias path."""
        features = torch.cat([base_hidden, thought_hidden], dim=-1).reshape(-1, 2 * base_hidden.shape[-1])
        features = features[:max_rows].to(self.net[0].weight.dtype)
        first = self.net[1](self.net[0](features))
        second = self.net[3](self.net[2](first))
        alive = torch.cat([(first > 0).any(dim=0), (second > 0).any(dim=0)])
        return alive.float().mean().item()


# 'bounded': w = sigmoid(u + logit(BOUNDED_START_WEIGHT)), so the zero-initialised head starts at w = 0.01. Not at
# exactly 0: a differentiable map into [0, 1] that is 0 at the start has its minimum there, hence a zero gradient, and
# the head could never move (docs/design.md §1). Changing it changes every saved 'bounded' model.
BOUNDED_START_WEIGHT = 0.01
BOUNDED_OFFSET = math.log(BOUNDED_START_WEIGHT / (1 - BOUNDED_START_WEIGHT))


def thought_weight(raw: torch.Tensor, mode: str) -> torch.Tensor:
    """Weight on the thought path from the head output ``raw [...]``: ``raw`` itself ('logits', unbounded), its
    sigmoid ('logprobs', starts at 0.5) or sigmoid(raw + BOUNDED_OFFSET) ('bounded', in (0, 1), starts at 0.01)."""
    if mode == "logits":
        return raw
    return torch.sigmoid(raw + BOUNDED_OFFSET if mode == "bounded" else raw)


def mix(base_logits: torch.Tensor, thought_logits: torch.Tensor, weight: torch.Tensor, mode: str) -> torch.Tensor:
    """Mixed logits ``[..., V]`` from base and thought logits ``[..., V]`` and the thought weight ``[...]``.

    'logits', 'bounded': z = (1 - w) z_base + w z_thought            (official code; 'bounded' keeps w in (0, 1))
    'logprobs':          z = (1 - w) log p_base + w log p_thought    (the paper's text; w = sigmoid of the head)
    """
    w = weight.unsqueeze(-1).to(base_logits.dtype)
    if mode == "logprobs":
        base_logits = torch.log_softmax(at_least_fp32(base_logits), dim=-1)
        thought_logits = torch.log_softmax(at_least_fp32(thought_logits), dim=-1)
        w = w.to(base_logits.dtype)
    return (1 - w) * base_logits + w * thought_logits
