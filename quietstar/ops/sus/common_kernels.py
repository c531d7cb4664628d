"""Triton helpers that both SUS designs' kernels call: the counter-based uniform (bit for bit :mod:`.rng`'s), the
attention pattern of :mod:`.reference` on index tensors (position ids, visibility, padding keys), and the tile
ranges a block of query rows visits.

The pattern: plain (causal or not) over the whole row, or the thought layout (L text tokens, then branches of S
tokens, docs/design.md §2); a sliding window (``WINDOWED``, window W) keeps a pair only if pos(row) - pos(col) < W,
with position ids text i at i, branch token k of position j at j + 1 + k. Text blocks and branch blocks are numbered
separately so that no block straddles the two.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def hash32(x):
    # lowbias32 on uint32 (wrapping multiplies); must match rng.hash32 bit for bit.
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def row_keys_for(seed, bh, rows):
    """The row keys of head ``bh``'s stream for ``seed``, one per row (uint32): rng.row_key(rng.stream_key(...))."""
    stream = hash32(seed.to(tl.uint32) ^ hash32(bh.to(tl.uint32) * 0x9E3779B1 + 1))
    return hash32(stream ^ hash32(rows.to(tl.uint32)))


@triton.jit
def uniform(row_keys, cols):
    """u for broadcastable row keys (uint32) and column indices; fp32 in [0, 1)."""
    bits = hash32(row_keys ^ (cols.to(tl.uint32) * 0x9E3779B1))
    return (bits >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2^-24


@triton.jit
def position_ids(index, num_text, branch_length):
    """Position ids of global indices (text i at i, branch token k of position j at j + 1 + k); as
    reference.positions."""
    offset = tl.maximum(index - num_text, 0)
    return tl.where(index < num_text, index, (offset // branch_length) % num_text + 1 + offset % branch_length)


@triton.jit
def visible(rows, cols, n, num_text, branch_length, key_valid_row, window, CAUSAL: tl.constexpr,
             HAS_KEY_VALID: tl.constexpr, WINDOWED: tl.constexpr):
    """Visibility of broadcastable (row, col) index tensors; rows and cols outside [0, n) are invisible."""
    row_is_text = rows < num_text
    row_segment = (rows - num_text) // branch_length  # only used where rows >= num_text
    limit = tl.where(row_is_text, rows, row_segment % num_text)
    col_is_text = cols < num_text
    text_ok = col_is_text
    if CAUSAL:
        text_ok = text_ok & (cols <= limit)
    if HAS_KEY_VALID:
        text_ok = text_ok & key_is_valid(key_valid_row, cols, num_text)
    col_segment = (cols - num_text) // branch_length
    branch_ok = (cols >= num_text) & (rows >= num_text) & (col_segment == row_segment) & (cols <= rows)
    seen = (text_ok | branch_ok) & (rows < n) & (cols < n)
    if WINDOWED:
        gap = position_ids(rows, num_text, branch_length) - position_ids(cols, num_text, branch_length)
        seen = seen & (gap < window)
    return seen


@triton.jit
def key_is_valid(key_valid_row, cols, num_text):
    """Whether each key is not padding (branch keys never are)."""
    return tl.load(key_valid_row + cols, mask=(cols < num_text) & (cols >= 0), other=1) != 0


@triton.jit
def pairs_seen(rows, cols, n, num_text, branch_length, key_valid_row, window, CAUSAL: tl.constexpr,
          HAS_KEY_VALID: tl.constexpr, WINDOWED: tl.constexpr, MASKED: tl.constexpr):
    """Which pairs of a tile count: the full rule on boundary tiles (``MASKED``), only padding keys on tiles every row
    sees whole (callers skip this when neither applies). ``rows``/``cols`` broadcast to the tile's shape."""
    if MASKED:
        seen = visible(rows, cols, n, num_text, branch_length, key_valid_row, window, CAUSAL, HAS_KEY_VALID,
                        WINDOWED)
    else:
        seen = key_is_valid(key_valid_row, cols, num_text) & (rows >= 0)
    return seen


@triton.jit
def clip(index, hi, n):
    """Indices at or past the end of their range become n, which nobody sees (so no tile counts twice)."""
    return tl.where(index < hi, index, n)


@triton.jit
def tile_split(origin, band_lo, hi, full_lo, full_hi, BLOCK: tl.constexpr):
    """Split the tiles origin + t * BLOCK that meet [band_lo, hi) into three runs of tile starts:
    [lo, mid_lo) and [mid_hi, hi) are boundary tiles, [mid_lo, mid_hi) the tiles wholly inside [full_lo, full_hi).

    Tiles before band_lo are skipped (the window); every tile is in exactly one run; an empty range gives
    lo = mid_lo = mid_hi >= hi. Differences are clamped at 0 before dividing (integer division truncates).
    """
    lo = origin + tl.maximum(band_lo - origin, 0) // BLOCK * BLOCK
    end = lo + (tl.maximum(hi - lo, 0) + BLOCK - 1) // BLOCK * BLOCK
    mid_lo = tl.minimum(lo + (tl.maximum(full_lo - lo, 0) + BLOCK - 1) // BLOCK * BLOCK, end)
    mid_hi = tl.maximum(lo + tl.maximum(tl.minimum(full_hi, hi) - lo, 0) // BLOCK * BLOCK, mid_lo)
    return lo, mid_lo, mid_hi


@triton.jit
def query_block(pid, text_blocks, n, num_text, branch_length, window, CAUSAL: tl.constexpr,
                 WINDOWED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows [start, stop) of query block ``pid`` and, for its text keys and its branch keys, the tile runs of
    :func:`tile_split`: (text_lo, text_mid_lo, text_mid_hi, text_hi), (branch_lo, ..., branch_hi)."""
    if pid < text_blocks:
        start = pid * BLOCK_M
        stop = tl.minimum(start + BLOCK_M, num_text)
        text_hi = num_text
        full_hi = num_text
        if CAUSAL:
            text_hi = stop
            full_hi = start + 1  # columns up to the first row are seen by every row
        band_lo = 0
        full_lo = 0
        if WINDOWED:
            band_lo = start - window + 1  # the first row's window
            full_lo = stop - window  # inside the last row's window
        branch_origin = 0
        branch_band_lo = 0
        branch_hi = 0
        branch_full_lo = 0
        branch_full_hi = 0
    else:
        start = num_text + (pid - text_blocks) * BLOCK_M
        stop = tl.minimum(start + BLOCK_M, n)
        first_segment = (start - num_text) // branch_length
        last_segment = (stop - 1 - num_text) // branch_length
        first_position = first_segment % num_text
        wraps = last_segment - first_segment >= num_text - first_position  # the block wraps past position L-1
        text_hi = tl.where(wraps, num_text, last_segment % num_text + 1)
        lowest_position = tl.where(wraps, 0, first_position)  # the smallest text position j among its segments
        full_hi = lowest_position + 1
        band_lo = 0
        full_lo = 0
        if WINDOWED:
            band_lo = lowest_position + 2 - window  # position ids are at least j + 1
            full_lo = text_hi + branch_length - window  # position ids are at most (text_hi - 1) + S
        branch_origin = num_text + first_segment * branch_length
        branch_band_lo = branch_origin
        branch_hi = stop
        branch_full_lo = branch_origin
        branch_full_hi = tl.where(first_segment == last_segment, start + 1, branch_origin)  # one segment or none
        if WINDOWED:
            branch_band_lo = start - window + 1
            branch_full_lo = stop - window
    text_lo, text_mid_lo, text_mid_hi = tile_split(0, band_lo, text_hi, full_lo, full_hi, BLOCK_N)
    branch_lo, branch_mid_lo, branch_mid_hi = tile_split(branch_origin, branch_band_lo, branch_hi, branch_full_lo,
                                                          branch_full_hi, BLOCK_N)
    return (start, stop, text_lo, text_mid_lo, text_mid_hi, text_hi,
            branch_lo, branch_mid_lo, branch_mid_hi, branch_hi)
