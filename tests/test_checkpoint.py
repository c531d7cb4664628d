"""The save format (quietstar/checkpoint.py): checkpoints written by earlier code still load to the same model.

The fixtures in tests/fixtures/ and how they were made: see tests/fixtures/make_checkpoint.py.
"""

from __future__ import annotations

import os
import shutil

import torch
from safetensors.torch import load_file

from quietstar import QuietStarConfig, QuietStarForCausalLM

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
OLD_CHECKPOINT = os.path.join(FIXTURES, "checkpoint")
OLD_OUTPUTS = os.path.join(FIXTURES, "checkpoint-outputs.safetensors")
LEGACY_CONFIG = os.path.join(FIXTURES, "legacy_quietstar_config.json")


def _outputs(model: QuietStarForCausalLM, recorded: dict):
    with torch.no_grad():
        return model(recorded["input_ids"], attention_mask=recorded["attention_mask"], labels=recorded["input_ids"],
                     thoughts=recorded["thoughts"])


def test_a_checkpoint_written_before_the_refactor_loads_to_the_same_outputs():
    recorded = load_file(OLD_OUTPUTS)
    model = QuietStarForCausalLM.from_pretrained(OLD_CHECKPOINT).eval()
    assert model.quietstar_config == QuietStarConfig(num_thought_tokens=2, num_lookahead_tokens=2, num_thoughts=2,
                                                     mixing="logprobs")
    assert model.thought_token_ids == (258, 259) and model.pad_token_id == 257 and model.base_model_id is None
    got = _outputs(model, recorded)
    for name in ("base_logits", "mixing_weights", "logits"):
        torch.testing.assert_close(getattr(got, name), recorded[name], msg=name)
    torch.testing.assert_close(got.loss.reshape(1), recorded["loss"])
    # Every saved part matters: the recorded thoughts move the mixed prediction away from the base one.
    assert (recorded["mixing_weights"] - 0.5).abs().max() > 0.1


def test_a_checkpoint_saved_before_later_config_fields_loads_with_the_behaviour_of_its_time(tmp_path):
    """The first format (commit b17f15d) had no ``base_model`` key and none of the QuietStarConfig fields added
    since: it loads with what the code then did (config.ADDED_FIELDS_BEFORE) and to the same outputs."""
    folder = tmp_path / "legacy"
    shutil.copytree(OLD_CHECKPOINT, folder)
    shutil.copyfile(LEGACY_CONFIG, folder / "quietstar_config.json")
    model = QuietStarForCausalLM.from_pretrained(folder).eval()
    config = model.quietstar_config
    assert (config.reward_source, config.reward_precision, config.advantage_normalization, config.thought_nll_weight,
            config.text_path, config.sus_c) == ("mixed", "autocast", "none", 0.0, "train", None)
    assert (config.reinforce_temperature, config.policy_weight, config.clip_negative_advantage) == (3.0, 1e6, True)
    assert model.base_model_id is None and model.thought_token_ids == (258, 259)
    recorded = load_file(OLD_OUTPUTS)
    got = _outputs(model, recorded)
    torch.testing.assert_close(got.logits, recorded["logits"])
    # Saved again, it is written in the current format and reads back to the same config.
    model.save_pretrained(tmp_path / "resaved")
    assert QuietStarForCausalLM.from_pretrained(tmp_path / "resaved").quietstar_config == config
