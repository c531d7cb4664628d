"""Thought-length curriculum (Fast Quiet-STaR): schedule parsing, the stage in force at each step of a real tiny
run, and resuming into the right stage."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import TrainerCallback

from conftest import make_model
from quietstar.training import QuietStarTrainer, QuietStarTrainingArguments, build_window_dataset
from quietstar.training.checks import check_positions
from quietstar.training.curriculum import Stage, longest_thought_lengths, parse_curriculum, stage_at
from quietstar.training.data import synthetic_arithmetic_documents
from quietstar.training.memory import check_memory, estimate_training_bytes

SCHEDULE = ["0:4/3", "2:3/2", "4:2/1"]


def test_parse_and_stage_at():
    stages = parse_curriculum(SCHEDULE)
    assert stages == [Stage(0, 4, 3), Stage(2, 3, 2), Stage(4, 2, 1)]
    assert [stage_at(stages, step).num_thought_tokens for step in range(7)] == [4, 4, 3, 3, 2, 2, 2]
    assert parse_curriculum([" 0 : 16 / 8 "]) == [Stage(0, 16, 8)]


def test_the_longest_lengths_count_the_config_and_every_stage():
    config = make_model(num_thought_tokens=2, num_lookahead_tokens=1).quietstar_config
    assert longest_thought_lengths(config) == (2, 1)
    assert longest_thought_lengths(config, parse_curriculum(["0:2/1", "2:1/3"])) == (2, 3)
    assert longest_thought_lengths(config, parse_curriculum(["0:5/1", "2:1/1"])) == (5, 1)


def test_the_position_check_and_the_memory_estimate_allow_for_a_stage_longer_than_the_config():
    model = make_model(num_thought_tokens=2, num_lookahead_tokens=1)
    args = QuietStarTrainingArguments(output_dir="unused", use_cpu=True, report_to="none",
                                      per_device_train_batch_size=2, thought_curriculum=["0:2/1", "2:5/3"])
    assert args.thought_stages == [Stage(0, 2, 1), Stage(2, 5, 3)]
    longest = dataclasses.replace(model.quietstar_config, num_thought_tokens=5, num_lookahead_tokens=3)
    expected = estimate_training_bytes(model, 2, 32, torch.float32, False, longest)
    assert check_memory(model, args, 32, torch.device("cpu"), available=None) == expected
    assert expected["total"] > estimate_training_bytes(model, 2, 32, torch.float32, False)["total"]
    limit = model.config.max_position_embeddings
    check_positions(model, limit - (5 + 3 + 1), args.thought_stages)  # the last branch ends at the last position
    with pytest.raises(ValueError, match=f"num_thought_tokens 5 and num_lookahead_tokens 3 needs {limit + 1}"):
        check_positions(model, limit - (5 + 3), args.thought_stages)


@pytest.mark.parametrize("schedule, message", [
    (["1:4/2"], "start at step 0"),
    (["0:4/2", "5:3/2", "5:2/1"], "must increase"),
    (["0:4/2", "3:2/1", "2:3/2"], "must increase"),
    (["0:4-2"], "STEP:THOUGHT_TOKENS/LOOKAHEAD"),
    (["0:0/2"], ">= 1"),
    ([], "empty"),
])
def test_bad_schedules_are_refused(schedule, message):
    with pytest.raises(ValueError, match=message):
        parse_curriculum(schedule)
    with pytest.raises(ValueError, match=message):
        QuietStarTrainingArguments(output_dir="unused", use_cpu=True, report_to="none", thought_curriculum=schedule)


class RecordLengths(TrainerCallback):
    """What the model's config says while each step's loss is computed."""

    def __init__(self, model):
        self.model, self.seen = model, []

    def on_step_end(self, args, state, control, **kwargs):
        cfg = self.model.quietstar_config
        self.seen.append((cfg.num_thought_tokens, cfg.num_lookahead_tokens))


def trainer_for(tmp_path, model, **overrides):
    values = dict(output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=2, learning_rate=1e-3,
                  use_cpu=True, report_to="none", disable_tqdm=True, save_strategy="no", logging_steps=1, seed=0,
                  thought_curriculum=SCHEDULE)
    values.update(overrides)
    dataset = build_window_dataset(synthetic_arithmetic_documents(12), model.tokenizer, 20, 5)
    recorder = RecordLengths(model)
    trainer = QuietStarTrainer(model=model, args=QuietStarTrainingArguments(**values), train_dataset=dataset,
                               callbacks=[recorder])
    return trainer, recorder


def test_a_tiny_run_follows_the_schedule(tmp_path):
    model = make_model(num_thought_tokens=8, num_lookahead_tokens=4)  # overridden from step 0
    trainer, recorder = trainer_for(tmp_path, model)
    trainer.train()
    assert recorder.seen == [(4, 3), (4, 3), (3, 2), (3, 2), (2, 1), (2, 1)]
    logs = [e for e in trainer.state.log_history if "base_nll" in e]
    # the metrics show the lookahead in force: mixed_nll_s exists for s < A only
    assert ["mixed_nll_2" in e for e in logs] == [True, True, False, False, False, False]
    assert ["mixed_nll_1" in e for e in logs] == [True, True, True, True, False, False]


def test_resuming_enters_the_stage_of_the_checkpoint_step(tmp_path):
    model = make_model()
    trainer, _ = trainer_for(tmp_path, model, max_steps=3, save_strategy="steps", save_steps=3)
    trainer.train()
    resumed_model = make_model()
    resumed, recorder = trainer_for(tmp_path, resumed_model, max_steps=6)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    assert recorder.seen == [(3, 2), (2, 1), (2, 1)]  # steps 4, 5, 6


def test_train_py_keeps_rows_long_enough_for_the_curriculums_longest_lookahead(tmp_path):
    """The config says A = 1, the curriculum raises it to 3 at step 2: rows shorter than 3 + 2 tokens must be dropped
    when the data is read, not refused by the model mid-training."""
    import json

    from quietstar.cli import train

    documents = ["a", "ab", "abc", "abcd", "abcde", "abcdef", "abcdefghij"]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents))
    argv = ["--model_config", json.dumps({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                          "num_hidden_layers": 1, "num_attention_heads": 2,
                                          "num_key_value_heads": 1}),
            "--tokenizer_name_or_path", "builtin-bytes", "--dataset", str(data), "--max_length", "16",
            "--num_thought_tokens", "2", "--num_lookahead_tokens", "1", "--thought_curriculum", "0:2/1", "2:2/3",
            "--output_dir", str(tmp_path / "run"), "--use_cpu", "true", "--report_to", "none",
            "--skip_memory_check", "true"]
    _, _, train_dataset, _ = train.prepare(argv)
    lengths = sorted(len(document) for document in train_dataset.documents)
    assert lengths and lengths[0] >= 3 + 2
    assert len(lengths) < len(documents)  # the short ones were dropped, not kept for A = 1
