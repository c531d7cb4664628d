"""The attention backends: one capability table, and the resolver that reads it (docs/design.md §2, "Backends").

Each implementation of the thought layout's attention is one :class:`Backend` row: the layer features it implements
(sliding windows, attention-logit soft-capping, attention sinks, values with their own head dim, dropout, padded
rows, branches at anchor positions only, hindsight branches that read text after their position), the devices it
runs on and whether it has a SUS backward. :func:`resolve` turns :class:`AttentionSettings` on one device (and the query's head dim and dtype) into the candidates of each
phase, in order of preference, computed once per model and device (and again when either changes). :func:`choose`
takes, for one layer's call, the first candidate that implements the layer's features, or refuses naming the backend
and the feature.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..ops import flash_cpu, flex, sus
from .settings import AttentionSettings

FEATURES = ("windows", "softcap", "sinks", "value_head_dim", "dropout", "padding", "anchors", "hindsight")


@dataclass(frozen=True)
class Backend:
    """What one implementation does. ``applies``: the implementation's own test of a call's inputs (device,
    dtype, head dim), for backends "auto" only takes where they apply."""

    name: str
    described: str  # how a refusal names it
    windows: bool
    softcap: bool
    sinks: bool
    value_head_dim: bool  # values with a head dim of their own (multi-head latent attention)
    dropout: bool
    padding: bool  # rows with padding keys
    anchors: bool  # branches at anchor positions only (thought_fraction < 1, quietstar.anchors)
    hindsight: bool  # sampling branches that read text after their position (quietstar.hindsight)
    devices: tuple[str, ...]
    sus: bool  # a SUS backward (sus_c)


BACKENDS = {backend.name: backend for backend in (
    Backend("eager", "the eager attention", windows=True, softcap=True, sinks=True, value_head_dim=True, dropout=True,
            padding=True, anchors=True, hindsight=True, devices=("cpu", "cuda"), sus=False),
    Backend("flash_cpu", "the CPU flash path", windows=True, softcap=False, sinks=True, value_head_dim=True,
            dropout=False, padding=False, anchors=False, hindsight=False, devices=("cpu",), sus=False),
    Backend("flex", "attention_backend='flex' (FlexAttention)", windows=True, softcap=True, sinks=False,
            value_head_dim=False, dropout=False, padding=True, anchors=False,
            hindsight=False, devices=("cuda",), sus=False),
    Backend("sus_torch", "the 'torch' SUS attention (sus_c)", windows=True, softcap=True, sinks=False,
            value_head_dim=False, dropout=False, padding=True, anchors=False,
            hindsight=False, devices=("cpu", "cuda"), sus=True),
    Backend("sus_triton", "the 'triton' SUS attention (sus_c)", windows=True, softcap=True, sinks=False,
            value_head_dim=False, dropout=False, padding=True, anchors=False,
            hindsight=False, devices=("cuda",), sus=True),
)}


@dataclass(frozen=True)
class LayerFeatures:
    """What one layer's call asks of a backend: each field True when the call has it."""

    windows: bool = False
    softcap: bool = False
    sinks: bool = False
    value_head_dim: bool = False
    dropout: bool = False
    padding: bool = False
    anchors: bool = False
    hindsight: bool = False


@dataclass(frozen=True)
class Plan:
    """The candidate backends of each phase on one device, in order of preference: ``sampling`` (the no-grad
    sampling steps), ``gradient`` (the expanded pass) and ``plain`` (a call without thoughts that sets sus_c)."""

    settings: AttentionSettings
    sampling: tuple[str, ...]
    gradient: tuple[str, ...]
    plain: tuple[str, ...]  # empty without sus_c


