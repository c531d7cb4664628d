"""SUS design C (two-level sampling per (row, key tile)), PyTorch reference: against an independent dense
computation, and its statistics.

The dense oracle builds the whole n x n probability matrix, sums it per key tile, draws level 1 and level 2
with :mod:`quietstar.ops.sus.rng` and applies the gradient formulas; the reference works per piece of the
thought layout without an n x n tensor. Statistics as in tests/test_sus.py: z-test of every gradient element
(Bonferroni, false-alarm rate 1e-3), empirical against analytic variance, where design C's dQ variance has the
within-cell covariance term (module docstring of design_c_reference.py) and dK, dV have design A's; each check also
fails for a wrong estimator.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from quietstar.ops.sus import attention, design_c_reference, reference, rng
from quietstar.ops.sus.reference import visible

FALSE_ALARM = 1e-3
TILE = 8  # small key tiles so that tiny problems have several per row


def _inputs(B=1, H=2, Hkv=2, n=24, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, d, generator=g, dtype=dtype) for h in (H, Hkv, Hkv))
    return q, k, v, torch.randn(B, H, n, d, generator=g, dtype=dtype)


def _reference_grads(q, k, v, do, scale, c, seed, tile=TILE, **pattern):
    pattern.setdefault("num_text", q.shape[2])
    o, lse = reference.attention_forward(q, k, v, scale, **pattern)
    return design_c_reference.attention_backward(q, k, v, o, lse, do, scale, **pattern, c=c, seed=seed, tile=tile)


# ---------------------------------------------------------------------------- the dense oracle

def _dense(q, k, v, do, scale, num_text, branch_length=0, key_valid=None):
    """(P, dP - D, mask) over the full n x n matrix, every head expanded; rows that see nothing get P = 0."""
    B, H, n, _ = q.shape
    k, v = (x.repeat_interleave(H // x.shape[1], dim=1) for x in (k, v))
    mask = visible(torch.arange(n)[:, None], torch.arange(n)[None], num_text, branch_length).expand(B, 1, n, n)
    if key_valid is not None:
        mask = mask & (torch.cat([key_valid, torch.ones(B, n - num_text, dtype=torch.bool)], 1)[:, None, None, :])
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
    o = p @ v
    return p, do @ v.transpose(-1, -2) - (do * o).sum(-1, keepdim=True), k, v


def _tile_of_columns(n, num_text, tile):
    return design_c_reference.key_tile(torch.arange(n), num_text, tile)


def _dense_weights(p, c, seed, num_text, tile, conditional=True):
    """Design C's P~ on a dense [B, H, n, n] P; ``conditional=False`` is a wrong estimator that keeps an
    entry of an open cell with probability q instead of q / pi."""
    B, H, n, _ = p.shape
    tiles = _tile_of_columns(n, num_text, tile)
    mass = p.new_zeros(B, H, n, int(tiles.max()) + 1).index_add_(-1, tiles, p)
    pi = torch.clamp(c * mass.float(), max=1.0)  # the draws compare in fp32, as the kernels do
    bh = torch.arange(B * H).view(B, H, 1, 1)
    rows = torch.arange(n)[:, None]
    u1 = rng.uniform(seed | (1 << 31), bh, rows, torch.arange(mass.shape[-1])[None])
    u2 = rng.uniform(seed, bh, rows, torch.arange(n)[None])
    q_keep = torch.clamp(c * p.float(), max=1.0)
    pi_entry, open_entry = pi[..., tiles], (u1 < pi)[..., tiles]
    kept = open_entry & ((u2 * pi_entry < q_keep) if conditional else (u2 < q_keep))
    return torch.where(kept, torch.clamp(p, min=1.0 / c), torch.zeros_like(p))


def _grads_from_weights(q, k, v, do, weights, f, scale, kv_heads):
    B, H, n, d = q.shape
    ds = weights * f
    dk = (scale * ds.transpose(-1, -2) @ q).view(B, kv_heads, H // kv_heads, n, d).sum(2)
    dv = (weights.transpose(-1, -2) @ do).view(B, kv_heads, H // kv_heads, n, d).sum(2)
    return scale * ds @ k, dk, dv


@pytest.mark.parametrize("case", ["causal", "thoughts-padded-gqa", "thoughts-long-branch"])
def test_reference_equals_the_dense_oracle(case):
    B, H, Hkv, L, N, S, pad = {"causal": (1, 2, 2, 29, 0, 0, 0), "thoughts-padded-gqa": (2, 4, 2, 7, 2, 3, 2),
                               "thoughts-long-branch": (1, 2, 1, 5, 1, 19, 1)}[case]
    n = L + N * L * S
    q, k, v, do = _inputs(B, H, Hkv, n, 8, seed=1, dtype=torch.float64)
    key_valid = None
    if pad:
        key_valid = torch.ones(B, L, dtype=torch.bool)
        key_valid[-1, :pad] = False
    pattern = dict(num_text=L, branch_length=S, key_valid=key_valid)
    p, f, k_full, _ = _dense(q, k, v, do, 0.4, L, S, key_valid)
    for c, seed in ((2.0, 5), (6.0, 7)):
        want = _grads_from_weights(q, k_full, v, do, _dense_weights(p, c, seed, L, TILE), f, 0.4, Hkv)
        got = _reference_grads(q, k, v, do, 0.4, c, seed, **pattern)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_key_tiles_number_text_then_branch_tiles():
    cols = torch.arange(30)
    assert design_c_reference.key_tile(cols, 30, 8).tolist() == [j // 8 for j in range(30)]
    assert design_c_reference.key_tile(cols, 10, 8).tolist() == [0] * 8 + [1] * 2 + [2] * 8 + [3] * 8 + [4] * 4
    assert design_c_reference.num_key_tiles(30, 10, 8) == 5 and design_c_reference.num_key_tiles(30, 30, 64) == 1


def test_open_cells_opens_about_the_expected_number_per_row():
    mass = torch.softmax(torch.randn(1, 3, 64, 40, generator=torch.Generator().manual_seed(0)) * 2, -1)
    cell_open, pi = design_c_reference.open_cells(mass, 4.0, seed=3)
    assert ((pi == 1) <= cell_open).all() and not cell_open[pi == 0].any()
    expected = pi.sum()  # each cell a Bernoulli(pi) draw
    sd = (pi * (1 - pi)).sum().sqrt()
    assert abs(cell_open.sum() - expected) < 4 * sd
    assert not torch.equal(cell_open, design_c_reference.open_cells(mass, 4.0, seed=4)[0])


# ---------------------------------------------------------------------------- statistics

@pytest.fixture(scope="module")
def stats_problem():
    q, k, v, do = _inputs(B=1, H=2, Hkv=2, n=24, d=16, seed=3)
    scale = 16**-0.5
    exact = _reference_grads(q, k, v, do, scale, None, 0)
    return q, k, v, do, scale, exact


def _analytic_variance(q, k, v, do, c, scale, tile=TILE, cell_covariance=True):
    """Per-element variance of (dq, dk, dv) under design C; ``cell_covariance=False`` drops the covariance of the
    entries of one cell (design A's formula, wrong for dQ)."""
    n = q.shape[2]
    p, f, _, _ = _dense(q, k, v, do, scale, n)
    tiles = _tile_of_columns(n, n, tile)
    one_hot = torch.nn.functional.one_hot(tiles).to(p.dtype)  # [n, tiles]
    pi = torch.clamp(c * p @ one_hot, max=1.0)
    q_keep = torch.clamp(c * p, max=1.0)
    positive = p > 0
    var_p = torch.where(positive, p * p * (1 / q_keep - 1), torch.zeros_like(p))
    var_dk = scale**2 * (var_p * f * f).transpose(-1, -2) @ (q * q)
    var_dv = var_p.transpose(-1, -2) @ (do * do)
    if not cell_covariance:
        return scale**2 * (var_p * f * f) @ (k * k), var_dk, var_dv
    pi_entry = pi[..., tiles]
    own = torch.where(positive, p * p * (1 / q_keep - 1 / pi_entry), torch.zeros_like(p))
    per_cell = torch.einsum("bhij,jt,bhje->bhite", f * p, one_hot, k)  # sum over the cell's entries of a_j P_ij
    shared = torch.where(pi > 0, 1 / pi - 1, torch.zeros_like(pi))
    var_dq = scale**2 * ((own * f * f) @ (k * k) + (shared[..., None] * per_cell**2).sum(-2))
    return var_dq, var_dk, var_dv


def _samples(sampler, count):
    draws = [sampler(seed) for seed in range(count)]
    return [torch.stack([d[i] for d in draws]) for i in range(3)]


def _sus_sampler(q, k, v, do, scale, c):
    return lambda seed: _reference_grads(q, k, v, do, scale, c, seed)


def _z_test_passes(samples, exact, variances, false_alarm=FALSE_ALARM):
    count = samples[0].shape[0]
    threshold = statistics.NormalDist().inv_cdf(1 - false_alarm / (2 * sum(e.numel() for e in exact)))
    for draws, want, var in zip(samples, exact, variances):
        mean = draws.mean(0)
        deterministic = var <= 1e-12 * want.abs().clamp(min=1) ** 2
        if not torch.allclose(mean[deterministic], want[deterministic], rtol=1e-4, atol=1e-5):
            return False
        if ((mean - want)[~deterministic] / torch.sqrt(var[~deterministic] / count)).abs().max() > threshold:
            return False
    return True


def _variance_ratio(draws, variance):
    return (draws.var(0, unbiased=True).sum() / variance.sum()).item()


def test_design_c_is_unbiased_with_the_analytic_variance(stats_problem):
    q, k, v, do, scale, exact = stats_problem
    c = 4.0
    samples = _samples(_sus_sampler(q, k, v, do, scale, c), 400)
    variances = _analytic_variance(q, k, v, do, c, scale)
    assert _z_test_passes(samples, exact, variances)
    for draws, variance in zip(samples, variances):
        assert 0.85 < _variance_ratio(draws, variance) < 1.15


def test_statistical_checks_catch_wrong_estimators(stats_problem):
    q, k, v, do, scale, exact = stats_problem
    c, n = 4.0, q.shape[2]
    variances = _analytic_variance(q, k, v, do, c, scale)
    p, f, _, _ = _dense(q, k, v, do, scale, n)
    unconditional = _samples(lambda seed: _grads_from_weights(
        q, k, v, do, _dense_weights(p, c, seed, n, TILE, conditional=False), f, scale, 2), 400)
    assert not _z_test_passes(unconditional, exact, variances)


def test_dq_variance_has_the_cell_covariance():
    """Nearly uniform attention, values constant per key tile: within a cell dS has one sign, so the entries' shared
    level-1 draw adds variance to dQ that design A's independent formula misses; dK and dV keep A's."""
    n, d = 48, 8
    g = torch.Generator().manual_seed(0)
    q, k = 0.01 * torch.randn(1, 1, n, d, generator=g), torch.randn(1, 1, n, d, generator=g).abs() + 1
    v = (torch.randn(n // TILE, d, generator=g) * 3)[torch.arange(n) // TILE][None, None].clone()
    do = torch.randn(1, 1, n, d, generator=g)
    c = 1.0
    samples = _samples(_sus_sampler(q, k, v, do, 1.0, c), 400)
    variances = _analytic_variance(q, k, v, do, c, 1.0)
    for draws, variance in zip(samples, variances):
        assert 0.9 < _variance_ratio(draws, variance) < 1.1
    independent = _analytic_variance(q, k, v, do, c, 1.0, cell_covariance=False)
    assert _variance_ratio(samples[0], independent[0]) > 1.3
    assert torch.equal(independent[1], variances[1]) and torch.equal(independent[2], variances[2])


def test_variance_falls_with_c(stats_problem):
    q, k, v, do, scale, _ = stats_problem
    analytic, empirical = [], []
    for c in (1.0, 4.0, 16.0):
        variances = _analytic_variance(q, k, v, do, c, scale)
        analytic.append(sum(x.sum() for x in variances).item())
        draws = _samples(_sus_sampler(q, k, v, do, scale, c), 100)
        empirical.append(sum(d.var(0, unbiased=True).sum() for d in draws).item())
    assert analytic[0] > analytic[1] > analytic[2] > 0
    assert empirical[0] > empirical[1] > empirical[2] > 0


def test_huge_c_is_the_exact_gradient_bit_for_bit(stats_problem):
    q, k, v, do, scale, exact = stats_problem
    for got, want in zip(_reference_grads(q, k, v, do, scale, 1e30, 11), exact):
        assert torch.equal(got, want)


def test_seed_fixes_the_sample():
    q, k, v, do = _inputs(seed=4)
    first, again, other = (_reference_grads(q, k, v, do, 0.25, 2.0, seed) for seed in (9, 9, 10))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])


# ---------------------------------------------------------------------------- the option

def test_sus_design_c_selects_this_estimator_in_attention():
    q, k, v, do = _inputs(B=1, H=4, Hkv=2, n=70, d=8, seed=6)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grads = {}
    for design in ("a", "c"):
        out = attention(*leaves, c=3.0, seed=8, backend="torch", sus_design=design)
        grads[design] = torch.autograd.grad(out, leaves, do)
    want = _reference_grads(q, k, v, do, 8**-0.5, 3.0, 8, tile=design_c_reference.TILE)
    for got, expected in zip(grads["c"], want):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(grads["a"][0], grads["c"][0])  # the same marginals, other samples
    exact = [torch.autograd.grad(attention(*leaves, backend="torch", sus_design=d), leaves, do) for d in ("a", "c")]
    assert all(torch.equal(a, b) for a, b in zip(*exact))  # c=None: the exact backward whatever the design


def test_unknown_sus_design_is_refused():
    q, k, v, _ = _inputs()
    with pytest.raises(ValueError, match="sus_design must be one of"):
        attention(q, k, v, c=2.0, sus_design="b")


@pytest.mark.parametrize("rule", [dict(window=4), dict(softcap=2.0)])
def test_design_c_refuses_windows_and_soft_capping_by_name(rule):
    q, k, v, _ = _inputs()
    with pytest.raises(ValueError, match="sus_design='c' does not implement sliding windows or soft-capping"):
        attention(q, k, v, c=2.0, sus_design="c", **rule)
    attention(q, k, v, c=None, sus_design="c", **rule)  # the exact backward is design A's, which has them
