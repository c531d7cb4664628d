"""Checks a run makes before it trains, so that bad input stops it with a message instead of a crash midway."""

from __future__ import annotations

import json
import os

from ..checkpoint import LM_CONFIG_FILE, read_saved_quietstar
from .curriculum import longest_thought_lengths

# LM config fields whose difference makes a checkpoint's weights unusable for the model being trained.
ARCHITECTURE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                       "intermediate_size", "vocab_size")
# Quiet-STaR fields a checkpoint must share with the run that resumes it; the curriculum may change the lengths.
THOUGHT_FIELDS = ("num_thought_tokens", "num_lookahead_tokens", "num_thoughts", "mixing", "start_thought_token",
                  "end_thought_token", "thoughts")


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
