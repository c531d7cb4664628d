"""SUS attention: the PyTorch reference against exact attention, the estimator's statistics, bad input.

Statistics (docs/design.md §5.6), on one attention call with fixed q, k, v and upstream gradient dO:
the exact gradient g; M SUS samples g_1..g_M with seeds 0..M-1; per element the analytic variance
of the estimator (each weight is an independent Bernoulli draw, Var P~ = P^2 (1/q - 1) with
q = min(1, cP), and every gradient is linear in P~). The z-test checks every element's mean with a
Bonferroni threshold for an overall false-alarm rate of 1e-3; the variance test checks the summed
empirical variance against the summed analytic one. Each check is also run on a wrong estimator
(dense = exact every time, and a mask that is not rescaled by 1/q) to show it would fail.
"""

from __future__ import annotations

import math
import statistics
import warnings

import pytest
import torch
import torch.nn.functional as F

from quietstar.attention import eager
from quietstar.attention.layout import ThoughtLayout
from quietstar.ops.sus import attention, resolve_backend, rng, sus_attention
from quietstar.ops.sus import design_a_reference, reference
from quietstar.ops.sus.reference import visible

FALSE_ALARM = 1e-3


def _inputs(B=1, H=2, Hkv=2, n=24, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, d, generator=g, dtype=dtype) for h in (H, Hkv, Hkv))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), torch.randn(B, H, n, d, generator=g, dtype=dtype)


def _grads(q, k, v, do, **kwargs):
    out = attention(q, k, v, backend="torch", **kwargs)
    return out, torch.autograd.grad(out, (q, k, v), do)


# ---------------------------------------------------------------------------- reference = exact attention

@pytest.mark.parametrize("n,heads,kv_heads,causal", [(1, 2, 2, True), (17, 4, 2, True), (24, 3, 1, False), (33, 2, 2, True)])
def test_reference_matches_sdpa(n, heads, kv_heads, causal):
    q, k, v, do = _inputs(B=2, H=heads, Hkv=kv_heads, n=n, d=8)
    out, grads = _grads(q, k, v, do, causal=causal, scale=0.3)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.3, enable_gqa=heads != kv_heads)
    expected_grads = torch.autograd.grad(expected, (q, k, v), do)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_reference_matches_eager_thought_layout_with_padding():
    L, N, S = 6, 2, 4
    q, k, v, do = _inputs(B=2, H=4, Hkv=2, n=L + N * L * S, d=8)
    key_valid = torch.ones(2, L, dtype=torch.bool)
    key_valid[1, :2] = False  # left padding
    do[1, :, :2] = 0  # padding queries: eager yields finite garbage, the reference zeros; losses mask them out
    out, grads = _grads(q, k, v, do, num_text=L, branch_length=S, key_valid=key_valid)
    layout = ThoughtLayout("expanded", key_valid, N, branch_length=S)
    expected = eager.expanded_attention(q, k, v, layout, 8**-0.5).transpose(1, 2)
    expected_grads = torch.autograd.grad(expected, (q, k, v), do)
    torch.testing.assert_close(out[0], expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1, :, 2:], expected[1, :, 2:], rtol=1e-5, atol=1e-6)
    assert out[1, :, :2].abs().max() == 0
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_visibility_rule_in_global_indices():
    L, S = 3, 2  # text 0..2, then branches (0,1)->3,4  (1)->5,6  (2)->7,8  then sample 2: 9..14
    rows, cols = torch.arange(15)[:, None], torch.arange(15)[None, :]
    seen = visible(rows, cols, L, S)
    assert seen[2].tolist() == [True] * 3 + [False] * 12
    assert seen[6, :L].tolist() == [True, True, False]  # branch of position 1 sees x_0, x_1
    assert seen[6, 5] and seen[6, 6] and not seen[6, 4] and not seen[5, 6]
    assert seen[10, :L].tolist() == [True, False, False] and seen[10, 9] and not seen[10, 4]  # second sample, j = 0


# ---------------------------------------------------------------------------- the random numbers

def test_uniforms_are_uniform_and_independent():
    u = rng.uniform(7, torch.arange(3)[:, None, None], torch.arange(200)[None, :, None], torch.arange(200)[None, None, :])
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() * 12 - 1) < 0.01
    for a, b in ((u[:, :, 1:], u[:, :, :-1]), (u[:, 1:], u[:, :-1]), (u[1:], u[:-1])):
        assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]) < 0.01
    assert not torch.equal(u, rng.uniform(8, torch.arange(3)[:, None, None], torch.arange(200)[None, :, None],
                                          torch.arange(200)[None, None, :]))


# ---------------------------------------------------------------------------- SUS statistics

def _probs_and_upstream(q, k, v, do, scale):
    n = q.shape[2]
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    p = torch.softmax(s, -1)
    o = p @ v
    ds_factor = do @ v.transpose(-1, -2) - (do * o).sum(-1, keepdim=True)  # dP - D
    return p, ds_factor


