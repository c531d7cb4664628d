"""SUS backward, design A: every attention weight drawn on its own. PyTorch reference.

Each visible weight P_ij is kept when u_ij < c P_ij (probability q_ij = min(1, c P_ij)) and then stands as
P~_ij = max(P_ij, 1/c) = P_ij / q_ij; a dropped one counts 0. u is the counter-based uniform of :mod:`.rng` at the
pair's global (row, col) in the row of n tokens, so any mask can be rebuilt from the seed. The gradients are those
of :func:`.reference.attention_backward` with P~ in place of P (README.md of this folder).
"""

from __future__ import annotations

import torch

from . import reference, rng


def sus_weights(probs: torch.Tensor, u: torch.Tensor, c: float) -> torch.Tensor:
    """P~ = max(P, 1/c) where u < c P, else 0: each weight kept with probability min(1, cP), rescaled by 1/q."""
    return torch.where(u < c * probs, torch.clamp(probs, min=1.0 / c), torch.zeros_like(probs))


def sampled_weights(pieces: list[reference.Piece], probs: list[torch.Tensor], c: float,
                    seed: int) -> list[torch.Tensor]:
    """P~ of every piece: probabilities ``[B, H, ..., R, C]`` -> the same shape."""
    B, H = probs[0].shape[:2]
    bh = torch.arange(B * H, device=probs[0].device).view(B, H)
    sampled = []
    for piece, p in zip(pieces, probs):
        stream = rng.stream_key(seed, bh.view(B, H, *([1] * (p.dim() - 2))))
        sampled.append(sus_weights(p, rng.uniform_from_keys(rng.row_key(stream, piece.rows), piece.cols), c))
    return sampled


def attention_backward(q, k, v, o, lse, do, scale, num_text, branch_length=0, causal=True, key_valid=None,
                       c=None, seed=0, window=None, softcap=None):
    """Gradients (dq, dk, dv) in fp32 (fp64 for fp64 inputs), exact (``c=None``) or SUS with parameter ``c`` and
    ``seed``."""
    draw = None if c is None else lambda pieces, probs: sampled_weights(pieces, probs, c, seed)
    return reference.attention_backward(q, k, v, o, lse, do, scale, num_text, branch_length, causal, key_valid,
                                        window, softcap, sampled_weights=draw)
