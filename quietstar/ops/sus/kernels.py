"""Triton kernels of SUS attention: FlashAttention-style exact forward, exact or SUS backward (design A).

One program handles one block of query rows (forward, dQ) or of key columns (dK, dV) of one head.
The attention pattern is the one of :mod:`.reference`: plain (causal or not) over the whole row, or
the thought layout (L text tokens, then branches of S tokens, docs/design.md §2). Text blocks and branch
blocks are numbered separately so that no block straddles the two, and each block visits only the
key (or query) ranges its rows can see:

* text query block: text keys up to its last row;
* branch query block: text keys up to the largest text position j of its segments, then the keys of
  its own segments (position-major layout keeps them next to the queries);
* text key block: text queries from its first column on, and in each of the N samples the branch
  rows of positions j >= its first column;
* branch key block: the rows of its own segments from its first column on.

SUS backward: both backward kernels recompute P = exp(S - lse) per tile, draw u(seed, bh, row, col)
with the counter-based hash of :mod:`.rng`, and use P~ = max(P, 1/c) where u < cP, else 0. A tile
with no kept entry skips its four backward matmuls; QK^T is always recomputed (this is what caps
design A's gain; see README.md).

Kernels are written for contiguous last dimensions; head dims 16, 32, 64, 128. Batch and head base offsets
are 64-bit (a batch can pass 2^31 elements); offsets inside one head's [n, d] slice are 32-bit (launch.py
refuses a head past 2^31 elements).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _hash32(x):
    # lowbias32 on uint32 (wrapping multiplies); must match rng.hash32 bit for bit.
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _row_keys(seed, bh, rows):
    stream = _hash32(seed.to(tl.uint32) ^ _hash32(bh.to(tl.uint32) * 0x9E3779B1 + 1))
    return _hash32(stream ^ _hash32(rows.to(tl.uint32)))


@triton.jit
def _uniform(row_keys, cols):
    """u for broadcastable row keys (uint32) and column indices; fp32 in [0, 1)."""
    bits = _hash32(row_keys ^ (cols.to(tl.uint32) * 0x9E3779B1))
    return (bits >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2^-24


@triton.jit
def _visible(rows, cols, n, num_text, branch_length, key_valid_row, CAUSAL: tl.constexpr,
             HAS_KEY_VALID: tl.constexpr):
    """Visibility of broadcastable (row, col) index tensors; rows and cols outside [0, n) are invisible."""
    row_is_text = rows < num_text
    row_segment = (rows - num_text) // branch_length  # only used where rows >= num_text
    limit = tl.where(row_is_text, rows, row_segment % num_text)
    col_is_text = cols < num_text
    text_ok = col_is_text
    if CAUSAL:
        text_ok = text_ok & (cols <= limit)
    if HAS_KEY_VALID:
        valid = tl.load(key_valid_row + cols, mask=col_is_text & (cols >= 0), other=1)
        text_ok = text_ok & (valid != 0)
    col_segment = (cols - num_text) // branch_length
    branch_ok = (cols >= num_text) & (rows >= num_text) & (col_segment == row_segment) & (cols <= rows)
    return (text_ok | branch_ok) & (rows < n) & (cols < n)


@triton.jit
def _clip(index, hi, n):
    """Indices at or past the end of their range become n, which nobody sees (so no tile counts twice)."""
    return tl.where(index < hi, index, n)


@triton.jit
def _query_block(pid, text_blocks, n, num_text, branch_length, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows of query block ``pid`` and the two key ranges it reads: [0, text_hi) and [branch_lo, branch_hi)."""
    if pid < text_blocks:
        start = pid * BLOCK_M
        stop = tl.minimum(start + BLOCK_M, num_text)
        text_hi = num_text
        if CAUSAL:
            text_hi = stop
        branch_lo = 0
        branch_hi = 0
    else:
        start = num_text + (pid - text_blocks) * BLOCK_M
        stop = tl.minimum(start + BLOCK_M, n)
        first_segment = (start - num_text) // branch_length
        last_segment = (stop - 1 - num_text) // branch_length
        first_position = first_segment % num_text
        text_hi = last_segment % num_text + 1
        if last_segment - first_segment >= num_text - first_position:  # the block wraps past position L-1
            text_hi = num_text
        branch_lo = num_text + first_segment * branch_length
        branch_hi = stop
    return start, stop, text_hi, branch_lo, branch_hi


