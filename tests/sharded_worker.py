"""One process of tests/test_sharded.py, started by torchrun: train a tiny Quiet-STaR model sharded across processes.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/sharded_worker.py {fsdp,deepspeed} OUT [ARCH]

``fsdp``: sharded the way accelerate's FSDP2 transformer auto-wrap does (every decoder layer named by the model's
``_no_split_modules``, then the root) with torch's ``fully_shard``; ``deepspeed``: a DeepSpeed ZeRO-2 engine
(gradients and optimizer state partitioned), as accelerate builds it for configs/accelerate/deepspeed-zero2.yaml.
Takes 2 SGD steps on this process's half of a fixed batch with fixed thoughts, gathers the full state dict as
accelerate does for saving and writes it with ``save_pretrained(state_dict=...)``. Under FSDP it then loads that
checkpoint into a fresh sharded model, as resuming does, and checks it holds exactly those weights.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import make_model, randomize_mixing_head  # noqa: E402
from quietstar import QuietStarForCausalLM  # noqa: E402
from quietstar.loss_config import OFFICIAL_LOSS  # noqa: E402
from quietstar.training.trainer import load_checkpoint_weights  # noqa: E402

STEPS, LEARNING_RATE, ROWS, LENGTH = 2, 0.1, 4, 12


def fixed_model_and_batch(arch: str):
    """The model, a batch ``[ROWS, LENGTH]`` and its thoughts, identical in every process (and in the test)."""
    # Raw advantages: normalised ones divide fp32 rounding differences by a small spread, which would
    # swamp the comparison of two exact computations (the recipe's loss is checked in fp64, test_losses.py).
    model = make_model(arch, **{**OFFICIAL_LOSS, "policy_weight": 3.0}).train()
    randomize_mixing_head(model)
    ids = torch.randint(0, 256, (ROWS, LENGTH), generator=torch.Generator().manual_seed(1))
    thoughts = model.sample_thoughts(ids, generator=torch.Generator().manual_seed(2))
    return model, ids, thoughts


def optimizer_for(model):
    # SGD: an update proportional to the gradient. Adam's normalised step would turn float noise in a
    # near-zero gradient entry into a full learning-rate step and hide what is compared: the gradients.
    return torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)


def train(model, ids, thoughts) -> None:
    optimizer = optimizer_for(model)
    for _ in range(STEPS):
        model(ids, labels=ids, thoughts=thoughts).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def fsdp_shard(model) -> None:
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if type(module).__name__ in model._no_split_modules:
            fully_shard(module)
    fully_shard(model)


def fsdp_full_state_dict(model) -> dict:
    """As accelerate gathers it for saving (Accelerator.get_state_dict under FSDP2): complete on process 0 only."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def run_fsdp(output_dir: str, arch: str, rank: int, world: int) -> None:
    model, ids, thoughts = fixed_model_and_batch(arch)
    fsdp_shard(model)
    train(model, ids.chunk(world)[rank].clone(), thoughts.chunk(world)[rank].clone())
    trained = fsdp_full_state_dict(model)
    if rank == 0:
        model.save_pretrained(output_dir, state_dict=trained)
    dist.barrier()

    # Resuming: a fresh sharded model takes the checkpoint's weights (what QuietStarTrainer does under FSDP).
    fresh, _, _ = fixed_model_and_batch(arch)
    fsdp_shard(fresh)
    load_checkpoint_weights(fresh, output_dir, sharded=True)
    reloaded = fsdp_full_state_dict(fresh)
    if rank == 0:
        reference = QuietStarForCausalLM.from_pretrained(output_dir).state_dict()
        differing = [k for k in reference if not torch.equal(reference[k], reloaded[k])]
        if differing:
            raise SystemExit(f"the resumed sharded model differs from its checkpoint in {differing}")


def run_deepspeed(output_dir: str, arch: str, rank: int, world: int) -> None:
    import deepspeed

    model, ids, thoughts = fixed_model_and_batch(arch)
    config = {"train_micro_batch_size_per_gpu": ROWS // world, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
              "gradient_clipping": 0.0}  # the trainer passes max_grad_norm; unclipped here to compare updates
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer_for(model), config=config)
    local_ids, local_thoughts = ids.chunk(world)[rank].clone(), thoughts.chunk(world)[rank].clone()
    for _ in range(STEPS):
        engine.backward(engine(local_ids, labels=local_ids, thoughts=local_thoughts).loss)
        engine.step()
    trained = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}  # Accelerator.get_state_dict
    if rank == 0:
        engine.module.save_pretrained(output_dir, state_dict=trained)


def main(mode: str, output_dir: str, arch: str) -> None:
    if mode == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    {"fsdp": run_fsdp, "deepspeed": run_deepspeed}[mode](output_dir, arch, rank, world)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "llama")
