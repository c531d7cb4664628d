"""Run configuration: every shipped YAML parses; typos, wrong types and bad values are refused clearly."""

from __future__ import annotations

import dataclasses
import glob
import os

import pytest
import transformers.training_args

from quietstar import AttentionSettings, QuietStarConfig, QuietStarLossConfig
from quietstar.training import (
    ConfigError,
    DataArguments,
    ModelArguments,
    QuietStarTrainingArguments,
    load_yaml_config,
    parse_config,
)
from quietstar.training import arguments as arguments_module

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))


@pytest.fixture
def bf16_capable(monkeypatch):
    """Let bf16 configs parse on a CPU-only machine (TrainingArguments checks the hardware)."""
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)


def write_yaml(tmp_path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_configs_exist():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"tiny-cpu.yaml", "mistral-7b-openwebmath.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_parses_and_starts_with_a_comment(path, bf16_capable):
    with open(path) as f:
        assert f.readline().startswith("# Run:"), f"{path} must start with a comment giving its command"
    model_args, data_args, quietstar_config, training_args, loss_config, attention = parse_config(["--config", path])
    assert isinstance(model_args, ModelArguments) and isinstance(data_args, DataArguments)
    assert isinstance(quietstar_config, QuietStarConfig)
    assert isinstance(training_args, QuietStarTrainingArguments)
    assert isinstance(loss_config, QuietStarLossConfig) and isinstance(attention, AttentionSettings)
    assert training_args.output_dir.startswith("runs/")


def test_tiny_cpu_values():
    model_args, data_args, quietstar_config, training_args, *_ = parse_config(
        ["--config", os.path.join(REPO, "configs", "tiny-cpu.yaml")]
    )
    assert model_args.model_config["model_type"] == "llama"
    assert model_args.tokenizer_name_or_path == "builtin-bytes"
    assert data_args.dataset == "synthetic-arithmetic"
    assert training_args.max_steps == 20 and training_args.use_cpu
    assert training_args.learning_rate == pytest.approx(1e-3)
    assert quietstar_config.num_thoughts == 2


def test_mistral_values_match_the_official_run(bf16_capable):
    model_args, data_args, quietstar_config, training_args, *_ = parse_config(
        ["--config", os.path.join(REPO, "configs", "mistral-7b-openwebmath.yaml")]
    )
    assert model_args.model_name_or_path == "mistralai/Mistral-7B-v0.1" and model_args.dtype == "float32"
    assert data_args.dataset == "open-web-math/open-web-math" and data_args.max_length == 256
    assert (quietstar_config.num_thought_tokens, quietstar_config.num_lookahead_tokens,
            quietstar_config.num_thoughts) == (9, 4, 2)
    assert isinstance(training_args.learning_rate, float) and training_args.learning_rate == 1e-6
    assert training_args.weight_decay == 0.001 and training_args.warmup_steps == 20
    assert training_args.max_grad_norm == 1.0 and training_args.max_steps == 100
    assert training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps == 8
    assert training_args.bf16 and training_args.activation_checkpointing
    assert training_args.thought_embedding_lr_scale == 100.0


def test_sus_config_is_the_official_run_with_sus(bf16_capable):
    official = parse_config(["--config", os.path.join(REPO, "configs", "mistral-7b-openwebmath.yaml")])
    sus = parse_config(["--config", os.path.join(REPO, "configs", "mistral-7b-openwebmath-sus.yaml")])
    assert sus.attention.attention_backend == "triton" and sus.attention.sus_c == 32.0
    assert official.attention.sus_c is None
    assert dataclasses.replace(sus.attention, attention_backend=official.attention.attention_backend,
                               sus_c=official.attention.sus_c) == official.attention
    assert sus.quietstar == official.quietstar and sus.data == official.data and sus.loss == official.loss
    assert (sus.training.learning_rate == official.training.learning_rate
            and sus.training.max_steps == official.training.max_steps)


def test_command_line_overrides_yaml(tmp_path):
    path = write_yaml(tmp_path, "model_config: {model_type: llama}\ntokenizer_name_or_path: builtin-bytes\n"
                                "dataset: synthetic-arithmetic\nlearning_rate: 1e-3\nmax_steps: 7\nnum_thoughts: 3\n")
    _, _, quietstar_config, training_args, *_ = parse_config(["--config", path, "--learning_rate", "1e-5",
                                                              "--num_thoughts", "4"])
    assert training_args.learning_rate == 1e-5
    assert quietstar_config.num_thoughts == 4
    assert training_args.max_steps == 7  # from the YAML


def test_model_config_from_a_json_flag():
    model_args, *_ = parse_config(["--model_config", '{"model_type": "qwen2", "hidden_size": 32}',
                                   "--tokenizer_name_or_path", "builtin-bytes", "--dataset", "synthetic-arithmetic"])
    assert model_args.model_config == {"model_type": "qwen2", "hidden_size": 32}


def test_unknown_key_is_refused_with_a_suggestion(tmp_path):
    path = write_yaml(tmp_path, "model_name_or_path: x\nlearning_rat: 1e-5\n")
    with pytest.raises(ConfigError, match=r"'learning_rat' \(did you mean 'learning_rate'"):
        load_yaml_config(path)


@pytest.mark.parametrize(
    "line, field, expected",
    [("max_steps: many", "max_steps", "int"),
     ("per_device_train_batch_size: 2.5", "per_device_train_batch_size", "int"),
     ("bf16: maybe", "bf16", r"bool or one of \['auto'\]"),
     ("learning_rate: [1]", "learning_rate", "float"),
     ("num_documents: ten", "num_documents", "int or null")],
)
def test_wrong_type_is_refused_naming_the_field(tmp_path, line, field, expected):
    with pytest.raises(ConfigError, match=rf"{field} must be {expected}, got"):
        load_yaml_config(write_yaml(tmp_path, line + "\n"))


def test_yaml_strings_are_parsed_to_the_field_type(tmp_path):
    values = load_yaml_config(write_yaml(tmp_path, "learning_rate: 1e-6\nmax_steps: '12'\nbf16: 'true'\n"
                                                   "report_to: [tensorboard]\nnum_documents: null\n"))
    assert values == {"learning_rate": 1e-6, "max_steps": 12, "bf16": True, "report_to": ["tensorboard"],
                      "num_documents": None}


def test_invalid_value_names_the_field(tmp_path):
    path = write_yaml(tmp_path, "model_name_or_path: x\ndataset: d.jsonl\nnum_thoughts: 0\n")
    with pytest.raises(ConfigError, match="num_thoughts must be a positive integer"):
        parse_config(["--config", path])


def test_yaml_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_yaml_config(write_yaml(tmp_path, "- a\n- b\n"))


def test_data_arguments_need_a_dataset():
    with pytest.raises(ValueError, match="Set dataset"):
        DataArguments()


def test_model_arguments_need_exactly_one_model_source():
    with pytest.raises(ValueError, match="exactly one of model_name_or_path"):
        ModelArguments()
    with pytest.raises(ValueError, match="needs tokenizer_name_or_path"):
        ModelArguments(model_config={"model_type": "llama"})
    with pytest.raises(ValueError, match="dtype must be one of"):
        ModelArguments(model_name_or_path="x", dtype="float64")


def test_learning_rate_scales_are_validated(tmp_path):
    with pytest.raises(ValueError, match="thought_embedding_lr_scale must be a finite number > 0"):
        QuietStarTrainingArguments(output_dir=str(tmp_path), thought_embedding_lr_scale=0)


@pytest.mark.parametrize("installed, expected", [(True, ["tensorboard"]), (False, [])])
def test_report_to_defaults_to_tensorboard_when_installed(monkeypatch, tmp_path, installed, expected):
    monkeypatch.setattr(arguments_module, "is_tensorboard_available", lambda: installed)
    args = QuietStarTrainingArguments(output_dir=str(tmp_path))
    assert args.report_to == expected
    assert args.label_names == ["labels"]
    assert QuietStarTrainingArguments(output_dir=str(tmp_path), report_to="wandb").report_to == ["wandb"]


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "accelerate", "*.yaml"))),
                         ids=os.path.basename)
