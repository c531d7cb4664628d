"""Training pipeline: text windows, the collator, QuietStarTrainer (loss, metrics, optimizer groups, NaN guard,
checkpoints, resume), gradient checkpointing, and an end-to-end run of scripts/train.py."""

from __future__ import annotations

import functools
import gzip
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import TrainerState, TrainingArguments

from conftest import make_model, randomize_mixing_head
from quietstar import AttentionSettings, QuietStarConfig, QuietStarForCausalLM, QuietStarLossConfig
from quietstar.tiny import byte_tokenizer, tiny_model
from quietstar.training import (
    DataArguments,
    ModelArguments,
    QuietStarTrainer,
    QuietStarTrainingArguments,
    RandomWindowDataset,
    WindowCollator,
    WindowEpochCallback,
    build_datasets,
    build_model,
    build_window_dataset,
    load_documents,
    synthetic_arithmetic_documents,
)
from quietstar.training.build import random_model_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIN_TOKENS = 4  # num_lookahead_tokens (2) + 2


def tiny_quietstar(seed: int = 0) -> QuietStarForCausalLM:
    return make_model(seed=seed, num_thought_tokens=2, num_lookahead_tokens=2)


def training_args(tmp_path, **overrides) -> QuietStarTrainingArguments:
    values = dict(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
                  use_cpu=True, report_to="none", disable_tqdm=True, save_strategy="no", logging_steps=1, seed=0)
    values.update(overrides)
    return QuietStarTrainingArguments(**values)


def window_dataset(tokenizer, num_documents: int = 8, max_length: int = 24) -> RandomWindowDataset:
    return build_window_dataset(synthetic_arithmetic_documents(num_documents), tokenizer, max_length, MIN_TOKENS)


def state_of(model) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


# -------------------------------------------------------------------------------------------------- data
def test_synthetic_arithmetic_is_deterministic_and_prefix_stable():
    documents = synthetic_arithmetic_documents(20, seed=3)
    assert documents == synthetic_arithmetic_documents(20, seed=3)
    assert documents[:5] == synthetic_arithmetic_documents(5, seed=3)
    assert documents != synthetic_arithmetic_documents(20, seed=4)
    assert all(" = " in document for document in documents)
    assert any("The answer is" in document for document in documents)


def test_windows_are_deterministic_full_length_and_change_with_the_epoch():
    tokenizer = byte_tokenizer()
    first, second = window_dataset(tokenizer), window_dataset(tokenizer)
    assert all(len(doc) > 24 for doc in first.documents)
    for index in range(len(first)):
        assert torch.equal(first[index]["input_ids"], second[index]["input_ids"])
        assert len(first[index]["input_ids"]) == 24
    epoch0 = [first[i]["input_ids"] for i in range(len(first))]
    first.set_epoch(1)
    epoch1 = [first[i]["input_ids"] for i in range(len(first))]
    assert any(not torch.equal(a, b) for a, b in zip(epoch0, epoch1))
    document = torch.from_numpy(first.documents[0].astype(np.int64))
    window = epoch1[0]
    assert any(torch.equal(document[s : s + 24], window) for s in range(len(document) - 23))  # a real slice


def test_epoch_callback_sets_the_dataset_epoch():
    dataset = window_dataset(byte_tokenizer())
    WindowEpochCallback(dataset).on_epoch_begin(None, TrainerState(epoch=2.0), None)
    assert dataset.epoch == 2


def test_collator_right_pads_with_masked_labels():
    tokenizer = byte_tokenizer()
    dataset = build_window_dataset(["abcdefghij", "xyz12", "a much longer document than the window"], tokenizer,
                                   max_length=8, min_tokens=MIN_TOKENS)
    batch = WindowCollator(tokenizer.pad_token_id)([dataset[i] for i in range(3)])
    assert batch["input_ids"].shape == (3, 8)
    assert batch["attention_mask"].sum(dim=1).tolist() == [8, 5, 8]
    assert batch["input_ids"][1, 5:].eq(tokenizer.pad_token_id).all()
    assert batch["labels"][1, 5:].eq(-100).all()
    real = batch["attention_mask"].bool()
    assert torch.equal(batch["labels"][real], batch["input_ids"][real])
    assert tokenizer.decode(batch["input_ids"][1, :5]) == "xyz12"


