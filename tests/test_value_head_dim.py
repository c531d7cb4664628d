"""Values with a head dim of their own (dv != d: multi-head latent attention, DeepSeek-V2/V3 and their kin).

The eager reference against the dense definition of tests/test_window_softcap.py (which never assumes dv = d), the CPU
flash path against eager (it zero-pads to one head dim), both for dv below and above d; the backends that take one
head dim refuse. The whole family (tiny deepseek_v3) runs in tests/test_parallel_equals_sequential.py and
tests/test_generation.py.
"""

from __future__ import annotations

import pytest
import torch

from quietstar.attention import AttentionSettings, ThoughtLayout, dispatch, eager
from quietstar.ops import flash_cpu
from test_window_softcap import _real_rows, dense_reference

HEAD_DIMS = [(8, 12), (12, 5)]  # (d, dv): values wider, then narrower than queries and keys


def _inputs(B, H, Hkv, n, d, dv, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, n, d, generator=generator, requires_grad=True)
    k = torch.randn(B, Hkv, n, d, generator=generator, requires_grad=True)
    v = torch.randn(B, Hkv, n, dv, generator=generator, requires_grad=True)
    return q, k, v, torch.randn(B, n, H, dv, generator=generator)


@pytest.mark.parametrize("d, dv", HEAD_DIMS)
@pytest.mark.parametrize("window", [None, 4])
def test_eager_expanded_attention_equals_the_dense_definition(d, dv, window):
    B, H, Hkv, L, N, S = 2, 4, 2, 7, 2, 3
    q, k, v, grad = _inputs(B, H, Hkv, L + N * L * S, d, dv)
    key_padding = torch.ones(B, L, dtype=torch.bool)
    key_padding[0, :2] = False
    key_padding[1, -1:] = False
    layout = ThoughtLayout("expanded", key_padding, N, branch_length=S, attention=AttentionSettings(attention_backend="eager"))
    want = dense_reference(q, k, v, key_padding, N, S, 0.4, window=window)
    got = eager.expanded_attention(q.double(), k.double(), v.double(), layout, 0.4, window=window)
    assert got.shape == (B, L + N * L * S, H, dv)
    rows = _real_rows(key_padding, N, S)
    torch.testing.assert_close(got[rows], want[rows])
    grads_want = torch.autograd.grad(want[rows], (q, k, v), grad[rows].double())
    grads_got = torch.autograd.grad(got[rows], (q, k, v), grad[rows].double())
    for name, a, b in zip("qkv", grads_got, grads_want):
        torch.testing.assert_close(a, b, msg=f"d{name}")


@pytest.mark.parametrize("d, dv", HEAD_DIMS)
@pytest.mark.parametrize("padded", [False, True])
def test_causal_attention_equals_the_dense_definition(d, dv, padded):
    B, H, Hkv, L = 2, 4, 2, 9
    q, k, v, _ = _inputs(B, H, Hkv, L, d, dv, seed=1)
    key_padding = torch.ones(B, L, dtype=torch.bool)
    key_padding[0, :3] = not padded
    want = dense_reference(q, k, v, key_padding, 0, 1, 0.4)
    for n_q in (L, 1):
        got = eager.causal_attention(q[:, :, L - n_q:].double(), k.double(), v.double(), key_padding, 0.4)
        real = key_padding[:, L - n_q:]
        torch.testing.assert_close(got[real], want[:, L - n_q:][real], msg=f"{n_q} queries")


