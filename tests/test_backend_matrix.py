"""Every attention backend against every layer feature: equal to eager, or refused by name (docs/design.md §5.8).

The features are those of the capability table (quietstar/attention/backends.py): sliding windows, attention-logit
soft-capping, attention sinks (GPT-OSS: one logit per query head in every softmax's denominator, with no value),
values with a head dim of their own (multi-head latent attention), dropout and padded rows. The expected matrix is
written out here (:data:`IMPLEMENTS`), independently of the table, and the table is checked against it.

The reference is independent of :mod:`quietstar.attention.layout`: every token of the expanded row gets its position
id and branch from the definition (docs/design.md §1) and one dense masked softmax runs over the whole row, with
transformers' rules: a query at position p sees a key at p' only if p - p' < W, and scaled scores s become
cap * tanh(s / cap). Eager is checked against it in every phase; the other backends against eager. The families
themselves run in tests/test_parallel_equals_sequential.py, tests/test_window_backends.py and
tests/test_generation.py.
"""

from __future__ import annotations

import pytest
import torch

from quietstar.attention import AttentionSettings, ThoughtLayout, dispatch, eager
from quietstar.attention.backends import BACKENDS, FEATURES
from quietstar.ops import flash_cpu

needs_flash = pytest.mark.skipif(flash_cpu._flash is None, reason="this torch has no CPU flash-attention op")

# What each backend implements, written out independently of quietstar.attention.backends.BACKENDS.
IMPLEMENTS = {
    "eager": {"windows", "softcap", "sinks", "value_head_dim", "dropout", "padding", "anchors",
              "hindsight"},
    "flash_cpu": {"windows", "sinks", "value_head_dim"},
    "flex": {"windows", "softcap", "padding"},
    "sus_torch": {"windows", "softcap", "padding"},
    "sus_triton": {"windows", "softcap", "padding"},
}
# How a refusal names each backend, and the settings that name it (flash_cpu is never named: "auto" takes it where it
# applies and eager elsewhere). sus_c=1e30 keeps every weight: the exact gradient, computed by the SUS backward.
# The kernels multiply fp32 exactly ("ieee"): compared with fp32 eager, no tf32 rounding.
NAMED = {"flex": ("FlexAttention", dict(attention_backend="flex")),
         "sus_torch": ("'torch' SUS", dict(attention_backend="eager", sus_c=1e30)),
         "sus_triton": ("'triton' SUS", dict(attention_backend="triton", triton_fp32_precision="ieee"))}
REFUSAL_WORDS = {"sinks": "attention sinks", "value_head_dim": "own head dim", "dropout": "attention dropout",
                 "softcap": "soft-caps"}


# ----------------------------------------------------------------------------------------------- the definition
def dense_reference(q, k, v, key_padding, N, S, scale, window=None, softcap=None, sinks=None):
    """q ``[B, H, L + NLS, d]``, k ``[B, Hkv, ...]``, v ``[B, Hkv, ..., dv]`` -> ``[B, n, H, dv]``: one dense softmax
    per query, fp64. ``sinks [H]``: a key of score sinks[h] and value 0 that every query of head h sees."""
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


def _real_rows(key_padding, N, S):
    """``[B, L + NLS]`` bool: the queries of real tokens (text x_j and the branches of real x_j); a padding query's
    output is garbage the losses mask out."""
    B, L = key_padding.shape
    branches = key_padding[:, None, :, None].expand(B, N, L, S).reshape(B, -1)
    return torch.cat([key_padding, branches], dim=1)


# ---------------------------------------------------------------------------------------------- shared cases
# A layer feature case: the rule the layer passes (window, softcap), sinks, and (d, dv). Windows shorter than a branch,
# than a row and longer than both; soft-capping alone and with a window; sinks with and without a window; values
# wider, then narrower than queries and keys.
CASES = {
    "window=4": dict(window=4), "window=3": dict(window=3), "window=9": dict(window=9),
    "softcap": dict(softcap=1.0), "window+softcap": dict(window=5, softcap=0.7),
    "sinks": dict(sinks=True), "sinks+window": dict(sinks=True, window=3),
    "dv>d": dict(dims=(8, 12)), "dv<d+window": dict(dims=(12, 5), window=4),
    "sinks+dv+window": dict(sinks=True, dims=(8, 12), window=4),
}


