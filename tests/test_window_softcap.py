"""Sliding-window attention and attention-logit soft-capping in the thought layout, backend by backend.

The reference here is independent of :mod:`quietstar.attention.layout`: every token of the expanded row gets its
position id and branch from the definition (docs/design.md §1) and one dense masked softmax runs over the whole
row, with transformers' rules: a query at position p sees a key at p' only if p - p' < W, and scaled scores s
become cap * tanh(s / cap).
"""

from __future__ import annotations

import pytest
import torch

from quietstar.attention import AttentionSettings, ThoughtLayout, eager
from quietstar.ops import flash_cpu


def dense_reference(q, k, v, key_padding, N, S, scale, window=None, softcap=None, sinks=None):
    """q ``[B, H, L + NLS, d]``, k/v ``[B, Hkv, ...]`` -> ``[B, n, H, d]``: one dense softmax per query, fp64.
    ``sinks [H]``: a key of score sinks[h] and value 0 that every query of head h sees (attention sinks)."""
    B, H, n, d = q.shape
    L = key_padding.shape[1]
    text_pos = key_padding.long().cumsum(-1) - 1
    positions, branch_of, last_text = [], [], []
    for b in range(B):
        pos, branch, last = list(text_pos[b]), [-1] * L, list(range(L))
        for t in range(N * L * S):
            j, s = (t // S) % L, t % S
            pos.append(text_pos[b, j] + 1 + s)
            branch.append(t // S)
            last.append(j)
        positions.append(torch.tensor(pos))
        branch_of.append(torch.tensor(branch))
        last_text.append(torch.tensor(last))
    pos, branch, last = torch.stack(positions), torch.stack(branch_of), torch.stack(last_text)  # [B, n]
    index = torch.arange(n)
    key_is_text = index < L
    valid = torch.cat([key_padding, torch.ones(B, n - L, dtype=torch.bool)], 1)
    sees_text = key_is_text[None, None, :] & (index[None, None, :] <= last[:, :, None])
    sees_branch = (~key_is_text[None, None, :] & (branch[:, :, None] == branch[:, None, :])
                   & (index[None, None, :] <= index[None, :, None]))
    visible = (sees_text | sees_branch) & valid[:, None, :]
    if window is not None:
        visible &= pos[:, :, None] - pos[:, None, :] < window
    group = H // k.shape[1]
    kk, vv = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = q.double() @ kk.transpose(-1, -2) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.double().view(1, H, 1, 1).expand(B, H, n, 1)], dim=-1)
        vv = torch.cat([vv, vv.new_zeros(B, H, 1, vv.shape[-1])], dim=2)
    probs = torch.softmax(scores, -1).nan_to_num(0.0)  # a padding query sees nothing
    return (probs @ vv).transpose(1, 2)


def _inputs(B, H, Hkv, L, N, S, d, seed=0):
    generator = torch.Generator().manual_seed(seed)
    n = L + N * L * S
    q = torch.randn(B, H, n, d, generator=generator, requires_grad=True)
    k = torch.randn(B, Hkv, n, d, generator=generator, requires_grad=True)
    v = torch.randn(B, Hkv, n, d, generator=generator, requires_grad=True)
    return q, k, v, torch.randn(B, n, H, d, generator=generator)


def _real_rows(key_padding, N, S):
    """``[B, L + NLS]`` bool: the queries of real tokens (text x_j and the branches of real x_j); a padding query's
    output is garbage the losses mask out."""
    B, L = key_padding.shape
    branches = key_padding[:, None, :, None].expand(B, N, L, S).reshape(B, -1)
    return torch.cat([key_padding, branches], dim=1)


CASES = [  # window shorter than a row and than a branch, longer than a branch, softcap with and without a window
    dict(window=4, softcap=None), dict(window=3, softcap=None), dict(window=9, softcap=None),
    dict(window=None, softcap=1.0), dict(window=5, softcap=0.7),
]


@pytest.mark.parametrize("rule", CASES)
@pytest.mark.parametrize("padded", [False, True])
def test_eager_expanded_attention_equals_the_dense_definition(rule, padded):
    B, H, Hkv, L, N, S, d = 2, 4, 2, 9, 2, 5, 8
    q, k, v, grad = _inputs(B, H, Hkv, L, N, S, d)
    key_padding = torch.ones(B, L, dtype=torch.bool)
    if padded:
        key_padding[0, :3] = False  # left padding
        key_padding[1, -2:] = False  # right padding
    layout = ThoughtLayout("expanded", key_padding, N, branch_length=S, attention=AttentionSettings(attention_backend="eager"))
    want = dense_reference(q, k, v, key_padding, N, S, 0.4, **rule)
    got = eager.expanded_attention(q.double(), k.double(), v.double(), layout, 0.4, **rule)
    rows = _real_rows(key_padding, N, S)
    torch.testing.assert_close(got[rows], want[rows])
    grads_want = torch.autograd.grad(want[rows], (q, k, v), grad[rows].double())
    grads_got = torch.autograd.grad(got[rows], (q, k, v), grad[rows].double())
    for name, a, b in zip("qkv", grads_got, grads_want):
        torch.testing.assert_close(a, b, msg=f"d{name}")


