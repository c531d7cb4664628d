"""Data-parallel training through accelerate: 2 CPU processes (gloo) with the global batch of 1 process end with the
same parameters.

Thoughts are sampled at a temperature of 1e-7 (greedy up to float ties) in both runs: each process draws from its own
random stream, so sampled thoughts could not match between a 1-process and a 2-process run, while everything else
(data order, windows, the loss, the all-reduced gradient, clipping, AdamW) must. Every window is full length, so
the per-process mean losses average to the 1-process mean exactly. Tolerance: 1e-5 absolute after 2 AdamW steps
at lr 1e-3 (float32; the only difference is the order of the gradient summation).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")


def run_training(output_dir, launch: list[str], per_device_batch: int) -> dict[str, torch.Tensor]:
    command = launch + [
        os.path.join(REPO, "scripts", "train.py"), "--config", os.path.join(REPO, "configs", "tiny-cpu.yaml"),
        "--max_steps", "2", "--per_device_train_batch_size", str(per_device_batch), "--output_dir", str(output_dir),
        "--learning_rate", "1e-3", "--warmup_steps", "0", "--thought_temperature", "1e-7", "--num_documents", "64",
        "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--dataloader_drop_last", "true",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    processes = 2 if "ddp-cpu.yaml" in " ".join(launch) else 1
    assert f"Training on {processes} process(es)" in result.stdout
    weights = load_file(os.path.join(output_dir, "model.safetensors"))
    weights.update(load_file(os.path.join(output_dir, "quietstar.safetensors")))
    return weights


@pytest.mark.slow  # two launches of scripts/train.py (~40 s)
def test_two_cpu_processes_match_one_process_with_the_same_global_batch(tmp_path):
    single = run_training(tmp_path / "one", [ACCELERATE, "launch", "--num_processes", "1"], per_device_batch=4)
    ddp = run_training(tmp_path / "two", [ACCELERATE, "launch", "--config_file",
                                          os.path.join(REPO, "configs", "accelerate", "ddp-cpu.yaml")],
                       per_device_batch=2)
    assert single.keys() == ddp.keys()
    worst = max((single[k].float() - ddp[k].float()).abs().max().item() for k in single)
    assert worst < 1e-5, worst
    # and the runs did train: a different global batch gives different parameters
    other = run_training(tmp_path / "other", [ACCELERATE, "launch", "--num_processes", "1"], per_device_batch=2)
    assert max((single[k].float() - other[k].float()).abs().max().item() for k in single) > 1e-4
