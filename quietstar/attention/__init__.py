"""The "quietstar" attention function, registered with transformers' AttentionInterface.

A model loaded with ``attn_implementation="quietstar"`` calls :func:`quietstar_attention` in every
layer. Without a ``thought_layout`` keyword it is ordinary causal attention (with the 2-D padding
mask that :func:`padding_mask` hands over instead of a dense 4-D mask); with one, it applies the
thought visibility rule of :mod:`quietstar.attention.layout`.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ..ops import flex, sus
from . import eager, flash_cpu
from .layout import ThoughtLayout, branch_visibility, prefix_visibility

ATTENTION_NAME = "quietstar"

__all__ = [
    "ATTENTION_NAME",
    "ThoughtLayout",
    "branch_visibility",
    "gradient_pass_backend",
    "padding_mask",
    "prefix_visibility",
    "quietstar_attention",
]


def padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """Mask function for AttentionMaskInterface: pass the 2-D padding mask through, build nothing dense."""
    return attention_mask


def _check_span(sliding_window, span: int) -> None:
    if sliding_window is not None and sliding_window < span:
        raise ValueError(
            f"This model uses sliding-window attention (window {sliding_window}) but a row here spans {span} "
            "positions; the quietstar attention does not implement sliding windows. Use rows no longer than the "
            "window (max_length), or a model with full attention."
        )


def quietstar_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    thought_layout: ThoughtLayout | None = None,
    sus_c: float | None = None,
    **kwargs,
):
    """Attention with transformers' calling convention: q ``[B, H, n, d]``, k/v ``[B, Hkv, n, d]`` -> ``[B, n, H, d]``.

    ``sus_c`` (a keyword of the model call, without a thought layout): ordinary causal attention with
    an exact forward and a SUS backward (quietstar.ops.sus), for any causal LM loaded with this attention.
    """
    if softcap is not None:
        raise ValueError("The quietstar attention does not implement attention-logit soft-capping.")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    training = module.training and dropout > 0
    layout = thought_layout
    if layout is None:
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                "The quietstar attention takes a 2-D padding mask [batch, keys]; got a "
                f"{attention_mask.dim()}-D mask. Pass attention_mask as transformers' usual [batch, length] tensor."
            )
        _check_span(sliding_window, key.shape[2])
        if sus_c is not None:
            if query.shape[2] != key.shape[2]:
                raise ValueError("sus_c applies to full-sequence calls (training), not to cached decoding.")
            if training:
                raise ValueError(f"Attention dropout ({dropout}) is not implemented with sus_c; set the model's "
                                 "attention_dropout to 0.")
            out = sus.attention(query.to(value.dtype), key.to(value.dtype), value, c=sus_c, scale=scaling,
                                seed=_fresh_seed(), key_valid=attention_mask)
            return out.transpose(1, 2).contiguous(), None
        return eager.causal_attention(query, key, value, attention_mask, scaling, dropout, training), None

    if key.shape[2] != layout.expected_length():
        raise ValueError(
            f"The quietstar '{layout.phase}' layout expects {layout.expected_length()} tokens per row, the model "
            f"call held {key.shape[2]}. Do not pass past_key_values together with a thought layout."
        )
    layer = module.layer_idx
    if layout.phase == "prefix":
        _check_span(sliding_window, layout.num_text)
        layout.text_cache[layer] = (key, value)
        return eager.causal_attention(query, key, value, layout.key_padding, scaling), None
    if layout.phase == "sample":
        if layout.step == 0:
            B, hkv, _, d = key.shape
            shape = (B, hkv, layout.num_thoughts, layout.num_text, layout.branch_length, d)
            layout.branch_cache[layer] = (key.new_zeros(shape), value.new_zeros(shape))
        k_text, v_text = layout.text_cache[layer]
        k_buf, v_buf = layout.branch_cache[layer]
        fast = layout.backend == "auto" and flash_cpu.applies(query, layout, 0.0)
        step_attention = flash_cpu.sample_step_attention if fast else eager.sample_step_attention
        return step_attention(query, key, value, k_buf, v_buf, k_text, v_text, layout, scaling), None
    _check_span(sliding_window, layout.num_text + layout.branch_length)
    backend = gradient_pass_backend(layout, query, dropout if training else 0.0)
    if backend == "flex":
        return flex.expanded_attention(query, key, value, layout, scaling, dropout if training else 0.0), None
    if backend in ("sus_triton", "sus_torch"):
        engine = backend.removeprefix("sus_")
        if training:
            raise ValueError(
                f"Attention dropout ({dropout}) is not implemented by the {engine!r} SUS attention; set the model's "
                "attention_dropout to 0 or use attention_backend='eager' without sus_c."
            )
        return _sus_expanded_attention(query, key, value, layout, scaling, engine), None
    if backend == "flash_cpu":
        return flash_cpu.expanded_attention(query, key, value, layout, scaling), None
    return eager.expanded_attention(query, key, value, layout, scaling, dropout, training), None


def _fresh_seed() -> int:
    """A new SUS mask per call, reproducible under torch.manual_seed (and replayed by activation
    checkpointing, which restores the RNG state before recomputing)."""
    return int(torch.randint(0, 2**31 - 1, ()).item())


def gradient_pass_backend(layout: ThoughtLayout, query: torch.Tensor, dropout: float) -> str:
    """Which implementation serves the gradient pass: "flex", "sus_triton", "sus_torch", "flash_cpu" or "eager".

    Named backends are taken as named ("triton": the Triton kernels, exact or SUS; "flex": FlexAttention).
    Under "auto", a SUS backward (``sus_c``) runs in the Triton kernels on CUDA, and an exact one in
    FlexAttention where it applies (CUDA). With ``sus_c`` the PyTorch SUS reference serves the rest;
    otherwise the CPU flash path where it applies, else eager.
    """
    if layout.backend == "triton":
        return "sus_triton"
    if layout.backend == "flex":
        return "flex"
    on_cuda = layout.backend == "auto" and query.device.type == "cuda"
    if layout.sus_c is not None:
        return "sus_triton" if on_cuda and sus.function.triton_available() else "sus_torch"
    if on_cuda and flex.applies(query, dropout):
        return "flex"
    if layout.backend == "auto" and flash_cpu.applies(query, layout, dropout):
        return "flash_cpu"
    return "eager"


def _sus_expanded_attention(query, key, value, layout: ThoughtLayout, scaling, engine):
    """The gradient pass through quietstar.ops.sus: exact forward, exact or SUS backward."""
    key_valid = None if bool(layout.key_padding.all()) else layout.key_padding
    out = sus.attention(
        query.to(value.dtype), key.to(value.dtype), value, c=layout.sus_c, scale=scaling, seed=_fresh_seed(), backend=engine,
        num_text=layout.num_text, branch_length=layout.branch_length, key_valid=key_valid,
    )
    return out.transpose(1, 2).contiguous()


AttentionInterface.register(ATTENTION_NAME, quietstar_attention)
AttentionMaskInterface.register(ATTENTION_NAME, padding_mask)
