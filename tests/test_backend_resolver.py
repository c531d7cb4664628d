"""Which attention backend the resolver picks for each phase, device, padding, dropout and SUS setting
(quietstar.attention.dispatch.resolve_backend; docs/design.md §5.8), and what each pick computes end to end. Whether
every backend computes the same attention is tests/test_backend_matrix.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import make_model, padded_batch, randomize_mixing_head
from quietstar.attention import AttentionSettings, ThoughtLayout, dispatch, eager
from quietstar.attention.backends import resolve
from quietstar.loss_config import OFFICIAL_LOSS
from quietstar.ops import flash_cpu, sus
from quietstar.thoughts import sample_thoughts

needs_flash = pytest.mark.skipif(flash_cpu._flash is None, reason="this torch has no CPU flash-attention op")


def _layout(phase, backend, padded=False, sus_c=None, L=5, N=2, T=3, S=4):
    key_padding = torch.ones(1, L, dtype=torch.bool)
    key_padding[0, 0] = not padded
    lengths = dict(branch_length=S) if phase == "expanded" else dict(num_thought_tokens=T)
    return ThoughtLayout(phase, key_padding, N, attention=AttentionSettings(attention_backend=backend, sus_c=sus_c),
                         **lengths)


@needs_flash
@pytest.mark.parametrize("phase, backend, padded, sus_c, dropout, expected", [
    ("expanded", "auto", False, None, 0.0, "flash_cpu"),
    ("expanded", "auto", True, None, 0.0, "eager"),
    ("expanded", "auto", False, None, 0.1, "eager"),
    ("expanded", "auto", False, 2.0, 0.0, "sus_torch"),
    ("expanded", "eager", False, None, 0.0, "eager"),
    ("expanded", "eager", False, 2.0, 0.0, "sus_torch"),
    ("expanded", "triton", False, None, 0.0, "sus_triton"),
    ("sample", "auto", False, None, 0.0, "flash_cpu"),
    ("sample", "auto", False, 2.0, 0.0, "flash_cpu"),
    ("sample", "auto", True, None, 0.0, "eager"),
    ("sample", "eager", False, None, 0.0, "eager"),
    ("sample", "triton", False, None, 0.0, "eager"),
])
def test_backend_choice_on_cpu(phase, backend, padded, sus_c, dropout, expected):
    query = torch.zeros(1, 2, 1, 8)
    assert dispatch.resolve_backend(_layout(phase, backend, padded, sus_c), query, dropout) == expected


@needs_flash
@pytest.mark.parametrize("phase", ["expanded", "sample"])
def test_auto_keeps_a_window_on_the_flash_path_and_soft_capping_on_eager(phase):
    """The CPU flash path implements sliding windows but not soft-capping (its kernels take no cap)."""
    query, layout = torch.zeros(1, 2, 1, 8), _layout(phase, "auto")
    assert dispatch.resolve_backend(layout, query, 0.0, window=3) == "flash_cpu"
    assert dispatch.resolve_backend(layout, query, 0.0, softcap=1.0) == "eager"
    assert dispatch.resolve_backend(layout, query, 0.0, window=3, softcap=1.0) == "eager"


def query_on(device: str, head_dim: int):
    """What the resolver reads of a query (device, dtype, shape): a CUDA one is described, not allocated."""
    return SimpleNamespace(device=torch.device(device), dtype=torch.bfloat16, shape=(1, 4, 10, head_dim))


@pytest.mark.parametrize("backend, sus_c, device, head_dim, dropout, expected", [
    ("auto", None, "cuda", 64, 0.0, "flex"),  # the exact gradient pass on CUDA
    ("auto", 32.0, "cuda", 64, 0.0, "sus_triton"),  # SUS on CUDA: the Triton kernels
    ("triton", None, "cuda", 64, 0.0, "sus_triton"),  # the exact kernels only when named
    ("flex", None, "cuda", 64, 0.0, "flex"),
    ("auto", None, "cuda", 8, 0.0, "eager"),  # a head dim FlexAttention lacks: the exact reference
    ("auto", None, "cuda", 64, 0.1, "eager"),  # attention dropout
    ("eager", None, "cuda", 64, 0.0, "eager"),
    ("eager", 32.0, "cuda", 64, 0.0, "sus_torch"),
    ("auto", 32.0, "cpu", 64, 0.0, "sus_torch"),
    ("auto", None, "cpu", 64, 0.0, "flash_cpu" if flash_cpu._flash is not None else "eager"),
])
def test_resolver_picks_flex_for_exact_and_triton_for_sus_on_cuda(backend, sus_c, device, head_dim, dropout,
                                                                   expected):
    if backend == "triton" or (sus_c is not None and device == "cuda" and backend == "auto"):
        pytest.importorskip("triton")
    layout = ThoughtLayout("expanded", torch.ones(1, 2, dtype=torch.bool), 1, branch_length=3,
                           attention=AttentionSettings(attention_backend=backend, sus_c=sus_c))
    query = torch.zeros(1, 4, 10, head_dim) if device == "cpu" else query_on(device, head_dim)
    assert dispatch.resolve_backend(layout, query, dropout) == expected


@pytest.mark.parametrize("sus_c, expected", [(None, "flex"), (32.0, "sus_triton")])
def test_auto_routes_windowed_and_soft_capped_layers_on_cuda_as_any_other(sus_c, expected):
    """On CUDA "auto" does not steer these layers away from FlexAttention and the Triton kernels."""
    if sus_c is not None:
        pytest.importorskip("triton")
    layout = ThoughtLayout("expanded", torch.ones(1, 2, dtype=torch.bool), 1, branch_length=3,
                           attention=AttentionSettings(sus_c=sus_c))
    for rule in (dict(window=5), dict(softcap=1.0), dict(window=5, softcap=1.0)):
        assert dispatch.resolve_backend(layout, query_on("cuda", 64), 0.0, **rule) == expected


def test_flex_has_no_sus_backward():
    with pytest.raises(ValueError, match="attention_backend='flex' does not have"):
        AttentionSettings(attention_backend="flex", sus_c=32.0)
    assert AttentionSettings(attention_backend="flex").attention_backend == "flex"


def test_a_backend_the_device_cannot_run_is_refused_once_naming_the_field(monkeypatch):
    """Resolved for the device, not per call: Triton on a CPU outside the interpreter is refused with the field and
    the way out; the same settings on CUDA resolve."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    resolve.cache_clear()  # resolved once per settings and device: drop what earlier tests resolved
    settings = AttentionSettings(attention_backend="triton", sus_c=30.0)
    with pytest.raises(ValueError, match=r"attention_backend='triton' cannot run here.*attention_backend='auto'"):
        dispatch.resolve_backend(ThoughtLayout("expanded", torch.ones(1, 2, dtype=torch.bool), 1, branch_length=3,
                                               attention=settings), torch.zeros(1, 2, 1, 16), 0.0)
    if sus.function.triton_available():
        layout = ThoughtLayout("expanded", torch.ones(1, 2, dtype=torch.bool), 1, branch_length=3, attention=settings)
        assert dispatch.resolve_backend(layout, query_on("cuda", 64), 0.0) == "sus_triton"


