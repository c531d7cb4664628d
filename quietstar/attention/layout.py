"""The thought layout: which tokens a model call holds, in which phase (docs/design.md §2, "The attention seam").

Who may see whom is the visibility rule of :mod:`quietstar.ops.visibility` (plain functions of tensors that every
backend shares). A row of L text tokens grows, at every position j and for each of N thought samples, a branch of
S tokens. Branch tokens are laid out sample-major then position-major: flat index ((n * L) + j) * S + k - 1,
so all S tokens of one branch sit together.
"""

from __future__ import annotations

import functools
from dataclasses import KW_ONLY, dataclass, field

import torch

from .settings import AttentionSettings

PHASES = ("prefix", "sample", "expanded")
SAMPLING_PHASES = ("prefix", "sample")


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

    With ``anchors [B, M]`` (thinking at a fraction of the positions, quietstar.anchors) branches grow at the M anchor
    positions of each row only: read L as M in the branch counts above (N*M tokens per sampling step, N*M*S branch
    tokens), and branch m of a row sees the text up to and including its anchor's position. Eager attention only.

    With ``reach [B, N, P]`` (hindsight proposals, quietstar.hindsight; sample phase only) branch (n, j) also sees the
    next reach[n, j] text tokens, and its tokens sit after them (position ids pos_j + reach + 1 + m). Eager attention.

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
    anchors: torch.Tensor | None = None  # [B, M] text position of each branch slot (-1: unused); None: every position
    reach: torch.Tensor | None = None  # [B, N, P] text tokens after its position each branch sees; None: none
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
        if self.reach is not None and self.phase != "sample":
            raise ValueError(f"ThoughtLayout.reach (hindsight proposals) applies to the 'sample' phase only, not to "
                             f"{self.phase!r}.")
        value = getattr(self, needed)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"The {self.phase!r} phase needs ThoughtLayout.{needed}, a positive integer; "
                             f"got {value!r}.")

    @property
    def num_text(self) -> int:
        return self.key_padding.shape[-1]

    @property
    def num_branch_positions(self) -> int:
        """The positions that grow branches in each row: M with anchors, else L."""
        return self.num_text if self.anchors is None else self.anchors.shape[-1]

    @functools.cached_property
    def padded(self) -> bool:
        """Whether any text key is padding: one device sync per model call, not one per layer."""
        return not bool(self.key_padding.all())

    def expected_length(self) -> int:
        """Number of tokens a model call in this phase must hold."""
        L, N, P = self.num_text, self.num_thoughts, self.num_branch_positions
        if self.phase == "prefix":
            return L
        if self.phase == "sample":
            return N * P
        return L + N * P * self.branch_length