def _analytic_variance(q, k, v, do, c, scale):
    """Per-element variance of (dq, dk, dv) under SUS: sums of independent Var(P~_ij) terms."""
    with torch.no_grad():
        p, f = _probs_and_upstream(q, k, v, do, scale)
        keep_prob = torch.clamp(c * p, max=1.0)
        var_p = torch.where(p > 0, p * p * (1 / keep_prob - 1), torch.zeros_like(p))
        var_dq = scale**2 * (var_p * f * f) @ (k * k)
        var_dk = scale**2 * (var_p * f * f).transpose(-1, -2) @ (q * q)
        var_dv = var_p.transpose(-1, -2) @ (do * do)
    return var_dq, var_dk, var_dv


def _manual_grads(q, k, v, do, weights, scale):
    """Gradients for a given replacement W of P in the backward (an independent slow formula)."""
    _, f = _probs_and_upstream(q, k, v, do, scale)
    ds = weights * f
    return scale * ds @ k, scale * ds.transpose(-1, -2) @ q, weights.transpose(-1, -2) @ do


def _sus_sampler(q, k, v, do, c):
    return lambda seed: _grads(q, k, v, do, c=c, seed=seed)[1]


def _unrescaled_sampler(q, k, v, do, c, scale):
    """A wrong estimator: the SUS mask applied to P without the 1/q rescaling (biased)."""
    B, H, n, _ = q.shape

    def sample(seed):
        with torch.no_grad():
            p, _ = _probs_and_upstream(q, k, v, do, scale)
            u = rng.uniform(seed, torch.arange(B * H).view(B, H, 1, 1), torch.arange(n)[:, None], torch.arange(n)[None])
            return _manual_grads(q, k, v, do, torch.where(u < c * p, p, torch.zeros_like(p)), scale)

    return sample


def _samples(sampler, count):
    draws = [sampler(seed) for seed in range(count)]
    return [torch.stack([d[i] for d in draws]) for i in range(3)]


def _z_test_passes(samples, exact, variances, false_alarm=FALSE_ALARM):
    """Every element's sample mean within a Bonferroni-corrected normal threshold of the exact gradient."""
    count = samples[0].shape[0]
    elements = sum(e.numel() for e in exact)
    threshold = statistics.NormalDist().inv_cdf(1 - false_alarm / (2 * elements))
    for draws, want, var in zip(samples, exact, variances):
        mean = draws.mean(0)
        deterministic = var <= 1e-12 * want.abs().clamp(min=1) ** 2
        if not torch.allclose(mean[deterministic], want[deterministic], rtol=1e-4, atol=1e-5):
            return False
        z = (mean - want)[~deterministic] / torch.sqrt(var[~deterministic] / count)
        if z.abs().max() > threshold:
            return False
    return True


def _variance_ratio(samples, variances):
    """Summed empirical variance over summed analytic variance (all three gradients)."""
    empirical = sum(d.var(0, unbiased=True).sum() for d in samples)
    return (empirical / sum(v.sum() for v in variances)).item()


@pytest.fixture(scope="module")
def stats_problem():
    q, k, v, do = _inputs(B=1, H=2, Hkv=2, n=24, d=16, seed=3)
    exact = _grads(q, k, v, do)[1]
    return q, k, v, do, exact


def test_sus_gradient_is_unbiased_and_has_the_analytic_variance(stats_problem):
    q, k, v, do, exact = stats_problem
    c, scale = 4.0, 16**-0.5
    samples = _samples(_sus_sampler(q, k, v, do, c), 400)
    variances = _analytic_variance(q, k, v, do, c, scale)
    assert _z_test_passes(samples, exact, variances)
    assert 0.9 < _variance_ratio(samples, variances) < 1.1


def test_statistical_checks_catch_wrong_estimators(stats_problem):
    q, k, v, do, exact = stats_problem
    c, scale = 4.0, 16**-0.5
    variances = _analytic_variance(q, k, v, do, c, scale)
    unrescaled = _samples(_unrescaled_sampler(q, k, v, do, c, scale), 400)
    assert not _z_test_passes(unrescaled, exact, variances)
    dense = _samples(lambda seed: _grads(q, k, v, do)[1], 50)
    assert _variance_ratio(dense, variances) < 0.01  # a dense backward has no variance at all


def test_variance_falls_with_c(stats_problem):
    q, k, v, do, _ = stats_problem
    scale = 16**-0.5
    analytic, empirical = [], []
    for c in (1.0, 4.0, 16.0):
        variances = _analytic_variance(q, k, v, do, c, scale)
        analytic.append(sum(x.sum() for x in variances).item())
        empirical.append(_variance_ratio(_samples(_sus_sampler(q, k, v, do, c), 100), variances) * analytic[-1])
    assert analytic[0] > analytic[1] > analytic[2] > 0
    assert empirical[0] > empirical[1] > empirical[2] > 0


def test_huge_c_is_the_exact_gradient_bit_for_bit(stats_problem):
    q, k, v, do, exact = stats_problem
    for got, want in zip(_grads(q, k, v, do, c=1e30, seed=11)[1], exact):
        assert torch.equal(got, want)


