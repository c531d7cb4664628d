"""Thinking where it matters (docs/design.md §7): thoughts at a fraction q (``QuietStarConfig.thought_fraction``) of
the text positions only, the anchors, chosen where the base model is least sure of the next token.

Shapes: B batch, L text tokens, M anchor slots per row, N thought samples, A lookahead tokens, V vocabulary.

``anchors [B, M]`` holds, per slot, the text position (column) j whose branches the slot grows, ascending along the
row; ``UNUSED`` (-1) marks the trailing slots of a row that chose fewer anchors than the batch's M.
"""

from __future__ import annotations

import math

import torch

from .ops.precision import at_least_fp32

UNUSED = -1


def next_token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each next-token distribution: ``logits [B, L, V]`` (thought-token-masked) -> ``[B, L]``."""
    logprobs = torch.log_softmax(at_least_fp32(logits), dim=-1)
    floor = torch.finfo(logprobs.dtype).min  # masked tokens: 0 * -inf would be NaN
    return -(logprobs.exp() * logprobs.clamp(min=floor)).sum(dim=-1)


def anchor_counts(key_padding: torch.Tensor, eligible: torch.Tensor, fraction: float) -> torch.Tensor:
    """M_b = ceil(q * real tokens of row b), at most its eligible positions: ``[B]``; key_padding and eligible
    ``[B, L]``."""
    wanted = torch.ceil(key_padding.sum(dim=1).double() * fraction - 1e-9).long()  # 1e-9: 10 * 0.3 is 3, not 4
    return torch.minimum(wanted, eligible.sum(dim=1))


def choose_anchors(entropy: torch.Tensor, eligible: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The ``counts[b]`` eligible positions of highest ``entropy`` in each row, ascending: ``anchors [B, M]``,
    M = max(counts) (at least 1), trailing slots UNUSED.

    entropy ``[B, L]`` (no gradient flows through the choice), eligible ``[B, L]`` bool: the positions that may think
    (real tokens whose A targets all exist and are scored), counts ``[B]``.
    """
    L = entropy.shape[1]
    M = max(int(counts.max()), 1)
    score = entropy.detach().masked_fill(~eligible, float("-inf"))
    top = score.topk(M, dim=1).indices  # [B, M], highest first
    used = torch.arange(M, device=entropy.device) < counts[:, None]
    ordered = torch.where(used, top, L).sort(dim=1).values  # used slots ascending, unused (L) last
    return ordered.masked_fill(ordered == L, UNUSED)


def anchor_columns(anchors: torch.Tensor) -> torch.Tensor:
    """``anchors [B, M]`` as gather indices: unused slots read column 0 (their results are never used)."""
    return anchors.clamp(min=0)


def at_anchors(values: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Per-position ``values [B, L, ...]`` at each anchor slot: ``[B, M, ...]`` (unused slots hold column 0's)."""
    index = anchor_columns(anchors).view(*anchors.shape, *[1] * (values.dim() - 2))
    return values.gather(1, index.expand(*anchors.shape, *values.shape[2:]))


def anchor_mask(anchors: torch.Tensor, length: int) -> torch.Tensor:
    """``anchors [B, M]`` as the ``[B, L]`` boolean mask of the positions that think (``length`` = L)."""
    mask = torch.zeros(anchors.shape[0], length + 1, dtype=torch.bool, device=anchors.device)
    mask.scatter_(1, anchors.masked_fill(anchors == UNUSED, length), True)  # unused slots mark a spare column
    return mask[:, :length]


def into_positions(full: torch.Tensor, values: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """``full [B, N, L, A]`` with the positions of the used anchor slots replaced by ``values [B, N, M, A]``
    (differentiable in both)."""
    B, N, L, A = full.shape
    # Unused slots write into a spare column L, dropped after, so they never collide with a used slot.
    index = anchors.masked_fill(anchors == UNUSED, L)[:, None, :, None].expand(B, N, -1, A)
    spare = torch.cat([full, full.new_zeros(B, N, 1, A)], dim=2)
    return spare.scatter(2, index, values)[:, :, :L]


def equal_compute_thought_tokens(num_thought_tokens: int, num_lookahead_tokens: int, fraction: float) -> int:
    """T' such that thinking at a fraction q of the positions with thoughts of T' tokens costs what thinking at every
    position with T tokens costs: the branch tokens per row, N * M * (T' + A + 1) with M = q * L, match
    N * L * (T + A + 1). T' = round((T + A + 1) / q) - A - 1, at least 1."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}.")
    branch_length = num_thought_tokens + num_lookahead_tokens + 1
    return max(1, round(branch_length / fraction) - num_lookahead_tokens - 1)


def anchors_per_row(max_length: int, fraction: float) -> int:
    """M for an unpadded row of ``max_length`` tokens: ceil(q * L)."""
    return math.ceil(fraction * max_length - 1e-9)
