"""PyTorch reference of the attention both SUS designs share: the pattern, the exact forward, and the backward
given the weights P~ it uses (P itself for the exact backward). The oracle for the kernels; each design's own
reference (``design_a_reference.py``, ``design_c_reference.py``) only draws P~.

Notation (README.md of this folder): scores S = scale * Q K^T over visible pairs, P = softmax(S) per
row with log-sum-exp ``lse``, O = P V. Backward with D_i = rowsum(dO_i * O_i):

    dV = P~^T dO,  dS = P~ * (dO V^T - D),  dQ = scale * dS K,  dK = scale * dS^T Q

With soft-capping (``softcap`` = cap, as Gemma 2) the scores are S = cap * tanh(scale * Q K^T / cap), and dS
is multiplied by the cap's slope 1 - tanh^2(scale * Q K^T / cap) before dQ and dK.

Attention patterns (global indices, row = query, col = key):

* plain (``branch_length = 0``): row i sees cols 0..i (``causal``) or all cols;
* thought layout (docs/design.md §2): the first ``num_text`` = L tokens are text, causal among themselves;
  the remaining n - L tokens are branches of ``branch_length`` = S tokens, laid out (n, j, k), and
  the branch of segment g (text position j = g mod L) sees text cols 0..j and its own earlier tokens.

A sliding ``window`` W (causal patterns only) keeps a pair only if pos(row) - pos(col) < W, with position ids
text i -> i and branch token k of text position j -> j + 1 + k (:func:`positions`). These are
quietstar.ops.visibility's positions wherever padding sits only at the ends of a row (right_pad's batches, left-padded
generation): real tokens keep their gaps, so every real query sees what layout's rule shows it.

Text keys marked False in ``key_valid`` [B, L] (padding) are seen by nobody. A row that sees
nothing gets P = 0: output 0, gradients 0, ``lse = +inf``.

The thought layout is computed in three pieces (text x text, branch x text, branch x own branch)
with one softmax per row across them, so no (n x n) tensor is built.
"""

from __future__ import annotations

import torch

from ..precision import at_least_fp32


def positions(index: torch.Tensor, num_text: int, branch_length: int) -> torch.Tensor:
    """Position ids of global indices: text i at i, branch token k of text position j at j + 1 + k."""
    L, S = num_text, max(branch_length, 1)
    offset = (index - L).clamp(min=0)
    return torch.where(index < L, index, torch.div(offset, S, rounding_mode="floor") % L + 1 + offset % S)


def visible(rows: torch.Tensor, cols: torch.Tensor, num_text: int, branch_length: int, causal: bool = True,
            window: int | None = None):
    """Who sees whom, for broadcastable global index tensors (padding not included)."""
    L, S = num_text, max(branch_length, 1)
    row_is_text = rows < L
    limit = torch.where(row_is_text, rows, torch.div(rows - L, S, rounding_mode="floor") % L)
    text_ok = cols < L
    if causal:
        text_ok = text_ok & (cols <= limit)
    same_branch = torch.div(cols - L, S, rounding_mode="floor") == torch.div(rows - L, S, rounding_mode="floor")
    branch_ok = (cols >= L) & ~row_is_text & same_branch & (cols <= rows)
    seen = text_ok | branch_ok
    if window is not None:
        seen = seen & (positions(rows, L, branch_length) - positions(cols, L, branch_length) < window)
    return seen


class Piece:
    """A block of the attention pattern: query rows x key cols as index tensors plus the slices they read."""

    def __init__(self, rows, cols, q_view, kv_view):
        self.rows, self.cols = rows, cols  # global indices, broadcast to the score shape [..., R, C]
        self.q_view = q_view  # x [B, H, n, d] -> queries [B, H, ..., R, d]
        self.kv_view = kv_view  # x [B, H, n, d] -> keys   [B, H, ..., C, d]