@pytest.mark.skipif(flash_cpu._flash is None, reason="this torch has no CPU flash-attention op")
@pytest.mark.parametrize("d, dv", HEAD_DIMS)
@pytest.mark.parametrize("window", [None, 3])
def test_flash_cpu_equals_eager(d, dv, window):
    B, H, Hkv, L, N, S = 2, 4, 2, 9, 2, 4
    q, k, v, grad = _inputs(B, H, Hkv, L + N * L * S, d, dv, seed=2)
    layout = ThoughtLayout("expanded", torch.ones(B, L, dtype=torch.bool), N, branch_length=S, attention=AttentionSettings(attention_backend="auto"))
    assert dispatch.resolve_backend(layout, q, 0.0, window, None, dv) == "flash_cpu"
    results = []
    for out in (eager.expanded_attention(q, k, v, layout, 0.3, window=window),
                flash_cpu.expanded_attention(q, k, v, L, N, S, 0.3, window)):
        assert out.shape == (B, L + N * L * S, H, dv)
        results.append((out, torch.autograd.grad(out, (q, k, v), grad)))
    (out_ref, grads_ref), (out, grads) = results
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for name, got, expected in zip("qkv", grads, grads_ref):
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=f"d{name}")


@pytest.mark.parametrize("d, dv", HEAD_DIMS)
def test_sampling_steps_equal_the_dense_definition(d, dv):
    """Step m's queries sit at branch slot m; eager (with a padded row) and the flash path (without) both."""
    B, H, Hkv, L, N, T = 2, 4, 2, 7, 2, 3
    generator = torch.Generator().manual_seed(3)
    randn = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    q_text, k_text, v_text = randn(B, H, L, d), randn(B, Hkv, L, d), randn(B, Hkv, L, dv)
    k_buffer, v_buffer = randn(B, Hkv, N, L, T, d), randn(B, Hkv, N, L, T, dv)
    for padded in (False, True):
        key_padding = torch.ones(B, L, dtype=torch.bool)
        key_padding[1, :2] = not padded
        rows = _real_rows(key_padding, N, T)[:, L:].view(B, N, L, T)
        for m in range(T):
            q_step = randn(B, H, N, L, d)
            q_branch = torch.zeros(B, H, N, L, T, d, dtype=torch.float64)
            q_branch[:, :, :, :, m] = q_step
            flat = lambda text, branch: torch.cat([text, branch.flatten(2, 4)], 2)  # noqa: E731
            want = dense_reference(flat(q_text, q_branch), flat(k_text, k_buffer), flat(v_text, v_buffer),
                                   key_padding, N, T, 0.4)[:, L:].reshape(B, N, L, T, H, dv)[:, :, :, m]
            seen = k_buffer[:, :, :, :, : m + 1], v_buffer[:, :, :, :, : m + 1]
            got = eager.sample_step_attention(q_step.flatten(2, 3), k_text, v_text, *seen, key_padding, 0.4)
            torch.testing.assert_close(got.view(B, N, L, H, dv)[rows[..., m]], want[rows[..., m]])
            if not padded and flash_cpu._flash is not None:
                fast = flash_cpu.sample_step_attention(q_step.flatten(2, 3).float(), k_text.float(), v_text.float(),
                                                       *(x.float() for x in seen), 0.4)
                torch.testing.assert_close(fast.view(B, N, L, H, dv), want.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend, sus_c, named", [("flex", None, "FlexAttention"), ("triton", None, "'triton' SUS"),
                                                   ("auto", 2.0, "SUS attention")])
def test_backends_with_one_head_dim_refuse(backend, sus_c, named):
    B, H, L, N, S = 1, 2, 4, 1, 2
    q, k, v, _ = _inputs(B, H, H, L + N * L * S, 16, 8)
    layout = ThoughtLayout("expanded", torch.ones(B, L, dtype=torch.bool), N, branch_length=S,
                           attention=AttentionSettings(attention_backend=backend, sus_c=sus_c))
    with pytest.raises(ValueError, match=f"own head dim \\(8; queries and keys: 16.*{named}.*'auto' or 'eager'"):
        dispatch.gradient_pass_attention(q, k, v, layout, 0.25, 0.0)
    with pytest.raises(ValueError, match="own head dim .*SUS attention"):
        dispatch.plain_attention(q, k, v, None, 0.25, 0.0, sus_c=2.0)