@functools.lru_cache(maxsize=64)
def resolve(settings: AttentionSettings, device_type: str, head_dim: int | None = None,
            dtype: torch.dtype | None = None) -> Plan:
    """The plan of ``settings`` on a device of type ``device_type`` for queries of ``head_dim`` and ``dtype``.

    Named backends serve the gradient pass alone ("triton": the SUS kernels, exact or SUS; "flex": FlexAttention;
    "eager": the reference, or with sus_c its SUS twin in PyTorch). Under "auto" a SUS backward runs in the Triton
    kernels wherever quietstar.ops.sus's own "auto" picks them (CUDA with Triton), else in its PyTorch reference; an
    exact one runs in FlexAttention on CUDA, the CPU flash path on CPU, eager where neither applies. The sampling
    steps run the CPU flash path under "auto" where it applies, else eager. A setting the device cannot run is
    refused here, naming the field and the way out.
    """
    backend, sus_c, device = settings.attention_backend, settings.sus_c, torch.device(device_type)
    # SUS where quietstar.ops.sus's own "auto" puts it: the Triton kernels on CUDA, else the PyTorch reference.
    auto_sus = "sus_torch"
    if sus_c is not None and backend == "auto" and sus.resolve_backend("auto", device, head_dim, dtype) == "triton":
        auto_sus = "sus_triton"
    if backend == "triton":
        try:
            sus.resolve_backend("triton", device, head_dim, dtype)
        except (ValueError, RuntimeError) as error:
            reason = ("the triton package is not installed" if isinstance(error, RuntimeError) else
                      f"it needs CUDA (or Triton's interpreter: TRITON_INTERPRET=1 before importing quietstar), and "
                      f"this call runs on {device_type}")
            raise ValueError(f"attention_backend='triton' cannot run here: {reason}. Set it to 'auto' (or 'eager'): "
                             "model.set_attention(attention_backend='auto'), or the run's attention_backend key."
                             ) from None
        gradient = ("sus_triton",)
    elif backend == "flex":
        gradient = ("flex",)
    elif sus_c is not None:
        gradient = (auto_sus,)
    elif backend == "auto":
        gradient = (*_native(("flex", "flash_cpu"), device_type), "eager")
    else:
        gradient = ("eager",)
    sampling = (*_native(("flash_cpu",), device_type), "eager") if backend == "auto" else ("eager",)
    plain = () if sus_c is None else (auto_sus,)
    return Plan(settings, sampling, gradient, plain)


def supports_anchors(settings: AttentionSettings, device_type: str) -> bool:
    """Whether ``settings`` on ``device_type`` run thoughts at anchor positions (thought_fraction < 1): some candidate
    of both the sampling steps and the gradient pass implements them."""
    plan = resolve(settings, device_type)
    return all(any(BACKENDS[name].anchors for name in phase) for phase in (plan.sampling, plan.gradient))


def _native(names: tuple[str, ...], device_type: str) -> tuple[str, ...]:
    """The fast paths of ``names`` that run on ``device_type``; eager, the reference, runs anywhere."""
    return tuple(name for name in names if device_type in BACKENDS[name].devices)


def missing_features(backend: Backend, features: LayerFeatures) -> list[str]:
    """The features of ``features`` that ``backend`` does not implement."""
    return [name for name in FEATURES if getattr(features, name) and not getattr(backend, name)]


def applies(name: str, query: torch.Tensor, key_padding: torch.Tensor | None, dropout: float) -> bool:
    """Whether the fast path ``name`` takes these inputs (its own device, dtype and head-dim test)."""
    if name == "flex":
        return flex.applies(query, dropout)
    if name == "flash_cpu":
        return key_padding is not None and flash_cpu.applies(query, key_padding, dropout)
    return True


def choose(candidates: tuple[str, ...], features: LayerFeatures, query: torch.Tensor,
           key_padding: torch.Tensor | None = None, dropout: float = 0.0, detail=None) -> Backend:
    """The first of ``candidates`` that implements ``features`` and takes the inputs; the last candidate is taken
    or refused (a named backend has only itself). ``detail``: feature -> the words a refusal says about it."""
    for name in candidates[:-1]:
        if not missing_features(BACKENDS[name], features) and applies(name, query, key_padding, dropout):
            return BACKENDS[name]
    backend = BACKENDS[candidates[-1]]
    missing = missing_features(backend, features)
    if missing:
        raise ValueError(refusal(backend, missing[0], detail(missing[0]) if detail else None))
    return backend


def refusal(backend: Backend, feature: str, detail: str | None = None) -> str:
    """The message refusing ``feature`` on ``backend``: what the model has, who lacks it, and the way out."""
    has = {
        "sinks": "This model uses attention sinks",
        "value_head_dim": "This model's values have their own head dim",
        "dropout": "This model uses attention dropout",
        "softcap": "This model soft-caps its attention logits",
        "windows": "This model uses sliding-window attention",
        "padding": "This call has padding keys",
        "anchors": "This model thinks at anchor positions only (thought_fraction < 1)",
        "hindsight": "This call samples hindsight proposals (hindsight_tokens > 0)",
    }[feature]
    if feature == "anchors":
        fix = ("thought_fraction < 1 runs on the eager attention backend; set attention backend to eager "
               "(attention_backend='eager' without sus_c; 'auto' picks it too)")
    elif feature == "hindsight":
        fix = "hindsight proposals are sampled on the eager attention backend, which 'auto' picks for them"
    elif feature == "dropout":
        fix = "set the model's attention_dropout to 0, or use attention_backend='eager' without sus_c"
    else:
        fix = "use attention_backend='auto' or 'eager' without sus_c, which implement it"
    return f"{has}{f' ({detail})' if detail else ''}, which {backend.described} does not implement; {fix}."
