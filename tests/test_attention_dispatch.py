"""The dispatch of the quietstar attention: which implementation serves each phase under each attention_backend,
and that the configured backend reaches every phase of a model call (parallel = sequential checks what they compute)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_model, padded_batch
from quietstar.attention import AttentionSettings, ThoughtLayout, dispatch, eager
from quietstar.ops import flash_cpu
from quietstar.thoughts import sample_thoughts

needs_flash = pytest.mark.skipif(flash_cpu._flash is None, reason="this torch has no CPU flash-attention op")

L, N, T, S, H, D = 5, 2, 3, 4, 2, 8


def _layout(phase, backend, padded=False, sus_c=None):
    key_padding = torch.ones(1, L, dtype=torch.bool)
    key_padding[0, 0] = not padded
    lengths = dict(branch_length=S) if phase == "expanded" else dict(num_thought_tokens=T)
    return ThoughtLayout(phase, key_padding, N, attention=AttentionSettings(attention_backend=backend, sus_c=sus_c), **lengths)


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
    query = torch.zeros(1, H, 1, D)
    assert dispatch.resolve_backend(_layout(phase, backend, padded, sus_c), query, dropout) == expected


@needs_flash
@pytest.mark.parametrize("phase", ["expanded", "sample"])
def test_auto_keeps_a_window_on_the_flash_path_and_soft_capping_on_eager(phase):
    """The CPU flash path implements sliding windows but not soft-capping (its kernels take no cap)."""
    query, layout = torch.zeros(1, H, 1, D), _layout(phase, "auto")
    assert dispatch.resolve_backend(layout, query, 0.0, window=3) == "flash_cpu"
    assert dispatch.resolve_backend(layout, query, 0.0, softcap=1.0) == "eager"
    assert dispatch.resolve_backend(layout, query, 0.0, window=3, softcap=1.0) == "eager"


def _spy(monkeypatch, module, name, calls):
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(f"{module.__name__}.{name}") or original(*a, **kw))


@needs_flash
def test_eager_backend_reaches_the_sampling_steps(monkeypatch):
    """attention_backend='eager' runs the eager sampling steps (not the flash path 'auto' takes), with equal results."""
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


@pytest.mark.parametrize("phase, given, needed", [
    ("expanded", dict(num_thought_tokens=T), "branch_length"),
    ("sample", dict(branch_length=S), "num_thought_tokens"),
    ("prefix", dict(num_thought_tokens=T, branch_length=S), "num_thought_tokens"),
])
def test_layout_takes_the_length_its_phase_uses(phase, given, needed):
    with pytest.raises(ValueError, match=needed):
        ThoughtLayout(phase, torch.ones(1, L, dtype=torch.bool), N, attention=AttentionSettings(attention_backend="auto"), **given)


def test_layout_refuses_a_missing_length():
    with pytest.raises(ValueError, match="needs ThoughtLayout.branch_length"):
        ThoughtLayout("expanded", torch.ones(1, L, dtype=torch.bool), N, attention=AttentionSettings(attention_backend="auto"))