# ----------------------------------------------------------------------------------------- through a model
def _spy(monkeypatch, module, name, calls):
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(f"{module.__name__}.{name}") or original(*a, **kw))


@needs_flash
def test_eager_backend_reaches_the_sampling_steps(monkeypatch):
    """attention_backend='eager' runs the eager sampling steps (not the flash path 'auto' takes), with equal results."""
    T = 3
    ids, mask = padded_batch(lengths=(7, 7))
    results, calls = {}, {}
    for backend in ("auto", "eager"):
        model = make_model("llama", num_thought_tokens=T, attention_backend=backend)
        calls[backend] = []
        for module, name in ((eager, "sample_step_attention"), (flash_cpu, "sample_step_attention")):
            _spy(monkeypatch, module, name, calls[backend])
        results[backend] = sample_thoughts(model, ids, mask.bool(), generator=torch.Generator().manual_seed(1),
                                           return_logits=True)
        monkeypatch.undo()
    layers = model.base.config.num_hidden_layers
    assert calls["eager"] == ["quietstar.attention.eager.sample_step_attention"] * (T * layers)
    assert calls["auto"] == ["quietstar.ops.flash_cpu.sample_step_attention"] * (T * layers)
    (thoughts_auto, logits_auto), (thoughts_eager, logits_eager) = results["auto"], results["eager"]
    torch.testing.assert_close(logits_eager, logits_auto, rtol=1e-5, atol=1e-5)
    assert torch.equal(thoughts_eager, thoughts_auto)


@needs_flash
def test_model_loss_and_gradients_agree_between_backends():
    """End to end through a model: 'auto' (flash path, unpadded rows) equals 'eager'."""
    results = []
    for backend in ("eager", "auto"):
        # Raw advantages: normalised ones divide fp32 rounding differences by a small spread, which would
        # swamp the comparison of two exact computations (the recipe's loss is checked in fp64, test_losses.py).
        model = make_model("qwen2", attention_backend=backend, **{**OFFICIAL_LOSS, "policy_weight": 2.0})
        randomize_mixing_head(model)
        ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(3))
        thoughts = model.sample_thoughts(ids, generator=torch.Generator().manual_seed(4))
        out = model(ids, labels=ids, thoughts=thoughts)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_eager, grads_eager), (loss_auto, grads_auto) = results
    torch.testing.assert_close(loss_auto, loss_eager, rtol=1e-5, atol=1e-6)
    for name in grads_eager:
        torch.testing.assert_close(grads_auto[name], grads_eager[name], rtol=1e-4, atol=1e-6, msg=name)


# --------------------------------------------------------------------------------------------- the layout
@pytest.mark.parametrize("phase, given, needed", [
    ("expanded", dict(num_thought_tokens=3), "branch_length"),
    ("sample", dict(branch_length=4), "num_thought_tokens"),
    ("prefix", dict(num_thought_tokens=3, branch_length=4), "num_thought_tokens"),
])
def test_layout_takes_the_length_its_phase_uses(phase, given, needed):
    with pytest.raises(ValueError, match=needed):
        ThoughtLayout(phase, torch.ones(1, 5, dtype=torch.bool), 2, **given)


def test_layout_refuses_a_missing_length():
    with pytest.raises(ValueError, match="needs ThoughtLayout.branch_length"):
        ThoughtLayout("expanded", torch.ones(1, 5, dtype=torch.bool), 2)