def test_accelerate_configs_load_and_say_how_to_launch(path):
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file

    with open(path) as f:
        assert f.readline().startswith("# Launch:  accelerate launch --config_file ")
    assert yaml.safe_load(open(path))["num_processes"] >= 2
    assert load_config_from_file(path).num_processes >= 2


def test_smollm2_configs_use_the_offline_assets(bf16_capable):
    for name in ("smollm2-135m-cpu", "smollm2-135m-cpu-experiment", "smollm2-135m-cpu-official", "smollm2-135m-gpu"):
        model_args, data_args, quietstar_config, training_args, *_ = parse_config(
            ["--config", os.path.join(REPO, "configs", f"{name}.yaml")])
        assert (model_args.model_name_or_path, data_args.dataset) == ("smollm2-135m", "offline-math")
        assert training_args.output_dir == f"runs/{name}"


def test_demo_and_experiment_use_the_recipe_and_the_presets_the_official_loss(bf16_capable):
    """The recipe (docs/recipe.md) is what the demo and the experiment run; the official loss only where a config says
    it reproduces the official run."""
    from quietstar.loss_config import OFFICIAL_LOSS

    for name in ("smollm2-135m-cpu", "smollm2-135m-cpu-experiment", "smollm2-135m-gpu"):
        run = parse_config(["--config", os.path.join(REPO, "configs", f"{name}.yaml")])
        config, loss, training_args = run.quietstar, run.loss, run.training
        assert config.text_path == "thought_lora" and run.model.peft is not None
        assert (loss.reward_source, loss.reward_precision, loss.advantage_normalization) == (
            "thought", "fp32", "batch_std")
        assert not loss.clip_negative_advantage and loss.reinforce_temperature == config.thought_temperature
        assert training_args.policy_weight_warmup_steps > 0 and training_args.mixing_head_lr_scale == 1
    for name in ("smollm2-135m-cpu-official", "mistral-7b-openwebmath", "mistral-7b-openwebmath-sus"):
        values = load_yaml_config(os.path.join(REPO, "configs", f"{name}.yaml"))
        assert {key: values[key] for key in OFFICIAL_LOSS} == OFFICIAL_LOSS, name
    official = load_yaml_config(os.path.join(REPO, "configs", "smollm2-135m-cpu-official.yaml"))
    assert (official["dtype"], official["bf16"], official["learning_rate"]) == ("bfloat16", False, 1e-6)


def test_cpu_configs_with_fp32_weights_leave_bf16_to_the_machine():
    """bf16: auto (quietstar/bf16.py): emulated bf16 on a CPU without bf16 instructions is ~100x slower, so no CPU
    config forces it; the official preset keeps pure bf16 weights without autocast, as the official run."""
    for path in CONFIGS:
        values = load_yaml_config(path)
        if values.get("use_cpu") and "bf16" in values:
            expected = False if values.get("dtype") == "bfloat16" else "auto"
            assert values["bf16"] == expected, os.path.basename(path)
    assert load_yaml_config(os.path.join(REPO, "configs", "smollm2-135m-cpu.yaml"))["bf16"] == "auto"
