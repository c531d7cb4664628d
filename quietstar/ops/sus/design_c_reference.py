"""SUS backward, design C: two-level sampling at (row, key-tile) granularity. PyTorch reference.

Design A (``design_a_reference.py``, ``design_a_kernels.py``) draws every attention weight on its own, so its backward
must visit every visible tile to find the few kept entries. Design C draws in two levels so that the
backward visits only the (row, key tile) cells it opened.

**Key tiles.** Keys are cut into tiles of ``tile`` columns (64, the kernels' key block), numbered as
the kernels number their blocks: text tiles [0, T), [T, 2T), ... up to L, then branch tiles from L
on: tile(j) = j // T for j < L, else ceil(L / T) + (j - L) // T. Plain attention has L = n.

**Level 1 (row, tile).** m_it = sum over j in tile t of P_ij is row i's softmax mass on tile t. The
cell opens with probability pi_it = min(1, c m_it), by u1_it < pi_it, u1 the counter-based uniform
of :mod:`.rng` at (seed with bit 31 set, bh, row i, tile t): one hash per row per tile, a stream
that no (31-bit) SUS seed of level 2 shares.

**Level 2 (entry).** In an open cell, entry (i, j) is kept when u2_ij * pi_it < q_ij, with
q_ij = min(1, c P_ij) and u2 design A's uniform at (seed, bh, i, j): probability q_ij / pi_it, which
is at most 1 because P_ij <= m_it. Overall, entry (i, j) is kept with probability
pi_it * q_ij / pi_it = q_ij, exactly design A's marginal, and a kept entry stands as
P~_ij = P_ij / q_ij = max(P_ij, 1/c). So E[P~] = P and every gradient (linear in P~) is unbiased, with
design A's per-entry variance Var P~_ij = P_ij^2 (1/q_ij - 1).

**Dependence.** Entries in different cells are independent (different rows or different level-1
draws; level-2 draws are independent of everything). Two entries j != k of one cell share the
level-1 draw: P(both kept) = pi q_j/pi q_k/pi, so Cov(P~_ij, P~_ik) = P_ij P_ik (1/pi_it - 1),
which vanishes for cells with pi = 1 (mass >= 1/c). Hence:

* dV_j = sum_i P~_ij dO_i and dK_j = s sum_i dS_ij Q_i sum over rows of one column, one entry per
  cell: their variance is design A's, sum_i Var(P~_ij) (...)^2.
* dQ_i = s sum_j dS_ij K_j sums over the entries of row i's cells: with a_j = (dP_ij - D_i) K_je,
  Var dQ_ie = s^2 sum_t [ sum_{j in t} a_j^2 P_ij^2 (1/q_ij - 1/pi_it) + (1/pi_it - 1) (sum_{j in t} a_j P_ij)^2 ].

**Work.** A row opens sum_t pi_it <= min(#tiles, c sum_t m_it) = min(#tiles, c) cells on average, whatever n
is; the backward gathers, per key tile, the rows that opened it and runs the dense tile math on them only.

**What the kernels store.** The forward (``design_c_kernels.py``) writes the tile log-sum-exp
l_it = log sum_{j in t} exp(S_ij) per (row, tile) as it goes; once lse_i is final it reads them back,
m_it = exp(l_it - lse_i), and draws level 1 (one hash per row per tile), keeping pi_it for an opened cell
and 0 for a closed one: fp32, 4 * ceil(n / 64) bytes per row and head (n = 16k: 1 KiB per row and head,
16 MiB per head), saved for the backward next to lse. This reference gets m_it by summing P instead; the
two agree to fp32 rounding, so kernel and reference open the same cells except for a draw within rounding
of pi.
The rounding can also make pi a hair below q_ij; the entry is then kept with probability pi, a bias
of the order of fp32 rounding.
"""

from __future__ import annotations

import torch

from . import reference, rng
from .limits import SEED_MASK

TILE = 64  # key tile: part of the estimator's distribution (which entries share a level-1 draw), so fixed
LEVEL1_STREAM = SEED_MASK + 1  # seeds are 31-bit (SEED_MASK): bit 31 gives level 1 a stream of its own


