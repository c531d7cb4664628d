"""Train a causal LM with Quiet-STaR.

    quietstar-train --config configs/tiny-cpu.yaml [--field value ...]
    accelerate launch -m quietstar.cli.train --config configs/mistral-7b-openwebmath.yaml
    (from a checkout: python scripts/train.py ..., accelerate launch scripts/train.py ...)

The YAML file gives defaults and flags override them; ``--help`` lists every field (model, data, Quiet-STaR
model, training, loss and attention arguments; all are written to ``output_dir/run_config.json``, the model
config alone into each checkpoint). Checkpoints go to ``output_dir/checkpoint-N`` and the final model to ``output_dir``;
load either with ``QuietStarForCausalLM.from_pretrained``. ``--resume_from_checkpoint DIR`` resumes a run.
"""

from __future__ import annotations

import sys

from transformers import set_seed

from ..assets import AssetUnavailableError
from ..training import QuietStarTrainer, build_datasets, build_model, parse_config
from ..training.curriculum import longest_thought_lengths
from ..training.checks import check_checkpoint_matches, check_gold_thoughts, check_positions, check_thought_fraction
from ..training.compute import step_cost
from ..training.memory import check_memory, format_gib
from ..training.run_files import check_output_dir, write_run_config


# Bad input: each of these carries a message for the user, printed instead of a traceback.
INPUT_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, AssetUnavailableError, MemoryError)


def prepare(argv: list[str] | None):
    """Parse and check the run, build the model and the datasets: everything before training that bad input can
    stop. Raises one of INPUT_ERRORS; writes nothing but ``run_config.json``, last."""
    run = parse_config(argv)
    model_args, data_args, quietstar_config, training_args = run.model, run.data, run.quietstar, run.training
    check_output_dir(training_args.output_dir, training_args.overwrite_output_dir, training_args.resume_from_checkpoint)
    if training_args.bf16_note and training_args.should_log:
        print(training_args.bf16_note)  # what bf16: auto chose for this machine, and how to force the other
    set_seed(training_args.seed)  # before the model: a random model_config is initialised from it
    model = build_model(model_args, quietstar_config, run.loss, run.attention, training_args.control)
    stages = training_args.thought_stages
    check_positions(model, data_args.max_length, stages)
    check_thought_fraction(model, training_args.device.type)
    check_gold_thoughts(training_args.uses_gold_thoughts, data_args.dataset, data_args.multihop_hops,
                        quietstar_config.num_thought_tokens, stages)
    if training_args.resume_from_checkpoint:
        check_checkpoint_matches(model, training_args.resume_from_checkpoint, curriculum=bool(stages))
    if not training_args.skip_memory_check:
        estimate = check_memory(model, training_args, data_args.max_length, training_args.device)
        if training_args.should_log:
            print(f"Training on {training_args.world_size} process(es); estimated peak memory "
                  f"{format_gib(estimate['total'])} per process.")
    window_seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
    with training_args.main_process_first(desc="loading and tokenizing the data"):
        # Rows must hold A + 2 real tokens for the longest lookahead the run will use (a curriculum may raise it).
        _, lookahead = longest_thought_lengths(quietstar_config, stages)
        train_dataset, eval_dataset = build_datasets(data_args, model.tokenizer, min_tokens=lookahead + 2,
                                                     seed=window_seed,
                                                     gold_intermediates=training_args.uses_gold_thoughts)
    if training_args.should_save:
        rows = (training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
                * training_args.world_size)
        cost = step_cost(training_args.control, model.quietstar_config, stages, data_args.max_length, rows,
                         training_args.max_steps, run.loss)
        # The model's config: what the run trains with once its control is applied.
        write_run_config(training_args.output_dir, model_args, data_args, model.quietstar_config, training_args,
                         run.loss, run.attention, cost)
    return model, training_args, train_dataset, eval_dataset


def main(argv: list[str] | None = None) -> None:
    try:
        model, training_args, train_dataset, eval_dataset = prepare(argv)
    except INPUT_ERRORS as error:
        sys.exit(f"train.py: error: {error}")
    trainer = QuietStarTrainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset)
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if training_args.control == "finetune" and model.lora is not None:
        # The final folder's LM is the fine-tuned LM itself, so any loader reads the control right; the checkpoints
        # keep the adapter separate, so the run still resumes.
        model.merge_lora()
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    # Every process waits for the saves, then the process group is torn down: a process that exits with its gloo
    # group alive aborts ("terminate called without an active exception") and fails the launch.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    if trainer.is_world_process_zero():
        print(f"Saved the trained model to {training_args.output_dir} "
              "(load it with quietstar.QuietStarForCausalLM.from_pretrained).")


if __name__ == "__main__":
    main()
