"""SUS attention with a sliding window and attention-logit soft-capping: the PyTorch reference against a dense
definition, and the SUS estimator's unbiasedness under both.

The dense definition builds the whole n x n score matrix from the thought layout's rule (docs/design.md §1): text i at
position i, branch token k of text position j at position j + 1 + k, a key visible only if the position gap is below
the window, scores s -> cap * tanh(s / cap); torch autograd gives its gradients.
"""

from __future__ import annotations

import pytest
import torch

from quietstar.ops.sus import design_a_reference, reference, rng

from test_sus import _samples, _variance_ratio, _z_test_passes


def dense_visibility(n, L, S, key_valid=None, window=None):
    """``[B or 1, n, n]`` bool from the definition: text causal, a branch sees text up to its position and itself."""
    t = torch.arange(n)
    text = t < L
    branch = torch.where(text, -1, (t - L) // max(S, 1))
    last_text = torch.where(text, t, branch % L)
    position = torch.where(text, t, last_text + 1 + (t - L) % max(S, 1))
    seen = (text[None] & (t[None] <= last_text[:, None])) | (~text[None] & (branch[None] == branch[:, None])
                                                            & (t[None] <= t[:, None]))
    if window is not None:
        seen &= position[:, None] - position[None] < window
    if key_valid is None:
        return seen[None]
    return seen[None] & torch.cat([key_valid, torch.ones(key_valid.shape[0], n - L, dtype=torch.bool)], 1)[:, None]


def dense_attention(q, k, v, scale, L, S, key_valid=None, window=None, softcap=None):
    """Output ``[B, H, n, d]`` by one masked softmax per row; a row that sees nothing gets 0."""
    group = q.shape[1] // k.shape[1]
    scores = q @ k.repeat_interleave(group, 1).transpose(-1, -2) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    seen = dense_visibility(q.shape[2], L, S, key_valid, window)[:, None]
    probs = torch.softmax(scores.masked_fill(~seen, float("-inf")), -1).nan_to_num(0.0)
    return probs @ v.repeat_interleave(group, 1)


def _inputs(B, H, Hkv, n, d, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, d, generator=g, dtype=dtype).requires_grad_() for h in (H, Hkv, Hkv))
    return q, k, v, torch.randn(B, H, n, d, generator=g, dtype=dtype)


# (L, N, S): plain causal rows and thought layouts with odd sizes; windows of 1 (itself only), shorter than a branch,
# shorter than the text, and longer than any gap (no effect)
PATTERNS = [(13, 0, 0), (7, 2, 3), (5, 1, 6)]
RULES = [dict(window=1), dict(window=2), dict(window=4), dict(window=40), dict(softcap=0.8),
         dict(window=3, softcap=1.5)]


@pytest.mark.parametrize("rule", RULES, ids=str)
@pytest.mark.parametrize("L, N, S", PATTERNS)
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_reference_equals_the_dense_definition(L, N, S, rule, padded):
    B, H, Hkv, d, scale = 2, 3, 1, 8, 0.7  # scale 0.7: scores reach the cap's saturated region
    n = L + N * L * S
    q, k, v, do = _inputs(B, H, Hkv, n, d, seed=L + N)
    key_valid = None
    if padded:
        key_valid = torch.ones(B, L, dtype=torch.bool)
        key_valid[0, :2] = False  # left padding
        key_valid[1, -2:] = False  # right padding
    pattern = dict(num_text=L, branch_length=S, key_valid=key_valid, **rule)
    o, lse = reference.attention_forward(q, k, v, scale, **pattern)
    want = dense_attention(q, k, v, scale, L, S, key_valid, rule.get("window"), rule.get("softcap"))
    torch.testing.assert_close(o, want)
    grads = reference.attention_backward(q, k, v, o, lse, do, scale, **pattern)
    for name, got, expected in zip("qkv", grads, torch.autograd.grad(want, (q, k, v), do)):
        torch.testing.assert_close(got, expected, msg=f"d{name}")
    if "window" in rule and rule["window"] < L:  # the window must change something, else this test proves nothing
        assert not torch.allclose(o, dense_attention(q, k, v, scale, L, S, key_valid, None, rule.get("softcap")))