@triton.jit
def _forward_tile(acc, m_i, l_i, q, k_base, v_base, stride_kn, rows, cols, n, num_text, branch_length,
                  key_valid_row, scale, CAUSAL: tl.constexpr, HAS_KEY_VALID: tl.constexpr,
                  HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    dims = tl.arange(0, HEAD_DIM)
    col_ok = cols < n
    k = tl.load(k_base + cols[:, None] * stride_kn + dims[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(v_base + cols[:, None] * stride_kn + dims[None, :], mask=col_ok[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    seen = _visible(rows[:, None], cols[None, :], n, num_text, branch_length, key_valid_row, CAUSAL, HAS_KEY_VALID)
    s = tl.where(seen, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    alpha = tl.exp(m_i - m_shift)
    p = tl.exp(s - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def forward_kernel(Q, K, V, O, LSE, KEY_VALID,
                   stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                   n, num_text, branch_length, num_heads, group, text_blocks, scale,
                   CAUSAL: tl.constexpr, HAS_KEY_VALID: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """O = softmax(scale Q K^T) V over visible pairs and lse per row; grid (query blocks, B*H)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # 64-bit base offsets
    b = bh // num_heads
    h = bh % num_heads
    start, stop, text_hi, branch_lo, branch_hi = _query_block(pid, text_blocks, n, num_text, branch_length,
                                                              CAUSAL, BLOCK_M)
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
    for col_start in range(0, text_hi, BLOCK_N):
        cols = _clip(col_start + tl.arange(0, BLOCK_N), text_hi, n)
        acc, m_i, l_i = _forward_tile(acc, m_i, l_i, q, k_base, v_base, stride_kn, rows_seen, cols, n, num_text,
                                      branch_length, key_valid_row, scale, CAUSAL, HAS_KEY_VALID, HEAD_DIM, PRECISION)
    for col_start in range(branch_lo, branch_hi, BLOCK_N):
        cols = _clip(col_start + tl.arange(0, BLOCK_N), branch_hi, n)
        acc, m_i, l_i = _forward_tile(acc, m_i, l_i, q, k_base, v_base, stride_kn, rows_seen, cols, n, num_text,
                                      branch_length, key_valid_row, scale, CAUSAL, HAS_KEY_VALID, HEAD_DIM, PRECISION)
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
        u = _uniform(row_keys, cols)
        p = tl.where(u < c * p, tl.maximum(p, 1.0 / c), 0.0)
        kept = tl.sum((p > 0).to(tl.int32))
    else:
        kept = 1
    return p, kept


@triton.jit
def _dq_tile(dq, q, do, lse, delta, row_keys, k_base, v_base, stride_kn, rows, cols, n, num_text,
             branch_length, key_valid_row, scale, c, CAUSAL: tl.constexpr, HAS_KEY_VALID: tl.constexpr,
             SUS: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    dims = tl.arange(0, HEAD_DIM)
    col_ok = cols < n
    k = tl.load(k_base + cols[:, None] * stride_kn + dims[None, :], mask=col_ok[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    seen = _visible(rows[:, None], cols[None, :], n, num_text, branch_length, key_valid_row, CAUSAL, HAS_KEY_VALID)
    p = tl.where(seen, tl.exp(s - lse[:, None]), 0.0)
    p, kept = _sus_probs(p, row_keys[:, None], cols[None, :], c, SUS)
    if kept > 0:
        v = tl.load(v_base + cols[:, None] * stride_kn + dims[None, :], mask=col_ok[:, None], other=0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit(do_not_specialize=["seed"])
def backward_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, KEY_VALID,
                       stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                       n, num_text, branch_length, num_heads, group, text_blocks, scale, c, seed,
                       CAUSAL: tl.constexpr, HAS_KEY_VALID: tl.constexpr, SUS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                       PRECISION: tl.constexpr):
    """dQ = scale * (P~ * (dO V^T - D)) K for one query block; grid (query blocks, B*H)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # 64-bit base offsets
    b = bh // num_heads
    h = bh % num_heads
    start, stop, text_hi, branch_lo, branch_hi = _query_block(pid, text_blocks, n, num_text, branch_length,
                                                              CAUSAL, BLOCK_M)
    rows = start + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < stop
    head = b * stride_qb + h * stride_qh
    offsets = rows[:, None] * stride_qn + dims[None, :]
    q = tl.load(Q + head + offsets, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + head + offsets, mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh * n + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh * n + rows, mask=row_ok, other=0.0)
    row_keys = _row_keys(seed, bh, rows)
    k_base = K + b * stride_kb + (h // group) * stride_kh
    v_base = V + b * stride_kb + (h // group) * stride_kh
    key_valid_row = KEY_VALID + b * num_text
    rows_seen = tl.where(row_ok, rows, n)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for col_start in range(0, text_hi, BLOCK_N):
        cols = _clip(col_start + tl.arange(0, BLOCK_N), text_hi, n)
        dq = _dq_tile(dq, q, do, lse, delta, row_keys, k_base, v_base, stride_kn, rows_seen, cols, n, num_text,
                      branch_length, key_valid_row, scale, c, CAUSAL, HAS_KEY_VALID, SUS, HEAD_DIM, PRECISION)
    for col_start in range(branch_lo, branch_hi, BLOCK_N):
        cols = _clip(col_start + tl.arange(0, BLOCK_N), branch_hi, n)
        dq = _dq_tile(dq, q, do, lse, delta, row_keys, k_base, v_base, stride_kn, rows_seen, cols, n, num_text,
                      branch_length, key_valid_row, scale, c, CAUSAL, HAS_KEY_VALID, SUS, HEAD_DIM, PRECISION)
    tl.store(DQ + head + offsets, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dkdv_rows(dk, dv, k, v, cols, q_base, do_base, lse_base, delta_base, stride_qn, bh, seed, row_lo, row_hi, n,
               num_text, branch_length, key_valid_row, scale, c, CAUSAL: tl.constexpr,
               HAS_KEY_VALID: tl.constexpr, SUS: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
               PRECISION: tl.constexpr):
    """Accumulate this key block's dK, dV over query rows [row_lo, row_hi), working transposed ([keys, rows])."""
    dims = tl.arange(0, HEAD_DIM)
    for row_start in range(row_lo, row_hi, BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M)
        row_ok = rows < row_hi
        q = tl.load(q_base + rows[:, None] * stride_qn + dims[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale  # [keys, rows]
        rows_seen = tl.where(row_ok, rows, n)
        seen = _visible(rows_seen[None, :], cols[:, None], n, num_text, branch_length, key_valid_row, CAUSAL,
                        HAS_KEY_VALID)
        p_t = tl.where(seen, tl.exp(s_t - lse[None, :]), 0.0)
        p_t, kept = _sus_probs(p_t, _row_keys(seed, bh, rows)[None, :], cols[:, None], c, SUS)
        if kept > 0:
            do = tl.load(do_base + rows[:, None] * stride_qn + dims[None, :], mask=row_ok[:, None], other=0.0)
            delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["seed"])
def backward_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, KEY_VALID,
                         stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                         n, num_text, branch_length, num_heads, group, text_key_blocks, scale, c, seed,
                         CAUSAL: tl.constexpr, HAS_KEY_VALID: tl.constexpr, SUS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                         PRECISION: tl.constexpr):
    """dV = P~^T dO and dK = scale * (P~ * (dO V^T - D))^T Q for one key block of one key/value head,
    summed over the query heads of its group; grid (key blocks, B*Hkv)."""
    pid = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)  # 64-bit base offsets
    num_kv_heads = num_heads // group
    b = bhk // num_kv_heads
    hk = bhk % num_kv_heads
    if pid < text_key_blocks:
        start = pid * BLOCK_N
        stop = tl.minimum(start + BLOCK_N, num_text)
    else:
        start = num_text + (pid - text_key_blocks) * BLOCK_N
        stop = tl.minimum(start + BLOCK_N, n)
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
    branch_tokens = n - num_text
    for g in range(0, group):
        h = hk * group + g
        bh = b * num_heads + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_qb + h * stride_qh
        lse_base = LSE + bh * n
        delta_base = DELTA + bh * n
        if pid < text_key_blocks:
            text_lo = 0
            if CAUSAL:
                text_lo = start
            dk, dv = _dkdv_rows(dk, dv, k, v, cols_seen, q_base, do_base, lse_base, delta_base, stride_qn, bh, seed,
                                text_lo, num_text, n, num_text, branch_length, key_valid_row, scale, c, CAUSAL,
                                HAS_KEY_VALID, SUS, BLOCK_M, HEAD_DIM, PRECISION)
            # Branches of positions j >= start, in each sample: a contiguous run of rows per sample.
            sample_rows = num_text * branch_length
            for sample_start in range(num_text, num_text + branch_tokens, sample_rows):
                dk, dv = _dkdv_rows(dk, dv, k, v, cols_seen, q_base, do_base, lse_base, delta_base, stride_qn, bh,
                                    seed, sample_start + start * branch_length, sample_start + sample_rows, n,
                                    num_text, branch_length, key_valid_row, scale, c, CAUSAL, HAS_KEY_VALID, SUS,
                                    BLOCK_M, HEAD_DIM, PRECISION)
        else:
            last_segment = (stop - 1 - num_text) // branch_length
            row_hi = num_text + (last_segment + 1) * branch_length
            dk, dv = _dkdv_rows(dk, dv, k, v, cols_seen, q_base, do_base, lse_base, delta_base, stride_qn, bh, seed,
                                start, row_hi, n, num_text, branch_length, key_valid_row, scale, c, CAUSAL,
                                HAS_KEY_VALID, SUS, BLOCK_M, HEAD_DIM, PRECISION)
    tl.store(DK + kv_head + kv_offsets, (dk * scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + kv_head + kv_offsets, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])
