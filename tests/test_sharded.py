"""Sharded training on 2 CPU processes (gloo): FSDP2 (torch's fully_shard, what accelerate's FSDP2 plugin applies)
and DeepSpeed ZeRO-2 (a DeepSpeed engine, what accelerate builds for configs/accelerate/deepspeed-zero2.yaml).

accelerate launches neither on CPU, so the trainer's FSDP and DeepSpeed paths themselves only run on GPUs; this
checks what they rely on: the model trains sharded exactly as it trains whole (sampling calls into sharded
decoder layers, the lm_head called several times per step, root-level parameters), a full state dict gathered
as accelerate gathers it saves a checkpoint that loads back as the trained model, and (FSDP) resuming scatters it
back exactly. Tolerance: 1e-6 absolute after 2 SGD steps at lr 0.1 in float32, which move every parameter by
1e-4 to 3e-2 (the only difference is the order of the gradient summation).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from sharded_worker import fixed_model_and_batch, train
from quietstar import QuietStarForCausalLM

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sharded_worker.py")
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


@pytest.mark.slow  # two processes start torch and build the model (~15 s)
@pytest.mark.parametrize("mode, arch", [
    ("fsdp", "llama"), ("fsdp", "qwen2"),
    pytest.param("deepspeed", "llama", marks=pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed not installed "
                                                                "(make setup installs it)")),
])
def test_two_sharded_processes_train_and_save_what_one_process_does(tmp_path, mode, arch):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER, mode,
         str(tmp_path / "sharded"), arch],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = QuietStarForCausalLM.from_pretrained(tmp_path / "sharded")

    whole, ids, thoughts = fixed_model_and_batch(arch)
    before = {name: p.detach().clone() for name, p in whole.named_parameters()}
    train(whole, ids, thoughts)
    whole.write_thought_embeddings()  # what a save does; the loaded model has it too
    trained = dict(whole.named_parameters())
    loaded = dict(sharded.named_parameters())
    assert trained.keys() == loaded.keys()
    worst = max((trained[k].detach() - loaded[k].detach()).abs().max().item() for k in trained)
    assert worst < 1e-6, worst
    moved = [k for k in trained if not torch.equal(before[k], trained[k].detach())]
    assert "thought_embeddings" in moved and any(k.startswith("mixing_head.") for k in moved)
    assert any(k.startswith("base.") for k in moved)


def test_fsdp_config_is_fsdp2_with_a_full_state_dict_and_the_trainer_accepts_only_that():
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.commands.config.config_args import load_config_from_file

    from conftest import make_model
    from quietstar.lora import add_lora, lora_config
    from quietstar.training.trainer import check_fsdp_plugin

    config = load_config_from_file(os.path.join(os.path.dirname(WORKER), "..", "configs", "accelerate", "fsdp.yaml"))
    assert (config.distributed_type, config.fsdp_config["fsdp_version"]) == ("FSDP", 2)
    assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    model = make_model("llama")
    check_fsdp_plugin(FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="FULL_STATE_DICT"), model)
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        check_fsdp_plugin(FullyShardedDataParallelPlugin(fsdp_version=1), model)
    with pytest.raises(ValueError, match="FULL_STATE_DICT"):
        check_fsdp_plugin(FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT"), model)
    add_lora(model, lora_config({"r": 2, "target_modules": ["q_proj"]}))
    with pytest.raises(ValueError, match="LoRA together with FSDP"):
        check_fsdp_plugin(FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="FULL_STATE_DICT"), model)


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed not installed (make setup installs it)")
def test_deepspeed_config_is_zero2_and_the_trainer_refuses_zero3_and_lora():
    from accelerate import DeepSpeedPlugin
    from accelerate.commands.config.config_args import load_config_from_file

    from conftest import make_model
    from quietstar.lora import add_lora, lora_config
    from quietstar.training.trainer import check_deepspeed_plugin

    config = load_config_from_file(os.path.join(os.path.dirname(WORKER), "..", "configs", "accelerate",
                                                "deepspeed-zero2.yaml"))
    assert (config.distributed_type, config.deepspeed_config["zero_stage"]) == ("DEEPSPEED", 2)
    model = make_model("llama")
    check_deepspeed_plugin(DeepSpeedPlugin(zero_stage=2), model)
    with pytest.raises(ValueError, match="ZeRO stages 0-2, not 3"):
        check_deepspeed_plugin(DeepSpeedPlugin(zero_stage=3), model)
    add_lora(model, lora_config({"r": 2, "target_modules": ["q_proj"]}))
    with pytest.raises(ValueError, match="LoRA together with DeepSpeed"):
        check_deepspeed_plugin(DeepSpeedPlugin(zero_stage=2), model)


@pytest.mark.parametrize("tied", [False, True])
def test_saving_from_a_gathered_state_dict_writes_what_saving_from_the_module_writes(tmp_path, tied):
    from safetensors.torch import load_file

    from conftest import randomize_mixing_head
    from quietstar import QuietStarConfig
    from quietstar.tiny import byte_tokenizer, tiny_model

    tokenizer = byte_tokenizer()
    base = tiny_model("llama", vocab_size=len(tokenizer), tie_word_embeddings=tied)
    model = QuietStarForCausalLM.from_base(base, tokenizer, QuietStarConfig())
    assert (model.lm_head.weight is model.base.get_input_embeddings().weight) == tied
    randomize_mixing_head(model)
    with torch.no_grad():
        model.thought_embeddings.normal_()  # rows the module's embedding matrix does not hold yet
    gathered = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "gathered", state_dict=gathered)
    model.save_pretrained(tmp_path / "module")
    for name in ("model.safetensors", "quietstar.safetensors"):
        a, b = load_file(tmp_path / "gathered" / name), load_file(tmp_path / "module" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    loaded = QuietStarForCausalLM.from_pretrained(tmp_path / "gathered")
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded.base(input_ids=ids).logits, model.base(input_ids=ids).logits)