def _features_of(case: dict, dropout: float = 0.0, padded: bool = False) -> set[str]:
    d, dv = case.get("dims", (8, 8))
    named = {"windows": "window" in case, "softcap": "softcap" in case, "sinks": case.get("sinks", False),
             "value_head_dim": d != dv, "dropout": dropout > 0, "padding": padded}
    return {name for name, present in named.items() if present}


def _tensors(case, B, H, Hkv, n, seed=0, d=None, dtype=torch.float32):
    """q, k, v (leaves), sinks ``[H]`` or None, and an upstream gradient ``[B, n, H, dv]``. ``d``: the head dim of
    queries and keys instead of the case's (values keep theirs where the case gives them one)."""
    generator = torch.Generator().manual_seed(seed)
    d_case, dv = case.get("dims", (8, 8))
    own_value_dim = d_case != dv
    d = d or d_case
    dv = dv if own_value_dim else d
    q = torch.randn(B, H, n, d, generator=generator, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, n, d, generator=generator, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, n, dv, generator=generator, dtype=dtype, requires_grad=True)
    sinks = (torch.randn(H, generator=generator, dtype=dtype) * 2).requires_grad_() if case.get("sinks") else None
    return q, k, v, sinks, torch.randn(B, n, H, dv, generator=generator, dtype=dtype)


def _rule(case: dict, sinks=None) -> dict:
    return dict(window=case.get("window"), softcap=case.get("softcap"), sinks=sinks)


def _key_padding(B, L, padded):
    key_padding = torch.ones(B, L, dtype=torch.bool)
    if padded:
        key_padding[0, :3] = False  # left padding
        key_padding[-1, -2:] = False  # right padding
    return key_padding


def _leaves(q, k, v, sinks):
    return (q, k, v) if sinks is None else (q, k, v, sinks)


