"""Exact resume and atomic checkpoints: a run killed with SIGKILL and resumed from its last checkpoint logs the same
losses and ends with the same weights as a run never interrupted; a save that dies midway leaves no checkpoint a
resume would pick up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers.trainer_utils import get_last_checkpoint

from conftest import make_model
from quietstar.training import QuietStarTrainer, QuietStarTrainingArguments, build_window_dataset
from quietstar.training.data import synthetic_arithmetic_documents

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24


def train_command(output_dir, *extra: str) -> list[str]:
    return [sys.executable, os.path.join(REPO, "scripts", "train.py"), "--config",
            os.path.join(REPO, "configs", "tiny-cpu.yaml"), "--output_dir", str(output_dir), "--max_steps", str(STEPS),
            "--save_steps", "3", "--save_total_limit", "2", "--logging_steps", "1", "--report_to", "none",
            "--disable_tqdm", "true", *extra]


def losses(output_dir) -> dict[int, tuple[float, float]]:
    entries = [json.loads(line) for line in open(os.path.join(output_dir, "metrics.jsonl"))]
    return {e["step"]: (e["loss"], e["base_nll"]) for e in entries if "base_nll" in e}


def weights(output_dir) -> dict[str, torch.Tensor]:
    tensors = load_file(os.path.join(output_dir, "model.safetensors"))
    tensors.update(load_file(os.path.join(output_dir, "quietstar.safetensors")))
    return tensors


@pytest.mark.slow  # three runs of scripts/train.py, one killed (~45 s)
def test_a_run_killed_and_resumed_matches_an_uninterrupted_run(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = tmp_path / "whole"
    subprocess.run(train_command(whole), cwd=REPO, env=env, check=True, capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    process = subprocess.Popen(train_command(killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoint-6").is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    last = get_last_checkpoint(str(killed))
    resumed_from = int(last.rsplit("-", 1)[1])
    assert 6 <= resumed_from < STEPS

    result = subprocess.run(train_command(killed, "--resume_from_checkpoint", last), cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    expected, got = losses(whole), losses(killed)
    assert sorted(got) == list(range(1, STEPS + 1))  # one entry per step: the killed run's extra logs were dropped
    assert got == expected  # every step's loss and base NLL, bit for bit
    reference = weights(whole)
    assert all(torch.equal(tensor, reference[name]) for name, tensor in weights(killed).items())


def test_a_save_that_dies_midway_publishes_no_checkpoint(tmp_path, monkeypatch):
    model = make_model(num_thought_tokens=2, num_lookahead_tokens=2)
    args = QuietStarTrainingArguments(output_dir=str(tmp_path), max_steps=4, save_steps=2, per_device_train_batch_size=2,
                                      use_cpu=True, report_to="none", disable_tqdm=True, logging_steps=1)
    dataset = build_window_dataset(synthetic_arithmetic_documents(8), model.tokenizer, 24, 4)
    trainer = QuietStarTrainer(model=model, args=args, train_dataset=dataset)
    real_save_rng_state = trainer._save_rng_state

    def dies_at_step_4(output_dir):
        if trainer.state.global_step == 4:
            raise OSError("No space left on device (simulated)")
        real_save_rng_state(output_dir)

    monkeypatch.setattr(trainer, "_save_rng_state", dies_at_step_4)
    with pytest.raises(OSError, match="No space left"):
        trainer.train()
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")  # the complete one
    assert not (tmp_path / "checkpoint-4").exists()
    assert (tmp_path / ".staging-checkpoint-4" / "checkpoint-4" / "model.safetensors").exists()  # the partial one
    assert {"model.safetensors", "optimizer.pt", "rng_state.pth", "trainer_state.json"} <= set(
        os.listdir(tmp_path / "checkpoint-2"))

    # the next save of that step clears the leftover and publishes a complete checkpoint
    monkeypatch.setattr(trainer, "_save_rng_state", real_save_rng_state)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert not (tmp_path / ".staging-checkpoint-4").exists()
    assert "rng_state.pth" in os.listdir(tmp_path / "checkpoint-4")
