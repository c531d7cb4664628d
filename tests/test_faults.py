"""Bad input and faults, one test per row of the table in docs/scale-and-reliability.md: each gets a clear message,
and nothing already saved is lost. (Config typos and wrong types: tests/test_configs.py; a NaN loss:
tests/test_training.py; a save that dies midway, as on a full disk: tests/test_resume.py.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from quietstar.cli.train import main as train_main
from quietstar.training.arguments import DataArguments
from quietstar.training.data import load_documents

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny-cpu.yaml")


def tiny_argv(tmp_path, *extra):
    return ["--config", TINY, "--output_dir", str(tmp_path / "run"), "--report_to", "none", "--disable_tqdm", "true",
            *extra]


def test_unknown_model_id_without_network(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "train.py"), "--model_name_or_path", "no-such-org/no-such-model",
         "--dataset", "synthetic-arithmetic", "--output_dir", str(tmp_path / "run"), "--use_cpu", "true"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "Could not load the tokenizer 'no-such-org/no-such-model'" in last and "network" in last
    assert not (tmp_path / "run").exists()


def test_a_dataset_with_empty_short_and_non_utf8_documents(tmp_path, caplog):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a_empty.txt").write_text("")
    (folder / "b_short.txt").write_text("1+1")
    (folder / "c_good.txt").write_text("12 + 30 = 42. 42 - 2 = 40. " * 4)
    assert load_documents(DataArguments(dataset=str(folder))) == ["1+1", "12 + 30 = 42. 42 - 2 = 40. " * 4]
    (folder / "d_latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"d_latin1.txt is not UTF-8 text .*re-encode it as UTF-8"):
        load_documents(DataArguments(dataset=str(folder)))
    with pytest.raises(SystemExit, match="d_latin1.txt is not UTF-8"):
        train_main(tiny_argv(tmp_path, "--dataset", str(folder), "--max_steps", "1"))
    (folder / "d_latin1.txt").unlink()
    (folder / "e_broken.jsonl").write_text('{"text": "fine"}\n{"text": "unterminated\n')
    with pytest.raises(SystemExit, match="e_broken.jsonl:2 is not valid JSON"):
        train_main(tiny_argv(tmp_path, "--dataset", str(folder), "--max_steps", "1"))


def test_max_length_beyond_the_models_positions(tmp_path):
    # tiny-cpu: max_position_embeddings 512, T = 4, A = 2: the last branch reaches position 510 + 4 + 2 + 1 = 517
    with pytest.raises(SystemExit, match=r"needs 517 positions.*max_position_embeddings 512.*at most 505"):
        train_main(tiny_argv(tmp_path, "--max_length", "510"))
    with pytest.raises(SystemExit, match=r"num_thought_tokens 16 .*needs 526 positions"):
        train_main(tiny_argv(tmp_path, "--max_length", "505", "--thought_curriculum", "0:16/4", "5:4/2"))
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_from_a_different_config_is_refused(tmp_path):
    train_main(tiny_argv(tmp_path, "--max_steps", "2", "--save_steps", "2"))
    checkpoint = tmp_path / "run" / "checkpoint-2"
    before = sorted(os.listdir(checkpoint))
    with pytest.raises(SystemExit, match=r"different configuration \(num_thought_tokens: checkpoint 4, run 3\)"):
        train_main(tiny_argv(tmp_path, "--max_steps", "4", "--num_thought_tokens", "3",
                             "--resume_from_checkpoint", str(checkpoint)))
    with pytest.raises(SystemExit, match=r"hidden_size: checkpoint 64, run 32"):
        train_main(tiny_argv(tmp_path, "--max_steps", "4", "--resume_from_checkpoint", str(checkpoint),
                             "--model_config", '{"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, '
                             '"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}'))
    with pytest.raises(SystemExit, match="not a complete checkpoint"):
        train_main(tiny_argv(tmp_path, "--resume_from_checkpoint", str(tmp_path / "run" / "no-such-checkpoint")))
    assert sorted(os.listdir(checkpoint)) == before  # nothing saved was touched
