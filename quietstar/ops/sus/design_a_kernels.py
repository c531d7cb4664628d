"""Triton kernels of SUS attention: FlashAttention-style exact forward, exact or SUS backward (design A).

One program handles one block of query rows (forward, dQ) or of key columns (dK, dV) of one head.
The attention pattern is the one of :mod:`.reference` (on index tensors in :mod:`.common_kernels`): plain
(causal or not) over the whole row, or the thought layout (L text tokens, then branches of S tokens,
docs/design.md §2). Text blocks and branch blocks are numbered separately so that no block straddles the two, and
each block visits only the key (or query) ranges its rows can see:

* text query block: text keys up to its last row;
* branch query block: text keys up to the largest text position j of its segments, then the keys of
  its own segments (position-major layout keeps them next to the queries);
* text key block: text queries from its first column on, and in each of the N samples the branch
  rows of positions j >= its first column;
* branch key block: the rows of its own segments from its first column on.

A sliding window (``WINDOWED``, window W on position ids: text i at i, branch token k of position j at j + 1 + k)
narrows each of these ranges to a band, and the tiles wholly outside it are left out of the loop bounds. Each range runs
in three parts (:func:`.common_kernels.tile_split`): tiles that every row of the block sees whole (causal, window and
segment rules hold for all pairs; only padding keys are masked) skip the visibility mask, and the boundary tiles on
either side compute it. Soft-capping (``SOFTCAP``) turns the scaled scores s into cap * tanh(s / cap) in every kernel
and multiplies dS by the slope 1 - tanh^2 in both backward kernels. Both are constexpr switches: a launch without them
compiles no window or cap code.

SUS backward: both backward kernels recompute P = exp(S - lse) per tile, draw u(seed, bh, row, col)
with the counter-based hash of :mod:`.rng`, and use P~ = max(P, 1/c) where u < cP, else 0. A tile
with no kept entry skips its four backward matmuls; QK^T is always recomputed (this is what caps
design A's gain; see README.md).

Kernels are written for contiguous last dimensions; head dims 16, 32, 64, 128. Batch and head base offsets
are 64-bit (a batch can pass 2^31 elements); offsets inside one head's [n, d] slice are 32-bit (common_launch.py
refuses a head past 2^31 elements).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common_kernels import clip, pairs_seen, query_block, row_keys_for, tile_split, uniform


@triton.jit
def _tanh(x):
    # tanh from exp: exact limits +-1 for large |x| (exp overflows to inf or underflows to 0), fp32 precision
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _forward_tile(acc, m_i, l_i, q, k_base, v_base, stride_kn, rows, col_start, hi, n, num_text, branch_length,
                  key_valid_row, scale, window, softcap, CAUSAL: tl.constexpr, HAS_KEY_VALID: tl.constexpr,
                  WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
                  HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    dims = tl.arange(0, HEAD_DIM)
    cols = clip(col_start + tl.arange(0, BLOCK_N), hi, n)
    col_ok = cols < n
    k = tl.load(k_base + cols[:, None] * stride_kn + dims[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(v_base + cols[:, None] * stride_kn + dims[None, :], mask=col_ok[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    if SOFTCAP:
        s = _tanh(s / softcap) * softcap
    if MASKED or HAS_KEY_VALID:
        seen = pairs_seen(rows[:, None], cols[None, :], n, num_text, branch_length, key_valid_row, window, CAUSAL,
                     HAS_KEY_VALID, WINDOWED, MASKED)
        s = tl.where(seen, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    alpha = tl.exp(m_i - m_shift)
    p = tl.exp(s - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _forward_range(acc, m_i, l_i, q, k_base, v_base, stride_kn, rows, lo, mid_lo, mid_hi, hi, n, num_text,
                   branch_length, key_valid_row, scale, window, softcap, CAUSAL: tl.constexpr,
                   HAS_KEY_VALID: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
                   HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """One key range in its three runs of :func:`tile_split`: boundary tiles masked, inner tiles not."""
    for col_start in range(lo, mid_lo, BLOCK_N):
        acc, m_i, l_i = _forward_tile(acc, m_i, l_i, q, k_base, v_base, stride_kn, rows, col_start, hi, n, num_text,
                                      branch_length, key_valid_row, scale, window, softcap, CAUSAL, HAS_KEY_VALID,
                                      WINDOWED, SOFTCAP, True, BLOCK_N, HEAD_DIM, PRECISION)
    for col_start in range(mid_lo, mid_hi, BLOCK_N):
        acc, m_i, l_i = _forward_tile(acc, m_i, l_i, q, k_base, v_base, stride_kn, rows, col_start, hi, n, num_text,
                                      branch_length, key_valid_row, scale, window, softcap, CAUSAL, HAS_KEY_VALID,
                                      WINDOWED, SOFTCAP, False, BLOCK_N, HEAD_DIM, PRECISION)
    for col_start in range(mid_hi, hi, BLOCK_N):
        acc, m_i, l_i = _forward_tile(acc, m_i, l_i, q, k_base, v_base, stride_kn, rows, col_start, hi, n, num_text,
                                      branch_length, key_valid_row, scale, window, softcap, CAUSAL, HAS_KEY_VALID,
                                      WINDOWED, SOFTCAP, True, BLOCK_N, HEAD_DIM, PRECISION)
    return acc, m_i, l_i


@triton.jit
def forward_kernel(Q, K, V, O, LSE, KEY_VALID,
                   stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                   n, num_text, branch_length, num_heads, group, text_blocks, scale, window, softcap,
                   CAUSAL: tl.constexpr, HAS_KEY_VALID: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """O = softmax(scale Q K^T) V over visible pairs and lse per row; grid (query blocks, B*H)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # 64-bit base offsets
    b = bh // num_heads
    h = bh % num_heads
    (start, stop, text_lo, text_mid_lo, text_mid_hi, text_hi,
     branch_lo, branch_mid_lo, branch_mid_hi, branch_hi) = query_block(pid, text_blocks, n, num_text, branch_length,
                                                                        window, CAUSAL, WINDOWED, BLOCK_M, BLOCK_N)
    rows = start + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < stop
    q_base = Q + b * stride_qb + h * stride_qh
    q = tl.load(q_base + rows[:, None] * stride_qn + dims[None, :], mask=row_ok[:, None], other=0.0)
    k_base = K + b * stride_kb + (h // group) * stride_kh
    v_base = V + b * stride_kb + (h // group) * stride_kh
    key_valid_row = KEY_VALID + b * num_text
    rows_seen = tl.where(row_ok, rows, n)  # rows past the block see nothing

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _forward_range(acc, m_i, l_i, q, k_base, v_base, stride_kn, rows_seen, text_lo, text_mid_lo,
                                   text_mid_hi, text_hi, n, num_text, branch_length, key_valid_row, scale, window,
                                   softcap, CAUSAL, HAS_KEY_VALID, WINDOWED, SOFTCAP, BLOCK_N, HEAD_DIM, PRECISION)
    acc, m_i, l_i = _forward_range(acc, m_i, l_i, q, k_base, v_base, stride_kn, rows_seen, branch_lo, branch_mid_lo,
                                   branch_mid_hi, branch_hi, n, num_text, branch_length, key_valid_row, scale, window,
                                   softcap, CAUSAL, HAS_KEY_VALID, WINDOWED, SOFTCAP, BLOCK_N, HEAD_DIM, PRECISION)
    seen_any = l_i > 0
    out = acc / tl.where(seen_any, l_i, 1.0)[:, None]
    lse = tl.where(seen_any, m_i + tl.log(tl.where(seen_any, l_i, 1.0)), float("inf"))
    o_base = O + b * stride_qb + h * stride_qh
    tl.store(o_base + rows[:, None] * stride_qn + dims[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh * n + rows, lse, mask=row_ok)


@triton.jit
def _sus_probs(p, row_keys, cols, c, SUS: tl.constexpr):
    """P~ (or P when not SUS) and whether any entry of the tile is kept."""
    if SUS:
        u = uniform(row_keys, cols)
        p = tl.where(u < c * p, tl.maximum(p, 1.0 / c), 0.0)
        kept = tl.sum((p > 0).to(tl.int32))
    else:
        kept = 1
    return p, kept


@triton.jit
def _capped_scores(s, softcap, SOFTCAP: tl.constexpr):
    """Soft-capped scores and the cap's slope d(capped)/ds = 1 - tanh^2 (1 without soft-capping)."""
    if SOFTCAP:
        tanh = _tanh(s / softcap)
        s = tanh * softcap
        slope = 1.0 - tanh * tanh
    else:
        slope = tl.full(s.shape, 1.0, tl.float32)
    return s, slope


@triton.jit
def _dq_tile(dq, q, do, lse, delta, row_keys, k_base, v_base, stride_kn, rows, col_start, hi, n, num_text,
             branch_length, key_valid_row, scale, c, window, softcap, CAUSAL: tl.constexpr,
             HAS_KEY_VALID: tl.constexpr, SUS: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr,
             MASKED: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    dims = tl.arange(0, HEAD_DIM)
    cols = clip(col_start + tl.arange(0, BLOCK_N), hi, n)
    col_ok = cols < n
    k = tl.load(k_base + cols[:, None] * stride_kn + dims[None, :], mask=col_ok[:, None], other=0.0)
    s, slope = _capped_scores(tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale, softcap, SOFTCAP)
    p = tl.exp(s - lse[:, None])
    if MASKED or HAS_KEY_VALID:
        seen = pairs_seen(rows[:, None], cols[None, :], n, num_text, branch_length, key_valid_row, window, CAUSAL,
                     HAS_KEY_VALID, WINDOWED, MASKED)
        p = tl.where(seen, p, 0.0)
    p, kept = _sus_probs(p, row_keys[:, None], cols[None, :], c, SUS)
    if kept > 0:
        v = tl.load(v_base + cols[:, None] * stride_kn + dims[None, :], mask=col_ok[:, None], other=0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * slope
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def _dq_range(dq, q, do, lse, delta, row_keys, k_base, v_base, stride_kn, rows, lo, mid_lo, mid_hi, hi, n, num_text,
              branch_length, key_valid_row, scale, c, window, softcap, CAUSAL: tl.constexpr,
              HAS_KEY_VALID: tl.constexpr, SUS: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """One key range in its three runs of :func:`tile_split`: boundary tiles masked, inner tiles not."""
    for col_start in range(lo, mid_lo, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, row_keys, k_base, v_base, stride_kn, rows, col_start, hi, n, num_text,
                      branch_length, key_valid_row, scale, c, window, softcap, CAUSAL, HAS_KEY_VALID, SUS, WINDOWED,
                      SOFTCAP, True, BLOCK_N, HEAD_DIM, PRECISION)
    for col_start in range(mid_lo, mid_hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, row_keys, k_base, v_base, stride_kn, rows, col_start, hi, n, num_text,
                      branch_length, key_valid_row, scale, c, window, softcap, CAUSAL, HAS_KEY_VALID, SUS, WINDOWED,
                      SOFTCAP, False, BLOCK_N, HEAD_DIM, PRECISION)
    for col_start in range(mid_hi, hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, row_keys, k_base, v_base, stride_kn, rows, col_start, hi, n, num_text,
                      branch_length, key_valid_row, scale, c, window, softcap, CAUSAL, HAS_KEY_VALID, SUS, WINDOWED,
                      SOFTCAP, True, BLOCK_N, HEAD_DIM, PRECISION)
    return dq


@triton.jit(do_not_specialize=["seed"])
def backward_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, KEY_VALID,
                       stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                       n, num_text, branch_length, num_heads, group, text_blocks, scale, c, seed, window, softcap,
                       CAUSAL: tl.constexpr, HAS_KEY_VALID: tl.constexpr, SUS: tl.constexpr,
                       WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """dQ = scale * (P~ * (dO V^T - D)) K for one query block; grid (query blocks, B*H)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # 64-bit base offsets
    b = bh // num_heads
    h = bh % num_heads
    (start, stop, text_lo, text_mid_lo, text_mid_hi, text_hi,
     branch_lo, branch_mid_lo, branch_mid_hi, branch_hi) = query_block(pid, text_blocks, n, num_text, branch_length,
                                                                        window, CAUSAL, WINDOWED, BLOCK_M, BLOCK_N)
    rows = start + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < stop
    head = b * stride_qb + h * stride_qh
    offsets = rows[:, None] * stride_qn + dims[None, :]
    q = tl.load(Q + head + offsets, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + head + offsets, mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh * n + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh * n + rows, mask=row_ok, other=0.0)
    row_keys = row_keys_for(seed, bh, rows)
    k_base = K + b * stride_kb + (h // group) * stride_kh
    v_base = V + b * stride_kb + (h // group) * stride_kh
    key_valid_row = KEY_VALID + b * num_text
    rows_seen = tl.where(row_ok, rows, n)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _dq_range(dq, q, do, lse, delta, row_keys, k_base, v_base, stride_kn, rows_seen, text_lo, text_mid_lo,
                   text_mid_hi, text_hi, n, num_text, branch_length, key_valid_row, scale, c, window, softcap, CAUSAL,
                   HAS_KEY_VALID, SUS, WINDOWED, SOFTCAP, BLOCK_N, HEAD_DIM, PRECISION)
    dq = _dq_range(dq, q, do, lse, delta, row_keys, k_base, v_base, stride_kn, rows_seen, branch_lo, branch_mid_lo,
                   branch_mid_hi, branch_hi, n, num_text, branch_length, key_valid_row, scale, c, window, softcap,
                   CAUSAL, HAS_KEY_VALID, SUS, WINDOWED, SOFTCAP, BLOCK_N, HEAD_DIM, PRECISION)
    tl.store(DQ + head + offsets, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dkdv_tile(dk, dv, k, v, cols, q_base, do_base, lse_base, delta_base, stride_qn, bh, seed, row_start, hi, n,
               num_text, branch_length, key_valid_row, scale, c, window, softcap, CAUSAL: tl.constexpr,
               HAS_KEY_VALID: tl.constexpr, SUS: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr,
               MASKED: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """Add one tile of query rows to this key block's dK, dV, working transposed ([keys, rows])."""
    dims = tl.arange(0, HEAD_DIM)
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < hi
    q = tl.load(q_base + rows[:, None] * stride_qn + dims[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
    s_t, slope_t = _capped_scores(tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale, softcap, SOFTCAP)
    rows_seen = tl.where(row_ok, rows, n)
    p_t = tl.exp(s_t - lse[None, :])
    if MASKED or HAS_KEY_VALID:
        seen = pairs_seen(rows_seen[None, :], cols[:, None], n, num_text, branch_length, key_valid_row, window, CAUSAL,
                     HAS_KEY_VALID, WINDOWED, MASKED)
        p_t = tl.where(seen, p_t, 0.0)
    p_t, kept = _sus_probs(p_t, row_keys_for(seed, bh, rows)[None, :], cols[:, None], c, SUS)
    if kept > 0:
        do = tl.load(do_base + rows[:, None] * stride_qn + dims[None, :], mask=row_ok[:, None], other=0.0)
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if SOFTCAP:
            ds_t = ds_t * slope_t
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkdv_rows(dk, dv, k, v, cols, q_base, do_base, lse_base, delta_base, stride_qn, bh, seed, row_lo, row_hi,
               full_lo, full_hi, n, num_text, branch_length, key_valid_row, scale, c, window, softcap,
               CAUSAL: tl.constexpr, HAS_KEY_VALID: tl.constexpr, SUS: tl.constexpr, WINDOWED: tl.constexpr,
               SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate this key block's dK, dV over query rows [row_lo, row_hi), whose rows in [full_lo, full_hi) see the
    whole block: the tiles wholly inside that run without the visibility mask."""
    lo, mid_lo, mid_hi = tile_split(row_lo, row_lo, row_hi, full_lo, full_hi, BLOCK_M)
    for row_start in range(lo, mid_lo, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, cols, q_base, do_base, lse_base, delta_base, stride_qn, bh, seed, row_start,
                            row_hi, n, num_text, branch_length, key_valid_row, scale, c, window, softcap, CAUSAL,
                            HAS_KEY_VALID, SUS, WINDOWED, SOFTCAP, True, BLOCK_M, HEAD_DIM, PRECISION)
    for row_start in range(mid_lo, mid_hi, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, cols, q_base, do_base, lse_base, delta_base, stride_qn, bh, seed, row_start,
                            row_hi, n, num_text, branch_length, key_valid_row, scale, c, window, softcap, CAUSAL,
                            HAS_KEY_VALID, SUS, WINDOWED, SOFTCAP, False, BLOCK_M, HEAD_DIM, PRECISION)
    for row_start in range(mid_hi, row_hi, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, cols, q_base, do_base, lse_base, delta_base, stride_qn, bh, seed, row_start,
                            row_hi, n, num_text, branch_length, key_valid_row, scale, c, window, softcap, CAUSAL,
                            HAS_KEY_VALID, SUS, WINDOWED, SOFTCAP, True, BLOCK_M, HEAD_DIM, PRECISION)
    return dk, dv


@triton.jit
def _key_block(pid, text_key_blocks, n, num_text, branch_length, window, CAUSAL: tl.constexpr,
               WINDOWED: tl.constexpr, BLOCK_N: tl.constexpr):
    """Columns [start, stop) of key block ``pid`` and the query rows that read them, each range with the part
    [full_lo, full_hi) whose rows see every column of the block (no mask computed there).

    A text key block is read by text rows [row_lo, row_hi) and, in each sample, by the branch rows of positions
    j >= start: offsets [branch_lo, branch_hi) from the sample's first row (all of the block: j >= stop - 1). A branch
    key block is read by the rows of its own segments, [row_lo, row_hi) (branch offsets empty). A window W bounds
    them by position: a row at position p reads keys at p' > p - W, and slot 0 of position j sits at j + 1.
    """
    S = branch_length
    if pid < text_key_blocks:
        start = pid * BLOCK_N
        stop = tl.minimum(start + BLOCK_N, num_text)
        row_lo = 0
        row_hi = num_text
        full_lo = 0
        full_hi = num_text
        hi_position = num_text  # branches of positions j < hi_position read it, of [stop - 1, full_hi_position) all
        full_hi_position = num_text
        if CAUSAL:
            row_lo = start
            full_lo = stop - 1
        if WINDOWED:
            row_hi = tl.minimum(num_text, stop - 1 + window)
            full_hi = start + window
            hi_position = tl.minimum(num_text, stop + window - 2)
            full_hi_position = start + window - S  # every slot of j within the window of column start
        branch_lo = start * S
        branch_hi = tl.maximum(hi_position * S, branch_lo)
        branch_full_lo = (stop - 1) * S
        branch_full_hi = full_hi_position * S
    else:
        start = num_text + (pid - text_key_blocks) * BLOCK_N
        stop = tl.minimum(start + BLOCK_N, n)
        row_lo = start
        row_hi = num_text + ((stop - 1 - num_text) // S + 1) * S  # the end of the last segment
        first_segment_end = num_text + ((start - num_text) // S + 1) * S
        full_lo = stop - 1
        full_hi = tl.where(first_segment_end >= stop, first_segment_end, start)  # one segment or none
        if WINDOWED:
            row_hi = tl.minimum(row_hi, stop - 1 + window)
            full_hi = tl.minimum(full_hi, start + window)
        branch_lo = 0
        branch_hi = 0
        branch_full_lo = 0
        branch_full_hi = 0
    return start, stop, row_lo, row_hi, full_lo, full_hi, branch_lo, branch_hi, branch_full_lo, branch_full_hi


@triton.jit(do_not_specialize=["seed"])
def backward_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, KEY_VALID,
                         stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                         n, num_text, branch_length, num_heads, group, text_key_blocks, scale, c, seed, window,
                         softcap, CAUSAL: tl.constexpr, HAS_KEY_VALID: tl.constexpr, SUS: tl.constexpr,
                         WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """dV = P~^T dO and dK = scale * (P~ * (dO V^T - D))^T Q for one key block of one key/value head,
    summed over the query heads of its group; grid (key blocks, B*Hkv)."""
    pid = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)  # 64-bit base offsets
    num_kv_heads = num_heads // group
    b = bhk // num_kv_heads
    hk = bhk % num_kv_heads
    (start, stop, row_lo, row_hi, full_lo, full_hi,
     branch_lo, branch_hi, branch_full_lo, branch_full_hi) = _key_block(pid, text_key_blocks, n, num_text, branch_length,
                                                                        window, CAUSAL, WINDOWED, BLOCK_N)
    cols = start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    col_ok = cols < stop
    kv_head = b * stride_kb + hk * stride_kh
    kv_offsets = cols[:, None] * stride_kn + dims[None, :]
    k = tl.load(K + kv_head + kv_offsets, mask=col_ok[:, None], other=0.0)
    v = tl.load(V + kv_head + kv_offsets, mask=col_ok[:, None], other=0.0)
    cols_seen = tl.where(col_ok, cols, n)
    key_valid_row = KEY_VALID + b * num_text
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    sample_rows = num_text * branch_length
    for g in range(0, group):
        h = hk * group + g
        bh = b * num_heads + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_qb + h * stride_qh
        lse_base = LSE + bh * n
        delta_base = DELTA + bh * n
        dk, dv = _dkdv_rows(dk, dv, k, v, cols_seen, q_base, do_base, lse_base, delta_base, stride_qn, bh, seed,
                            row_lo, row_hi, full_lo, full_hi, n, num_text, branch_length, key_valid_row, scale, c,
                            window, softcap, CAUSAL, HAS_KEY_VALID, SUS, WINDOWED, SOFTCAP, BLOCK_M, HEAD_DIM,
                            PRECISION)
        if pid < text_key_blocks:  # the same run of branch rows in each sample
            for sample_start in range(num_text, n, sample_rows):
                dk, dv = _dkdv_rows(dk, dv, k, v, cols_seen, q_base, do_base, lse_base, delta_base, stride_qn, bh,
                                    seed, sample_start + branch_lo, sample_start + branch_hi,
                                    sample_start + branch_full_lo, sample_start + branch_full_hi, n, num_text,
                                    branch_length, key_valid_row, scale, c, window, softcap, CAUSAL, HAS_KEY_VALID,
                                    SUS, WINDOWED, SOFTCAP, BLOCK_M, HEAD_DIM, PRECISION)
    tl.store(DK + kv_head + kv_offsets, (dk * scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + kv_head + kv_offsets, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])
