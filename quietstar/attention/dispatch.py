"""The "quietstar" attention function: a short entry point, one function per phase, one backend choice.

transformers calls :func:`quietstar_attention` in every layer of a model loaded with
``attn_implementation="quietstar"``. The call's ``thought_layout`` keyword names the phase
(:mod:`.layout`): none (ordinary causal attention: the text pass, generation, any plain LM),
``"prefix"``, ``"sample"`` or ``"expanded"``. Which implementation serves a call is read from the capability
table in :mod:`.backends` (:func:`resolve_backend`); this file decides nothing about what a backend implements.

Shapes as transformers passes them: q ``[B, H, n, d]``, k ``[B, Hkv, n, d]``, v ``[B, Hkv, n, dv]`` (after RoPE;
dv != d in multi-head latent attention); every phase returns ``[B, n, H, dv]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..ops import flash_cpu, flex, sus
from . import eager
from .backends import LayerFeatures, choose, resolve
from .layout import ThoughtLayout
from .settings import AttentionSettings

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
    sus_design: str = "a",
    s_aux: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs,
):
    """Attention with transformers' calling convention; returns (output ``[B, n, H, dv]``, None).

    ``sliding_window`` (this layer's window, None in global layers), ``softcap`` (attention-logit
    soft-capping) and attention sinks (``s_aux`` as GPT-OSS names them, or ``sinks``: one logit per query head,
    ``[H]``) are the family's own, applied in every phase (:mod:`.layout`, :mod:`.eager`). Sinks per token and an
    additive ``position_bias`` over query-key pairs are refused.
    ``sus_c`` and ``sus_design`` (keywords of the model call, without a thought layout): ordinary causal attention
    with an exact forward and a SUS backward (quietstar.ops.sus), for any causal LM loaded with this attention.
    What each backend implements is in :data:`.backends.BACKENDS`.
    """
    if getattr(module, "is_causal", True) is False:  # transformers' own attention functions read it from the module
        raise ValueError(
            f"{type(module).__name__} attends bidirectionally (is_causal=False); Quiet-STaR needs every attention "
            "over tokens to be causal (BERT-style encoders become causal LMs with config.is_decoder=True).")
    sinks = s_aux if sinks is None else sinks
    if position_bias is not None or (sinks is not None and sinks.dim() != 1):
        feature = "an additive position bias" if position_bias is not None else "attention sinks that vary by token"
        raise ValueError(f"{type(module).__name__} passes {feature} to its attention, which Quiet-STaR's attention "
                         "does not implement; its thoughts would be computed wrongly.")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    dropout = dropout if module.training else 0.0
    rule = dict(window=sliding_window, softcap=softcap, sinks=sinks)
    layout = thought_layout
    if layout is None:
        return plain_attention(query, key, value, attention_mask, scaling, dropout, sus_c, sus_design=sus_design,
                               **rule), None
    if key.shape[2] != layout.expected_length():
        raise ValueError(
            f"The quietstar '{layout.phase}' layout expects {layout.expected_length()} keys per row (one per token of "
            f"the call), {type(module).__name__} attended over {key.shape[2]}: either past_key_values were passed "
            "with a thought layout (do not), or the model adds key/value entries of its own to the tokens' (compressed "
            "or memory entries, as DeepSeek-V4's compressed attention appends), which the thought layout cannot place."
        )
    if layout.phase == "prefix":
        return prefix_attention(module.layer_idx, query, key, value, layout, scaling, **rule), None
    if layout.phase == "sample":
        return sampling_step_attention(module.layer_idx, query, key, value, layout, scaling, **rule), None
    return gradient_pass_attention(query, key, value, layout, scaling, dropout, **rule), None


def _features(query, value_head_dim, padded, dropout, window, softcap, sinks, anchors=False,
              hindsight=False) -> tuple[LayerFeatures, Callable]:
    """What a call asks of a backend, and how a refusal describes each feature (called only to refuse)."""
    own_value_dim = value_head_dim not in (None, query.shape[-1])
    features = LayerFeatures(windows=window is not None, softcap=softcap is not None, sinks=sinks is not None,
                             value_head_dim=own_value_dim, dropout=dropout > 0, padding=padded, anchors=anchors,
                             hindsight=hindsight)

    def detail(feature: str) -> str | None:
        return {"dropout": f"{dropout}", "softcap": f"cap {softcap}", "windows": f"window {window}",
                "sinks": None if sinks is None else f"one logit per head {tuple(sinks.shape)}",
                "value_head_dim": f"{value_head_dim}; queries and keys: {query.shape[-1]}, as in multi-head latent "
                                  "attention"}.get(feature)
    return features, detail


def resolve_backend(layout: ThoughtLayout, query: torch.Tensor, dropout: float, window: int | None = None,
                    softcap: float | None = None, value_head_dim: int | None = None,
                    sinks: torch.Tensor | None = None) -> str:
    """Which implementation serves a sampling step or the gradient pass: "eager", "flash_cpu", "flex", "sus_torch"
    or "sus_triton": the first candidate of the layout's plan (:func:`.backends.resolve`, once per settings and
    device) that implements this layer's features (:func:`.backends.choose`); a named backend that lacks one
    refuses, naming it. ``value_head_dim``: the values' head dim, when it may differ from the queries'."""
    plan = resolve(layout.attention, query.device.type, query.shape[-1], query.dtype)
    candidates = plan.gradient if layout.phase == "expanded" else plan.sampling
    features, detail = _features(query, value_head_dim, layout.padded, dropout, window, softcap, sinks,
                                 anchors=layout.anchors is not None, hindsight=layout.reach is not None)
    return choose(candidates, features, query, layout.key_padding, dropout, detail).name


def plain_attention(query, key, value, attention_mask, scaling, dropout, sus_c, window=None, softcap=None,
                    sinks=None, sus_design="a"):
    """Ordinary causal attention over a 2-D padding mask ``[B, n_kv]``; with ``sus_c``, a SUS backward of design
    ``sus_design``."""
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            "The quietstar attention takes a 2-D padding mask [batch, keys]; got a "
            f"{attention_mask.dim()}-D mask. Pass attention_mask as transformers' usual [batch, length] tensor."
        )
    if sus_c is None:
        return eager.causal_attention(query, key, value, attention_mask, scaling, dropout, window, softcap, sinks)
    if query.shape[2] != key.shape[2]:
        raise ValueError("sus_c applies to full-sequence calls (training), not to cached decoding.")
    settings = AttentionSettings(sus_c=sus_c, sus_design=sus_design)
    plan = resolve(settings, query.device.type, query.shape[-1], value.dtype)
    features, detail = _features(query, value.shape[-1], False, dropout, window, softcap, sinks)
    engine = choose(plan.plain, features, query, None, dropout, detail).name.removeprefix("sus_")
    out = sus.attention(query.to(value.dtype), key.to(value.dtype), value, c=sus_c, scale=scaling,
                        seed=_fresh_seed(), backend=engine, key_valid=attention_mask, window=window, softcap=softcap,
                        sus_design=sus_design)
    return out.transpose(1, 2).contiguous()


def prefix_attention(layer: int, query, key, value, layout: ThoughtLayout, scaling, window=None, softcap=None,
                     sinks=None):
    """The text pass before sampling: causal attention over the L text tokens, whose K/V are kept for the steps."""
    layout.text_cache[layer] = (key, value)
    return eager.causal_attention(query, key, value, layout.key_padding, scaling, window=window, softcap=softcap,
                                  sinks=sinks)


def sampling_step_attention(layer: int, query, key, value, layout: ThoughtLayout, scaling, window=None,
                            softcap=None, sinks=None):
    """Sampling step m = ``layout.step``: the N*P new tokens b_{.,m+1} (P = L, or M anchors; k ``[B, Hkv, N*P, d]``,
    v ``[B, Hkv, N*P, dv]``) go into slot m of this layer's branch buffers ``[B, Hkv, N, P, T, d or dv]`` (allocated
    at step 0); their queries then attend to the cached text and to their own branch slots 0..m."""
    m = layout.step
    if m == 0:
        slots = (layout.num_thoughts, layout.num_branch_positions, layout.num_thought_tokens)
        layout.branch_cache[layer] = tuple(x.new_zeros(*x.shape[:2], *slots, x.shape[-1]) for x in (key, value))
    k_text, v_text = layout.text_cache[layer]
    k_buffer, v_buffer = layout.branch_cache[layer]
    B, hkv, N, P = k_buffer.shape[:4]
    k_buffer[:, :, :, :, m] = key.view(B, hkv, N, P, -1)
    v_buffer[:, :, :, :, m] = value.view(B, hkv, N, P, -1)
    k_branch, v_branch = k_buffer[:, :, :, :, : m + 1], v_buffer[:, :, :, :, : m + 1]
    if resolve_backend(layout, query, 0.0, window, softcap, sinks=sinks) == "flash_cpu":
        return flash_cpu.sample_step_attention(query, k_text, v_text, k_branch, v_branch, scaling, window, sinks)
    return eager.sample_step_attention(query, k_text, v_text, k_branch, v_branch, layout.key_padding, scaling,
                                       window, softcap, sinks, layout.anchors, layout.reach)


def gradient_pass_attention(query, key, value, layout: ThoughtLayout, scaling, dropout, window=None, softcap=None,
                            sinks=None):
    """The expanded phase: the L text tokens then the N*L*S branch tokens, with gradient."""
    backend = resolve_backend(layout, query, dropout, window, softcap, value.shape[-1], sinks)
    settings = layout.attention
    if backend in ("sus_torch", "sus_triton"):
        key_valid = layout.key_padding if layout.padded else None
        out = sus.attention(
            query.to(value.dtype), key.to(value.dtype), value, c=settings.sus_c, scale=scaling, seed=_fresh_seed(),
            backend=backend.removeprefix("sus_"), num_text=layout.num_text, branch_length=layout.branch_length,
            key_valid=key_valid, fp32_precision=settings.triton_fp32_precision, window=window, softcap=softcap,
            sus_design=settings.sus_design,
        )
        return out.transpose(1, 2).contiguous()
    if backend == "flex":
        return flex.expanded_attention(query, key, value, layout, scaling, dropout, window, softcap)
    if backend == "flash_cpu":
        return flash_cpu.expanded_attention(query, key, value, layout.num_text, layout.num_thoughts,
                                            layout.branch_length, scaling, window, sinks)
    return eager.expanded_attention(query, key, value, layout, scaling, dropout, window, softcap, sinks)


def _fresh_seed() -> int:
    """A new SUS mask per call, reproducible under torch.manual_seed (and replayed by activation
    checkpointing, which restores the RNG state before recomputing)."""
    return int(torch.randint(0, 2**31 - 1, ()).item())
