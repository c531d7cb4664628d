"""The gradient pass's exact attention on CUDA from PyTorch's FlexAttention (``torch.nn.attention.flex_attention``).

A fast path of :mod:`quietstar.attention.eager` (its reference; tests compare the two). The thought
layout's visibility rule (:mod:`.visibility`) becomes a FlexAttention ``mask_mod`` over
the flattened expanded row of n = L + N*L*S tokens; FlexAttention turns it into a block-sparse
``BlockMask`` (built once per model call and kept on the ThoughtLayout, so every layer shares it) and
runs fused forward and backward kernels that skip the blocks nobody sees, with grouped-query heads
read in place. A sliding-window layer adds the window to the mask_mod (position ids as visibility.py gives them, so
padding is skipped as eager skips it; one BlockMask per window size, shared by the layers that have it), and
soft-capping is a ``score_mod``: scaled scores s -> cap * tanh(s / cap). On CPU FlexAttention has a forward only (unfused); there the gradient pass keeps its
CPU paths and this module serves no-gradient calls and tests.

Shapes as transformers passes them: q ``[B, H, n, d]``, k/v ``[B, Hkv, n, d]``; output ``[B, n, H, d]``.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .visibility import text_positions

MIN_HEAD_DIM = 16  # FlexAttention's kernels take head dims from 16 up
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def thought_mask_mod(key_padding: torch.Tensor, num_text: int, branch_length: int, window: int | None = None):
    """The visibility rule as a FlexAttention mask_mod: ``mask_mod(b, h, q_idx, kv_idx)`` -> whether query
    ``q_idx`` of row ``b`` sees key ``kv_idx`` in the expanded row.

    key_padding: ``[B, L]`` bool, True for real text tokens. Index t >= L is branch token t - L =
    ((n * L) + j) * S + k - 1, so (t - L) // S names its branch and that branch's text position is
    ((t - L) // S) mod L. With a ``window`` W, a query at position id p sees keys at p' only if p - p' < W, with
    visibility.py's position ids: text_positions for text, pos_j + 1 + s for branch slot s (0-based) of position j.
    """
    L, S = num_text, branch_length
    positions = text_positions(key_padding)  # [B, L]

    def position(b, t):
        in_branch = t >= L
        offset = torch.clamp(t - L, min=0)
        text_index = torch.where(in_branch, (offset // S) % L, t)
        return positions[b, text_index] + torch.where(in_branch, 1 + offset % S, 0)

    def mask_mod(b, h, q_idx, kv_idx):
        q_in_branch = q_idx >= L
        q_branch = (q_idx - L) // S
        last_text_seen = torch.where(q_in_branch, q_branch % L, q_idx)
        kv_is_text = kv_idx < L
        # clamp: branch keys index a real column too; their value is discarded by kv_is_text
        text_seen = kv_is_text & (kv_idx <= last_text_seen) & key_padding[b, torch.clamp(kv_idx, max=L - 1)]
        own_branch = q_in_branch & ~kv_is_text & ((kv_idx - L) // S == q_branch) & (kv_idx <= q_idx)
        seen = text_seen | own_branch
        if window is None:
            return seen
        return seen & (position(b, q_idx) - position(b, kv_idx) < window)

    return mask_mod


def softcap_score_mod(softcap: float):
    """Attention-logit soft-capping as a FlexAttention score_mod: scaled score s -> softcap * tanh(s / softcap)."""

    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / softcap) * softcap

    return score_mod


def block_mask(layout, window: int | None = None) -> BlockMask:
    """The BlockMask of a call's thought layout (a :class:`quietstar.attention.ThoughtLayout`, passed in by the
    dispatch) for layers with this sliding ``window`` (None: full), built on first use and kept in
    ``layout.flex_block_mask`` (a dict by window) for the other layers."""
    if layout.flex_block_mask is None:
        layout.flex_block_mask = {}
    if window not in layout.flex_block_mask:
        key_padding = layout.key_padding.bool()
        batch, n = key_padding.shape[0], layout.expected_length()
        mask_mod = thought_mask_mod(key_padding, layout.num_text, layout.branch_length, window)
        # Compiled on CUDA: the uncompiled builder materialises a [B, n, n] mask, gigabytes at n = 60k.
        layout.flex_block_mask[window] = create_block_mask(mask_mod, batch, None, n, n, device=key_padding.device,
                                                           _compile=key_padding.device.type == "cuda")
    return layout.flex_block_mask[window]


def applies(query: torch.Tensor, dropout: float) -> bool:
    """Whether ``attention_backend: auto`` runs the gradient pass here: CUDA, no dropout, a head dim and dtype
    FlexAttention takes."""
    return (query.device.type == "cuda" and dropout == 0 and query.shape[-1] >= MIN_HEAD_DIM
            and query.dtype in DTYPES)


def check_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float) -> None:
    """Refuse what FlexAttention cannot run, saying what to use instead."""
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    if needs_grad and query.device.type != "cuda":
        raise ValueError(f"attention_backend='flex' needs CUDA for the gradient pass (FlexAttention has no backward "
                         f"on {query.device.type}); use 'auto' or 'eager'.")
    if dropout > 0:
        raise ValueError(f"Attention dropout ({dropout}) is not implemented by the FlexAttention path; set the "
                         "model's attention_dropout to 0 or use attention_backend='eager'.")
    if query.shape[-1] < MIN_HEAD_DIM:
        raise ValueError(f"FlexAttention takes head dims of at least {MIN_HEAD_DIM}, this model has "
                         f"{query.shape[-1]}; use attention_backend='auto' or 'eager'.")
    if value.dtype not in DTYPES:
        raise ValueError(f"FlexAttention takes {DTYPES}, got {value.dtype}; use attention_backend='eager'.")


@functools.cache
def _compiled_flex_attention():
    # Compiled once per process; without torch.compile FlexAttention materialises every score.
    return torch.compile(flex_attention)


def expanded_attention(query, key, value, layout, scaling: float, dropout: float = 0.0,
                       window: int | None = None, softcap: float | None = None):
    """Exact attention over a thought-expanded row (the gradient pass): q ``[B, H, n, d]``, k/v ``[B, Hkv, n, d]``
    -> ``[B, n, H, d]``, with the layer's sliding ``window`` and ``softcap`` (None: off). A query that sees nothing
    (padding) gets a zero output."""
    check_inputs(query, key, value, dropout)
    run = _compiled_flex_attention() if query.device.type == "cuda" else flex_attention
    # Under autocast RoPE can leave q, k in fp32 and v in bf16: FlexAttention takes one dtype.
    score_mod = None if softcap is None else softcap_score_mod(softcap)
    out = run(query.to(value.dtype), key.to(value.dtype), value, score_mod=score_mod,
              block_mask=block_mask(layout, window), scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous()
