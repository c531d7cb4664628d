"""LoRA through peft: low-rank adapters on chosen LM modules, the rest of the LM frozen.

The thought embeddings and the mixing head live outside the LM, so they keep training fully. The adapter is
injected into ``model.base`` in place (``peft.get_peft_model``), so everything that reads the LM (the attention
seam, generation, evaluation) runs through it unchanged. On disk a LoRA model is the LM without the adapter (a
stock transformers folder) plus the adapter in ``adapter/`` (``PeftModel.save_pretrained``), the layout
``scripts/export.py --merge-lora`` expects.
"""

from __future__ import annotations

import os

from peft import LoraConfig, PeftModel, get_peft_model

ADAPTER_FOLDER = "adapter"


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