def pattern_pieces(n: int, num_text: int, branch_length: int, device) -> list[Piece]:
    L, S = num_text, branch_length
    ar = lambda lo, hi: torch.arange(lo, hi, device=device)  # noqa: E731
    text = Piece(ar(0, L)[:, None], ar(0, L)[None, :], lambda x: x[:, :, :L], lambda x: x[:, :, :L])
    if n == L:
        return [text]
    groups = (n - L) // S
    prefix = Piece(ar(L, n)[:, None], ar(0, L)[None, :], lambda x: x[:, :, L:], lambda x: x[:, :, :L])
    own = Piece(
        ar(L, n).view(groups, S, 1),
        ar(L, n).view(groups, 1, S),
        lambda x: x[:, :, L:].unflatten(2, (groups, S)),
        lambda x: x[:, :, L:].unflatten(2, (groups, S)),
    )
    return [text, prefix, own]


def check_pattern(n: int, num_text: int, branch_length: int, causal: bool = True, window: int | None = None,
                  softcap: float | None = None) -> None:
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise ValueError(f"window must be a positive integer (or None for full attention), got {window!r}.")
    if window is not None and not causal:
        raise ValueError("A sliding window applies to causal attention; pass causal=True or window=None.")
    if softcap is not None and not (isinstance(softcap, (int, float)) and not isinstance(softcap, bool) and softcap > 0):
        raise ValueError(f"softcap must be a positive number (or None for no soft-capping), got {softcap!r}.")
    if num_text > n or (branch_length == 0 and num_text != n):
        raise ValueError(f"num_text={num_text} does not fit a row of {n} tokens with branch_length={branch_length}.")
    if branch_length and (n - num_text) % branch_length:
        raise ValueError(f"{n - num_text} branch tokens are not a whole number of branches of {branch_length}.")


def _scores_and_mask(piece, q, k, scale, num_text, branch_length, causal, key_valid, window, softcap):
    """Scores, visibility and the cap's slope dS/d(scale QK^T) (None without soft-capping) of one piece."""
    scores = torch.matmul(piece.q_view(q), piece.kv_view(k).transpose(-1, -2)) * scale
    slope = None
    if softcap is not None:
        tanh = torch.tanh(scores / softcap)
        scores, slope = tanh * softcap, 1 - tanh * tanh
    mask = visible(piece.rows, piece.cols, num_text, branch_length, causal, window)
    mask = mask.expand(scores.shape[2:])[None, None]
    if key_valid is not None:
        col_ok = key_valid[:, piece.cols.clamp(max=num_text - 1)] | (piece.cols >= num_text)  # [B, ..., R?, C]
        mask = mask & col_ok.reshape(key_valid.shape[0], 1, *col_ok.shape[1:])
    return scores, mask, slope


def _probs(scores_list, masks, lse=None):
    """One softmax per row across pieces. Pieces after the first share rows with each other (the
    branch rows): the caller passes them flattened to [B, H, R, C_i] so they can be concatenated."""
    scores = torch.cat(scores_list, dim=-1).masked_fill(~torch.cat(masks, dim=-1), float("-inf"))
    if lse is None:
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
    probs = torch.exp(scores - lse)
    return list(probs.split([s.shape[-1] for s in scores_list], dim=-1)), lse


