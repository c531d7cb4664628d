"""One process of tests/test_fsdp.py, started by torchrun: train a tiny Quiet-STaR model sharded with FSDP2.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_worker.py OUTPUT_DIR [ARCH]

Shards the model the way accelerate's FSDP2 transformer auto-wrap does (every decoder layer named by the
model's ``_no_split_modules``, then the root), takes 2 SGD steps on this process's half of a fixed
batch with fixed thoughts, gathers the full state dict and saves it with ``save_pretrained(state_dict=...)``;
then loads that checkpoint into a fresh sharded model, as resuming does, and checks it holds exactly those weights.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import make_model, randomize_mixing_head  # noqa: E402
from quietstar import QuietStarForCausalLM  # noqa: E402
from quietstar.training.trainer import load_checkpoint_weights  # noqa: E402

STEPS, LEARNING_RATE, ROWS, LENGTH = 2, 0.1, 4, 12


def fixed_model_and_batch(arch: str):
    """The model, a batch ``[ROWS, LENGTH]`` and its thoughts, identical in every process (and in the test)."""
    model = make_model(arch, policy_weight=3.0).train()
    randomize_mixing_head(model)
    ids = torch.randint(0, 256, (ROWS, LENGTH), generator=torch.Generator().manual_seed(1))
    thoughts = model.sample_thoughts(ids, generator=torch.Generator().manual_seed(2))
    return model, ids, thoughts


def train(model, ids, thoughts) -> None:
    # SGD: an update proportional to the gradient. Adam's normalised step would turn float noise in a
    # near-zero gradient entry into a full learning-rate step and hide what is compared: the gradients.
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    for _ in range(STEPS):
        model(ids, labels=ids, thoughts=thoughts).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def shard(model) -> None:
    for module in model.modules():
        if type(module).__name__ in model._no_split_modules:
            fully_shard(module)
    fully_shard(model)


def full_state_dict(model) -> dict:
    """As accelerate gathers it for saving (Accelerator.get_state_dict under FSDP2): complete on process 0 only."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def main(output_dir: str, arch: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, ids, thoughts = fixed_model_and_batch(arch)
    shard(model)
    train(model, ids.chunk(world)[rank].clone(), thoughts.chunk(world)[rank].clone())
    trained = full_state_dict(model)
    if rank == 0:
        model.save_pretrained(output_dir, state_dict=trained)
    dist.barrier()

    # Resuming: a fresh sharded model takes the checkpoint's weights (what QuietStarTrainer does under FSDP).
    fresh, _, _ = fixed_model_and_batch(arch)
    shard(fresh)
    load_checkpoint_weights(fresh, output_dir, sharded=True)
    reloaded = full_state_dict(fresh)
    if rank == 0:
        reference = QuietStarForCausalLM.from_pretrained(output_dir).state_dict()
        differing = [k for k in reference if not torch.equal(reference[k], reloaded[k])]
        if differing:
            raise SystemExit(f"the resumed sharded model differs from its checkpoint in {differing}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "llama")