def test_short_documents_are_skipped_with_a_count(caplog):
    with caplog.at_level(logging.WARNING):
        dataset = build_window_dataset(["ab", "abc", "abcdef", "abcdefgh"], byte_tokenizer(), 8, MIN_TOKENS)
    assert len(dataset) == 2
    assert "Skipped 2 of 4 documents shorter than 4 tokens" in caplog.text
    with pytest.raises(ValueError, match="No document has at least 4 tokens"):
        build_window_dataset(["ab"], byte_tokenizer(), 8, MIN_TOKENS)


def test_local_sources(tmp_path):
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("first file\n\nstill the first document")
    (tmp_path / "txt" / "b.txt").write_text("second file")
    assert load_documents(DataArguments(dataset=str(tmp_path / "txt"))) == [
        "first file\n\nstill the first document", "second file"]

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": f"doc {i}"}) + "\n" for i in range(5)))
    assert load_documents(DataArguments(dataset=str(jsonl), text_field="body", num_documents=3)) == [
        "doc 0", "doc 1", "doc 2"]
    with gzip.open(tmp_path / "docs.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "zipped"}) + "\n")
    assert load_documents(DataArguments(dataset=str(tmp_path / "*.jsonl.gz"))) == ["zipped"]

    pq.write_table(pa.table({"text": ["p0", "p1"]}), tmp_path / "docs.parquet")
    assert load_documents(DataArguments(dataset=str(tmp_path / "docs.parquet"))) == ["p0", "p1"]

    with pytest.raises(KeyError, match="has no field 'text'"):
        load_documents(DataArguments(dataset=str(jsonl)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_documents(DataArguments(dataset=str(tmp_path / "missing.jsonl")))


def test_hub_datasets_are_streamed_when_limited(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config_name, split, streaming):
        calls.append((name, config_name, split, streaming))
        return datasets.Dataset.from_dict({"content": ["a", None, "b", "c"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    args = DataArguments(dataset="org/corpus", dataset_config_name="en", text_field="content", num_documents=2)
    assert load_documents(args) == ["a", "b"]
    assert load_documents(DataArguments(dataset="org/corpus", text_field="content")) == ["a", "b", "c"]
    assert calls == [("org/corpus", "en", "train", True), ("org/corpus", None, "train", False)]
    with pytest.raises(KeyError, match="no column 'text'"):
        load_documents(DataArguments(dataset="org/corpus"))


def test_evaluation_documents_are_held_out():
    args = DataArguments(dataset="synthetic-arithmetic", num_documents=10, num_eval_documents=3, max_length=16)
    train, evaluation = build_datasets(args, byte_tokenizer(), MIN_TOKENS)
    assert (len(train), len(evaluation)) == (7, 3)
    with pytest.raises(ValueError, match="num_eval_documents"):
        build_datasets(DataArguments(dataset="synthetic-arithmetic", num_documents=3, num_eval_documents=3),
                       byte_tokenizer(), MIN_TOKENS)


# ------------------------------------------------------------------------------------------------- model
def test_build_model_from_a_random_config():
    args = ModelArguments(model_config={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1},
                          tokenizer_name_or_path="builtin-bytes")
    model = build_model(args, QuietStarConfig(num_thought_tokens=2, num_lookahead_tokens=2))
    assert model.base.config.hidden_size == 32
    assert model.base.get_input_embeddings().num_embeddings == len(model.tokenizer) == 260


def test_random_model_config_refuses_misspelt_fields():
    with pytest.raises(ValueError, match=r"'hiden_size' \(did you mean 'hidden_size'"):
        random_model_config({"model_type": "llama", "hiden_size": 32}, vocab_size=258)
    config = random_model_config({"model_type": "llama", "rope_theta": 1000.0}, vocab_size=258)  # legacy name
    assert config.rope_parameters["rope_theta"] == 1000.0 and config.vocab_size == 258
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        random_model_config({"model_type": "llama", "vocab_size": 10}, vocab_size=258)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model = tiny_quietstar().train()
    randomize_mixing_head(model)  # thoughts matter: a live mixing head and policy loss
    batch = WindowCollator(model.pad_token_id)([window_dataset(model.tokenizer)[i] for i in range(2)])
    thoughts = model.sample_thoughts(batch["input_ids"], batch["attention_mask"],
                                     generator=torch.Generator().manual_seed(0))

    def loss_and_gradients():
        model.zero_grad()
        out = model(**batch, thoughts=thoughts, output_logits=False)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, gradients = loss_and_gradients()
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    checkpointed_loss, checkpointed_gradients = loss_and_gradients()
    assert torch.equal(loss, checkpointed_loss)
    assert gradients.keys() == checkpointed_gradients.keys()
    for name, gradient in gradients.items():
        torch.testing.assert_close(checkpointed_gradients[name], gradient, rtol=1e-5, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------------------------- trainer
def test_trainer_refuses_other_models_and_arguments(tmp_path):
    with pytest.raises(TypeError, match="QuietStarForCausalLM"):
        QuietStarTrainer(model=tiny_model(), args=training_args(tmp_path))
    with pytest.raises(TypeError, match="QuietStarTrainingArguments"):
        QuietStarTrainer(model=tiny_quietstar(), args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True))


def test_optimizer_groups_and_learning_rates(tmp_path):
    model = tiny_quietstar()
    frozen = model.base.lm_head.weight
    frozen.requires_grad_(False)
    args = training_args(tmp_path, learning_rate=1e-3, weight_decay=0.01, thought_embedding_lr_scale=100.0,
                         mixing_head_lr_scale=3.0)
    optimizer = QuietStarTrainer(model=model, args=args).create_optimizer()
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert list(groups) == ["body", "body_no_decay", "thought_embeddings", "mixing_head", "mixing_head_no_decay"]
    assert groups["body"]["lr"] == groups["body_no_decay"]["lr"] == 1e-3
    assert groups["thought_embeddings"]["lr"] == pytest.approx(0.1)
    assert groups["mixing_head"]["lr"] == groups["mixing_head_no_decay"]["lr"] == pytest.approx(3e-3)
    assert groups["body"]["weight_decay"] == groups["mixing_head"]["weight_decay"] == 0.01
    assert groups["thought_embeddings"]["weight_decay"] == groups["body_no_decay"]["weight_decay"] == 0.0
    assert groups["thought_embeddings"]["params"] == [model.thought_embeddings]

    def ids(group):
        return {id(p) for p in groups[group]["params"]}

    assert id(model.base.model.norm.weight) in ids("body_no_decay")
    assert id(model.mixing_head.net[0].bias) in ids("mixing_head_no_decay")
    assert ids("mixing_head") | ids("mixing_head_no_decay") == {id(p) for p in model.mixing_head.parameters()}
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert id(frozen) not in grouped and len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters() if p.requires_grad}


def test_training_moves_every_group_and_logs_metrics(tmp_path):
    model = tiny_quietstar()
    frozen = model.base.model.layers[0].mlp.up_proj.weight
    frozen.requires_grad_(False)
    before = state_of(model)
    dataset = window_dataset(model.tokenizer)
    trainer = QuietStarTrainer(model=model, args=training_args(tmp_path), train_dataset=dataset, eval_dataset=dataset)
    trainer.train()
    after = state_of(model)
    # Two steps: the zero last mixing layer moves in step 1, the layers before it (whose gradient is zero
    # while it is zero) and the thought embeddings (no reward signal while w = 0) in step 2.
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert {"thought_embeddings", "mixing_head.net.0.weight", "base.lm_head.weight"} <= set(trainable)
    for name in trainable:
        assert not torch.equal(before[name], after[name]), f"{name} did not move"
    frozen_name = "base.model.layers.0.mlp.up_proj.weight"
    assert torch.equal(before[frozen_name], after[frozen_name])

    train_logs = [entry for entry in trainer.state.log_history if "base_nll" in entry]
    assert [entry["step"] for entry in train_logs] == [1, 2]
    assert {"loss", "nll_loss", "policy_loss", "reward_mean", "mixing_weight_mean", "mixed_nll_1"} <= set(train_logs[0])

    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_base_nll", "eval_policy_loss", "eval_mixed_nll_0"} <= set(metrics)
    assert "eval_base_nll" in trainer.state.log_history[-1] and "base_nll" not in trainer.state.log_history[-1]


def test_non_finite_loss_raises_before_any_checkpoint_of_that_step(tmp_path, monkeypatch):
    model = tiny_quietstar()
    forward, calls = model.forward, []

    @functools.wraps(forward)  # keeps the signature: Trainer passes only the columns forward accepts
    def forward_with_nan_at_step_2(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # poison the loss and every term the trainer measures
            out.loss = out.loss * float("nan")
            out.loss_terms = {name: term * float("nan") for name, term in out.loss_terms.items()}
        return out

    monkeypatch.setattr(model, "forward", forward_with_nan_at_step_2)
    args = training_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=1)
    trainer = QuietStarTrainer(model=model, args=args, train_dataset=window_dataset(model.tokenizer))
    expected = r"at global step 2; its update was not applied\. No checkpoint was written"
    with pytest.raises(RuntimeError, match=expected):
        trainer.train()
    run = tmp_path / "run"
    assert sorted(os.listdir(run)) == ["checkpoint-1", "metrics.jsonl"]
    saved = QuietStarForCausalLM.from_pretrained(run / "checkpoint-1")
    current = state_of(model)  # the NaN step stopped before its update: still the step-1 weights
    for name, value in saved.state_dict().items():
        assert torch.isfinite(value).all() and torch.equal(value, current[name]), name


def test_checkpoints_save_model_and_resume(tmp_path):
    args = training_args(tmp_path, max_steps=3, save_strategy="steps", save_steps=1)
    model = tiny_quietstar()
    trainer = QuietStarTrainer(model=model, args=args, train_dataset=window_dataset(model.tokenizer))
    trainer.train()
    trainer.save_model()
    run = tmp_path / "run"
    assert {"checkpoint-1", "checkpoint-2", "checkpoint-3", "quietstar_config.json", "training_args.bin"} <= set(
        os.listdir(run))
    final = state_of(model)
    reloaded = QuietStarForCausalLM.from_pretrained(run).state_dict()
    assert all(torch.equal(reloaded[name], value) for name, value in final.items())

    resumed_model = tiny_quietstar(seed=1)  # different weights: resuming must load the checkpoint's
    resumed = QuietStarTrainer(model=resumed_model, args=args, train_dataset=window_dataset(resumed_model.tokenizer))
    resumed.train(resume_from_checkpoint=str(run / "checkpoint-2"))
    assert resumed.state.global_step == 3
    for name, value in state_of(resumed_model).items():
        torch.testing.assert_close(value, final[name], rtol=1e-5, atol=1e-6, msg=name)


def test_trainer_turns_on_activation_checkpointing(tmp_path):
    model = tiny_quietstar()
    args = training_args(tmp_path, max_steps=1, activation_checkpointing=True)
    QuietStarTrainer(model=model, args=args, train_dataset=window_dataset(model.tokenizer)).train()
    assert model.is_activation_checkpointing


def test_trainer_trains_under_bf16_autocast(tmp_path):
    model = tiny_quietstar()
    args = training_args(tmp_path, max_steps=1, bf16=True)
    QuietStarTrainer(model=model, args=args, train_dataset=window_dataset(model.tokenizer)).train()
    assert model.base.dtype == torch.float32  # fp32 master weights; only the compute is bf16
    assert torch.isfinite(torch.stack([p.detach().sum() for p in model.parameters()])).all()


# ------------------------------------------------------------------------------------------------ script
@pytest.mark.slow  # a fresh interpreter: imports and first-call warm-up take most of its ~15 s
def test_train_script_writes_a_loadable_checkpoint(tmp_path):
    output_dir = tmp_path / "tiny"
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "train.py"), "--config", os.path.join(REPO, "configs",
         "tiny-cpu.yaml"), "--max_steps", "2", "--save_steps", "2", "--output_dir", str(output_dir),
         "--report_to", "none", "--disable_tqdm", "true", "--policy_weight", "2.5", "--attention_backend", "eager"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Saved the trained model to {output_dir}" in result.stdout
    model = QuietStarForCausalLM.from_pretrained(output_dir / "checkpoint-2")
    assert model.quietstar_config.num_thought_tokens == 4
    assert (output_dir / "quietstar_config.json").exists()
    # The run's loss and attention settings go to its run config, never into the model it saves.
    run_config = json.loads((output_dir / "run_config.json").read_text())
    assert run_config["QuietStarLossConfig"]["policy_weight"] == 2.5
    assert run_config["AttentionSettings"]["attention_backend"] == "eager"
    assert "policy_weight" not in run_config["QuietStarConfig"]
    for folder in (output_dir, output_dir / "checkpoint-2"):
        saved = json.loads((folder / "quietstar_config.json").read_text())["quietstar"]
        assert saved == model.quietstar_config.to_dict()
    assert model.loss_config == QuietStarLossConfig() and model.attention == AttentionSettings()