def expand_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    return x.repeat_interleave(num_heads // x.shape[1], dim=1)


def all_probs(q, k, scale, num_text, branch_length, causal, key_valid, window, softcap, lse=None):
    """Probabilities of every piece, in the piece's own shape, lse per row [B, H, n], and the pieces' cap slopes."""
    n = q.shape[2]
    pieces = pattern_pieces(n, num_text, branch_length, q.device)
    raw = [_scores_and_mask(p, q, k, scale, num_text, branch_length, causal, key_valid, window, softcap)
           for p in pieces]
    slopes = [r[2] for r in raw]
    text_lse = None if lse is None else lse[:, :, :num_text, None]
    (text_p,), text_lse = _probs([raw[0][0]], [raw[0][1]], text_lse)
    probs, lses = [text_p], [text_lse[..., 0]]
    if len(pieces) == 3:
        B, H, R = q.shape[0], q.shape[1], n - num_text
        flat = [(s.expand(B, H, *s.shape[2:]).reshape(B, H, R, -1), m.expand(-1, -1, *s.shape[2:]).reshape(-1, 1, R, s.shape[-1]))
                for s, m, _ in raw[1:]]
        branch_lse = None if lse is None else lse[:, :, num_text:, None]
        (prefix_p, own_p), branch_lse = _probs([f[0] for f in flat], [f[1] for f in flat], branch_lse)
        probs += [prefix_p, own_p.view(raw[2][0].shape)]
        lses.append(branch_lse[..., 0])
    return pieces, probs, torch.cat(lses, dim=-1), slopes


def attention_forward(q, k, v, scale, num_text, branch_length=0, causal=True, key_valid=None, window=None,
                      softcap=None):
    """Exact attention. q ``[B, H, n, d]``, k/v ``[B, Hkv, n, d]`` -> (o ``[B, H, n, d]``, lse ``[B, H, n]``), in
    fp32 (fp64 for fp64 inputs)."""
    check_pattern(q.shape[2], num_text, branch_length, causal, window, softcap)
    H = q.shape[1]
    q, k, v = at_least_fp32(q), expand_heads(at_least_fp32(k), H), expand_heads(at_least_fp32(v), H)
    pieces, probs, lse, _ = all_probs(q, k, scale, num_text, branch_length, causal, key_valid, window, softcap)
    out = torch.zeros_like(q)
    for piece, p in zip(pieces, probs):
        contrib = torch.matmul(p, piece.kv_view(v))
        out[:, :, piece.rows.min():piece.rows.max() + 1] += contrib.reshape(*q.shape[:2], -1, q.shape[-1])
    return out, lse


def attention_backward(q, k, v, o, lse, do, scale, num_text, branch_length=0, causal=True, key_valid=None,
                       window=None, softcap=None, sampled_weights=None):
    """Gradients (dq, dk, dv) in fp32 (fp64 for fp64 inputs): exact, or with the weights P~ that
    ``sampled_weights(pieces, probs)`` returns for the pieces' probabilities (a list of tensors shaped like
    ``probs``; each SUS design's reference passes its own draw)."""
    B, H, n, d = q.shape
    hkv = k.shape[1]
    q, do = at_least_fp32(q), at_least_fp32(do)
    k, v = expand_heads(at_least_fp32(k), H), expand_heads(at_least_fp32(v), H)
    delta = (do * at_least_fp32(o)).sum(-1)  # D_i from the exact output, never from P~ (that would bias dQ)
    pieces, probs, _, slopes = all_probs(q, k, scale, num_text, branch_length, causal, key_valid, window, softcap,
                                         lse)
    if sampled_weights is not None:
        probs = sampled_weights(pieces, probs)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for piece, p, slope in zip(pieces, probs, slopes):
        q_p, k_p, v_p, do_p = piece.q_view(q), piece.kv_view(k), piece.kv_view(v), piece.q_view(do)
        delta_p = piece.q_view(delta[..., None])
        ds = p * (torch.matmul(do_p, v_p.transpose(-1, -2)) - delta_p)
        if slope is not None:
            ds = ds * slope
        rows = slice(piece.rows.min(), piece.rows.max() + 1)
        cols = slice(piece.cols.min(), piece.cols.max() + 1)
        dq[:, :, rows] += (scale * torch.matmul(ds, k_p)).reshape(B, H, -1, d)
        dk[:, :, cols] += (scale * torch.matmul(ds.transpose(-1, -2), q_p)).reshape(B, H, -1, d)
        dv[:, :, cols] += torch.matmul(p.transpose(-1, -2), do_p).reshape(B, H, -1, d)
    group = H // hkv
    return dq, dk.view(B, hkv, group, n, d).sum(2), dv.view(B, hkv, group, n, d).sum(2)
