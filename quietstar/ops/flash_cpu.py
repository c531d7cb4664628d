"""The thought layout's attention from exact CPU flash-attention kernels, merged by log-sum-exp.

A fast path of :mod:`quietstar.attention.eager` (its reference; tests compare the two), for the
gradient pass (:func:`expanded_attention`) and the sampling steps (:func:`sample_step_attention`).

The visibility rule splits into two ordinary causal attentions and a small batched one:
* text queries over text keys: causal, length L;
* for each sample n and branch slot s, the queries b_{0..L-1, s} over the text keys are causal in j
  (b_{j,s} sees x_0..x_j): B*N*S causal sequences of length L;
* inside each branch, slots attend causally to earlier slots: B*N*L blocks of S x S, done as batched
  products (too small for a flash kernel to pay off).
Each part's softmax is exact; the two branch parts are merged with their log-sum-exps (as ring
attention does), and the backward of each part uses the merged output and log-sum-exp, which is exact
for a joint softmax.

Uses PyTorch's CPU flash kernels (``aten._scaled_dot_product_flash_attention_for_cpu`` and its
backward), so it serves CPU tensors without padding or dropout; :func:`applies` says when. The kernels
take grouped-query heads natively (query head i reads key/value head i // (H / Hkv)), which the code
uses twice: grouped K/V are never repeated, and the B*N*S branch-over-text sequences become extra query
heads of the text's own K/V, so the text K/V are never copied N*S times and their gradients come back
already summed over branches.

A sliding-window layer (``window`` W, :mod:`.visibility`'s rule) makes each causal part a band:
text query j sees keys j - W < i <= j, and branch slot s, at position j + 1 + s, sees text keys
j + 1 + s - W < i <= j (so the branch-over-text part runs once per slot, each with its own band). A band
runs in chunks of queries, each over only the keys its band reaches (key tiles wholly outside are never
read), with the band's edge as an additive mask; inside a branch, slots more than W - 1 apart are masked.
Soft-capping is not available in these kernels; the dispatch sends soft-capped layers to the eager path. Attention
sinks (one logit per head in every softmax's denominator, GPT-OSS) rescale each part's output by its log-sum-exp.

The kernels take one head dim for q, k and v. Values with a head dim of their own (dv != d: multi-head latent
attention) are zero-padded to d, or queries and keys to dv (:func:`_common_head_dim`); both are exact.
Shapes: q ``[B, H, L + N L S, d]``, k ``[B, Hkv, L + N L S, d]``, v ``[B, Hkv, L + N L S, dv]``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .visibility import branch_visibility

BAND_CHUNK = 128  # queries per chunk of a band

_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_flash_backward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


@functools.cache
def _native_grouped_heads() -> bool:
    """Whether this torch's CPU flash kernel takes fewer key/value heads than query heads."""
    try:
        _flash(torch.zeros(1, 2, 1, 8), torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, 1, 8), is_causal=True, scale=1.0)
    except RuntimeError:
        return False
    return True


def applies(query: torch.Tensor, key_padding: torch.Tensor, dropout: float) -> bool:
    """The fast path is exact here: CPU, fp32/bf16, no padding key (``key_padding [B, L]`` all True), no dropout."""
    return (_flash is not None and query.device.type == "cpu" and dropout == 0.0
            and query.dtype in (torch.float32, torch.bfloat16) and bool(key_padding.all())
            and _native_grouped_heads())


def _common_head_dim(q, k, v):
    """q, k, v zero-padded on the last dim to max(d, dv); the caller slices the output back to dv.

    Zero value columns only add zero output columns; zero query and key columns add nothing to a score. So the
    sliced output is exact, and so are the gradients (autograd drops those of the padding).
    """
    d, dv = q.shape[-1], v.shape[-1]
    if dv < d:
        return q, k, F.pad(v, (0, d - dv))
    if dv > d:
        return F.pad(q, (0, dv - d)), F.pad(k, (0, dv - d)), v
    return q, k, v


