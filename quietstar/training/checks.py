"""Checks a run makes before it trains, so that bad input stops it with a message instead of a crash midway."""

from __future__ import annotations

import json
import os

from ..attention.backends import supports_anchors
from ..checkpoint import LM_CONFIG_FILE, read_saved_quietstar
from .arguments import SYNTHETIC_MULTIHOP
from .curriculum import longest_thought_lengths

# LM config fields whose difference makes a checkpoint's weights unusable for the model being trained.
ARCHITECTURE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                       "intermediate_size", "vocab_size")
# Quiet-STaR fields a checkpoint must share with the run that resumes it; the curriculum may change the lengths.
THOUGHT_FIELDS = ("num_thought_tokens", "num_lookahead_tokens", "num_thoughts", "mixing", "start_thought_token",
                  "end_thought_token", "thoughts", "thought_fraction")


def check_positions(model, max_length: int, stages=()) -> None:
    """The thought branch of the last position reaches position id ``max_length + T + A``; refuse a window the
    model's position embeddings (``max_position_embeddings``) cannot hold. ``stages``: a thought curriculum, whose
    longest stage counts."""
    thought, lookahead = longest_thought_lengths(model.quietstar_config, stages)
    needed = max_length + thought + lookahead + 1
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and needed > limit:
        raise ValueError(
            f"max_length {max_length} with num_thought_tokens {thought} and num_lookahead_tokens "
            f"{lookahead} needs {needed} positions, but the model has max_position_embeddings "
            f"{limit}. Lower max_length to at most {limit - needed + max_length}."
        )


def check_thought_fraction(model, device_type: str) -> None:
    """Thinking at anchor positions only (thought_fraction < 1) runs on the eager attention: refuse, before any step,
    attention settings that would not run it on ``device_type``."""
    if model.quietstar_config.thought_fraction < 1 and not supports_anchors(model.attention, device_type):
        raise ValueError(f"thought_fraction {model.quietstar_config.thought_fraction} (thoughts at anchor positions "
                         f"only) with attention_backend={model.attention.attention_backend!r}, "
                         f"sus_c={model.attention.sus_c!r}: thought_fraction < 1 runs on the eager attention backend; "
                         "set attention backend to eager (attention_backend: eager, without sus_c; auto picks it too).")


def check_checkpoint_matches(model, checkpoint: str, curriculum: bool = False) -> None:
    """Refuse to resume from a checkpoint written for another model or Quiet-STaR config, naming what differs."""
    lm_path = os.path.join(checkpoint, LM_CONFIG_FILE)
    if not os.path.isfile(lm_path):
        raise FileNotFoundError(f"{lm_path} is missing: {checkpoint} is not a complete checkpoint of this trainer.")
    saved_thoughts = read_saved_quietstar(checkpoint).config.to_dict()
    with open(lm_path) as f:
        saved_lm = json.load(f)
    current_lm, current_thoughts = model.config.to_dict(), model.quietstar_config.to_dict()
    skip = {"num_thought_tokens", "num_lookahead_tokens"} if curriculum else set()
    differences = [f"{name}: checkpoint {saved_lm.get(name)!r}, run {current_lm.get(name)!r}"
                   for name in ARCHITECTURE_FIELDS if saved_lm.get(name) != current_lm.get(name)]
    differences += [f"{name}: checkpoint {saved_thoughts.get(name)!r}, run {current_thoughts.get(name)!r}"
                    for name in THOUGHT_FIELDS if name not in skip and saved_thoughts.get(name) != current_thoughts.get(name)]
    if differences:
        raise ValueError(f"Checkpoint {checkpoint} was written by a different configuration ({'; '.join(differences)}). "
                         "Resume with the configuration that wrote it, or start a new run in another output_dir.")


def check_gold_thoughts(uses_gold_thoughts: bool, dataset: str, hops: int, num_thought_tokens: int,
                        stages=()) -> None:
    """Refuse a gold-thought warm start that has nothing to insert or no room for it: it needs the multi-hop task
    with k >= 2 (k - 1 intermediates) and thoughts of at least k - 1 tokens at every curriculum stage."""
    if not uses_gold_thoughts:
        return
    if dataset != SYNTHETIC_MULTIHOP:
        raise ValueError(f"gold_thought_steps / gold_thought_interval insert the multi-hop task's gold thoughts, but "
                         f"dataset is {dataset!r}; use dataset: {SYNTHETIC_MULTIHOP}, or set both to 0.")
    if hops < 2:
        raise ValueError(f"Gold thoughts (gold_thought_steps, gold_thought_interval) need multihop_hops >= 2: at k = {hops} a query has no intermediate "
                         "entity to put in its thought.")
    shortest = min([num_thought_tokens, *(stage.num_thought_tokens for stage in stages)])
    if shortest < hops - 1:
        raise ValueError(f"A gold thought holds the query's {hops - 1} intermediate entities, but thoughts are "
                         f"{shortest} tokens long; raise num_thought_tokens to at least {hops - 1}.")