def test_sus_keeps_about_c_entries_per_row():
    q, k, v, do = _inputs(B=1, H=1, Hkv=1, n=256, d=16, seed=5)
    scale, c = 0.05, 8.0  # small scale: nearly uniform attention, the case where dropping saves most
    p, _ = _probs_and_upstream(q, k, v, do, scale)
    u = rng.uniform(0, torch.zeros(1, 1, 1, 1, dtype=torch.int64), torch.arange(256)[:, None], torch.arange(256)[None])
    kept = (u < c * p).sum(-1).float()
    expected = torch.clamp(c * p, max=1).sum(-1)
    assert (expected <= c + 1e-4).all()
    assert abs(kept[..., 128:].mean() - expected[..., 128:].mean()) < 0.5


def test_seed_fixes_the_mask():
    q, k, v, do = _inputs(seed=4)
    first = _grads(q, k, v, do, c=2.0, seed=9)[1]
    again = _grads(q, k, v, do, c=2.0, seed=9)[1]
    other = _grads(q, k, v, do, c=2.0, seed=10)[1]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])


# ---------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("c", [0, -1.0, True, "32", float("nan")])
def test_bad_c_is_refused(c):
    q, k, v, _ = _inputs()
    with pytest.raises(ValueError, match="c must be a positive number"):
        sus_attention(q, k, v, c)


def test_bad_shapes_dtypes_and_backends_are_refused():
    q, k, v, _ = _inputs(H=4, Hkv=2)
    with pytest.raises(ValueError, match="does not match q"):
        sus_attention(q, k[:, :, :5], v[:, :, :5], 4.0)
    with pytest.raises(ValueError, match="not a multiple"):
        sus_attention(q[:, :3], k, v, 4.0)
    with pytest.raises(ValueError, match="share a dtype"):
        sus_attention(q, k.double(), v.double(), 4.0)
    with pytest.raises(ValueError, match=r"\[batch, heads, n, head_dim\]"):
        sus_attention(q[0], k, v, 4.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        sus_attention(q, k, v, 4.0, backend="cuda")
    with pytest.raises(ValueError, match="head dims"):
        sus_attention(q[..., :8], k[..., :8], v[..., :8], 4.0, backend="triton")
    with pytest.raises(ValueError, match="fp32_precision must be one of"):
        sus_attention(q, k, v, 4.0, fp32_precision="fp64")


@pytest.mark.parametrize("head_dim, dtype, reason", [(80, torch.bfloat16, "head dims"), (96, torch.float16, "head dims"),
                                                     (256, torch.float32, "head dims"), (64, torch.float64, "fp16")])
def test_auto_falls_back_to_the_reference_with_a_warning_where_the_kernels_do_not_apply(head_dim, dtype, reason):
    pytest.importorskip("triton")
    cuda = torch.device("cuda")  # a device, not a tensor: the choice is made without a GPU
    with pytest.warns(UserWarning, match=f"falls back to the PyTorch reference: .*{reason}"):
        assert resolve_backend("auto", cuda, head_dim, dtype) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("auto", cuda, 128, torch.bfloat16) == "triton"
        assert resolve_backend("auto", torch.device("cpu"), head_dim, dtype) == "torch"  # CPU: no kernels, no warning


def test_triton_backend_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    q, k, v, _ = _inputs()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        sus_attention(q, k, v, 4.0, backend="triton")


def test_auto_backend_on_cpu_is_the_reference(monkeypatch):
    calls = []
    for name in ("attention_forward", "attention_backward"):
        original = getattr(reference, name)
        monkeypatch.setattr(reference, name, lambda *a, _f=original, _n=name, **kw: calls.append(_n) or _f(*a, **kw))
    q, k, v, do = _inputs()
    out = sus_attention(q, k, v, 4.0)
    assert math.isfinite(out.sum().item())
    torch.autograd.grad(out, (q, k, v), do)
    assert calls == ["attention_forward", "attention_backward"]


@pytest.mark.parametrize("num_text,branch_length,causal", [(9, 0, True), (3, 2, True), (9, 0, False)],
                         ids=["causal", "thoughts", "noncausal"])
def test_reference_keeps_fp64(num_text, branch_length, causal):
    """A reference for gradient checks must compute fp64 inputs in fp64: fp32 arithmetic fails gradcheck."""
    pattern = dict(num_text=num_text, branch_length=branch_length, causal=causal)
    q, k, v, do = _inputs(H=2, Hkv=1, n=9, d=8, dtype=torch.float64)
    o, lse = reference.attention_forward(q, k, v, 0.5, **pattern)
    grads = design_a_reference.attention_backward(q, k, v, o, lse, do, 0.5, **pattern, c=2.0, seed=3)
    assert o.dtype == lse.dtype == torch.float64 and all(g.dtype == torch.float64 for g in grads)
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, backend="torch", **pattern), (q, k, v))
