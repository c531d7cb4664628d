"""The training controls that tell thinking from fine-tuning (``control`` in QuietStarTrainingArguments; docs/design.md
§7): what each changes in the model a run builds, and the finetune control's loss.

- ``finetune``: the same adapters (or, without peft, the same full LM) trained as a plain causal LM: adapters act on
  every token (``text_path`` thought_lora becomes train), the thought embeddings and the mixing head are frozen, and
  the loss is :func:`plain_lm_output`'s next-token NLL. Nothing samples thoughts.
- ``null_thoughts``: the model's thoughts are filler (``QuietStarConfig.thoughts = "filler"``), so the whole recipe
  runs on T filler tokens per thought; the trainer turns the policy loss off.
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import QuietStarConfig
from ..losses import IGNORE_INDEX, masked_mean, token_nll
from ..modeling import QuietStarForCausalLM, QuietStarOutput
from ..vocab import mask_thought_tokens


def control_config(control: str, config: QuietStarConfig, peft) -> QuietStarConfig:
    """The QuietStarConfig a run with ``control`` builds its model with (``peft``: the run's peft settings or None).

    Refuses ``thoughts: filler`` set by hand (``control: null_thoughts`` is the one switch) and a finetune control
    of a frozen text path (it would train nothing).
    """
    if config.thoughts != "sampled" and control != "null_thoughts":
        raise ValueError(f"thoughts: {config.thoughts} is what control: null_thoughts sets (it also turns the policy "
                         "loss off); set control: null_thoughts instead of thoughts.")
    if control == "null_thoughts":
        return dataclasses.replace(config, thoughts="filler")
    if control == "finetune":
        if config.text_path == "frozen":
            raise ValueError("control: finetune trains the text path as a plain LM, but text_path: frozen has nothing "
                             "that trains on text; its control is the base model itself, which needs no run.")
        if config.text_path == "thought_lora" and peft is None:
            raise ValueError("control: finetune of a thought_lora run needs the run's peft section (the adapters to "
                             "train on every token).")
        return dataclasses.replace(config, text_path="train")
    return config


def freeze_thought_parts(model: QuietStarForCausalLM) -> None:
    """The finetune control trains the text path only: the thought embeddings and the mixing head get no gradient
    (nothing thinks), so they are frozen rather than left as unused parameters (which DDP refuses)."""
    model.thought_embeddings.requires_grad_(False)
    model.mixing_head.requires_grad_(False)


def plain_lm_output(model: QuietStarForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    labels: torch.Tensor) -> QuietStarOutput:
    """The finetune control's step: the LM (its adapters on every token) as a plain causal LM, no thoughts.

    input_ids/attention_mask/labels ``[B, L]`` (labels: IGNORE_INDEX where not scored; the target of position j is
    labels[j+1]). loss = mean over valid positions of -log p(x_{j+1}), with the thought tokens excluded from the
    distribution as in every Quiet-STaR score; positions as in the Quiet-STaR text pass. ``loss_terms``: {"nll"}.
    """
    key_padding = model._key_padding(input_ids, attention_mask)
    logits = model.base(input_ids=input_ids, attention_mask=key_padding.long(),
                        position_ids=model.text_positions(key_padding)).logits
    targets = labels[:, 1:].masked_fill(~key_padding[:, 1:], IGNORE_INDEX)
    valid = (targets != IGNORE_INDEX) & key_padding[:, :-1]
    nll = token_nll(mask_thought_tokens(logits[:, :-1], model.thought_token_ids), targets.masked_fill(~valid, 0))
    loss = masked_mean(nll, valid)
    value = loss.item()
    return QuietStarOutput(loss=loss, metrics={"loss": value, "nll_loss": value, "base_nll": value},
                           loss_terms={"nll": loss})
