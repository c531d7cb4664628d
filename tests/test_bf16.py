"""bf16: auto turns bf16 autocast on only where the hardware computes bf16 natively; training, the run config, the
memory estimate and the benches follow that one decision (quietstar/bf16.py), with the capability mocked here."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

import quietstar.bf16 as bf16_module
from conftest import make_model
from quietstar.bf16 import EMULATED_CPU_SLOWDOWN, native_bf16, resolve_bf16, run_device_type
from quietstar.training import QuietStarTrainingArguments, load_yaml_config, parse_config
from quietstar.training.memory import check_memory, estimate_training_bytes
from quietstar.training.run_files import read_run_config, write_run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, "configs", "tiny-cpu.yaml")
CPU_FEATURES = [None, "AMX_BF16"]  # a Zen 3 (AVX2 only) and a CPU with AMX


@pytest.fixture
def cpu_bf16(monkeypatch):
    """``cpu_bf16(feature)``: make the CPU report ``feature`` (None: no native bf16), whatever this machine has."""

    def set_feature(feature: str | None):
        monkeypatch.setattr(bf16_module, "native_bf16", lambda device_type: feature)

    return set_feature


def cpu_args(tmp_path, **values) -> QuietStarTrainingArguments:
    return QuietStarTrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none", **values)


def our_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "bf16: true" in str(w.message)]


@pytest.mark.parametrize("feature", CPU_FEATURES)
def test_auto_is_bf16_only_where_the_cpu_computes_it_natively_and_says_so_in_one_line(tmp_path, cpu_bf16, feature):
    cpu_bf16(feature)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        args = cpu_args(tmp_path, bf16="auto")
    assert args.bf16 is (feature is not None)
    assert args.mixed_precision == ("bf16" if feature else "no")  # what the Trainer's accelerator autocasts to
    note = args.bf16_note
    assert "\n" not in note and note.startswith("bf16: auto -> ")
    if feature:
        assert "bf16 autocast" in note and feature in note and "--bf16 false" in note
    else:  # names the capability, the choice, why, and how to force bf16
        assert "fp32" in note and torch.backends.cpu.get_cpu_capability() in note
        assert "AMX_BF16 or AVX512_BF16" in note and f"~{EMULATED_CPU_SLOWDOWN}x slower" in note
        assert "--bf16 true" in note
    assert not our_warnings(record)


@pytest.mark.parametrize("feature", CPU_FEATURES)
def test_explicit_settings_are_respected_and_true_warns_only_without_native_bf16(tmp_path, cpu_bf16, feature):
    cpu_bf16(feature)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        on, off = cpu_args(tmp_path, bf16=True), cpu_args(tmp_path, bf16=False)
    assert (on.bf16, off.bf16) == (True, False) and on.bf16_note is None and off.bf16_note is None
    assert (on.mixed_precision, off.mixed_precision) == ("bf16", "no")
    warned = our_warnings(record)
    if feature:
        assert not warned
    else:
        assert len(warned) == 1 and f"about {EMULATED_CPU_SLOWDOWN}x slower" in warned[0]
        assert "--bf16 auto" in warned[0] and "bench/cpu_bf16.py" in warned[0]


def test_a_bad_setting_is_refused_naming_the_values(tmp_path):
    with pytest.raises(ValueError, match="bf16 must be true, false or 'auto', got 'yes'"):
        cpu_args(tmp_path, bf16="yes")


def test_auto_bf16_on_a_machine_without_a_gpu_runs_on_the_cpu(tmp_path, cpu_bf16, monkeypatch):
    """TrainingArguments refuses bf16 without a GPU unless use_cpu is set; auto sets it when it picks bf16 there."""
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    cpu_bf16("AMX_BF16")
    args = QuietStarTrainingArguments(output_dir=str(tmp_path / "run"), report_to="none", bf16="auto")
    assert args.bf16 and args.use_cpu


def test_the_run_device_decides_which_hardware_counts(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("cuda"))
    assert run_device_type(use_cpu=False) == "cuda" and run_device_type(use_cpu=True) == "cpu"
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # accelerate launch --cpu
    assert run_device_type(use_cpu=False) == "cpu"
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    assert run_device_type(use_cpu=False) == "cpu"
    # On a GPU, auto follows the GPU's support; an explicit true is transformers' to check, without our CPU warning.
    monkeypatch.setattr(bf16_module, "native_bf16", lambda device_type: None if device_type == "cpu" else "cc 9.0")
    assert resolve_bf16("auto", "cuda").enabled and not resolve_bf16("auto", "cpu").enabled
    assert resolve_bf16(True, "cuda") == bf16_module.Bf16Choice(True)


@pytest.mark.parametrize("capabilities, expected", [({"avx2": True}, None),
                                                    ({"avx2": True, "avx512_f": True}, None),
                                                    ({"avx512_f": True, "avx512_bf16": True}, "AVX512_BF16"),
                                                    ({"amx_tile": True, "amx_bf16": True}, "AMX_BF16"),
                                                    ({"architecture": "arm64", "neon": True}, None)])
def test_native_cpu_bf16_is_read_from_what_pytorch_detects(monkeypatch, capabilities, expected):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert native_bf16("cpu") == expected


def test_yaml_auto_round_trips_and_the_command_line_overrides_it(tmp_path, cpu_bf16):
    path = tmp_path / "run.yaml"
    path.write_text(open(TINY_CONFIG).read() + "bf16: auto\n")
    assert load_yaml_config(str(path))["bf16"] == "auto"
    for feature in CPU_FEATURES:
        cpu_bf16(feature)
        training = parse_config(["--config", str(path)])[3]
        assert training.bf16 is (feature is not None) and training.bf16_note.startswith("bf16: auto")
    cpu_bf16(None)
    with pytest.warns(UserWarning, match="slower"):
        assert parse_config(["--config", str(path), "--bf16"])[3].bf16 is True  # a bare flag is true
    for flag, expected in (("false", False), ("True", True), ("auto", False), ("no", False), ("1", True)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert parse_config(["--config", str(path), "--bf16", flag])[3].bf16 is expected, flag
    with pytest.raises(SystemExit):  # argparse: "argument --bf16: must be bool or one of ['auto'], got 'maybe'"
        parse_config(["--config", str(path), "--bf16", "maybe"])
    # The run config records what auto resolved to, for the report.
    parts = parse_config(["--config", str(path)])
    write_run_config(str(tmp_path / "out"), *parts)
    assert read_run_config(str(tmp_path / "out"))["QuietStarTrainingArguments"]["bf16"] is False


@pytest.mark.parametrize("feature", CPU_FEATURES)
def test_the_memory_estimate_follows_the_resolved_choice(tmp_path, cpu_bf16, feature):
    cpu_bf16(feature)
    model = make_model(num_thought_tokens=4, num_lookahead_tokens=2, num_thoughts=2)
    args = cpu_args(tmp_path, bf16="auto", per_device_train_batch_size=3)
    dtype = torch.bfloat16 if feature else torch.float32
    expected = estimate_training_bytes(model, 3, 48, dtype, gradient_checkpointing=False)
    assert check_memory(model, args, 48, torch.device("cpu"), available=None) == expected
    fp32 = estimate_training_bytes(model, 3, 48, torch.float32, gradient_checkpointing=False)
    assert (expected["activations"] < fp32["activations"]) is (feature is not None)

    class Unresolved:  # arguments that were never built as QuietStarTrainingArguments resolve the same way
        per_device_train_batch_size, bf16, fp16, gradient_checkpointing = 3, "auto", False, False

    assert check_memory(model, Unresolved, 48, torch.device("cpu"), available=None) == expected


def test_train_prints_what_auto_chose_at_start(tmp_path, cpu_bf16, capsys):
    from quietstar.cli.train import prepare

    cpu_bf16(None)
    prepare(["--config", TINY_CONFIG, "--bf16", "auto", "--output_dir", str(tmp_path / "run"), "--report_to", "none"])
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("bf16: auto -> fp32") and "--bf16 true" in out.splitlines()[0]
    with open(tmp_path / "run" / "run_config.json") as f:
        assert json.load(f)["QuietStarTrainingArguments"]["bf16"] is False