# ------------------------------------------------------------------------------- eager against the definition
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_eager_expanded_attention_equals_the_dense_definition(case, padded):
    B, H, Hkv, L, N, S = 2, 4, 2, 9, 2, 5
    q, k, v, sinks, grad = _tensors(case, B, H, Hkv, L + N * L * S)
    key_padding = _key_padding(B, L, padded)
    layout = ThoughtLayout("expanded", key_padding, N, branch_length=S)
    rule = _rule(case, sinks)
    want = dense_reference(q, k, v, key_padding, N, S, 0.4, **rule)
    got = eager.expanded_attention(q.double(), k.double(), v.double(), layout, 0.4,
                                   **{**rule, "sinks": None if sinks is None else sinks.double()})
    assert got.shape == (B, L + N * L * S, H, v.shape[-1])
    rows = _real_rows(key_padding, N, S)
    torch.testing.assert_close(got[rows], want[rows])
    leaves = _leaves(q, k, v, sinks)
    grads_want = torch.autograd.grad(want[rows], leaves, grad[rows].double())
    grads_got = torch.autograd.grad(got[rows], leaves, grad[rows].double())
    for name, a, b in zip(("q", "k", "v", "sinks"), grads_got, grads_want):
        torch.testing.assert_close(a, b, msg=f"d{name}")
    # The feature changes the result, else this case proves nothing about it.
    plain = dense_reference(q, k, v, key_padding, N, S, 0.4)
    if rule != _rule({}):
        assert not torch.allclose(want[rows], plain[rows])


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_causal_attention_equals_the_dense_definition(case, padded):
    """The text pass and plain calls (training text, generation): causal, windowed on position ids that skip
    padding; also with fewer queries than keys (decoding over a cache)."""
    B, H, Hkv, L = 2, 4, 2, 11
    q, k, v, sinks, _ = _tensors(case, B, H, Hkv, L, seed=1)
    key_padding = torch.ones(B, L, dtype=torch.bool)
    if padded:
        key_padding[0, :4] = False
    rule = _rule(case, sinks)
    want = dense_reference(q, k, v, key_padding, 0, 1, 0.4, **rule)
    for n_q in (L, 3, 1):
        got = eager.causal_attention(q[:, :, L - n_q:].double(), k.double(), v.double(), key_padding, 0.4,
                                     **{**rule, "sinks": None if sinks is None else sinks.double()})
        real = key_padding[:, L - n_q:]  # a padding query's output is garbage the losses mask out
        torch.testing.assert_close(got[real], want[:, L - n_q:][real], msg=f"{n_q} queries")


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_sampling_steps_equal_the_dense_definition(case, padded):
    """Step m's queries sit at branch slot m: their outputs are the dense row's at slot m (slots past m unseen).
    Eager on every row, the CPU flash path (fp32) where "auto" takes it: unpadded rows, no soft-capping."""
    B, H, Hkv, L, N, T = 2, 4, 2, 9, 2, 5
    d, dv = case.get("dims", (8, 8))
    generator = torch.Generator().manual_seed(2)
    randn = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    key_padding = torch.ones(B, L, dtype=torch.bool)
    if padded:
        key_padding[1, :2] = False
    q_text, k_text, v_text = randn(B, H, L, d), randn(B, Hkv, L, d), randn(B, Hkv, L, dv)
    k_buffer, v_buffer = randn(B, Hkv, N, L, T, d), randn(B, Hkv, N, L, T, dv)
    sinks = randn(H) * 2 if case.get("sinks") else None
    rule = _rule(case, sinks)
    rows = _real_rows(key_padding, N, T)[:, L:].view(B, N, L, T)
    layout = ThoughtLayout("sample", key_padding, N, num_thought_tokens=T)
    flash = (not padded and flash_cpu._flash is not None
             and dispatch.resolve_backend(layout, q_text.float(), 0.0, rule["window"], rule["softcap"], dv,
                                          sinks) == "flash_cpu")
    assert flash or padded or "softcap" in case or flash_cpu._flash is None  # "auto" takes it where it applies
    for m in range(T):
        q_step = randn(B, H, N, L, d)
        q_branch = torch.zeros(B, H, N, L, T, d, dtype=torch.float64)
        q_branch[:, :, :, :, m] = q_step
        flat = lambda text, branch: torch.cat([text, branch.flatten(2, 4)], 2)  # noqa: E731
        want = dense_reference(flat(q_text, q_branch), flat(k_text, k_buffer), flat(v_text, v_buffer), key_padding,
                               N, T, 0.4, **rule)[:, L:].reshape(B, N, L, T, H, dv)[:, :, :, m]
        seen = k_buffer[:, :, :, :, : m + 1], v_buffer[:, :, :, :, : m + 1]
        got = eager.sample_step_attention(q_step.flatten(2, 3), k_text, v_text, *seen, key_padding, 0.4, **rule)
        torch.testing.assert_close(got.view(B, N, L, H, dv)[rows[..., m]], want[rows[..., m]], msg=f"step {m}")
        if flash:
            fast = flash_cpu.sample_step_attention(q_step.flatten(2, 3).float(), k_text.float(), v_text.float(),
                                                   *(x.float() for x in seen), 0.4, rule["window"],
                                                   None if sinks is None else sinks.float())
            torch.testing.assert_close(fast.view(B, N, L, H, dv), want.float(), rtol=1e-5, atol=1e-5,
                                       msg=f"flash step {m}")


# ------------------------------------------------------------------------------ each backend, each feature
def test_the_capability_table_says_what_the_matrix_expects():
    for name, backend in BACKENDS.items():
        assert {feature for feature in FEATURES if getattr(backend, feature)} == IMPLEMENTS[name], name


