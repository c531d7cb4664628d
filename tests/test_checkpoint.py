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

from quietstar import AttentionSettings, QuietStarConfig, QuietStarForCausalLM, QuietStarLossConfig
from quietstar.attention.backends import resolve
from quietstar.checkpoint import CONFIG_FILE, SavedQuietStar, read_saved_quietstar
from quietstar.loss_config import OFFICIAL_LOSS

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
OLD_CHECKPOINT = os.path.join(FIXTURES, "checkpoint")
OLD_OUTPUTS = os.path.join(FIXTURES, "checkpoint-outputs.safetensors")
LEGACY_CONFIG = os.path.join(FIXTURES, "legacy_quietstar_config.json")
GPU_RUN_CHECKPOINT = os.path.join(FIXTURES, "checkpoint-gpu-run")
# The loss and attention fields every save written before the model config was split holds.
RUN_FIELDS = QuietStarLossConfig.field_names() | AttentionSettings.field_names()


def _outputs(model: QuietStarForCausalLM, recorded: dict):
    with torch.no_grad():
        return model(recorded["input_ids"], attention_mask=recorded["attention_mask"], labels=recorded["input_ids"],
                     thoughts=recorded["thoughts"])


def test_a_checkpoint_written_before_the_refactor_loads_to_the_same_outputs():
    recorded = load_file(OLD_OUTPUTS)
    model = QuietStarForCausalLM.from_pretrained(OLD_CHECKPOINT).eval()
    assert model.quietstar_config == QuietStarConfig(num_thought_tokens=2, num_lookahead_tokens=2, num_thoughts=2,
                                                     mixing="logprobs")
    # Its loss fields (the recipe's) become the model's loss config; attention runs with the defaults.
    assert model.loss_config == QuietStarLossConfig() and model.attention == AttentionSettings()
    assert model.thought_token_ids == (258, 259) and model.pad_token_id == 257 and model.base_model_id is None
    got = _outputs(model, recorded)
    for name in ("base_logits", "mixing_weights", "logits"):
        torch.testing.assert_close(getattr(got, name), recorded[name], msg=name)
    torch.testing.assert_close(got.loss.reshape(1), recorded["loss"])
    # Every saved part matters: the recorded thoughts move the mixed prediction away from the base one.
    assert (recorded["mixing_weights"] - 0.5).abs().max() > 0.1


def test_a_checkpoint_saved_before_later_config_fields_loads_with_the_behaviour_of_its_time(tmp_path):
    """The first format (commit b17f15d) had no ``base_model`` key and none of the QuietStarConfig fields added
    since: it loads with what the code then did (config.ADDED_FIELDS_BEFORE, loss_config.SAVED_LOSS_FIELDS_BEFORE)
    and to the same outputs."""
    folder = tmp_path / "legacy"
    shutil.copytree(OLD_CHECKPOINT, folder)
    shutil.copyfile(LEGACY_CONFIG, folder / "quietstar_config.json")
    model = QuietStarForCausalLM.from_pretrained(folder).eval()
    config, loss = model.quietstar_config, model.loss_config
    assert config.text_path == "train" and model.attention == AttentionSettings()
    assert (loss.reward_source, loss.reward_precision, loss.advantage_normalization, loss.thought_nll_weight) == (
        "mixed", "autocast", "none", 0.0)
    assert (loss.reinforce_temperature, loss.policy_weight, loss.clip_negative_advantage) == (3.0, 1e6, True)
    assert loss == QuietStarLossConfig.official() == QuietStarLossConfig(**OFFICIAL_LOSS)
    assert model.base_model_id is None and model.thought_token_ids == (258, 259)
    recorded = load_file(OLD_OUTPUTS)
    got = _outputs(model, recorded)
    torch.testing.assert_close(got.logits, recorded["logits"])
    # Saved again, it is written in the current format, without run settings, and reads back to the same config.
    model.save_pretrained(tmp_path / "resaved")
    resaved = json.loads((tmp_path / "resaved" / CONFIG_FILE).read_text())
    assert not RUN_FIELDS & set(resaved["quietstar"])
    assert QuietStarForCausalLM.from_pretrained(tmp_path / "resaved").quietstar_config == config


