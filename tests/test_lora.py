"""LoRA through peft: what trains and what is frozen, save/load exactness, resume, merge on export, bad settings."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_model, randomize_mixing_head
from quietstar import QuietStarForCausalLM
from quietstar.cli.export import export
from quietstar.lora import add_lora, lora_config
from quietstar.training import ModelArguments, QuietStarTrainer, QuietStarTrainingArguments, build_window_dataset
from quietstar.training.data import synthetic_arithmetic_documents

LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
IDS = torch.tensor([[5, 258, 70, 71, 259, 9, 10, 11, 40, 41], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])


def lora_model(seed: int = 0):
    model = make_model(seed=seed, num_thought_tokens=2, num_lookahead_tokens=2)
    add_lora(model, lora_config(LORA))
    return model


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.named_parameters()}


def train(model, tmp_path, steps: int = 2, **overrides):
    values = dict(output_dir=str(tmp_path / "run"), max_steps=steps, per_device_train_batch_size=2,
                  learning_rate=1e-2, use_cpu=True, report_to="none", disable_tqdm=True, save_strategy="no",
                  logging_steps=1, seed=0)
    values.update(overrides)
    dataset = build_window_dataset(synthetic_arithmetic_documents(8), model.tokenizer, 24, 4)
    trainer = QuietStarTrainer(model=model, args=QuietStarTrainingArguments(**values), train_dataset=dataset)
    trainer.train()
    return trainer


def test_only_adapters_thought_embeddings_and_mixing_head_train(tmp_path):
    model = lora_model()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    adapters = {name for name in trainable if "lora_" in name}
    assert adapters and all(("q_proj" in n or "v_proj" in n) for n in adapters)
    assert trainable - adapters == {"thought_embeddings"} | {f"mixing_head.{n}" for n, _ in
                                                             model.mixing_head.named_parameters()}
    before = snapshot(model)
    train(model, tmp_path)
    after = snapshot(model)
    for name in before:
        moved = not torch.equal(before[name], after[name])
        assert moved == (name in trainable), f"{name}: moved={moved}, trainable={name in trainable}"


def test_save_writes_a_plain_lm_plus_adapter_and_loads_back_exactly(tmp_path):
    model = lora_model()
    train(model, tmp_path)
    randomize_mixing_head(model)  # so that thoughts matter in the comparison below
    model.save_pretrained(tmp_path / "saved")
    assert os.path.exists(tmp_path / "saved" / "adapter" / "adapter_config.json")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()  # stock transformers, no adapter
    assert not any("lora_" in name for name, _ in plain.named_parameters())
    model.eval()
    with torch.no_grad(), model.lora.disable_adapter():
        torch.testing.assert_close(plain(input_ids=IDS).logits, model.base(input_ids=IDS).logits)
    restored = QuietStarForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert restored.lora is not None
    thoughts = model.sample_thoughts(IDS, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = model(IDS, thoughts=thoughts), restored(IDS, thoughts=thoughts)
    assert torch.equal(got.logits, expected.logits)
    assert torch.equal(got.base_logits, expected.base_logits)
    with torch.no_grad(), model.lora.disable_adapter():
        assert (model.base(input_ids=IDS).logits - expected.base_logits).abs().max() > 1e-3  # the adapter matters


def test_resume_loads_the_adapter_of_the_checkpoint(tmp_path):
    model = lora_model(seed=0)
    train(model, tmp_path, steps=2, save_strategy="steps", save_steps=2)
    fresh = lora_model(seed=1)
    trainer = train(fresh, tmp_path, steps=2, save_strategy="no")
    trainer._load_from_checkpoint(str(tmp_path / "run" / "checkpoint-2"))
    for (name, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), name


def test_export_merges_the_trained_adapter(tmp_path):
    model = lora_model()
    train(model, tmp_path)
    model.save_pretrained(tmp_path / "ckpt")
    export(tmp_path / "ckpt", tmp_path / "export", merge_lora=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS).logits, model.base(input_ids=IDS).logits,
                                   rtol=1e-5, atol=1e-5)
    assert QuietStarForCausalLM.from_pretrained(tmp_path / "export").lora is None


@pytest.mark.parametrize("settings, message", [
    ({"rank": 4}, "unknown LoRA settings \\['rank'\\]"),
    ({"peft_type": "IA3"}, "Only LoRA"),
    ("[1, 2]", "mapping"),
    ("{not json", "not valid JSON"),
])
def test_bad_peft_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        ModelArguments(model_name_or_path="unused", peft=settings)

