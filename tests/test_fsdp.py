"""FSDP2 (torch's fully_shard, what accelerate's FSDP2 plugin applies) on 2 CPU processes (gloo).

accelerate does not launch FSDP on CPU, so the trainer's FSDP path itself only runs on GPUs; this checks what it
relies on: the model trains sharded exactly as it trains whole (sampling calls into sharded decoder layers,
the lm_head called several times per step, root-level parameters), and a full state dict gathered from the
shards saves a checkpoint that loads back as the trained model. Tolerance: 1e-6 absolute after 2 SGD steps at
lr 0.1 in float32, which move parameters by up to about 1e-2 (the only difference is the order of the
gradient summation).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fsdp_worker import fixed_model_and_batch, train
from quietstar import QuietStarForCausalLM

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fsdp_worker.py")


@pytest.mark.slow  # two processes start torch and build the model (~20 s)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fsdp2_on_two_processes_trains_and_saves_what_one_process_does(tmp_path, arch):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER,
         str(tmp_path / "fsdp"), arch],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = QuietStarForCausalLM.from_pretrained(tmp_path / "fsdp")

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
