"""LoRA through peft: low-rank adapters on chosen LM modules, the rest of the LM frozen.

The thought embeddings and the mixing head live outside the LM, so they keep training fully. The adapter is
injected into ``model.base`` in place (``peft.get_peft_model``), so everything that reads the LM (the attention
seam, generation, evaluation) runs through it unchanged. On disk a LoRA model is the LM without the adapter (a
stock transformers folder) plus the adapter in ``adapter/`` (``PeftModel.save_pretrained``), the layout
``scripts/export.py --merge-lora`` expects.
"""

from __future__ import annotations

import os

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

ADAPTER_FOLDER = "adapter"
# Keyword of a model call without a thought layout: bool [B, n], True for the tokens that are thought-branch tokens
# (generation and the explicit-sequence test oracle use it; calls with a thought layout derive it from the layout).
THOUGHT_BRANCH_MASK = "thought_branch_mask"


def lora_config(values: dict) -> LoraConfig:
    """A ``peft.LoraConfig`` from a config's ``peft:`` mapping; unknown keys are refused with the valid ones."""
    if not isinstance(values, dict):
        raise ValueError(f"peft must be a mapping of LoraConfig fields (r, lora_alpha, target_modules, ...), "
                         f"got {values!r}.")
    values = dict(values)
    if values.pop("peft_type", "LORA") not in ("LORA", "lora"):
        raise ValueError("Only LoRA is supported in the peft section (peft_type: LORA).")
    values.setdefault("task_type", "CAUSAL_LM")
    known = set(LoraConfig.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"peft has unknown LoRA settings {unknown}; use fields of peft.LoraConfig such as r, "
                         "lora_alpha, lora_dropout, target_modules.")
    return LoraConfig(**values)


def add_lora(model, config: LoraConfig) -> PeftModel:
    """Inject LoRA adapters into ``model.base`` and freeze its other weights; return the peft wrapper."""
    peft_model = get_peft_model(model.base, config)
    if peft_model.base_model.model is not model.base:
        raise RuntimeError("peft wrapped a copy of the LM instead of injecting adapters into it.")
    model.attach_lora(peft_model)
    return peft_model


def load_lora(model, folder: str, trainable: bool = True) -> PeftModel | None:
    """Attach the adapter saved in ``folder/adapter`` to ``model.base``, if there is one."""
    adapter = os.path.join(folder, ADAPTER_FOLDER)
    if not os.path.isdir(adapter):
        return None
    peft_model = PeftModel.from_pretrained(model.base, adapter, is_trainable=trainable)
    model.attach_lora(peft_model)
    return peft_model


def lm_state_dict_without_lora(base) -> dict:
    """The LM's weights as the LM alone has them: adapter tensors dropped, ``base_layer`` names undone."""
    return {name.replace(".base_layer.", "."): tensor for name, tensor in base.state_dict().items()
            if "lora_" not in name}


def branch_scale(layout, branch_mask, hidden: torch.Tensor):
    """How much of the adapters' output each token of a model call gets: None (none), 1.0 (all), or a
    ``[B|1, n, 1]`` 0/1 tensor. From the thought layout when there is one (prefix: text only, none; sample: branch
    tokens only, all; expanded: the L text tokens none, the branch tokens all), else from ``branch_mask [B, n]``."""
    if layout is not None:
        if layout.phase == "prefix":
            return None
        if layout.phase == "sample":
            return 1.0
        return (torch.arange(hidden.shape[1], device=hidden.device) >= layout.num_text).to(hidden.dtype)[None, :, None]
    if branch_mask is None:
        return None
    return branch_mask.to(device=hidden.device, dtype=hidden.dtype).unsqueeze(-1)


class ThoughtTokenGate:
    """Makes the LoRA adapters of ``model.base`` act on thought-branch tokens only (``text_path="thought_lora"``).

    Every text token is then computed by the frozen base LM, so the text K/V that thoughts read and every
    prediction made without thoughts are exactly the base model's. Each layer's attention module gets a forward
    pre-hook that reads the call's ``thought_layout`` or ``thought_branch_mask`` keyword and sets the scale; every
    ``lora_B`` of that layer multiplies its output by it. The hook sits on the attention module, inside the layer's
    ``forward``, so activation checkpointing replays it when it recomputes the layer.
    """

    def __init__(self, base, layers):
        self.scale = None
        self._handles = []
        inside = set()
        for layer in layers:
            attention = getattr(layer, "self_attn", None)
            if attention is None:
                raise ValueError(f"text_path='thought_lora' needs decoder layers with a self_attn module; "
                                 f"{type(layer).__name__} has none.")
            self._handles.append(attention.register_forward_pre_hook(self._set_scale, with_kwargs=True))
            inside.update(id(m) for m in layer.modules())
        for name, module in base.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            if id(module) not in inside:
                raise ValueError(f"text_path='thought_lora' takes adapters inside the decoder layers only; {name} is "
                                 "outside them (remove it from target_modules).")
            if getattr(module, "lora_variant", None):
                raise ValueError(f"text_path='thought_lora' supports plain LoRA only; {name} uses a variant "
                                 "(DoRA or similar).")
            for adapter in module.lora_B.values():
                self._handles.append(adapter.register_forward_hook(self._gate))

    def _set_scale(self, module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.scale = branch_scale(kwargs.get("thought_layout"), kwargs.get(THOUGHT_BRANCH_MASK), hidden)

    def _gate(self, module, inputs, output):
        if self.scale is None:
            return torch.zeros_like(output)
        if isinstance(self.scale, float):
            return output
        return output * self.scale.to(output.dtype)
