"""Expanded attention from exact CPU flash-attention kernels, merged by log-sum-exp (a fast path of eager.py).

The visibility rule splits into two ordinary causal attentions:
* for each sample n and branch slot s, the queries b_{0..L-1, s} over the text keys are causal in j
  (b_{j,s} sees x_0..x_j): B*N*S causal sequences of length L;
* inside each branch, slots attend causally to earlier slots: B*N*L causal sequences of length S.
Text queries are a third causal attention. Each part's softmax is exact; the two branch parts are
merged with their log-sum-exps (as ring attention does), and the backward runs each part's flash
backward with the merged output and log-sum-exp, which is exact for a joint softmax.

Uses PyTorch's CPU flash kernels (``aten._scaled_dot_product_flash_attention_for_cpu`` and its
backward), so it serves CPU tensors without padding or dropout; :func:`applies` says when.
Shapes: q ``[B, H, L + N L S, d]``, k/v the same with H heads (grouped-query heads already repeated).
"""

from __future__ import annotations

import torch

from .layout import ThoughtLayout

_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_flash_backward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def applies(query: torch.Tensor, layout: ThoughtLayout, dropout: float) -> bool:
    """The fast path is exact here: CPU, fp32/bf16, no padding key, no attention dropout."""
    return (_flash is not None and query.device.type == "cpu" and dropout == 0.0
            and query.dtype in (torch.float32, torch.bfloat16) and bool(layout.key_padding.all()))


def _split(x: torch.Tensor, L: int, N: int, S: int):
    """[B, H, L + NLS, d] -> text [B, H, L, d], branch-as-causal-in-j [BNS, H, L, d], in-branch [BNL, H, S, d]."""
    B, H, _, d = x.shape
    branch = x[:, :, L:].reshape(B, H, N, L, S, d)
    over_text = branch.permute(0, 2, 4, 1, 3, 5).reshape(B * N * S, H, L, d)
    in_branch = branch.permute(0, 2, 3, 1, 4, 5).reshape(B * N * L, H, S, d)
    return x[:, :, :L].contiguous(), over_text, in_branch


def _from_over_text(x: torch.Tensor, B: int, N: int, S: int) -> torch.Tensor:
    """[BNS, H, L, ...] -> [B, H, N, L, S, ...]."""
    _, H, L, *rest = x.shape
    return x.reshape(B, N, S, H, L, *rest).movedim(3, 1).movedim(3, 4)


def _from_in_branch(x: torch.Tensor, B: int, N: int, L: int) -> torch.Tensor:
    """[BNL, H, S, ...] -> [B, H, N, L, S, ...]."""
    _, H, S, *rest = x.shape
    return x.reshape(B, N, L, H, S, *rest).movedim(3, 1)


class ExpandedFlashAttention(torch.autograd.Function):
    """Exact attention over a thought-expanded row; one gradient per input (q, k, v) and None for the rest."""

    @staticmethod
    def forward(ctx, q, k, v, L: int, N: int, S: int, scale: float):
        B, H, _, d = q.shape
        q_text, q_over, q_in = _split(q, L, N, S)
        k_text, _, k_in = _split(k, L, N, S)
        v_text, _, v_in = _split(v, L, N, S)
        k_over = k_text.unsqueeze(1).expand(B, N * S, H, L, d).reshape(B * N * S, H, L, d)
        v_over = v_text.unsqueeze(1).expand(B, N * S, H, L, d).reshape(B * N * S, H, L, d)
        out_text, lse_text = _flash(q_text, k_text, v_text, is_causal=True, scale=scale)
        out_over, lse_over = _flash(q_over, k_over, v_over, is_causal=True, scale=scale)
        out_in, lse_in = _flash(q_in, k_in, v_in, is_causal=True, scale=scale)
        lse_a, lse_b = _from_over_text(lse_over, B, N, S), _from_in_branch(lse_in, B, N, L)
        lse = torch.logaddexp(lse_a, lse_b)  # [B, H, N, L, S]
        out_branch = (torch.exp(lse_a - lse).unsqueeze(-1) * _from_over_text(out_over, B, N, S)
                      + torch.exp(lse_b - lse).unsqueeze(-1) * _from_in_branch(out_in, B, N, L)).to(q.dtype)
        out = torch.cat([out_text, out_branch.reshape(B, H, N * L * S, d)], dim=2)
        ctx.save_for_backward(q, k, v, out, lse_text, lse)
        ctx.sizes = (L, N, S, scale)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse_text, lse = ctx.saved_tensors
        L, N, S, scale = ctx.sizes
        B, H, _, d = q.shape
        q_text, q_over, q_in = _split(q, L, N, S)
        k_text, _, k_in = _split(k, L, N, S)
        v_text, _, v_in = _split(v, L, N, S)
        g_text, g_over, g_in = _split(grad.contiguous(), L, N, S)
        o_text, o_over, o_in = _split(out, L, N, S)
        k_over = k_text.unsqueeze(1).expand(B, N * S, H, L, d).reshape(B * N * S, H, L, d)
        v_over = v_text.unsqueeze(1).expand(B, N * S, H, L, d).reshape(B * N * S, H, L, d)
        lse_over = lse.permute(0, 2, 4, 1, 3).reshape(B * N * S, H, L).contiguous()
        lse_in = lse.permute(0, 2, 3, 1, 4).reshape(B * N * L, H, S).contiguous()
        dq_text, dk_text, dv_text = _flash_backward(g_text, q_text, k_text, v_text, o_text, lse_text, 0.0, True,
                                                    scale=scale)
        dq_over, dk_over, dv_over = _flash_backward(g_over, q_over, k_over, v_over, o_over, lse_over, 0.0, True,
                                                    scale=scale)
        dq_in, dk_in, dv_in = _flash_backward(g_in, q_in, k_in, v_in, o_in, lse_in, 0.0, True, scale=scale)
        dq_branch = _from_over_text(dq_over, B, N, S) + _from_in_branch(dq_in, B, N, L)
        dk_text = dk_text + dk_over.reshape(B, N * S, H, L, d).sum(1)
        dv_text = dv_text + dv_over.reshape(B, N * S, H, L, d).sum(1)
        dk_branch = _from_in_branch(dk_in, B, N, L).reshape(B, H, N * L * S, d)
        dv_branch = _from_in_branch(dv_in, B, N, L).reshape(B, H, N * L * S, d)
        return (torch.cat([dq_text, dq_branch.reshape(B, H, N * L * S, d)], 2),
                torch.cat([dk_text, dk_branch], 2), torch.cat([dv_text, dv_branch], 2), None, None, None, None)


