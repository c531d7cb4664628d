"""Files a run keeps in its output_dir besides checkpoints: ``metrics.jsonl`` and ``run_config.json``.

``metrics.jsonl`` holds one JSON object per Trainer log (training and evaluation), with ``step`` and ``epoch``;
the run report (``scripts/report.py``) reads it. A resumed run first drops the entries logged after the
checkpoint it resumes from, so the file describes one uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import os

from transformers import TrainerCallback

METRICS_FILE = "metrics.jsonl"
RUN_CONFIG_FILE = "run_config.json"


def read_metrics(output_dir: str) -> list[dict]:
    """The entries of ``output_dir/metrics.jsonl`` (empty when there is none)."""
    path = os.path.join(output_dir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsFileCallback(TrainerCallback):
    """Appends every log to ``output_dir/metrics.jsonl`` (main process only)."""

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        entries = [e for e in read_metrics(args.output_dir) if e.get("step", 0) <= state.global_step]
        os.makedirs(args.output_dir, exist_ok=True)
        path = os.path.join(args.output_dir, METRICS_FILE)
        with open(f"{path}.tmp", "w") as f:
            f.writelines(json.dumps(e) + "\n" for e in entries)
        os.replace(f"{path}.tmp", path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        entry = {"step": state.global_step, "epoch": state.epoch, **logs}
        with open(os.path.join(args.output_dir, METRICS_FILE), "a") as f:
            f.write(json.dumps(entry) + "\n")


def check_output_dir(output_dir: str, overwrite: bool, resume_from_checkpoint: str | None) -> None:
    """Refuse to train into a folder that already holds files, unless overwriting or resuming was asked for."""
    if overwrite or resume_from_checkpoint or not os.path.isdir(output_dir) or not os.listdir(output_dir):
        return
    raise FileExistsError(
        f"output_dir {output_dir} already holds a run ({', '.join(sorted(os.listdir(output_dir))[:4])}...). "
        "Resume it with --resume_from_checkpoint DIR, train over it with --overwrite_output_dir true, or choose "
        "another --output_dir."
    )


def write_run_config(output_dir: str, *argument_objects) -> None:
    """All run arguments (model, data, Quiet-STaR, training, loss, attention) as one JSON file, a section per class,
    for the report and for people."""
    values = {}
    for arguments in argument_objects:
        section = arguments.to_dict() if hasattr(arguments, "to_dict") else dataclasses.asdict(arguments)
        values[type(arguments).__name__] = section
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, RUN_CONFIG_FILE)
    with open(f"{path}.tmp", "w") as f:
        json.dump(values, f, indent=2, default=str)
    os.replace(f"{path}.tmp", path)


def read_run_config(output_dir: str) -> dict:
    path = os.path.join(output_dir, RUN_CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: {output_dir} is not a run folder written by scripts/train.py.")
    with open(path) as f:
        return json.load(f)