def num_key_tiles(n: int, num_text: int, tile: int = TILE) -> int:
    return -(-num_text // tile) + -(-(n - num_text) // tile)


def key_tile(cols: torch.Tensor, num_text: int, tile: int = TILE) -> torch.Tensor:
    """Key tile of global column indices: text tiles from 0, then branch tiles from L."""
    text_tiles = -(-num_text // tile)
    return torch.where(cols < num_text, torch.div(cols, tile, rounding_mode="floor"),
                       text_tiles + torch.div(cols - num_text, tile, rounding_mode="floor"))


def open_cells(mass: torch.Tensor, c: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Level 1: mass ``[B, H, n, tiles]`` -> (open ``[B, H, n, tiles]`` bool, pi = min(1, c * mass) fp32)."""
    B, H, n, tiles = mass.shape
    pi = torch.clamp(c * mass.float(), max=1.0)
    bh = torch.arange(B * H, device=mass.device).view(B, H, 1, 1)
    u1 = rng.uniform(seed | LEVEL1_STREAM, bh, torch.arange(n, device=mass.device)[:, None],
                     torch.arange(tiles, device=mass.device)[None, :])
    return u1 < pi, pi


def kept_weights(probs: torch.Tensor, u2: torch.Tensor, cell_open: torch.Tensor, cell_pi: torch.Tensor,
                 c: float) -> torch.Tensor:
    """Level 2, elementwise over broadcastable tensors: P~ = max(P, 1/c) where the cell is open and
    u2 * pi < min(1, cP), else 0."""
    keep_prob = torch.clamp(c * probs.float(), max=1.0)
    kept = cell_open & (u2 * cell_pi < keep_prob)
    return torch.where(kept, torch.clamp(probs, min=1.0 / c), torch.zeros_like(probs))


def _cell_tiles(piece, num_text, tile, shape):
    """Key tile of every entry of a piece, expanded to its probabilities' shape (an index for gather/scatter)."""
    return key_tile(piece.cols, num_text, tile).expand(shape)


def tile_mass(pieces, probs, B, H, n, num_text, tile=TILE) -> torch.Tensor:
    """m_it = sum_{j in tile t} P_ij, ``[B, H, n, tiles]``, from the pieces' probabilities."""
    mass = probs[0].new_zeros(B, H, n, num_key_tiles(n, num_text, tile))
    for piece, p in zip(pieces, probs):
        piece.q_view(mass).scatter_add_(-1, _cell_tiles(piece, num_text, tile, p.shape), p)  # views write through
    return mass


def sampled_weights(pieces: list[reference.Piece], probs: list[torch.Tensor], n: int, num_text: int, c: float,
                    seed: int, tile: int = TILE) -> list[torch.Tensor]:
    """P~ of every piece of a row of n tokens, by the two levels: probabilities ``[B, H, ..., R, C]`` -> the same
    shape."""
    B, H = probs[0].shape[:2]
    cell_open, cell_pi = open_cells(tile_mass(pieces, probs, B, H, n, num_text, tile), c, seed)
    bh = torch.arange(B * H, device=probs[0].device).view(B, H)
    sampled = []
    for piece, p in zip(pieces, probs):
        index = _cell_tiles(piece, num_text, tile, p.shape)
        stream = rng.stream_key(seed, bh.view(B, H, *([1] * (p.dim() - 2))))
        u2 = rng.uniform_from_keys(rng.row_key(stream, piece.rows), piece.cols)
        sampled.append(kept_weights(p, u2, piece.q_view(cell_open).gather(-1, index),
                                    piece.q_view(cell_pi).gather(-1, index), c))
    return sampled


def attention_backward(q, k, v, o, lse, do, scale, num_text, branch_length=0, causal=True, key_valid=None,
                       c=None, seed=0, tile=TILE):
    """SUS gradients (dq, dk, dv) of design C, in fp32 (fp64 for fp64 inputs); ``c=None`` is the exact backward.
    No window, no soft-capping (function.check_inputs refuses them)."""
    n = q.shape[2]
    draw = None if c is None else lambda pieces, probs: sampled_weights(pieces, probs, n, num_text, c, seed, tile)
    return reference.attention_backward(q, k, v, o, lse, do, scale, num_text, branch_length, causal, key_valid,
                                        sampled_weights=draw)
