"""The thought layout's visibility rule and position ids, as plain functions of tensors (docs/design.md §1,
"Visibility"). Every attention backend applies this rule; :mod:`quietstar.attention.layout` describes the model call
that carries it.

A row of L text tokens grows, at every position j and for each of N thought samples, a branch of
S tokens b_{j,1..S} with position ids j + 1 .. j + S. The rule, in one place:

* text token x_j sees text tokens x_0..x_j (causal), never a branch;
* branch token b_{j,k} (sample n) sees text tokens x_0..x_j and b_{j,1..k} of its own sample;
* padding keys are seen by nobody;
* in a sliding-window layer (``window`` W, per layer: transformers passes it to local layers only), a query
  at position id p sees a key at position id p' only if p - p' < W (transformers' own rule). Position ids
  skip padding (:func:`text_positions`) and branch slot s of position j sits at pos_j + 1 + s, so the
  window of a branch token reaches back from its own position, as it would on the explicit sequence.
"""

from __future__ import annotations

import torch


def text_positions(key_padding: torch.Tensor) -> torch.Tensor:
    """Position ids ``[B, L]`` that skip padding: a left-padded row gets the positions of its unpadded self."""
    return (key_padding.long().cumsum(dim=-1) - 1).clamp(min=0)


def in_window(gap: torch.Tensor, window: int | None) -> torch.Tensor | bool:
    """transformers' sliding-window rule on position gaps (query position - key position): gap < window."""
    return True if window is None else gap < window


def prefix_visibility(key_padding: torch.Tensor, window: int | None = None, offsets=0) -> torch.Tensor:
    """Which text keys each position may see: ``[B, L, L]`` bool, entry (j, i) = i <= j, x_i is not padding and
    (with a window) pos_j + offset - pos_i < window.

    This serves both the causal text-to-text attention (offset 0) and branch-to-prefix attention: b_{j,s} sees
    the text that x_j sees, within the window of its own position pos_j + 1 + s (offset 1 + s). ``offsets``: an
    int, or a tensor ``[S]`` of offsets, one per branch slot, which gives ``[B, S, L, L]``.
    """
    length = key_padding.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=key_padding.device).tril()
    visible = causal[None] & key_padding[:, None, :]
    per_slot = isinstance(offsets, torch.Tensor)
    if window is None:
        return visible[:, None].expand(-1, len(offsets), -1, -1) if per_slot else visible
    positions = text_positions(key_padding)
    gap = positions[:, :, None] - positions[:, None, :]  # [B, L(j), L(i)]
    if per_slot:
        gap, visible = gap[:, None] + offsets.view(1, -1, 1, 1), visible[:, None]
    else:
        gap = gap + offsets
    return visible & in_window(gap, window)


def branch_visibility(length: int, device: torch.device, window: int | None = None) -> torch.Tensor:
    """Causal visibility inside one branch: ``[S, S]`` bool, entry (k, k') = k' <= k and k - k' < window."""
    slots = torch.arange(length, device=device)
    gap = slots[:, None] - slots[None, :]
    return (gap >= 0) & in_window(gap, window)


def reaching_prefix_visibility(key_padding: torch.Tensor, reach: torch.Tensor, window: int | None = None,
                               offset: int = 1) -> torch.Tensor:
    """Which text keys a hindsight branch token sees: ``[B, N, P, L]`` bool for branches that also read ``reach
    [B, N, P]`` text tokens after their position j (quietstar.hindsight; P = L here). Entry (n, j, i) = i <= j +
    reach[n, j] and x_i is not padding; the branch token sits at position id pos_j + reach + ``offset`` (slot
    ``offset`` - 1 of a branch that starts after x_{j+reach}), so a window reaches back from there. With reach 0 this
    is :func:`prefix_visibility` at ``offset``.
    """
    length = key_padding.shape[-1]
    columns = torch.arange(length, device=key_padding.device)
    last_seen = columns.view(1, 1, -1, 1) + reach[..., None]  # [B, N, P, 1]
    visible = (columns.view(1, 1, 1, -1) <= last_seen) & key_padding[:, None, None, :]
    if window is None:
        return visible
    positions = text_positions(key_padding)
    gap = positions[:, None, :, None] + reach[..., None] + offset - positions[:, None, None, :]
    return visible & in_window(gap, window)