def test_a_gpu_run_checkpoint_loads_and_scores_on_cpu():
    """A save written before the split by a run with ``attention_backend: triton`` and SUS (design C): its attention
    settings are reported once and ignored, so the model runs on a CPU, to the outputs of the same weights."""
    saved = json.loads(open(os.path.join(GPU_RUN_CHECKPOINT, CONFIG_FILE)).read())["quietstar"]
    assert (saved["attention_backend"], saved["sus_c"], saved["sus_design"]) == ("triton", 30.0, "c")
    with pytest.warns(UserWarning, match=r"run settings in the old save ignored \(attention_backend='triton', "
                                         r"sus_c=30.0, sus_design='c', triton_fp32_precision='ieee'\).*set_attention"):
        model = QuietStarForCausalLM.from_pretrained(GPU_RUN_CHECKPOINT).eval()
    assert model.attention == AttentionSettings()
    recorded = load_file(OLD_OUTPUTS)  # the same weights as OLD_CHECKPOINT (make_checkpoint.py)
    got = _outputs(model, recorded)
    for name in ("base_logits", "mixing_weights", "logits"):
        torch.testing.assert_close(getattr(got, name), recorded[name], msg=name)
    torch.testing.assert_close(got.loss.reshape(1), recorded["loss"])
    # Settings for this process are given at loading, or later with set_attention.
    with pytest.warns(UserWarning, match="run settings in the old save ignored"):
        eager = QuietStarForCausalLM.from_pretrained(GPU_RUN_CHECKPOINT,
                                                     attention=AttentionSettings(attention_backend="eager")).eval()
    assert eager.attention == AttentionSettings(attention_backend="eager")
    torch.testing.assert_close(_outputs(eager, recorded).logits, recorded["logits"])


def test_a_backend_the_device_cannot_run_is_refused_naming_the_setting(monkeypatch):
    """Asked for on a CPU without Triton's interpreter, the Triton backend is refused at the first call, naming the
    field and the way out (not with a kernel-level message about CUDA tensors)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    resolve.cache_clear()  # resolved once per settings and device: drop what earlier tests resolved
    model = QuietStarForCausalLM.from_pretrained(OLD_CHECKPOINT).eval()
    model.set_attention(attention_backend="triton", sus_c=30.0)  # a model is often set up on a CPU, then moved
    recorded = load_file(OLD_OUTPUTS)
    with pytest.raises(ValueError, match=r"attention_backend='triton' cannot run here.*needs CUDA.*"
                                         r"set_attention\(attention_backend='auto'\)"):
        _outputs(model, recorded)
    model.set_attention(attention_backend="auto", sus_c=None)
    torch.testing.assert_close(_outputs(model, recorded).logits, recorded["logits"])

def test_the_reader_gives_the_saved_values_typed():
    saved = read_saved_quietstar(OLD_CHECKPOINT)
    assert saved == SavedQuietStar(QuietStarConfig(num_thought_tokens=2, num_lookahead_tokens=2, num_thoughts=2,
                                                   mixing="logprobs"), (258, 259), 257, None, QuietStarLossConfig())
    with pytest.raises(dataclasses.FrozenInstanceError):
        saved.pad_token_id = 0
    with open(os.path.join(OLD_CHECKPOINT, CONFIG_FILE)) as f:
        written = json.load(f)
    # The run settings of the old save are read, never written back.
    written["quietstar"] = {k: v for k, v in written["quietstar"].items() if k not in RUN_FIELDS}
    dumped = saved.to_dict()
    newer = set(dumped["quietstar"]) - set(written["quietstar"])  # model fields added after this save was written
    assert newer == {"thoughts", "thought_fraction"}  # ... at what the code did then:
    assert dumped["quietstar"]["thoughts"] == "sampled" and dumped["quietstar"]["thought_fraction"] == 1.0
    dumped["quietstar"] = {k: v for k, v in dumped["quietstar"].items() if k not in newer}
    assert dumped == written  # what the writer writes, key for key


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