def _split(x: torch.Tensor, L: int, N: int, S: int):
    """[B, H, L + NLS, d] -> text [B, H, L, d] and the branches [B, H, N, L, S, d] (a view)."""
    B, H, _, d = x.shape
    return x[:, :, :L].contiguous(), x[:, :, L:].view(B, H, N, L, S, d)


def _over_text(branch: torch.Tensor) -> torch.Tensor:
    """Branches [B, H, N, L, S, d] -> [B, H*N*S, L, d] (head order h, n, s: the extra heads of head h share its
    text K/V)."""
    B, H, N, L, S, d = branch.shape
    return branch.transpose(3, 4).reshape(B, H * N * S, L, d)


def _from_over_text(x: torch.Tensor, H: int, N: int, S: int) -> torch.Tensor:
    """[B, H*N*S, L, ...] -> [B, H, N, L, S, ...]."""
    B, _, L, *rest = x.shape
    return x.reshape(B, H, N, S, L, *rest).transpose(3, 4)


def _grouped(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """[B, H, N, L, S, ...] -> [B, Hkv, G, N, L, S, ...], G = H / Hkv (a view)."""
    return x.unflatten(1, (hkv, x.shape[1] // hkv))


def _in_branch_scores(q_branch, k_branch, scale: float, window: int | None) -> torch.Tensor:
    """Scores of each branch slot over its own branch's slots, causal: q ``[B, H, N, L, S, d]``,
    k ``[B, Hkv, N, L, S, d]`` -> ``[B, Hkv, G, N, L, S, S]`` in fp32, -inf above the diagonal (and outside the
    window).

    Branches are only S long, so this is a batched product of S x S blocks; a flash kernel over B*N*L
    sequences of length S spends most of its time on block padding and per-sequence overhead.
    """
    S = q_branch.shape[-2]
    scores = torch.einsum("bkgnlsd,bknltd->bkgnlst", _grouped(q_branch, k_branch.shape[1]).float(),
                          k_branch.float()) * scale
    return scores.masked_fill_(~branch_visibility(S, scores.device, window), float("-inf"))


def _band_chunks(length: int, reach: int, dtype: torch.dtype, device: torch.device):
    """Chunks of a causal band over ``length`` queries and keys, query j seeing keys j - reach < i <= j: yields
    (query slice, key slice, additive mask ``[queries, keys]`` of the chunk); keys outside every query's band in
    the chunk are left out."""
    for start in range(0, length, BAND_CHUNK):
        stop = min(start + BAND_CHUNK, length)
        first_key = max(0, start - reach + 1)
        gap = torch.arange(start, stop, device=device)[:, None] - torch.arange(first_key, stop, device=device)
        mask = torch.zeros(gap.shape, dtype=dtype, device=device).masked_fill_((gap < 0) | (gap >= reach),
                                                                              float("-inf"))
        yield slice(start, stop), slice(first_key, stop), mask


def _band_forward(q, k, v, reach: int | None, scale: float):
    """Causal attention in a band: q ``[B, Hq, L, d]``, k/v ``[B, Hkv, L, d]``, query j sees keys
    j - reach < i <= j (all of 0..j for ``reach=None``). Returns out ``[B, Hq, L, d]``, lse ``[B, Hq, L]``; with
    ``reach <= 0`` no query sees anything: out 0, lse -inf (which the log-sum-exp merge turns into weight 0)."""
    L = q.shape[2]
    if reach is None or reach >= L:
        return _flash(q, k, v, is_causal=True, scale=scale)
    if reach <= 0:
        return torch.zeros_like(q), q.new_full(q.shape[:3], float("-inf"), dtype=torch.float32)
    parts = [_flash(q[:, :, rows], k[:, :, keys], v[:, :, keys], attn_mask=mask, scale=scale)
             for rows, keys, mask in _band_chunks(L, reach, q.dtype, q.device)]
    return torch.cat([out for out, _ in parts], dim=2), torch.cat([lse for _, lse in parts], dim=2)


def _band_backward(grad, q, k, v, out, lse, reach: int | None, scale: float):
    """Gradients (dq, dk, dv) of :func:`_band_forward`, given the output and log-sum-exp of the joint softmax."""
    L = q.shape[2]
    if reach is None or reach >= L:
        return _flash_backward(grad, q, k, v, out, lse, 0.0, True, scale=scale)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if reach <= 0:
        return dq, dk, dv
    for rows, keys, mask in _band_chunks(L, reach, q.dtype, q.device):
        dq_part, dk_part, dv_part = _flash_backward(grad[:, :, rows], q[:, :, rows], k[:, :, keys], v[:, :, keys],
                                                    out[:, :, rows], lse[:, :, rows].contiguous(), 0.0, False,
                                                    attn_mask=mask, scale=scale)
        dq[:, :, rows] = dq_part
        dk[:, :, keys] += dk_part
        dv[:, :, keys] += dv_part
    return dq, dk, dv


def _slot_reach(window: int | None, slot: int) -> int | None:
    """How far back over the text branch slot ``slot`` (at position j + 1 + slot) sees: W - 1 - slot."""
    return None if window is None else window - 1 - slot


def _over_text_forward(q_branch, k_text, v_text, scale: float, window: int | None):
    """Branch queries ``[B, H, N, L, S, d]`` over the text keys -> out ``[B, H, N, L, S, d]``, lse ``[B, H, N, L, S]``.

    Without a window all B*N*S sequences are causal alike: one flash call, the samples and slots as extra
    query heads. With one, each slot has its own band: one banded call per slot, the samples as extra heads.
    """
    B, H, N, L, S, d = q_branch.shape
    if window is None:
        out, lse = _flash(_over_text(q_branch), k_text, v_text, is_causal=True, scale=scale)
        return _from_over_text(out, H, N, S), _from_over_text(lse, H, N, S)
    parts = [_band_forward(q_branch[:, :, :, :, s].reshape(B, H * N, L, d), k_text, v_text, _slot_reach(window, s),
                           scale) for s in range(S)]
    return (torch.stack([out.view(B, H, N, L, d) for out, _ in parts], dim=4),
            torch.stack([lse.view(B, H, N, L) for _, lse in parts], dim=4))


def _over_text_backward(g_branch, q_branch, k_text, v_text, o_branch, lse, scale: float, window: int | None):
    """Gradients of :func:`_over_text_forward` given the merged output and lse: dq ``[B, H, N, L, S, d]``, dk and
    dv of the text ``[B, Hkv, L, d]`` (summed over branches)."""
    B, H, N, L, S, d = q_branch.shape
    if window is None:
        lse_over = lse.transpose(3, 4).reshape(B, H * N * S, L).contiguous()
        dq, dk, dv = _flash_backward(_over_text(g_branch), _over_text(q_branch), k_text, v_text,
                                     _over_text(o_branch), lse_over, 0.0, True, scale=scale)
        return _from_over_text(dq, H, N, S), dk, dv
    dq, dk, dv = [], torch.zeros_like(k_text), torch.zeros_like(v_text)
    for s in range(S):
        slot = lambda x: x[:, :, :, :, s].reshape(B, H * N, L, *x.shape[5:])  # noqa: E731
        dq_slot, dk_slot, dv_slot = _band_backward(slot(g_branch), slot(q_branch), k_text, v_text, slot(o_branch),
                                                   slot(lse).contiguous(), _slot_reach(window, s), scale)
        dq.append(dq_slot.view(B, H, N, L, d))
        dk += dk_slot
        dv += dv_slot
    return torch.stack(dq, dim=4), dk, dv


def _with_sinks(out, lse, sinks):
    """Add per-head sink logits ``sinks [H]`` to a softmax's denominator: out ``[B, H, ..., d]`` and lse ``[B, H, ...]``
    of the softmax without them -> those of the softmax with them (the sink carries no value)."""
    sink = sinks.float().view(1, -1, *[1] * (lse.dim() - 2))
    merged = torch.logaddexp(lse, sink)
    return (out.float() * torch.exp(lse - merged).unsqueeze(-1)).to(out.dtype), merged


def _sink_gradient(grad, out, lse, sinks):
    """The gradient of per-head sink logits ``sinks [H]``: the sink is a key with value 0, so its score's gradient is
    P_sink * (0 - rowsum(dO * O)), summed over every query of the head. grad/out ``[B, H, n, d]``, lse ``[B, H, n]``."""
    delta = (grad.float() * out.float()).sum(-1)
    return -(torch.exp(sinks.float().view(1, -1, 1) - lse) * delta).sum(dim=(0, 2)).to(sinks.dtype)


class ExpandedFlashAttention(torch.autograd.Function):
    """Exact attention over a thought-expanded row; one gradient per input (q, k, v, sinks) and None for the rest.

    Branch queries attend to the text (flash, causal in j) and to their own branch (S x S blocks); the
    two parts share one softmax, merged by log-sum-exp (with per-head ``sinks [H]``, their logits join it too). The
    backward of each part uses the merged output and log-sum-exp, which is exact for a joint softmax.
    """

    @staticmethod
    def forward(ctx, q, k, v, L: int, N: int, S: int, scale: float, window: int | None, sinks=None):
        B, H, _, d = q.shape
        (q_text, q_branch), (k_text, k_branch), (v_text, v_branch) = (_split(x, L, N, S) for x in (q, k, v))
        out_text, lse_text = _band_forward(q_text, k_text, v_text, window, scale)
        out_over, lse_a = _over_text_forward(q_branch, k_text, v_text, scale, window)
        scores = _in_branch_scores(q_branch, k_branch, scale, window)
        lse_in = torch.logsumexp(scores, dim=-1)  # [B, Hkv, G, N, L, S]
        out_in = torch.einsum("bkgnlst,bknltd->bkgnlsd", torch.exp(scores - lse_in.unsqueeze(-1)), v_branch.float())
        lse_b = lse_in.flatten(1, 2)
        lse = torch.logaddexp(lse_a, lse_b)  # [B, H, N, L, S]
        out_branch = (torch.exp(lse_a - lse).unsqueeze(-1) * out_over
                      + torch.exp(lse_b - lse).unsqueeze(-1) * out_in.flatten(1, 2)).to(q.dtype)
        if sinks is not None:
            out_text, lse_text = _with_sinks(out_text, lse_text, sinks)
            out_branch, lse = _with_sinks(out_branch, lse, sinks)
        out = torch.cat([out_text, out_branch.reshape(B, H, N * L * S, d)], dim=2)
        ctx.save_for_backward(q, k, v, out, lse_text, lse, sinks)
        ctx.sizes = (L, N, S, scale, window)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse_text, lse, sinks = ctx.saved_tensors
        L, N, S, scale, window = ctx.sizes
        B, H, _, d = q.shape
        hkv = k.shape[1]
        (q_text, q_branch), (k_text, k_branch), (v_text, v_branch) = (_split(x, L, N, S) for x in (q, k, v))
        (g_text, g_branch), (o_text, o_branch) = _split(grad.contiguous(), L, N, S), _split(out, L, N, S)
        dq_text, dk_text, dv_text = _band_backward(g_text, q_text, k_text, v_text, o_text, lse_text, window, scale)
        dq_over, dk_over, dv_over = _over_text_backward(g_branch, q_branch, k_text, v_text, o_branch, lse, scale,
                                                        window)
        # In-branch part by hand: P = exp(scores - merged lse), dS = P * (dO V^T - rowsum(dO * O)).
        probs = torch.exp(_in_branch_scores(q_branch, k_branch, scale, window) - _grouped(lse, hkv).unsqueeze(-1))
        g_grouped = _grouped(g_branch, hkv).float()
        delta = (g_grouped * _grouped(o_branch, hkv).float()).sum(-1, keepdim=True)
        dv_in = torch.einsum("bkgnlst,bkgnlsd->bknltd", probs, g_grouped)
        d_scores = probs * (torch.einsum("bkgnlsd,bknltd->bkgnlst", g_grouped, v_branch.float()) - delta) * scale
        dq_in = torch.einsum("bkgnlst,bknltd->bkgnlsd", d_scores, k_branch.float()).flatten(1, 2)
        dk_in = torch.einsum("bkgnlst,bkgnlsd->bknltd", d_scores, _grouped(q_branch, hkv).float())
        dq_branch = dq_over + dq_in.to(dq_over.dtype)
        d_sinks = None
        if sinks is not None:
            flat = lambda x: x.reshape(B, H, N * L * S, *x.shape[5:])  # noqa: E731
            d_sinks = (_sink_gradient(g_text, o_text, lse_text, sinks)
                       + _sink_gradient(flat(g_branch), flat(o_branch), flat(lse), sinks))
        return (torch.cat([dq_text, dq_branch.reshape(B, H, N * L * S, d)], 2),
                torch.cat([dk_text + dk_over, dk_in.to(k.dtype).reshape(B, hkv, N * L * S, d)], 2),
                torch.cat([dv_text + dv_over, dv_in.to(v.dtype).reshape(B, hkv, N * L * S, d)], 2),
                None, None, None, None, None, d_sinks)


def expanded_attention(q, k, v, num_text: int, num_thoughts: int, branch_length: int, scaling: float,
                       window: int | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """The gradient pass: q ``[B, H, L + N L S, d]``, k ``[B, Hkv, L + N L S, d]``, v ``[B, Hkv, L + N L S, dv]``
    -> ``[B, n, H, dv]``.

    Same contract as :func:`quietstar.attention.eager.expanded_attention` for unpadded rows.
    """
    # Under autocast RoPE can leave q and k in fp32 and v in bf16; compute in v's dtype, as eager's output is.
    dv = v.shape[-1]
    q, k, v = _common_head_dim(q.to(v.dtype), k.to(v.dtype), v)
    out = ExpandedFlashAttention.apply(q, k, v, num_text, num_thoughts, branch_length, scaling, window, sinks)
    return out[..., :dv].transpose(1, 2).contiguous()


def sample_step_attention(q, k_text, v_text, k_branch, v_branch, scaling: float,
                          window: int | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """One sampling step for unpadded rows (no gradient): the N*L queries b_{j,m+1} ``[B, H, N*L, d]`` attend to
    the text ``k_text [B, Hkv, L, d]``, ``v_text [B, Hkv, L, dv]`` (keys 0..j) and to their own branch slots 0..m,
    ``k_branch [B, Hkv, N, L, m+1, d]``, ``v_branch [B, Hkv, N, L, m+1, dv]``, within the window of their position
    j + 1 + m. Returns ``[B, N*L, H, dv]``.

    Same contract as :func:`quietstar.attention.eager.sample_step_attention`. The queries over the text
    are causal in j for each sample: one flash call in which the N samples are extra query heads of the
    text K/V (a view, no copy). Their own branch slots are a small batched product. The two softmaxes
    are merged by their log-sum-exps.
    """
    B, hkv, N, L, slots, d = k_branch.shape
    H, dv = q.shape[1], v_text.shape[-1]
    q = q.to(v_text.dtype)
    q_over, k_over, v_over = _common_head_dim(q.reshape(B, H * N, L, d), k_text.to(v_text.dtype), v_text)
    out_a, lse_a = _band_forward(q_over, k_over, v_over, _slot_reach(window, slots - 1), scaling)
    out_a, lse_a = out_a[..., :dv].reshape(B, H, N, L, dv), lse_a.view(B, H, N, L)
    grouped = q.view(B, hkv, H // hkv, N, L, d).float()
    scores = torch.einsum("bkgnld,bknlsd->bkgnls", grouped, k_branch.float()) * scaling
    scores.masked_fill_(~branch_visibility(slots, scores.device, window)[-1], float("-inf"))
    lse_b = torch.logsumexp(scores, dim=-1)
    out_b = torch.einsum("bkgnls,bknlsd->bkgnld", torch.exp(scores - lse_b.unsqueeze(-1)), v_branch.float())
    lse_b, out_b = lse_b.reshape(B, H, N, L), out_b.reshape(B, H, N, L, dv)
    lse = torch.logaddexp(lse_a.float(), lse_b)
    out = torch.exp(lse_a - lse).unsqueeze(-1) * out_a.float() + torch.exp(lse_b - lse).unsqueeze(-1) * out_b
    if sinks is not None:
        out, _ = _with_sinks(out, lse, sinks)
    return out.to(v_text.dtype).reshape(B, H, N * L, dv).transpose(1, 2).contiguous()
