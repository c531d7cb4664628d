"""Will a run fit? A coarse estimate of peak training memory, checked before training starts.

The estimate (bytes, per process) adds:
* weights, gradients and AdamW's two moments: 16 bytes per trainable parameter in fp32 (4 per frozen one),
  divided among the processes under FSDP (which shards them);
* activations kept for backward by the gradient pass over the thought-expanded rows: B * L * (1 + N*S)
  tokens (S = T + A + 1), each keeping about ``8 * hidden + 4 * intermediate`` values per layer at the compute
  dtype (one layer's worth plus one hidden state per layer with gradient checkpointing);
* logits: every scored position (B * L * (1 + N * (T + A)) of them) holds a vocabulary row in fp32 three times
  (logits, log-softmax, gradient).
It ignores allocator slack and framework overhead, so the check only refuses runs the estimate says cannot fit.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from ..anchors import anchors_per_row
from ..bf16 import resolve_bf16
from .curriculum import longest_thought_lengths

FLOAT_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


def estimate_training_bytes(model, batch_size: int, max_length: int, compute_dtype: torch.dtype,
                            gradient_checkpointing: bool, quietstar_config=None, weight_shards: int = 1) -> dict[str, int]:
    """Estimated peak bytes by part (``weights_and_optimizer``, ``activations``, ``logits``) and ``total``, for the
    thought lengths of ``quietstar_config`` (default: the model's), with branches at its ``thought_fraction`` of
    the positions; ``weight_shards`` processes share the weights and optimizer state (FSDP)."""
    cfg, text_cfg = quietstar_config or model.quietstar_config, model.config
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    hidden = text_cfg.hidden_size
    intermediate = getattr(text_cfg, "intermediate_size", None) or 4 * hidden
    layers = text_cfg.num_hidden_layers
    branch = cfg.num_thought_tokens + cfg.num_lookahead_tokens + 1
    thinking = anchors_per_row(max_length, cfg.thought_fraction)  # positions with branches: M, or L at q = 1
    tokens = batch_size * (max_length + cfg.num_thoughts * thinking * branch)
    per_token_layer = (8 * hidden + 4 * intermediate) * FLOAT_BYTES.get(compute_dtype, 4)
    if gradient_checkpointing:
        activations = tokens * (per_token_layer + layers * hidden * FLOAT_BYTES.get(compute_dtype, 4))
    else:
        activations = tokens * layers * per_token_layer
    scored_per_branch = cfg.num_thought_tokens + cfg.num_lookahead_tokens
    scored = batch_size * (max_length + cfg.num_thoughts * thinking * scored_per_branch)
    logits = scored * text_cfg.vocab_size * 4 * 3
    parts = {"weights_and_optimizer": (16 * trainable + 4 * frozen) // weight_shards, "activations": activations,
             "logits": logits}
    parts["total"] = sum(parts.values())
    return parts


def available_bytes(device: torch.device) -> int | None:
    """Free memory where training runs: the GPU's free memory, or the host's MemAvailable (None if unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def format_gib(value: int) -> str:
    return f"{value / 2**30:.1f} GiB"


def fsdp_shards(args) -> int:
    """How many processes share the weights: the process count under FSDP (``accelerate launch`` with an FSDP config
    sets ACCELERATE_USE_FSDP; TrainingArguments' own ``fsdp`` option too), else 1."""
    fsdp = bool(getattr(args, "fsdp", None)) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    return max(getattr(args, "world_size", 1), 1) if fsdp else 1


def check_memory(model, args, max_length: int, device: torch.device, available: int | None = None) -> dict:
    """Raise MemoryError (with the estimate) when the estimated peak exceeds the free memory; return the estimate.

    ``args``: the training arguments (per_device_train_batch_size, bf16/fp16, gradient_checkpointing); a bf16 of
    "auto" counts as what it resolves to on ``device`` (quietstar.bf16.resolve_bf16), as training does.
    """
    bf16 = resolve_bf16(args.bf16, device.type).enabled
    compute_dtype = torch.bfloat16 if bf16 else torch.float16 if args.fp16 else model.base.dtype
    thought, lookahead = longest_thought_lengths(model.quietstar_config, getattr(args, "thought_stages", ()))
    cfg = dataclasses.replace(model.quietstar_config, num_thought_tokens=thought, num_lookahead_tokens=lookahead)
    parts = estimate_training_bytes(model, args.per_device_train_batch_size, max_length, compute_dtype,
                                    args.gradient_checkpointing, cfg, weight_shards=fsdp_shards(args))
    available = available_bytes(device) if available is None else available
    if available is not None and parts["total"] > available:
        detail = ", ".join(f"{name} {format_gib(value)}" for name, value in parts.items() if name != "total")
        raise MemoryError(
            f"This run needs about {format_gib(parts['total'])} ({detail}) on {device}, but only "
            f"{format_gib(available)} is free. Lower per_device_train_batch_size (raise gradient_accumulation_steps "
            "to keep the batch), max_length, num_thoughts or num_thought_tokens, or set gradient_checkpointing: true. "
            "skip_memory_check: true trains anyway."
        )
    return parts
