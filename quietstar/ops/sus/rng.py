"""Counter-based uniform random numbers: u(seed, bh, row, col), identical in PyTorch and Triton.

SUS keeps attention weight (row, col) of head ``bh`` when ``u < c * P``. Deriving u from a hash of
its coordinates instead of a stateful generator means the forward, both backward kernels and a
test in plain PyTorch all see the very same mask without storing it.

The mixing function is Chris Wellons' "lowbias32" integer hash. Per (seed, bh) a stream key is
hashed once, per row a row key, and per element only one hash of ``row_key ^ col * GOLDEN``, so
the per-element cost in a kernel is two multiplies and three xor-shifts. ``u`` keeps the top 24
bits, so it is exact in fp32 and lies in [0, 1 - 2^-24].
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B1  # odd, 2^32 / golden ratio: spreads consecutive columns over the whole word
HASH_MUL_1 = 0x7FEB352D
HASH_MUL_2 = 0x846CA68B
UNIFORM_SCALE = 2.0**-24


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding unsigned 32-bit values (products wrap, then are masked)."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = (x * HASH_MUL_1) & MASK32
    x = x ^ (x >> 15)
    x = (x * HASH_MUL_2) & MASK32
    return x ^ (x >> 16)


def stream_key(seed: int, bh: torch.Tensor) -> torch.Tensor:
    """Key of the random stream of head ``bh`` (= batch * num_heads + head) for ``seed`` (low 32 bits used)."""
    bh = torch.as_tensor(bh, dtype=torch.int64)
    return hash32((seed & MASK32) ^ hash32(bh * GOLDEN + 1))


def row_key(stream: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    return hash32(stream ^ hash32(row.to(torch.int64)))


def uniform_from_keys(row_keys: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """u for every (row key, column) pair, broadcasting; float32 in [0, 1)."""
    bits = hash32(row_keys ^ ((col.to(torch.int64) * GOLDEN) & MASK32))
    return (bits >> 8).to(torch.float32) * UNIFORM_SCALE


def uniform(seed: int, bh: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """u(seed, bh, row, col), broadcasting ``bh``, ``row`` and ``col`` against each other."""
    return uniform_from_keys(row_key(stream_key(seed, bh), row), col)