def test_window_positions_follow_the_layout():
    L, S = 4, 3  # branch of position j sits at j + 1 .. j + 3
    index = torch.arange(L + 2 * L * S)
    assert reference.positions(index, L, S)[:L + S + 1].tolist() == [0, 1, 2, 3, 1, 2, 3, 2]
    assert reference.positions(index, L, S)[L + L * S:L + L * S + 3].tolist() == [1, 2, 3]  # second sample, j = 0
    seen = reference.visible(index[:, None], index[None], L, S, window=2)
    row = L + 2 * S + 1  # branch of j = 2, slot 1: position 4
    assert seen[row].nonzero().flatten().tolist() == [row - 1, row]  # x_2 (position 2) is out, its own slot 0 in
    assert seen[row - 1].nonzero().flatten().tolist() == [2, row - 1]  # slot 0 (position 3) still sees x_2


@pytest.mark.parametrize("bad", [dict(window=0), dict(window=2.5), dict(window=True), dict(softcap=0.0),
                                 dict(softcap=-1.0), dict(window=3, causal=False)], ids=str)
def test_bad_windows_and_caps_are_refused(bad):
    q, k, v, _ = _inputs(1, 1, 1, 6, 8)
    with pytest.raises(ValueError, match="window|softcap"):
        reference.attention_forward(q, k, v, 0.5, num_text=6, **bad)


def _dense_weights_and_upstream(q, k, v, do, scale, L, S, window, softcap):
    """P, dP - D and the cap's slope, all ``[B, H, n, n]`` (H = Hkv)."""
    with torch.no_grad():
        raw = q @ k.transpose(-1, -2) * scale
        tanh = torch.tanh(raw / softcap)
        seen = dense_visibility(q.shape[2], L, S, None, window)[:, None]
        p = torch.softmax((tanh * softcap).masked_fill(~seen, float("-inf")), -1)
        return p, do @ v.transpose(-1, -2) - (do * (p @ v)).sum(-1, keepdim=True), 1 - tanh * tanh


def test_sus_gradient_with_window_and_softcap_is_unbiased():
    """The z-test and variance check of test_sus.py, on a thought layout with a window and a cap: the analytic
    variance carries the cap's slope, Var dS = Var P~ (dP - D)^2 slope^2."""
    L, N, S, window, softcap, c = 6, 1, 3, 3, 1.0, 3.0
    n, d = L + N * L * S, 16
    scale = d**-0.5
    q, k, v, do = _inputs(1, 2, 2, n, d, seed=5, dtype=torch.float32)
    pattern = dict(num_text=L, branch_length=S, window=window, softcap=softcap)
    o, lse = reference.attention_forward(q, k, v, scale, **pattern)
    exact = reference.attention_backward(q, k, v, o, lse, do, scale, **pattern)
    p, upstream, slope = _dense_weights_and_upstream(q, k, v, do, scale, L, S, window, softcap)
    keep = torch.clamp(c * p, max=1.0)
    var_p = torch.where(p > 0, p * p * (1 / keep - 1), torch.zeros_like(p))
    var_ds = var_p * (upstream * slope) ** 2
    variances = (scale**2 * var_ds @ (k * k), scale**2 * var_ds.transpose(-1, -2) @ (q * q),
                 var_p.transpose(-1, -2) @ (do * do))
    sus = _samples(lambda seed: design_a_reference.attention_backward(q, k, v, o, lse, do, scale, **pattern, c=c,
                                                                   seed=seed), 400)
    assert _z_test_passes(sus, exact, variances)
    assert 0.85 < _variance_ratio(sus, variances) < 1.15
    # a backward that forgets the cap's slope is caught
    uncapped = _samples(lambda seed: _without_slope(q, k, v, o, lse, do, scale, pattern, c, seed), 400)
    assert not _z_test_passes(uncapped, exact, variances)


def _without_slope(q, k, v, o, lse, do, scale, pattern, c, seed):
    """A wrong SUS backward: soft-capped forward, but dS not multiplied by the slope (the plain formulas on P~)."""
    with torch.no_grad():
        p, upstream, _ = _dense_weights_and_upstream(q, k, v, do, scale, pattern["num_text"], pattern["branch_length"],
                                                     pattern["window"], pattern["softcap"])
        n = q.shape[2]
        u = rng.uniform(seed, torch.arange(q.shape[1]).view(1, -1, 1, 1), torch.arange(n)[:, None], torch.arange(n))
        weights = design_a_reference.sus_weights(p, u, c)
        ds = weights * upstream
        return scale * ds @ k, scale * ds.transpose(-1, -2) @ q, weights.transpose(-1, -2) @ do
