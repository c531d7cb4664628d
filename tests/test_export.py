"""Export (quietstar/cli/export.py: quietstar-export, scripts/export.py): a stock LM folder plus the Quiet-STaR parts and
a model card, restored exactly in a fresh process; validation that names bad files; atomic writes; LoRA merging; pushing
without network fails cleanly."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import huggingface_hub.constants
import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import make_model, padded_batch, randomize_mixing_head
from quietstar import QuietStarForCausalLM
from quietstar.cli.export import ExportError, export, push_to_hub
from quietstar.cli.export import main as export_main
from quietstar.training import (
    QuietStarTrainer,
    QuietStarTrainingArguments,
    build_window_dataset,
    synthetic_arithmetic_documents,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPORT_SCRIPT = os.path.join(REPO, "scripts", "export.py")
THOUGHT_TOKENS = ("<|startofthought|>", "<|endofthought|>")
EXPORTED_FILES = {"README.md", "config.json", "generation_config.json", "model.safetensors", "quietstar.safetensors",
                  "quietstar_config.json", "tokenizer.json", "tokenizer_config.json"}
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}  # never waits on a network


def trained_model(seed: int = 0) -> QuietStarForCausalLM:
    """A tiny model whose mixing head and thought embeddings differ from their initial values."""
    model = make_model(seed=seed)
    randomize_mixing_head(model, scale=2.0)
    with torch.no_grad():
        model.thought_embeddings.copy_(torch.randn(model.thought_embeddings.shape,
                                                   generator=torch.Generator().manual_seed(seed + 5)))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model, folder): a trained model saved with save_pretrained, as a trainer checkpoint would be."""
    model = trained_model()
    folder = tmp_path_factory.mktemp("saved") / "checkpoint"
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture
def checkpoint(saved, tmp_path):
    """A private copy of the saved checkpoint inside a run folder, with training leftovers beside the model."""
    folder = tmp_path / "run" / "checkpoint-20"
    shutil.copytree(saved[1], folder)
    (folder / "optimizer.pt").write_bytes(b"optimizer state")
    return folder


def folder_digest(folder) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in sorted(os.listdir(folder))}


def leftovers(parent) -> list[str]:
    return [name for name in os.listdir(parent) if name.startswith(".")]


def card_of(folder) -> tuple[dict, str]:
    """(YAML header, body) of the model card in ``folder``."""
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