@pytest.mark.parametrize("rule", CASES)
@pytest.mark.parametrize("padded", [False, True])
def test_causal_attention_equals_the_dense_definition(rule, padded):
    """The text pass and plain calls (training text, generation): causal, windowed on position ids that skip
    padding; also with fewer queries than keys (decoding over a cache)."""
    B, H, Hkv, L, d = 2, 4, 2, 11, 8
    q, k, v, _ = _inputs(B, H, Hkv, L, 0, 1, d, seed=1)
    key_padding = torch.ones(B, L, dtype=torch.bool)
    if padded:
        key_padding[0, :4] = False
    want = dense_reference(q, k, v, key_padding, 0, 1, 0.4, **rule)
    for n_q in (L, 3, 1):
        got = eager.causal_attention(q[:, :, L - n_q:].double(), k.double(), v.double(), key_padding, 0.4, **rule)
        real = key_padding[:, L - n_q:]  # a padding query's output is garbage the losses mask out
        torch.testing.assert_close(got[real], want[:, L - n_q:][real], msg=f"{n_q} queries")


@pytest.mark.parametrize("rule", CASES)
@pytest.mark.parametrize("padded", [False, True])
def test_eager_sampling_steps_equal_the_dense_definition(rule, padded):
    """Step m's queries sit at branch slot m: their outputs are the dense row's at slot m (slots past m unseen)."""
    B, H, Hkv, L, N, T, d = 2, 4, 2, 9, 2, 5, 8
    generator = torch.Generator().manual_seed(2)
    key_padding = torch.ones(B, L, dtype=torch.bool)
    if padded:
        key_padding[1, :2] = False
    q_text, k_text, v_text = (torch.randn(B, h, L, d, generator=generator, dtype=torch.float64) for h in (H, Hkv, Hkv))
    k_buffer, v_buffer = (torch.randn(B, Hkv, N, L, T, d, generator=generator, dtype=torch.float64) for _ in range(2))
    rows = _real_rows(key_padding, N, T)[:, L:].view(B, N, L, T)
    for m in range(T):
        q_step = torch.randn(B, H, N, L, d, generator=generator, dtype=torch.float64)
        q_branch = torch.zeros(B, H, N, L, T, d, dtype=torch.float64)
        q_branch[:, :, :, :, m] = q_step
        flat = lambda text, branch: torch.cat([text, branch.flatten(2, 4)], 2)  # noqa: E731
        want = dense_reference(flat(q_text, q_branch), flat(k_text, k_buffer), flat(v_text, v_buffer), key_padding,
                               N, T, 0.4, **rule)[:, L:].reshape(B, N, L, T, H, d)[:, :, :, m]
        seen = k_buffer[:, :, :, :, : m + 1], v_buffer[:, :, :, :, : m + 1]
        got = eager.sample_step_attention(q_step.flatten(2, 3), k_text, v_text, *seen, key_padding, 0.4, **rule)
        got = got.view(B, N, L, H, d)
        torch.testing.assert_close(got[rows[..., m]], want[rows[..., m]], msg=f"step {m}")
        if not padded and rule["softcap"] is None and flash_cpu.applies(q_step.float(), key_padding, 0.0):
            fast = flash_cpu.sample_step_attention(q_step.flatten(2, 3).float(), k_text.float(), v_text.float(),
                                                   *(x.float() for x in seen), 0.4, rule["window"])
            torch.testing.assert_close(fast.view(B, N, L, H, d), want.float(), rtol=1e-5, atol=1e-5,
                                       msg=f"flash step {m}")


WINDOWS = [1, 3, 6, 9, 30]  # a window of 1 (only itself), shorter than a branch, than a row, than a band chunk


@pytest.mark.skipif(flash_cpu._flash is None, reason="this torch has no CPU flash-attention op")
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("B, H, Hkv, L, N, S, d", [(2, 4, 2, 13, 2, 5, 16), (1, 2, 1, 150, 1, 3, 8)])
def test_flash_cpu_with_a_window_equals_eager(window, B, H, Hkv, L, N, S, d, monkeypatch):
    """Outputs and gradients; the second size runs the band in several chunks (a small chunk forces it)."""
    monkeypatch.setattr(flash_cpu, "BAND_CHUNK", 32)
    q, k, v, grad = _inputs(B, H, Hkv, L, N, S, d, seed=window)
    layout = ThoughtLayout("expanded", torch.ones(B, L, dtype=torch.bool), N, branch_length=S, attention=AttentionSettings(attention_backend="auto"))
    results = []
    for out in (eager.expanded_attention(q, k, v, layout, 0.3, window=window),
                flash_cpu.expanded_attention(q, k, v, L, N, S, 0.3, window)):
        results.append((out, torch.autograd.grad(out, (q, k, v), grad)))
    (out_ref, grads_ref), (out, grads) = results
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for name, got, expected in zip("qkv", grads, grads_ref):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=f"d{name}")