def expanded_attention(q, k, v, layout: ThoughtLayout, scaling: float) -> torch.Tensor:
    """Same contract as :func:`quietstar.attention.eager.expanded_attention`; returns ``[B, n, H, d]``."""
    groups = q.shape[1] // k.shape[1]
    # Under autocast RoPE can leave q and k in fp32 and v in bf16; compute in v's dtype, as eager's output is.
    q, k = q.to(v.dtype), k.to(v.dtype)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = ExpandedFlashAttention.apply(q, k, v, layout.num_text, layout.num_thoughts, layout.branch_length, scaling)
    return out.transpose(1, 2).contiguous()


def sample_step_attention(q, k_new, v_new, k_buffer, v_buffer, k_text, v_text, layout: ThoughtLayout, scaling):
    """Same contract as :func:`quietstar.attention.eager.sample_step_attention` (no gradient), for unpadded rows.

    The N*L queries b_{j,step+1} over the text are causal in j for each sample: one flash call over
    B*N sequences of length L. Their own branch slots 0..step are a small batched product. The two
    softmaxes are merged by their log-sum-exps.
    """
    B, hkv, N, L, _, d = k_buffer.shape
    m = layout.step
    k_buffer[:, :, :, :, m] = k_new.view(B, hkv, N, L, d)
    v_buffer[:, :, :, :, m] = v_new.view(B, hkv, N, L, d)
    H = q.shape[1]
    groups = H // hkv
    q = q.to(v_text.dtype)
    q_over = q.view(B, H, N, L, d).transpose(1, 2).reshape(B * N, H, L, d)
    k_over = k_text.to(v_text.dtype).repeat_interleave(groups, dim=1).unsqueeze(1).expand(B, N, H, L, d)
    v_over = v_text.repeat_interleave(groups, dim=1).unsqueeze(1).expand(B, N, H, L, d)
    out_a, lse_a = _flash(q_over, k_over.reshape(B * N, H, L, d), v_over.reshape(B * N, H, L, d), is_causal=True,
                          scale=scaling)
    out_a = out_a.view(B, N, H, L, d).transpose(1, 2)  # [B, H, N, L, d]
    lse_a = lse_a.view(B, N, H, L).transpose(1, 2)
    k_seen = k_buffer[:, :, :, :, : m + 1].repeat_interleave(groups, dim=1)  # [B, H, N, L, m+1, d]
    v_seen = v_buffer[:, :, :, :, : m + 1].repeat_interleave(groups, dim=1)
    scores = torch.einsum("bhnld,bhnlsd->bhnls", q.view(B, H, N, L, d).float(), k_seen.float()) * scaling
    lse_b = torch.logsumexp(scores, dim=-1)
    out_b = torch.einsum("bhnls,bhnlsd->bhnld", torch.exp(scores - lse_b.unsqueeze(-1)), v_seen.float())
    lse = torch.logaddexp(lse_a.float(), lse_b)
    out = torch.exp(lse_a - lse).unsqueeze(-1) * out_a.float() + torch.exp(lse_b - lse).unsqueeze(-1) * out_b
    return out.to(v_text.dtype).reshape(B, H, N * L, d).transpose(1, 2).contiguous()