def _expanded_problem(case, padded, d=None, dtype=torch.float32):
    B, H, Hkv, L, N, S = 2, 4, 2, 7, 2, 3
    q, k, v, sinks, grad = _tensors(case, B, H, Hkv, L + N * L * S, seed=3, d=d, dtype=dtype)
    return q, k, v, sinks, grad, _key_padding(B, L, padded), N, S


def _outputs_and_grads(run, q, k, v, sinks, grad):
    out = run()
    leaves = _leaves(q, k, v, sinks)
    return out, torch.autograd.grad(out, leaves, grad) if out.requires_grad else None


@pytest.mark.parametrize("case", [*CASES.values(), dict(dropout=0.2)], ids=[*CASES.keys(), "dropout"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("backend", ["flex", "sus_torch", "sus_triton"])
def test_a_named_backend_equals_eager_or_refuses_by_name(backend, case, padded):
    """The gradient pass through the dispatch, under the settings that name the backend: where it implements the
    layer's features, eager's outputs (and gradients, where it has a backward on this device); else a refusal naming
    the backend, the feature and the way out. FlexAttention runs a forward only on CPU (its CUDA gradients:
    tests/test_flex.py); the Triton kernels run in Triton's interpreter on CPU, exact (no sus_c)."""
    if backend == "sus_triton":
        pytest.importorskip("triton")
        if padded and not torch.cuda.is_available():
            pytest.skip("padded rows in the interpreter are tests/test_sus_kernels.py's (minutes here)")
    dropout = case.get("dropout", 0.0)
    described, settings = NAMED[backend]
    # Queries and keys at a head dim every backend takes (FlexAttention and the kernels need at least 16).
    q, k, v, sinks, grad, key_padding, N, S = _expanded_problem(case, padded, d=16)
    rows = _real_rows(key_padding, N, S)
    grad = grad * rows[..., None, None]  # a padding query's output is garbage the losses mask out
    layout = ThoughtLayout("expanded", key_padding, N, branch_length=S, attention=AttentionSettings(**settings))
    rule = _rule(case, sinks)
    missing = _features_of(case, dropout, padded) - IMPLEMENTS[backend]
    if missing:
        feature = next(name for name in FEATURES if name in missing)  # the first the layer lacks, in the table's order
        with pytest.raises(ValueError, match=f"{REFUSAL_WORDS[feature]}.*{described}.*"
                                             f"{'attention_dropout to 0' if feature == 'dropout' else 'auto'}"):
            dispatch.gradient_pass_attention(q, k, v, layout, 0.25, dropout, **rule)
        return
    with_grad = backend != "flex" or q.device.type == "cuda"
    if not with_grad:  # FlexAttention refuses inputs that require grad on CPU
        q, k, v = (x.detach() for x in (q, k, v))
    with torch.set_grad_enabled(with_grad):
        out, grads = _outputs_and_grads(lambda: dispatch.gradient_pass_attention(q, k, v, layout, 0.25, 0.0, **rule),
                                        q, k, v, sinks, grad)
        reference = ThoughtLayout("expanded", key_padding, N, branch_length=S)
        out_ref, grads_ref = _outputs_and_grads(lambda: eager.expanded_attention(q, k, v, reference, 0.25, **rule),
                                                q, k, v, sinks, grad)
    torch.testing.assert_close(out[rows], out_ref[rows], rtol=1e-5, atol=1e-5)
    assert (grads is None) == (not with_grad)
    for name, got, want in zip("qkv", grads or (), grads_ref or ()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"d{name}")


@needs_flash
@pytest.mark.parametrize("case", [{}, *CASES.values(), dict(dropout=0.2)], ids=["plain", *CASES.keys(), "dropout"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_auto_takes_the_cpu_flash_path_where_it_applies_and_eager_elsewhere(case, padded):
    """The CPU flash path is never named: "auto" takes it for the layers whose features it implements (unpadded,
    no soft-capping, no dropout), with eager's outputs and gradients (sinks' included), and eager for the others."""
    dropout = case.get("dropout", 0.0)
    q, k, v, sinks, grad, key_padding, N, S = _expanded_problem(case, padded)
    layout = ThoughtLayout("expanded", key_padding, N, branch_length=S)
    rule = _rule(case, sinks)
    chosen = dispatch.resolve_backend(layout, q, dropout, rule["window"], rule["softcap"], v.shape[-1], sinks)
    assert chosen == ("eager" if _features_of(case, dropout, padded) - IMPLEMENTS["flash_cpu"] else "flash_cpu")
    if chosen == "eager":
        return
    L = key_padding.shape[1]
    out, grads = _outputs_and_grads(lambda: flash_cpu.expanded_attention(q, k, v, L, N, S, 0.3, rule["window"], sinks),
                                    q, k, v, sinks, grad)
    out_ref, grads_ref = _outputs_and_grads(lambda: eager.expanded_attention(q, k, v, layout, 0.3, **rule),
                                            q, k, v, sinks, grad)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    tolerance = dict(rtol=1e-4, atol=1e-4 if sinks is not None else 1e-5)
    for name, got, want in zip(("q", "k", "v", "sinks"), grads, grads_ref):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, **tolerance, msg=f"d{name}")


@needs_flash
@pytest.mark.parametrize("B, H, Hkv, L, N, S, d", [(1, 4, 2, 13, 2, 5, 16), (2, 3, 3, 7, 3, 9, 8), (1, 2, 1, 33, 1, 2, 32)])
def test_flash_cpu_equals_eager_at_odd_sizes(B, H, Hkv, L, N, S, d):
    q, k, v, _, grad = _tensors({}, B, H, Hkv, L + N * L * S, d=d)
    layout = ThoughtLayout("expanded", torch.ones(B, L, dtype=torch.bool), N, branch_length=S)
    assert flash_cpu.applies(q, layout.key_padding, 0.0)
    out, grads = _outputs_and_grads(lambda: flash_cpu.expanded_attention(q, k, v, L, N, S, d ** -0.5), q, k, v, None,
                                    grad)
    out_ref, grads_ref = _outputs_and_grads(lambda: eager.expanded_attention(q, k, v, layout, d ** -0.5), q, k, v,
                                            None, grad)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for name, got, expected in zip("qkv", grads, grads_ref):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=f"d{name}")


WINDOWS = [1, 3, 6, 9, 30]  # a window of 1 (only itself), shorter than a branch, than a row, than a band chunk


@needs_flash
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("B, H, Hkv, L, N, S, d", [(2, 4, 2, 13, 2, 5, 16), (1, 2, 1, 150, 1, 3, 8)])
def test_flash_cpu_with_a_window_equals_eager(window, B, H, Hkv, L, N, S, d, monkeypatch):
    """Outputs and gradients; the second size runs the band in several chunks (a small chunk forces it)."""
    monkeypatch.setattr(flash_cpu, "BAND_CHUNK", 32)
    q, k, v, _, grad = _tensors({}, B, H, Hkv, L + N * L * S, seed=window, d=d)
    layout = ThoughtLayout("expanded", torch.ones(B, L, dtype=torch.bool), N, branch_length=S)
    out, grads = _outputs_and_grads(lambda: flash_cpu.expanded_attention(q, k, v, L, N, S, 0.3, window), q, k, v, None,
                                    grad)
    out_ref, grads_ref = _outputs_and_grads(lambda: eager.expanded_attention(q, k, v, layout, 0.3, window=window),
                                            q, k, v, None, grad)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for name, got, expected in zip("qkv", grads, grads_ref):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=f"d{name}")


@needs_flash
def test_flash_cpu_does_not_apply_with_padding_or_dropout():
    q = torch.zeros(1, 2, 4 + 4 * 3, 8)
    padded, full = torch.tensor([[False, True, True, True]]), torch.ones(1, 4, dtype=torch.bool)
    assert not flash_cpu.applies(q, padded, 0.0)
    assert not flash_cpu.applies(q, full, 0.1)
    assert flash_cpu.applies(q, full, 0.0)


@needs_flash
@pytest.mark.parametrize("B, H, Hkv, N, L, T, d", [(2, 4, 2, 2, 13, 5, 16), (1, 3, 1, 3, 7, 2, 8)])
def test_flash_sampling_step_equals_eager(B, H, Hkv, N, L, T, d):
    """Every sampling step, over the branch slots 0..m filled so far (NaN past them, as a buffer the steps fill)."""
    generator = torch.Generator().manual_seed(L)
    k_text, v_text = (torch.randn(B, Hkv, L, d, generator=generator) for _ in range(2))
    key_padding = torch.ones(B, L, dtype=torch.bool)
    k_buffer, v_buffer = (torch.full((B, Hkv, N, L, T, d), float("nan")) for _ in range(2))
    for step in range(T):
        q = torch.randn(B, H, N * L, d, generator=generator)
        k_buffer[:, :, :, :, step], v_buffer[:, :, :, :, step] = (torch.randn(B, Hkv, N, L, d, generator=generator)
                                                                  for _ in range(2))
        seen = k_buffer[:, :, :, :, : step + 1], v_buffer[:, :, :, :, : step + 1]
        want = eager.sample_step_attention(q, k_text, v_text, *seen, key_padding, 0.3)
        got = flash_cpu.sample_step_attention(q, k_text, v_text, *seen, 0.3)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- calls without a thought layout
@pytest.mark.parametrize("case", [CASES["window=3"], CASES["softcap"], dict(window=4, softcap=1.0)],
                         ids=["window", "softcap", "window+softcap"])
@pytest.mark.parametrize("sus_design", ["a", "c"])
def test_plain_calls_with_sus_c_keep_the_window_and_the_cap(case, sus_design):
    """Ordinary causal attention with a SUS backward (sus_c on a model call without thoughts), padded keys: the
    exact forward and, at huge c, the exact gradients of eager's causal attention. Design C takes neither rule and
    says so."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 11, 16, generator=generator, requires_grad=True) for h in (4, 2, 2))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :3] = 0  # left padding, as generation pads
    grad = torch.randn(2, 11, 4, 16, generator=generator) * mask[..., None, None]
    rule = dict(window=case.get("window"), softcap=case.get("softcap"))
    if sus_design == "c":
        with pytest.raises(ValueError, match="sus_design='c' does not implement sliding windows or soft-capping"):
            dispatch.plain_attention(q, k, v, mask, 0.5, 0.0, 1e30, sus_design="c", **rule)
        return
    results = []
    for sus_c in (None, 1e30):
        out = dispatch.plain_attention(q, k, v, mask, 0.5, 0.0, sus_c, sus_design=sus_design, **rule)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    real = mask.bool()
    (out_ref, *grads_ref), (out, *grads) = results
    torch.testing.assert_close(out[real], out_ref[real], rtol=1e-5, atol=1e-6)
    for name, got, want in zip("qkv", grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=f"d{name}")
    unwindowed = eager.causal_attention(q, k, v, mask, 0.5, softcap=rule["softcap"])
    assert rule["window"] is None or not torch.allclose(out[real], unwindowed[real])


@pytest.mark.parametrize("case", [CASES["sinks"], CASES["dv>d"], dict(dropout=0.2)], ids=["sinks", "dv", "dropout"])
def test_plain_calls_with_sus_c_refuse_what_sus_lacks(case):
    q, k, v, sinks, _ = _tensors(case, 1, 2, 2, 6, d=16)
    (feature,) = _features_of(case, case.get("dropout", 0.0)) - IMPLEMENTS["sus_torch"]
    with pytest.raises(ValueError, match=f"{REFUSAL_WORDS[feature]}.*SUS attention"):
        dispatch.plain_attention(q, k, v, None, 0.25, case.get("dropout", 0.0), sus_c=2.0, sinks=sinks)
