"""Build the tokenizer, the base language model and the Quiet-STaR model that ModelArguments describe."""

from __future__ import annotations

import dataclasses
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..assets import resolve_model
from ..attention import AttentionSettings
from ..config import QuietStarConfig
from ..loss_config import QuietStarLossConfig
from ..lora import add_lora, lora_config
from ..modeling import QuietStarForCausalLM
from ..tiny import byte_tokenizer
from .arguments import BUILTIN_BYTE_TOKENIZER, ModelArguments
from .config_file import did_you_mean
from .controls import control_config, freeze_thought_parts


def load_tokenizer(args: ModelArguments):
    """The tokenizer named by ``tokenizer_name_or_path`` (default: the model's), or the built-in byte tokenizer."""
    name = args.tokenizer_name_or_path or args.model_name_or_path
    if name == BUILTIN_BYTE_TOKENIZER:
        return byte_tokenizer()
    return _load(AutoTokenizer.from_pretrained, name, "tokenizer")


def random_model_config(values: dict, vocab_size: int):
    """A transformers config from ``values`` (vocab_size defaults to ``vocab_size``); misspelt fields are refused."""
    values = {"vocab_size": vocab_size, **values}
    if values["vocab_size"] < vocab_size:
        raise ValueError(f"model_config.vocab_size ({values['vocab_size']}) is smaller than the tokenizer's "
                         f"{vocab_size} tokens; remove it to use the tokenizer's size.")
    config = AutoConfig.for_model(**values)
    if dataclasses.is_dataclass(config):
        fields = {f.name for f in dataclasses.fields(config)} | {"model_type"}
        # Legacy names (e.g. rope_theta) are folded into fields; a typo stays behind as a stray attribute.
        stray = [key for key in values if key not in fields and key in vars(config)]
        if stray:
            hints = [f"{key!r}{did_you_mean(key, fields)}" for key in stray]
            raise ValueError(f"model_config has keys that are not fields of {type(config).__name__}: "
                             f"{', '.join(hints)}.")
    return config


def load_base_model(args: ModelArguments, tokenizer):
    """The causal LM: pretrained from ``model_name_or_path``, or randomly initialised from ``model_config``."""
    dtype = getattr(torch, args.dtype)
    if args.model_config is not None:
        return AutoModelForCausalLM.from_config(random_model_config(args.model_config, len(tokenizer)), dtype=dtype)
    return _load(AutoModelForCausalLM.from_pretrained, args.model_name_or_path, "model", dtype=dtype)


def _load(from_pretrained, name: str, what: str, **kwargs):
    """``from_pretrained(name)``, with an offline name resolved; a name that is neither a local folder nor
    reachable on the Hub gets a message saying so."""
    try:
        return from_pretrained(resolve_model(name), **kwargs)
    except OSError as error:
        local = os.path.isdir(os.path.expanduser(name))
        where = "the local folder has no usable files" if local else (
            "it is not a local folder, and the Hugging Face Hub has no such repository or cannot be reached")
        raise ValueError(f"Could not load the {what} {name!r}: {where} ({str(error).splitlines()[0]}). Use a local "
                         "folder, an offline name such as 'smollm2-135m', or check the id and your network.") from error


def build_model(args: ModelArguments, quietstar_config: QuietStarConfig, loss_config: QuietStarLossConfig | None = None,
                attention: AttentionSettings | None = None, control: str = "none") -> QuietStarForCausalLM:
    """Tokenizer + base LM wrapped as a QuietStarForCausalLM (the two thought tokens are added), with the run's
    loss and attention settings, LoRA adapters when ``args.peft`` asks for them, built for the training ``control``
    (quietstar.training.controls: its ``quietstar_config`` is the one the control runs with)."""
    quietstar_config = control_config(control, quietstar_config, args.peft)
    check_text_path(args, quietstar_config)
    tokenizer = load_tokenizer(args)
    model = QuietStarForCausalLM.from_base(load_base_model(args, tokenizer), tokenizer, quietstar_config,
                                           loss_config=loss_config, attention=attention)
    model.loss_config.check_mixing(quietstar_config.mixing)  # before any step: the prior needs a bounded w
    if quietstar_config.text_path == "frozen":
        model.base.requires_grad_(False)
    if args.peft is not None:
        add_lora(model, lora_config(args.peft))
    if control == "finetune":
        freeze_thought_parts(model)
    return model


def check_text_path(args: ModelArguments, quietstar_config: QuietStarConfig) -> None:
    """Refuse a text_path that the peft settings contradict, naming both fields."""
    path = quietstar_config.text_path
    if path == "frozen" and args.peft is not None:
        raise ValueError("text_path: frozen keeps the LM's weights fixed, but peft adds LoRA adapters that would train "
                         "the text path. Use text_path: thought_lora (adapters on thought tokens only), or remove peft.")
    if path == "thought_lora" and args.peft is None:
        raise ValueError("text_path: thought_lora trains LoRA adapters on thought tokens, but no peft section says "
                         "which: add e.g. peft: {r: 16, lora_alpha: 32, target_modules: [q_proj, k_proj, v_proj, "
                         "o_proj]}, or use text_path: frozen.")