# ---------------------------------------------------------------------------------------------- the export
def test_export_is_a_stock_lm_folder_whose_tokenizer_and_embeddings_hold_the_thought_tokens(saved, checkpoint,
                                                                                          tmp_path):
    model, _ = saved
    out = tmp_path / "export"
    assert export(checkpoint, out) == str(out)
    assert set(os.listdir(out)) == EXPORTED_FILES  # no optimizer state, no trainer files
    assert leftovers(tmp_path) == []

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.tokenize(f"a{THOUGHT_TOKENS[0]}b{THOUGHT_TOKENS[1]}") == ["a", THOUGHT_TOKENS[0], "b",
                                                                              THOUGHT_TOKENS[1]]
    assert tokenizer.convert_tokens_to_ids(list(THOUGHT_TOKENS)) == [258, 259] == list(model.thought_token_ids)
    lm = AutoModelForCausalLM.from_pretrained(out).eval()
    assert lm.get_input_embeddings().num_embeddings == len(tokenizer) == 260
    assert torch.equal(lm.get_input_embeddings().weight[[258, 259]], model.thought_embeddings)
    ids = torch.tensor([[5, 258, 70, 71, 259, 9, 10]])
    with torch.no_grad():
        expected = model.base(inputs_embeds=model.embed(ids)).logits
        torch.testing.assert_close(lm(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


ROUND_TRIP = """
import sys, torch
from quietstar import QuietStarForCausalLM
model = QuietStarForCausalLM.from_pretrained(sys.argv[1]).eval()
inputs = torch.load(sys.argv[2])
with torch.no_grad():
    out = model(inputs["input_ids"], attention_mask=inputs["attention_mask"], thoughts=inputs["thoughts"])
torch.save({name: getattr(out, name) for name in ("base_logits", "thought_logits", "mixing_weights", "logits")},
           sys.argv[3])
"""


def test_a_fresh_process_restores_the_export_exactly(saved, checkpoint, tmp_path):
    model, _ = saved
    ids, mask = padded_batch(lengths=(9, 7))
    thoughts = model.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(3))
    torch.save({"input_ids": ids, "attention_mask": mask, "thoughts": thoughts}, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, thoughts=thoughts)
    export(checkpoint, tmp_path / "export")

    subprocess.run([sys.executable, "-c", ROUND_TRIP, str(tmp_path / "export"), str(tmp_path / "inputs.pt"),
                    str(tmp_path / "outputs.pt")], check=True, timeout=120, cwd=REPO)
    restored = torch.load(tmp_path / "outputs.pt")
    assert restored["mixing_weights"].abs().max() > 0.1  # the trained mixing head is in play
    for name, value in restored.items():
        assert value.dtype == torch.float32 and torch.equal(value, getattr(expected, name)), name


def test_model_card_holds_metadata_config_training_metrics_and_eval_results(checkpoint, tmp_path):
    history = [
        {"step": 10, "epoch": 0.5, "loss": 3.14159, "base_nll": 2.71828, "mixed_nll_0": 2.5, "reward_mean": -0.25},
        {"step": 20, "epoch": 1.0, "loss": 2.0, "base_nll": 2.3456789, "mixed_nll_0": 2.25, "reward_mean": 0.125},
        {"step": 20, "epoch": 1.0, "eval_loss": 1.875, "eval_base_nll": 1.5},
    ]
    (checkpoint.parent / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    gsm8k = {"task": "gsm8k", "protocol": "accuracy", "metric": "accuracy", "n": 1319, "items": []}
    thinking = {"baseline": False, "score": 0.123456, "quietstar_config": {"num_thoughts": 4, "num_thought_tokens": 8}}
    (checkpoint / "gsm8k_results.json").write_text(json.dumps({**gsm8k, **thinking}))
    (checkpoint / "train_results.json").write_text(json.dumps({"train_loss": 2.5}))  # the Trainer's: not a result
    extra = tmp_path / "baseline.json"
    extra.write_text(json.dumps({**gsm8k, "baseline": True, "score": 0.1, "quietstar_config": None}))
    out = tmp_path / "export"
    export(checkpoint, out, eval_results=[extra], base_model="HuggingFaceTB/SmolLM2-135M", license="apache-2.0")

    header, body = card_of(out)
    assert header == {"library_name": "transformers", "pipeline_tag": "text-generation", "license": "apache-2.0",
                      "base_model": "HuggingFaceTB/SmolLM2-135M", "tags": ["quiet-star", "reasoning"]}
    for row in ("| `num_thought_tokens` | `3` |", "| `num_lookahead_tokens` | `3` |", "| `num_thoughts` | `2` |",
                "| `mixing` | `logits` |", "| `text_path` | `train` |"):
        assert row in body
    # Run settings (how the loss was weighed, how attention ran) are not the model's: the card does not list them.
    for name in ("policy_weight", "reward_source", "attention_backend", "sus_c"):
        assert f"| `{name}` |" not in body, name
    assert "20 optimizer steps" in body
    for row in ("| `loss` | 2 | 20 |", "| `base_nll` | 2.346 | 20 |", "| `reward_mean` | 0.125 | 20 |",
                "| `eval_loss` | 1.875 | 20 |", "| 10 | 3.142 | 2.718 | 2.5 | -0.25 |",
                "| 20 | 2 | 2.346 | 2.25 | 0.125 |",
                "| gsm8k | accuracy | thoughts (N=4, T=8) | accuracy | 0.1235 | 1319 |",
                "| gsm8k | accuracy | no thoughts (baseline) | accuracy | 0.1 | 1319 |"):
        assert row in body
    assert "train_loss" not in body.split("## Evaluation")[1]
    assert 'AutoModelForCausalLM.from_pretrained("<user>/export")' in body
    assert "suppress_tokens=[258, 259]" in body


def test_a_trainer_checkpoint_exports_with_its_logged_metrics(tmp_path):
    model = make_model(num_thought_tokens=2, num_lookahead_tokens=2)
    args = QuietStarTrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2,
                                      use_cpu=True, report_to="none", disable_tqdm=True, save_strategy="steps",
                                      save_steps=2, logging_steps=1, seed=0)
    dataset = build_window_dataset(synthetic_arithmetic_documents(4), model.tokenizer, 24, 4)
    trainer = QuietStarTrainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    last = [entry for entry in trainer.state.log_history if "base_nll" in entry][-1]

    export(tmp_path / "run" / "checkpoint-2", tmp_path / "export")
    assert set(os.listdir(tmp_path / "export")) == EXPORTED_FILES
    _, body = card_of(tmp_path / "export")
    assert f"| `base_nll` | {last['base_nll']:.4g} | 2 |" in body
    assert f"| `mixed_nll_1` | {last['mixed_nll_1']:.4g} | 2 |" in body


def test_model_card_without_training_state_or_results_has_no_such_sections(checkpoint, tmp_path):
    export(checkpoint, tmp_path / "export", repo_id="me/thinker")
    header, body = card_of(tmp_path / "export")
    assert "base_model" not in header and "license" not in header
    assert "## Training" not in body and "## Evaluation" not in body
    assert 'snapshot_download("me/thinker")' in body and "not recorded" in body


def test_a_malformed_eval_results_file_is_named(checkpoint, tmp_path):
    bad = tmp_path / "scores.json"
    bad.write_text(json.dumps({"accuracy": 0.5}))
    with pytest.raises(ExportError, match=f"{bad} is not an evaluation result"):
        export(checkpoint, tmp_path / "export", eval_results=[bad])


# ------------------------------------------------------------------------------------------------ validation
def truncate(path) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def garble(path) -> None:
    path.write_text('{"not json')


@pytest.mark.parametrize("name, damage", [
    ("config.json", os.remove), ("config.json", garble), ("model.safetensors", os.remove),
    ("model.safetensors", truncate), ("quietstar_config.json", os.remove), ("quietstar_config.json", garble),
    ("quietstar.safetensors", os.remove), ("quietstar.safetensors", truncate), ("tokenizer.json", garble),
    ("tokenizer_config.json", os.remove),
])
def test_a_missing_or_corrupt_file_is_named_and_nothing_is_written(checkpoint, tmp_path, name, damage):
    damage(checkpoint / name)
    word = "missing" if damage is os.remove else "corrupt"
    with pytest.raises(ExportError, match=f"{checkpoint / name} is {word}"):
        export(checkpoint, tmp_path / "export")
    assert not (tmp_path / "export").exists() and leftovers(tmp_path) == []


def test_a_quietstar_config_with_wrong_fields_is_named(checkpoint, tmp_path):
    path = checkpoint / "quietstar_config.json"
    saved = json.loads(path.read_text())
    saved["quietstar"]["num_thougths"] = 2
    path.write_text(json.dumps(saved))
    with pytest.raises(ExportError, match=f"{path} is corrupt.*num_thougths"):
        export(checkpoint, tmp_path / "export")


def test_a_sharded_checkpoint_exports_and_a_missing_shard_is_named(saved, checkpoint, tmp_path):
    model, _ = saved
    os.remove(checkpoint / "model.safetensors")
    model.base.save_pretrained(checkpoint, max_shard_size="200KB")
    shards = sorted(name for name in os.listdir(checkpoint) if name.startswith("model-"))
    assert len(shards) >= 2
    export(checkpoint, tmp_path / "export")
    assert set(shards) < set(os.listdir(tmp_path / "export"))
    restored = QuietStarForCausalLM.from_pretrained(tmp_path / "export")
    assert all(torch.equal(value, model.state_dict()[name]) for name, value in restored.state_dict().items())

    os.remove(checkpoint / shards[-1])
    with pytest.raises(ExportError, match=f"{checkpoint / shards[-1]} is missing"):
        export(checkpoint, tmp_path / "again")


# ---------------------------------------------------------------------------------------------- destination
def test_an_existing_out_is_refused_unless_overwrite_and_survives_a_failed_export(checkpoint, tmp_path,
                                                                                   monkeypatch):
    out = tmp_path / "export"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(ExportError, match=f"{out} already exists; pass overwrite=True"):
        export(checkpoint, out)

    def failing_card(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("quietstar.cli.export.write_model_card", failing_card)
    with pytest.raises(OSError, match="disk full"):
        export(checkpoint, out, overwrite=True)
    assert os.listdir(out) == ["mine.txt"] and leftovers(tmp_path) == []
    monkeypatch.undo()

    rename = os.rename

    def rename_failing_into_out(source, target):  # moving the old OUT aside works, moving the new one in fails
        if str(target) == str(out) and ".exporting-" in str(source):
            raise OSError("rename failed")
        rename(source, target)

    monkeypatch.setattr(os, "rename", rename_failing_into_out)
    with pytest.raises(OSError, match="rename failed"):
        export(checkpoint, out, overwrite=True)
    assert os.listdir(out) == ["mine.txt"]
    monkeypatch.undo()

    export(checkpoint, out, overwrite=True)
    assert set(os.listdir(out)) == EXPORTED_FILES and leftovers(tmp_path) == []


def test_export_refuses_to_replace_its_own_checkpoint(checkpoint):
    before = folder_digest(checkpoint)
    for out in (checkpoint, checkpoint.parent):
        with pytest.raises(ExportError, match="would replace the checkpoint"):
            export(checkpoint, out, overwrite=True)
    assert folder_digest(checkpoint) == before


# ---------------------------------------------------------------------------------------------------- LoRA
def add_lora_adapter(model: QuietStarForCausalLM, folder):
    """Wrap ``model.base`` in a LoRA adapter with random non-zero weights, save it to ``folder/adapter``; return
    the peft model."""
    lora = get_peft_model(model.base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in lora.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    lora.save_pretrained(folder / "adapter")
    return lora.eval()


def test_merge_lora_writes_the_merged_lm_with_the_adapter_models_logits(tmp_path):
    model = trained_model(seed=1)
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    lora = add_lora_adapter(model, checkpoint)
    ids = torch.tensor([[5, 258, 70, 71, 259, 9, 10, 11], [1, 2, 3, 4, 5, 6, 7, 8]])

    with pytest.raises(ExportError, match="has a LoRA adapter.*--merge-lora"):
        export(checkpoint, tmp_path / "unmerged")
    export(checkpoint, tmp_path / "export", merge_lora=True)
    assert set(os.listdir(tmp_path / "export")) == EXPORTED_FILES
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    plain = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        expected = lora(input_ids=ids).logits
        assert (plain(input_ids=ids).logits - expected).abs().max() > 0.1  # the adapter changes the LM
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    restored = QuietStarForCausalLM.from_pretrained(tmp_path / "export")
    assert torch.equal(restored.thought_embeddings, model.thought_embeddings)
    assert all(torch.equal(value, model.mixing_head.state_dict()[name])
               for name, value in restored.mixing_head.state_dict().items())


def test_merge_lora_without_an_adapter_says_there_is_none(checkpoint, tmp_path):
    with pytest.raises(ExportError, match=f"{checkpoint} has no LoRA adapter"):
        export(checkpoint, tmp_path / "export", merge_lora=True)
    assert not (tmp_path / "export").exists()


# ---------------------------------------------------------------------------------------------------- push
@pytest.mark.timeout(120)
def test_push_without_network_fails_cleanly_and_leaves_the_folder_intact(checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "export"
    export(checkpoint, out)
    before = folder_digest(out)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", OFFLINE_ENV["HF_ENDPOINT"])
    with pytest.raises(ExportError) as failure:
        push_to_hub(out, "someone/quietstar-tiny", private=True)
    message = str(failure.value)
    assert message.startswith("could not reach the Hugging Face Hub") and "\n" not in message
    assert f"the exported folder at {out} is intact; push it later with `hf upload someone/quietstar-tiny {out} . " \
           "--private`" in message
    assert folder_digest(out) == before
    with pytest.raises(ExportError, match="is not a Hub repository id"):
        push_to_hub(out, "not a repo id")


def run_export_script(*args, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, EXPORT_SCRIPT, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, **OFFLINE_ENV})


def test_cli_exports_then_reports_a_failed_push_in_one_line(checkpoint, tmp_path):
    out = tmp_path / "export"
    result = run_export_script(checkpoint, out, "--push-to-hub", "someone/quietstar-tiny")
    assert result.returncode == 1
    assert result.stdout.strip() == f"Exported {checkpoint} to {out}"
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("export.py: error: could not reach the Hugging Face Hub") and "is intact" in line
    assert set(os.listdir(out)) == EXPORTED_FILES


def test_cli_bad_input_exits_with_a_one_line_error(tmp_path, capsys):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(SystemExit) as exit_:
        export_main([str(missing), str(tmp_path / "export")])
    assert exit_.value.code == f"export.py: error: Checkpoint folder {missing} does not exist."
    with pytest.raises(SystemExit) as exit_:
        export_main([str(missing), str(tmp_path / "export"), "--private"])
    assert exit_.value.code == 2 and "--private needs --push-to-hub" in capsys.readouterr().err
    assert not (tmp_path / "export").exists()
