"""Triton kernels of SUS design C (design_c_reference.py holds the sampling and its derivation).

* ``forward_kernel``: the exact forward of :mod:`.design_a_kernels` with key blocks of exactly one key tile, which also
  draws level 1. In the loop it writes the tile log-sum-exp l_it = log sum_{j in t} exp(S_ij) per (row, key tile)
  into CELL_PI (one log and one store per row per tile); once the row's lse is final it reads them back and
  overwrites each with pi_it = min(1, c exp(l_it - lse_i)) where u1_it < pi_it, else 0 (one hash per row per
  tile). Branch key loops start at a tile boundary (a few invisible columns more) so that every block is one
  tile of design_c_reference.key_tile's numbering.
* ``backward_kernel``: one program per (key tile, key/value head). For each query head of the group it walks
  the rows that opened the tile (gathered by the launch, BLOCK_M at a time: dense tensor-core tiles of
  gathered rows), recomputes P for them, keeps entry (i, j) when u2_ij * pi_it < min(1, c P_ij), and
  accumulates dK and dV in registers and dQ of the gathered rows by fp32 atomics.

The forward's visibility rule and block geometry and the hash come from :mod:`.common_kernels`, as design A's do,
so both designs see one attention pattern and one random stream; the backward's visibility is one span per row and
key tile (:func:`_visible_span`), tested against the reference on every pattern.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common_kernels import clip, pairs_seen, query_block, row_keys_for, uniform


@triton.jit
def _visible_span(rows, text_tile, n, num_text, branch_length, CAUSAL: tl.constexpr):
    """Within one key tile, the keys row r sees form one span [lo, hi] (padding aside): a text tile holds text keys
    0..limit(r) (limit = r for a text row, its position j for a branch row), a branch tile the keys of r's own
    branch up to r. Two compares per score instead of the general rule of :func:`.common_kernels.visible`."""
    row_is_text = rows < num_text
    row_segment = (rows - num_text) // branch_length  # only used where rows >= num_text
    if text_tile:
        lo = tl.zeros_like(rows)
        hi = tl.where(row_is_text, rows, row_segment % num_text)
        if not CAUSAL:
            hi = tl.zeros_like(rows) + (num_text - 1)
    else:
        lo = tl.where(row_is_text, n, num_text + row_segment * branch_length)
        hi = rows
    lo = tl.where(rows < n, lo, n)  # rows past the list see nothing
    return lo, hi


@triton.jit
def _forward_tile(acc, m_i, l_i, q, k_base, v_base, stride_kn, rows, col_start, hi, n, num_text, branch_length,
                  key_valid_row, scale, cell_ptrs, row_ok, CAUSAL: tl.constexpr, HAS_KEY_VALID: tl.constexpr,
                  MASKED: tl.constexpr, TILE: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """design A's ``_forward_tile`` (no window, no soft-capping) that also stores the tile's log-sum-exp per row."""
    dims = tl.arange(0, HEAD_DIM)
    cols = clip(col_start + tl.arange(0, TILE), hi, n)
    col_ok = cols < n
    k = tl.load(k_base + cols[:, None] * stride_kn + dims[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(v_base + cols[:, None] * stride_kn + dims[None, :], mask=col_ok[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    if MASKED or HAS_KEY_VALID:
        seen = pairs_seen(rows[:, None], cols[None, :], n, num_text, branch_length, key_valid_row, 0, CAUSAL,
                     HAS_KEY_VALID, False, MASKED)
        s = tl.where(seen, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    alpha = tl.exp(m_i - m_shift)
    p = tl.exp(s - m_shift[:, None])
    tile_sum = tl.sum(p, 1)
    # log-sum-exp of this tile alone, from the running shift (underflows only for mass below e^-87 of the row max)
    tile_lse = tl.where(tile_sum > 0, m_shift + tl.log(tl.where(tile_sum > 0, tile_sum, 1.0)), float("-inf"))
    tl.store(cell_ptrs + col_start // TILE, tile_lse, mask=row_ok)
    l_i = l_i * alpha + tile_sum
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _open_cells(cell_ptrs, tile, lse, rows, row_keys, row_ok, c):
    """Level 1 for one tile of the block's rows: l_it read back, pi_it if the cell opens, else 0, written over it."""
    tile_lse = tl.load(cell_ptrs + tile, mask=row_ok, other=float("-inf"))
    pi = tl.minimum(c * tl.exp(tile_lse - lse), 1.0)  # -inf tiles and rows that see nothing (lse = +inf) give 0
    u = uniform(row_keys, tl.zeros_like(rows) + tile)
    tl.store(cell_ptrs + tile, tl.where(u < pi, pi, 0.0), mask=row_ok)


