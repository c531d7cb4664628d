"""Exact PyTorch backend of the "quietstar" attention; the reference every other backend is tested against.

Shapes: B batch, H query heads, Hkv key/value heads (H = Hkv * G, grouped-query attention),
L text tokens, N thought samples, S branch tokens, d query/key head dim, dv value head dim (multi-head latent
attention, as DeepSeek-V2/V3 have it, gives values their own; elsewhere dv = d). Queries arrive as ``[B, H, n, d]``,
keys as ``[B, Hkv, n, d]`` and values as ``[B, Hkv, n, dv]`` (after RoPE), as transformers passes them; outputs are
``[B, n, H, dv]``. Scores are
computed in fp32 (fp64 for fp64 inputs, so gradient checks stay fp64) and masked with the most negative finite value of their
dtype, so a query with nothing to see (a padding query) yields finite garbage that the losses mask
out, never NaN.

Every function takes the layer's ``window`` (sliding-window attention, :mod:`quietstar.ops.visibility`'s rule; None: full),
``softcap`` (attention-logit soft-capping as Gemma 2 does it: scaled scores s -> cap * tanh(s / cap)
before the mask and the softmax; None: off) and ``sinks`` (attention sinks as GPT-OSS has them: ``[H]``, one
logit per query head that joins every softmax's denominator and carries no value; None: none).

Work per head: O(L^2 N S + L N S^2); no tensor of size (N L S) x (N L S) is ever built. With anchors (branches at
M of the L positions only, :mod:`quietstar.anchors`) read P = M for the branch positions below: O(L^2 + L N M S +
M N S^2); without them P = L.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..anchors import at_anchors
from ..ops.precision import at_least_fp32, wide_dtype
from ..ops.visibility import (branch_visibility, in_window, prefix_visibility, reaching_prefix_visibility,
                              text_positions)
from .layout import ThoughtLayout


def _grouped(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, H, n, d] -> [B, Hkv, G, n, d]; head h reads key/value head h // G (as transformers' repeat_kv)."""
    b, h, n, d = x.shape
    return x.view(b, num_kv_heads, h // num_kv_heads, n, d)


def _ungrouped(x: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, G, n, d] -> [B, n, H, d], the layout attention functions return."""
    b, hkv, g, n, d = x.shape
    return x.reshape(b, hkv * g, n, d).transpose(1, 2).contiguous()


def capped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Attention-logit soft-capping of scaled scores: cap * tanh(s / cap) (identity for ``softcap=None``)."""
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def _masked_softmax(scores: torch.Tensor, visible: torch.Tensor, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over the last dim of grouped scores ``[B, Hkv, G, ...]`` where ``visible``; with ``sinks`` ``[H]``,
    head h's sink logit joins the denominator (its own probability is dropped)."""
    # In place: scores are fresh outputs of a matmul or of the cap's final product, which autograd does not keep.
    scores = scores.masked_fill_(~visible, torch.finfo(scores.dtype).min)
    if sinks is None:
        return torch.softmax(scores, dim=-1, dtype=wide_dtype(scores.dtype))
    hkv, g = scores.shape[1:3]
    column = sinks.to(scores.dtype).view(1, hkv, g, *[1] * (scores.dim() - 3)).expand(*scores.shape[:-1], 1)
    return torch.softmax(torch.cat([scores, column], dim=-1), dim=-1, dtype=wide_dtype(scores.dtype))[..., :-1]


def _softmax(scores: torch.Tensor, visible: torch.Tensor, dropout: float, sinks=None) -> torch.Tensor:
    probs = _masked_softmax(scores, visible, sinks)
    return F.dropout(probs, p=dropout) if dropout > 0 else probs


def causal_attention(q, k, v, key_padding, scaling, dropout=0.0, window=None, softcap=None, sinks=None):
    """Ordinary causal attention; queries are the last q.shape[2] of the k.shape[2] key positions.

    key_padding: ``[B, n_kv]`` bool (True = real token) or None; ``dropout``: the attention-dropout
    rate to apply (0 outside training). Positions skip padding keys, so a window reaches as far back as on
    the unpadded row. Returns ``[B, n_q, H, dv]``.
    Without padding, soft-capping or sinks this is PyTorch's fused attention (much less overhead per call when
    decoding).
    """
    hkv, n_q, n_kv = k.shape[1], q.shape[2], k.shape[2]
    padded = key_padding is not None and not bool(key_padding.all())
    key_padding = key_padding if padded else None
    query_index = torch.arange(n_kv - n_q, n_kv, device=q.device)[:, None]
    visible = query_index >= torch.arange(n_kv, device=q.device)  # [n_q, n_kv]
    if window is not None:
        if padded:
            positions = text_positions(key_padding.bool())
            gaps = positions[:, -n_q:, None] - positions[:, None, :]  # [B, n_q, n_kv]
        else:
            gaps = query_index - torch.arange(n_kv, device=q.device)
        visible = visible & in_window(gaps, window)
    if key_padding is None and softcap is None and sinks is None:
        q, k = q.to(v.dtype), k.to(v.dtype)  # under autocast RoPE can leave q, k in fp32 and v in bf16
        plain_causal = window is None and n_q in (1, n_kv)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if plain_causal else visible, dropout_p=dropout,
                                             is_causal=plain_causal and n_q > 1, scale=scaling,
                                             enable_gqa=hkv != q.shape[1])
        return out.transpose(1, 2).contiguous()
    qg = at_least_fp32(_grouped(q, hkv)) * scaling  # scaling q is cheaper than scaling the scores
    scores = capped(torch.matmul(qg, at_least_fp32(k).unsqueeze(2).transpose(-1, -2)), softcap)
    visible = visible.view(-1, 1, 1, n_q, n_kv)
    if key_padding is not None:
        visible = visible & key_padding[:, None, None, None, :].bool()
    probs = _softmax(scores, visible, dropout, sinks).to(v.dtype)
    return _ungrouped(torch.matmul(probs, v.unsqueeze(2)))


def expanded_attention(q, k, v, layout: ThoughtLayout, scaling, dropout=0.0, window=None, softcap=None, sinks=None):
    """Attention over a thought-expanded row: L text tokens, then N*P*S branch tokens (P = L, or the M anchors).

    Text queries attend causally to text; branch queries of position j attend jointly (one
    softmax) to text keys 0..j and to their own branch's keys 0..k (all within the window).
    """
    B, hkv, _, d = k.shape
    dv = v.shape[-1]
    L, N, S = layout.num_text, layout.num_thoughts, layout.branch_length
    P = layout.num_branch_positions
    qg = at_least_fp32(_grouped(q, hkv)) * scaling
    g = qg.shape[2]
    k_text, v_text = k[:, :, :L].unsqueeze(2), v[:, :, :L].unsqueeze(2)  # [B, Hkv, 1, L, d]
    k_branch = k[:, :, L:].reshape(B, hkv, 1, N, P, S, d)
    v_branch = v[:, :, L:].reshape(B, hkv, 1, N, P, S, dv)
    key_padding = layout.key_padding.bool()
    prefix_visible = prefix_visibility(key_padding, window)  # [B, L(j), L(i)]

    # Text queries.
    text_scores = capped(torch.matmul(qg[:, :, :, :L], at_least_fp32(k_text).transpose(-1, -2)), softcap)
    text_probs = _softmax(text_scores, prefix_visible[:, None, None], dropout, sinks).to(v.dtype)
    text_out = torch.matmul(text_probs, v_text)  # [B, Hkv, G, L, d]

    # Branch queries: scores against the prefix and against their own branch, one softmax over both.
    q_branch = qg[:, :, :, L:].reshape(B, hkv, g, N, P, S, d)
    to_prefix = torch.matmul(q_branch.reshape(B, hkv, g, N * P * S, d), at_least_fp32(k_text).transpose(-1, -2))
    to_prefix = to_prefix.view(B, hkv, g, N, P, S, L)
    to_branch = torch.matmul(q_branch, at_least_fp32(k_branch).transpose(-1, -2))  # [..., N, P, S, S]
    slot_offsets = torch.arange(1, S + 1, device=q.device)
    branch_prefix_visible = prefix_visibility(key_padding, window, slot_offsets).transpose(1, 2)  # [B, L, S, L]
    if layout.anchors is not None:
        branch_prefix_visible = at_anchors(branch_prefix_visible, layout.anchors)  # [B, M, S, L]
    visible = torch.cat(
        [
            branch_prefix_visible[:, None, None, None].expand(B, 1, 1, 1, P, S, L),
            branch_visibility(S, q.device, window).expand(B, 1, 1, 1, P, S, S),
        ],
        dim=-1,
    )
    probs = _softmax(capped(torch.cat([to_prefix, to_branch], dim=-1), softcap), visible, dropout, sinks).to(v.dtype)
    prefix_probs, branch_probs = probs.split([L, S], dim=-1)
    branch_out = torch.matmul(prefix_probs.reshape(B, hkv, g, N * P * S, L), v_text)
    branch_out = branch_out.view(B, hkv, g, N, P, S, dv) + torch.matmul(branch_probs, v_branch)
    out = torch.cat([text_out, branch_out.reshape(B, hkv, g, N * P * S, dv)], dim=3)
    return _ungrouped(out)


def sample_step_attention(q, k_text, v_text, k_branch, v_branch, key_padding, scaling, window=None, softcap=None,
                          sinks=None, anchors=None, reach=None):
    """One sampling step (no gradient): the N*P queries b_{j,m+1} ``[B, H, N*P, d]`` (P = L, or the M positions of
    ``anchors [B, M]``) attend to the text prefix ``k_text [B, Hkv, L, d]``, ``v_text [B, Hkv, L, dv]`` (keys 0..j
    that are not padding, ``key_padding [B, L]``) and to their own branch slots 0..m, ``k_branch [B, Hkv, N, P, m+1,
    d]``, ``v_branch [B, Hkv, N, P, m+1, dv]``, within the window of their position pos_j + 1 + m. With ``reach [B, N,
    P]`` (hindsight proposals; not with anchors) branch (n, j) also sees text keys j+1..j+reach, and sits at position
    pos_j + reach + 1 + m. Returns ``[B, N*P, H, dv]``.
    """
    B, hkv, N, P, slots, d = k_branch.shape
    L, dv = k_text.shape[2], v_branch.shape[-1]
    qg = at_least_fp32(_grouped(q, hkv)) * scaling
    g = qg.shape[2]
    to_prefix = torch.matmul(qg, at_least_fp32(k_text).unsqueeze(2).transpose(-1, -2)).view(B, hkv, g, N, P, L)
    q_step = qg.view(B, hkv, g, N, P, 1, d)
    to_branch = torch.matmul(q_step, at_least_fp32(k_branch).unsqueeze(2).transpose(-1, -2)).squeeze(-2)
    if reach is not None:
        if anchors is not None:
            raise ValueError("Hindsight proposals (reach) are sampled at every position, not at anchors.")
        prefix_visible = reaching_prefix_visibility(key_padding.bool(), reach, window, slots)[:, None, None]
    else:
        prefix_visible = prefix_visibility(key_padding.bool(), window, slots)  # [B, L, L]
        if anchors is not None:
            prefix_visible = at_anchors(prefix_visible, anchors)  # [B, M, L]
        prefix_visible = prefix_visible[:, None, None, None]  # [B, 1, 1, 1, P, L]
    branch_visible = branch_visibility(slots, q.device, window)[-1].expand(B, 1, 1, N, P, slots)
    visible = torch.cat([prefix_visible.expand(B, 1, 1, N, P, L), branch_visible], -1)
    probs = _masked_softmax(capped(torch.cat([to_prefix, to_branch], dim=-1), softcap), visible, sinks)
    prefix_probs, branch_probs = probs.to(v_text.dtype).split([L, slots], dim=-1)
    out = torch.matmul(prefix_probs.reshape(B, hkv, g, N * P, L), v_text.unsqueeze(2))
    out = out.view(B, hkv, g, N, P, dv) + torch.matmul(branch_probs.unsqueeze(-2), v_branch.unsqueeze(2)).squeeze(-2)
    return _ungrouped(out.reshape(B, hkv, g, N * P, dv))
