"""The save format (quietstar/checkpoint.py): checkpoints written by earlier code still load to the same model.

The fixtures in tests/fixtures/ and how they were made: see tests/fixtures/make_checkpoint.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
import torch
from conftest import make_model
from safetensors.torch import load_file

from quietstar import QuietStarConfig, QuietStarForCausalLM
from quietstar.checkpoint import CONFIG_FILE, SavedQuietStar, read_saved_quietstar

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
    # triton_fp32_precision came later: the save loads with what the code then did (exact fp32, "ieee").
    assert model.quietstar_config == QuietStarConfig(num_thought_tokens=2, num_lookahead_tokens=2, num_thoughts=2,
                                                     mixing="logprobs", triton_fp32_precision="ieee")
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
            config.text_path, config.sus_c, config.triton_fp32_precision) == ("mixed", "autocast", "none", 0.0, "train",
                                                                              None, "ieee")
    assert (config.reinforce_temperature, config.policy_weight, config.clip_negative_advantage) == (3.0, 1e6, True)
    assert model.base_model_id is None and model.thought_token_ids == (258, 259)
    recorded = load_file(OLD_OUTPUTS)
    got = _outputs(model, recorded)
    torch.testing.assert_close(got.logits, recorded["logits"])
    # Saved again, it is written in the current format and reads back to the same config.
    model.save_pretrained(tmp_path / "resaved")
    assert QuietStarForCausalLM.from_pretrained(tmp_path / "resaved").quietstar_config == config


def test_the_reader_gives_the_saved_values_typed():
    saved = read_saved_quietstar(OLD_CHECKPOINT)
    assert saved == SavedQuietStar(QuietStarConfig(num_thought_tokens=2, num_lookahead_tokens=2, num_thoughts=2,
                                                   mixing="logprobs", triton_fp32_precision="ieee"), (258, 259), 257,
                                   None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        saved.pad_token_id = 0
    with open(os.path.join(OLD_CHECKPOINT, CONFIG_FILE)) as f:
        written = json.load(f)
    written["quietstar"]["triton_fp32_precision"] = "ieee"  # a later field, filled in on reading
    written["quietstar"]["sus_design"] = "a"  # a later field, filled in on reading
    assert saved.to_dict() == written  # what the writer writes, key for key


def _damaged_copy(tmp_path, change) -> str:
    folder = tmp_path / "damaged"
    shutil.copytree(OLD_CHECKPOINT, folder)
    path = folder / CONFIG_FILE
    saved = json.loads(path.read_text())
    change(saved)
    path.write_text(json.dumps(saved))
    return folder


@pytest.mark.parametrize("missing", ["quietstar", "thought_token_ids", "pad_token_id"])
def test_a_saved_config_without_a_required_key_is_refused_naming_the_file_and_the_key(tmp_path, missing):
    folder = _damaged_copy(tmp_path, lambda saved: saved.pop(missing))
    with pytest.raises(ValueError, match=f"{folder / CONFIG_FILE} is corrupt.*{missing}"):
        QuietStarForCausalLM.from_pretrained(folder)


def test_a_saved_config_with_other_than_two_thought_token_ids_is_refused(tmp_path):
    folder = _damaged_copy(tmp_path, lambda saved: saved["thought_token_ids"].append(260))
    with pytest.raises(ValueError, match=r"thought_token_ids must hold 2 ids, got \[258, 259, 260\]"):
        read_saved_quietstar(folder)


def test_a_save_that_fails_midway_leaves_the_previous_save_in_place(tmp_path, monkeypatch):
    model = make_model()
    model.save_pretrained(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    other = make_model(seed=1, num_thoughts=3)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device (simulated)")

    monkeypatch.setattr(other.tokenizer, "save_pretrained", disk_full)  # after the LM's weights are written
    with pytest.raises(OSError, match="No space left"):
        other.save_pretrained(tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before
    assert QuietStarForCausalLM.from_pretrained(tmp_path).quietstar_config == model.quietstar_config