@triton.jit(do_not_specialize=["seed"])
def forward_kernel(Q, K, V, O, LSE, CELL_PI, KEY_VALID,
                   stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                   n, num_text, branch_length, num_heads, group, text_blocks, text_tiles, num_tiles, scale, c, seed,
                   CAUSAL: tl.constexpr, HAS_KEY_VALID: tl.constexpr, BLOCK_M: tl.constexpr,
                   TILE: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """O, lse per row, and level 1 per (row, key tile): CELL_PI ``[B*H, n, num_tiles]`` (zeroed before) gets pi_it for
    an opened cell, 0 for a closed one; grid (query blocks, B*H)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # 64-bit base offsets
    b = bh // num_heads
    h = bh % num_heads
    (start, stop, text_lo, text_mid_lo, text_mid_hi, text_hi,
     branch_lo, _, _, branch_hi) = query_block(pid, text_blocks, n, num_text, branch_length, 0, CAUSAL, False,
                                                BLOCK_M, TILE)
    if branch_hi > branch_lo:  # a branch block: its key tiles start at tile boundaries counted from L
        branch_lo = num_text + (branch_lo - num_text) // TILE * TILE
    rows = start + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < stop
    q_base = Q + b * stride_qb + h * stride_qh
    q = tl.load(q_base + rows[:, None] * stride_qn + dims[None, :], mask=row_ok[:, None], other=0.0)
    k_base = K + b * stride_kb + (h // group) * stride_kh
    v_base = V + b * stride_kb + (h // group) * stride_kh
    key_valid_row = KEY_VALID + b * num_text
    rows_seen = tl.where(row_ok, rows, n)  # rows past the block see nothing
    cell_rows = CELL_PI + bh * n * num_tiles + rows * num_tiles
    branch_cells = cell_rows + text_tiles - num_text // TILE  # + col_start // TILE: tile text_tiles + (col - L) / TILE

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # text keys in the three runs of common_kernels.tile_split: boundary tiles masked, tiles every row sees whole not
    for col_start in range(text_lo, text_mid_lo, TILE):
        acc, m_i, l_i = _forward_tile(acc, m_i, l_i, q, k_base, v_base, stride_kn, rows_seen, col_start, text_hi, n,
                                      num_text, branch_length, key_valid_row, scale, cell_rows, row_ok, CAUSAL,
                                      HAS_KEY_VALID, True, TILE, HEAD_DIM, PRECISION)
    for col_start in range(text_mid_lo, text_mid_hi, TILE):
        acc, m_i, l_i = _forward_tile(acc, m_i, l_i, q, k_base, v_base, stride_kn, rows_seen, col_start, text_hi, n,
                                      num_text, branch_length, key_valid_row, scale, cell_rows, row_ok, CAUSAL,
                                      HAS_KEY_VALID, False, TILE, HEAD_DIM, PRECISION)
    for col_start in range(text_mid_hi, text_hi, TILE):
        acc, m_i, l_i = _forward_tile(acc, m_i, l_i, q, k_base, v_base, stride_kn, rows_seen, col_start, text_hi, n,
                                      num_text, branch_length, key_valid_row, scale, cell_rows, row_ok, CAUSAL,
                                      HAS_KEY_VALID, True, TILE, HEAD_DIM, PRECISION)
    for col_start in range(branch_lo, branch_hi, TILE):  # a few tiles of the block's own branches: all masked
        acc, m_i, l_i = _forward_tile(acc, m_i, l_i, q, k_base, v_base, stride_kn, rows_seen, col_start, branch_hi,
                                      n, num_text, branch_length, key_valid_row, scale, branch_cells, row_ok, CAUSAL,
                                      HAS_KEY_VALID, True, TILE, HEAD_DIM, PRECISION)
    seen_any = l_i > 0
    out = acc / tl.where(seen_any, l_i, 1.0)[:, None]
    lse = tl.where(seen_any, m_i + tl.log(tl.where(seen_any, l_i, 1.0)), float("inf"))
    o_base = O + b * stride_qb + h * stride_qh
    tl.store(o_base + rows[:, None] * stride_qn + dims[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh * n + rows, lse, mask=row_ok)

    tl.debug_barrier()  # the loop's l_it stores, from any thread of the program, are read back below
    row_keys = row_keys_for(seed.to(tl.uint32) | 0x80000000, bh, rows)  # level 1's stream (LEVEL1_STREAM)
    for tile in range(0, tl.cdiv(text_hi, TILE)):
        _open_cells(cell_rows, tile, lse, rows, row_keys, row_ok, c)
    for col_start in range(branch_lo, branch_hi, TILE):
        _open_cells(cell_rows, text_tiles + (col_start - num_text) // TILE, lse, rows, row_keys, row_ok, c)


@triton.jit
def _opened_rows(dk, dv, k, v, cols, col_ok, text_tile, Q, DO, DQ, LSE, DELTA, ROWS, PI, first, count, q_base,
                 do_base, stride_qn, bh, seed, n, num_text, branch_length, scale, c, CAUSAL: tl.constexpr,
                 BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """dK, dV of this key tile from the ``count`` rows of head ``bh`` that opened it (ROWS/PI from ``first``), and
    their dQ added atomically; works transposed ([keys, rows]) like design A's dK/dV kernel."""
    dims = tl.arange(0, HEAD_DIM)
    dq_head = DQ + bh * n * HEAD_DIM
    for chunk in range(0, count, BLOCK_M):
        index = chunk + tl.arange(0, BLOCK_M)
        ok = index < count
        rows = tl.load(ROWS + first + index, mask=ok, other=0)
        pi = tl.load(PI + first + index, mask=ok, other=1.0)
        offsets = rows[:, None] * stride_qn + dims[None, :]
        q = tl.load(q_base + offsets, mask=ok[:, None], other=0.0)
        do = tl.load(do_base + offsets, mask=ok[:, None], other=0.0)
        lse = tl.load(LSE + bh * n + rows, mask=ok, other=float("inf"))
        delta = tl.load(DELTA + bh * n + rows, mask=ok, other=0.0)
        lo, hi = _visible_span(tl.where(ok, rows, n), text_tile, n, num_text, branch_length, CAUSAL)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale  # [keys, rows]
        seen = (cols[:, None] >= lo[None, :]) & (cols[:, None] <= hi[None, :]) & col_ok[:, None]
        p_t = tl.where(seen, tl.exp(s_t - lse[None, :]), 0.0)
        keep_prob = tl.minimum(c * p_t, 1.0)
        u = uniform(row_keys_for(seed, bh, rows)[None, :], cols[:, None])
        p_t = tl.where(u * pi[None, :] < keep_prob, tl.maximum(p_t, 1.0 / c), 0.0)  # level 2: q / pi given open
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
        dq = tl.dot(tl.trans(ds_t).to(k.dtype), k, input_precision=PRECISION)  # [rows, HEAD_DIM]
        tl.atomic_add(dq_head + rows[:, None] * HEAD_DIM + dims[None, :], dq * scale, mask=ok[:, None])
    return dk, dv


@triton.jit(do_not_specialize=["seed"])
def backward_kernel(Q, K, V, DO, DQ, DK, DV, LSE, DELTA, KEY_VALID, ROWS, PI, CELL_FIRST, CELL_COUNT,
                    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                    n, num_text, branch_length, num_heads, group, text_tiles, num_tiles, scale, c, seed,
                    CAUSAL: tl.constexpr, HAS_KEY_VALID: tl.constexpr, BLOCK_M: tl.constexpr, TILE: tl.constexpr,
                    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """Design C's SUS backward for one key tile of one key/value head, over the query heads of its group;
    grid (key tiles, B*Hkv). DQ ``[B, H, n, HEAD_DIM]`` fp32, zeroed before; cell (bh, tile) lists its opened rows
    at ROWS[CELL_FIRST[cell] :][: CELL_COUNT[cell]] with their pi at PI, cell = bh * num_tiles + tile."""
    pid = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)  # 64-bit base offsets
    num_kv_heads = num_heads // group
    b = bhk // num_kv_heads
    hk = bhk % num_kv_heads
    if pid < text_tiles:
        start = pid * TILE
        stop = tl.minimum(start + TILE, num_text)
    else:
        start = num_text + (pid - text_tiles) * TILE
        stop = tl.minimum(start + TILE, n)
    cols = start + tl.arange(0, TILE)
    dims = tl.arange(0, HEAD_DIM)
    col_ok = cols < stop
    kv_head = b * stride_kb + hk * stride_kh
    kv_offsets = cols[:, None] * stride_kn + dims[None, :]
    k = tl.load(K + kv_head + kv_offsets, mask=col_ok[:, None], other=0.0)
    v = tl.load(V + kv_head + kv_offsets, mask=col_ok[:, None], other=0.0)
    text_tile = pid < text_tiles
    col_seen = col_ok
    if HAS_KEY_VALID:
        if text_tile:  # padding keys: seen by nobody
            col_seen = col_seen & (tl.load(KEY_VALID + b * num_text + cols, mask=col_ok, other=0) != 0)
    dk = tl.zeros([TILE, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([TILE, HEAD_DIM], dtype=tl.float32)
    for g in range(0, group):
        h = hk * group + g
        bh = b * num_heads + h
        cell = bh * num_tiles + pid
        first = tl.load(CELL_FIRST + cell)
        count = tl.load(CELL_COUNT + cell)
        dk, dv = _opened_rows(dk, dv, k, v, cols, col_seen, text_tile, Q, DO, DQ, LSE, DELTA, ROWS, PI, first, count,
                              Q + b * stride_qb + h * stride_qh, DO + b * stride_qb + h * stride_qh, stride_qn, bh,
                              seed, n, num_text, branch_length, scale, c, CAUSAL, BLOCK_M, HEAD_DIM, PRECISION)
    tl.store(DK + kv_head + kv_offsets, (dk * scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + kv_head + kv_offsets, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])
