"""The thought layout: which tokens a model call holds and who may see whom (docs/design.md §1, "Visibility").

A row of L text tokens grows, at every position j and for each of N thought samples, a branch of
S tokens b_{j,1..S} with position ids j + 1 .. j + S. The visibility rule, in one place:

* text token x_j sees text tokens x_0..x_j (causal), never a branch;
* branch token b_{j,k} (sample n) sees text tokens x_0..x_j and b_{j,1..k} of its own sample;
* padding keys are seen by nobody;
* in a sliding-window layer (``window`` W, per layer: transformers passes it to local layers only), a query
  at position id p sees a key at position id p' only if p - p' < W (transformers' own rule). Position ids
  skip padding (:func:`text_positions`) and branch slot s of position j sits at pos_j + 1 + s, so the
  window of a branch token reaches back from its own position, as it would on the explicit sequence.

Branch tokens are laid out sample-major then position-major: flat index ((n * L) + j) * S + k - 1,
so all S tokens of one branch sit together.
"""

from __future__ import annotations

import functools
from dataclasses import KW_ONLY, dataclass, field

import torch

from .settings import AttentionSettings

PHASES = ("prefix", "sample", "expanded")
SAMPLING_PHASES = ("prefix", "sample")


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


@dataclass
class ThoughtLayout:
    """Travels to the "quietstar" attention function as the ``thought_layout`` keyword of a model call.

    phase:
      * ``"prefix"``: the call holds the L text tokens; attention is causal and every layer's
        text K/V is stored in ``text_cache`` for the sampling steps (no gradient).
      * ``"sample"``: the call holds the N*L branch tokens b_{.,step+1} (one per sample and
        position, order (n, j)); their K/V go into slot ``step`` of the preallocated
        ``branch_cache`` buffer ``[B, Hkv, N, L, T, d]`` and they attend to the cached prefix
        plus their own branch so far (no gradient).
      * ``"expanded"``: the call holds the L text tokens followed by the N*L*S branch tokens of
        the thought-expanded row; the gradient pass.

    The sampling phases (prefix, sample) take ``num_thought_tokens`` (T, the branch buffer's
    slots); the expanded phase takes ``branch_length`` (S = T + A + 1 tokens per branch).
    """

    phase: str
    key_padding: torch.Tensor  # [B, L] bool, True for real tokens
    num_thoughts: int  # N
    _: KW_ONLY
    attention: AttentionSettings = AttentionSettings()  # the model's; quietstar.attention.backends resolves them
    num_thought_tokens: int | None = None  # T, sampling phases only
    branch_length: int | None = None  # S, expanded phase only
    step: int = 0  # the sampling step m: this call's tokens are b_{.,m+1}
    text_cache: dict = field(default_factory=dict)  # layer_idx -> (k, v), each [B, Hkv, L, d]
    branch_cache: dict = field(default_factory=dict)  # layer_idx -> (k, v), each [B, Hkv, N, L, T, d]
    # The expanded phase's FlexAttention BlockMasks by sliding window (quietstar.ops.flex), built by the first layer
    # with that window, shared by the others
    flex_block_mask: object = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.phase not in PHASES:
            raise ValueError(f"ThoughtLayout.phase must be one of {PHASES}, got {self.phase!r}.")
        if self.phase == "expanded":
            needed, unused = "branch_length", "num_thought_tokens"
        else:
            needed, unused = "num_thought_tokens", "branch_length"
        if getattr(self, unused) is not None:
            raise ValueError(f"ThoughtLayout.{unused} does not apply to the {self.phase!r} phase; pass {needed}.")
        value = getattr(self, needed)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"The {self.phase!r} phase needs ThoughtLayout.{needed}, a positive integer; "
                             f"got {value!r}.")

    @property
    def num_text(self) -> int:
        return self.key_padding.shape[-1]

    @functools.cached_property
    def padded(self) -> bool:
        """Whether any text key is padding: one device sync per model call, not one per layer."""
        return not bool(self.key_padding.all())

    def expected_length(self) -> int:
        """Number of tokens a model call in this phase must hold."""
        L, N = self.num_text, self.num_thoughts
        if self.phase == "prefix":
            return L
        if self.phase == "sample":
            return N * L
        return L + N * L * self.branch_length
