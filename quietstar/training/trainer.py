"""QuietStarTrainer: transformers.Trainer adapted to QuietStarForCausalLM.

What it changes:
- the loss is the model's Quiet-STaR objective weighed by the run's loss config (``loss_config``, with lambda from the
  policy-weight schedule of QuietStarTrainingArguments); its metrics are logged (in training, means since the last log;
  in evaluation, means over the evaluation set, ``eval_``-prefixed);
- a non-finite loss raises before its step's update and before anything of that step is saved;
- the optimizer has separate parameter groups for the LM body, the thought embeddings and the mixing head;
- checkpoints are written and read with ``QuietStarForCausalLM.save_pretrained`` / ``from_pretrained``, and
  published atomically: written under ``.staging-checkpoint-N`` and renamed to ``checkpoint-N`` once complete;
- ``thought_curriculum`` changes the thought and lookahead lengths over steps (quietstar.training.curriculum);
- every log is also appended to ``output_dir/metrics.jsonl`` (quietstar.training.run_files);
- ``control`` (quietstar.training.controls): the finetune control's loss is the plain LM's NLL, the null-thoughts
  control has no policy loss; a model not built for the run's control is refused;
- ``gold_thought_steps`` (the multi-hop task's gold-thought warm start) and ``gold_thought_interval`` (gold steps
  interleaved after it): on those steps the batch's gold intermediates replace the sampled thoughts at the query
  positions, and the policy loss, entropy bonus and contrastive reward are off.
Supported: one device, or several with DDP, FSDP2 or DeepSpeed ZeRO 0-2 (``accelerate launch``). Under FSDP the
full state dict is gathered for saving and scattered when resuming; under DeepSpeed the engine's own checkpoint
restores the run. FSDP1, sharded FSDP state dicts, ZeRO-3 and LoRA with either are refused.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections import defaultdict

import torch
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..files import replace_folder
from ..loss_config import QuietStarLossConfig
from ..modeling import QuietStarForCausalLM
from ..tasks.multihop import insert_gold_thoughts
from .arguments import QuietStarTrainingArguments
from .controls import plain_lm_output
from .data import RandomWindowDataset, WindowCollator, WindowEpochCallback
from .curriculum import CurriculumCallback
from .run_files import MetricsFileCallback

logger = logging.getLogger(__name__)


def check_fsdp_plugin(plugin, model: QuietStarForCausalLM) -> None:
    """Refuse the FSDP settings the trainer cannot checkpoint correctly, saying which setting to change."""
    if getattr(plugin, "fsdp_version", 1) != 2:
        raise ValueError("QuietStarTrainer supports FSDP2 only: set fsdp_version: 2 in the accelerate config "
                         "(configs/accelerate/fsdp.yaml).")
    if "FULL_STATE_DICT" not in str(plugin.state_dict_type):
        raise ValueError("QuietStarTrainer writes checkpoints from a full state dict under FSDP: set "
                         "fsdp_state_dict_type: FULL_STATE_DICT in the accelerate config.")
    if model.lora is not None:
        raise ValueError("LoRA together with FSDP is not supported; LoRA already fits most models on one GPU, or "
                         "train fully with FSDP.")


def check_deepspeed_plugin(plugin, model: QuietStarForCausalLM) -> None:
    """Refuse the DeepSpeed settings the trainer does not support, saying which setting to change."""
    if plugin.zero_stage not in (0, 1, 2):
        raise ValueError(f"QuietStarTrainer supports DeepSpeed ZeRO stages 0-2, not {plugin.zero_stage}: ZeRO-3 shards "
                         "the parameters the thought sampling reads. Use zero_stage: 2 "
                         "(configs/accelerate/deepspeed-zero2.yaml), or FSDP2 to shard parameters.")
    if model.lora is not None:
        raise ValueError("LoRA together with DeepSpeed is not supported; train LoRA with DDP or on one device.")


def check_control(model: QuietStarForCausalLM, control: str) -> None:
    """Refuse a model that was not built for the run's ``control`` (quietstar.training.build.build_model builds it)."""
    wanted = "filler" if control == "null_thoughts" else "sampled"
    if model.quietstar_config.thoughts != wanted:
        raise ValueError(f"control: {control} needs a model whose thoughts are {wanted}, got thoughts="
                         f"{model.quietstar_config.thoughts!r}; build it with build_model(..., control={control!r}).")
    if control == "finetune" and model._thought_gate is not None:
        raise ValueError("control: finetune trains the adapters on the text, but this model's adapters act on thought "
                         "tokens only (text_path thought_lora), so the text would not train; build it with "
                         "build_model(..., control='finetune').")


def load_checkpoint_weights(model: QuietStarForCausalLM, folder: str, sharded: bool = False) -> None:
    """Load the weights of a checkpoint written by ``save_pretrained`` into ``model``, in place.

    ``sharded``: the parameters are FSDP2 shards; every process reads the full checkpoint and keeps its shards.
    """
    saved = QuietStarForCausalLM.from_pretrained(folder, dtype=model.base.dtype)
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, saved.state_dict(), options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(saved.state_dict())


class QuietStarTrainer(Trainer):
    """Train a :class:`QuietStarForCausalLM` with :class:`QuietStarTrainingArguments`.

    ``data_collator`` defaults to a :class:`WindowCollator` with the model's pad token, ``processing_class`` to
    the model's tokenizer; a :class:`RandomWindowDataset` as ``train_dataset`` gets its epoch set every epoch.
    ``loss_config``: the run's loss (default: the model's ``loss_config``); the trainer owns it and passes it to
    every model call, lambda scaled by the schedule in training. Other arguments are Trainer's.
    """

    def __init__(self, model: QuietStarForCausalLM, args: QuietStarTrainingArguments, train_dataset=None,
                 eval_dataset=None, data_collator=None, processing_class=None, callbacks=None,
                 loss_config: QuietStarLossConfig | None = None, **kwargs):
        if not isinstance(model, QuietStarForCausalLM):
            raise TypeError(f"QuietStarTrainer trains a QuietStarForCausalLM, got {type(model).__name__}; wrap the "
                            "LM with QuietStarForCausalLM.from_base(base, tokenizer, config).")
        if not isinstance(args, QuietStarTrainingArguments):
            raise TypeError(f"QuietStarTrainer needs QuietStarTrainingArguments (it holds the learning-rate scales "
                            f"of the thought embeddings and the mixing head), got {type(args).__name__}.")
        callbacks = [*(callbacks or []), MetricsFileCallback()]
        if args.thought_stages:
            callbacks.append(CurriculumCallback(model, args.thought_stages))
        if isinstance(train_dataset, RandomWindowDataset):
            callbacks.append(WindowEpochCallback(train_dataset))
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=WindowCollator(model.pad_token_id) if data_collator is None else data_collator,
            processing_class=model.tokenizer if processing_class is None else processing_class,
            callbacks=callbacks,
            **kwargs,
        )
        check_control(model, args.control)
        if self.is_deepspeed_enabled:
            check_deepspeed_plugin(self.accelerator.state.deepspeed_plugin, model)
        if self.is_fsdp_enabled:
            check_fsdp_plugin(self.accelerator.state.fsdp_plugin, model)
        self.loss_config = model.loss_config if loss_config is None else loss_config
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._step_metrics = {}  # measured once in an optimizer step, logged when its gradients are clipped
        self._term_norm_step = None
        self._checkpoint_staging = None

    # ------------------------------------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The Quiet-STaR loss of one batch; its metrics are stored until the next log.

        Raises RuntimeError on a non-finite loss: before backward, so the exception ends training before this
        step's update and before any checkpoint of it.
        """
        loss_config = self.scheduled_loss_config() if model.training else self.loss_config
        gold = inputs.pop("gold_intermediates", None)
        thoughts = None
        gold_step = model.training and self.args.is_gold_step(self.state.global_step)
        if gold_step:
            if gold is None:
                raise ValueError("gold_thought_steps / gold_thought_interval need batches with gold_intermediates: build the datasets with "
                                 "build_datasets(..., gold_intermediates=True) (dataset synthetic-multihop).")
            unwrapped = self.accelerator.unwrap_model(model)
            thoughts = insert_gold_thoughts(unwrapped.sample_thoughts(inputs["input_ids"], inputs.get("attention_mask")),
                                            gold, unwrapped.filler_token_id)
            loss_config = dataclasses.replace(loss_config, policy_weight=0.0, entropy_bonus_weight=0.0,
                                              contrastive_reward_weight=0.0)
        if self.args.control == "finetune":
            outputs = plain_lm_output(self.accelerator.unwrap_model(model), inputs["input_ids"],
                                      inputs.get("attention_mask"), inputs["labels"])
        else:
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                            labels=inputs["labels"], thoughts=thoughts, output_logits=False, loss_config=loss_config)
        if model.training and self.args.uses_gold_thoughts:
            outputs.metrics["gold_thoughts"] = float(gold_step)
        if model.training:
            outputs.metrics["policy_weight"] = loss_config.policy_weight
            self._measure_term_gradients(model, outputs.loss_terms)
        if not torch.isfinite(outputs.loss):
            if model.training:
                where = f"at global step {self.state.global_step + 1}; its update was not applied"
            else:
                where = f"in evaluation after global step {self.state.global_step}"
            raise RuntimeError(
                f"Non-finite Quiet-STaR loss ({outputs.loss.item()}) {where}. No checkpoint was written for this "
                f"step (output_dir: {self.args.output_dir}). Metrics: {outputs.metrics}. Try a lower learning_rate "
                "or policy_weight, or bf16 instead of fp16."
            )
        mode = "train" if model.training else "eval"
        for name, value in outputs.metrics.items():
            self._metrics[mode][name].append(value)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def _set_signature_columns_if_needed(self) -> None:
        """Trainer keeps only the batch keys the model's forward takes; the gold intermediates are the trainer's."""
        super()._set_signature_columns_if_needed()
        if "gold_intermediates" not in self._signature_columns:
            self._signature_columns.append("gold_intermediates")

    def scheduled_loss_config(self) -> QuietStarLossConfig:
        """The run's loss config with lambda_t = lambda * the policy-weight schedule's factor at this step."""
        factor = self.args.policy_weight_factor(self.state.global_step)
        return dataclasses.replace(self.loss_config, policy_weight=self.loss_config.policy_weight * factor)

    def _measure_term_gradients(self, model, weighted: dict) -> None:
        """On the steps ``loss_term_grad_norm_steps`` asks for, the gradient norm of each weighted loss term."""
        step = self.state.global_step
        every = self.args.loss_term_grad_norm_steps
        if every and step % every == 0 and step != self._term_norm_step and torch.is_grad_enabled():
            self._term_norm_step = step  # once per optimizer step, not per accumulated micro-batch
            params = [p for p in model.parameters() if p.requires_grad]
            for name, term in weighted.items():
                if not term.requires_grad:
                    continue
                grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads
                                                             if g is not None] or [term.new_zeros(())]))
                self._step_metrics[f"grad_norm/{name}"] = norm.item()

    def _clip_grad_norm(self, model):
        """Trainer's clipping; before it, the norm of the summed gradient in each optimizer parameter group."""
        for group in self.optimizer.param_groups:
            grads = [p.grad for p in group["params"] if p.grad is not None]
            if grads:
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
                self._metrics["train"][f"grad_norm/{group.get('name', 'group')}"].append(norm.item())
        for name, value in self._step_metrics.items():
            self._metrics["train"][name].append(value)
        self._step_metrics.clear()
        return super()._clip_grad_norm(model)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation computes the loss (and stores metrics) only: (loss, None, None)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the means of the training metrics stored since the last log to a training log (one with "loss")."""
        stored = self._metrics["train"]
        if stored and "loss" in logs:
            logs.update({k: v for k, v in self._mean_over_processes(stored).items() if k not in logs})
            stored.clear()
        super().log(logs, start_time)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """Trainer's loop, plus the means of the Quiet-STaR metrics as ``{metric_key_prefix}_{name}``."""
        stored = self._metrics["eval"]
        stored.clear()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        if stored:
            means = self._mean_over_processes(stored)
            stored.clear()
            output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in means.items()
                                   if f"{metric_key_prefix}_{k}" not in output.metrics})
        return output

    def _mean_over_processes(self, stored: dict[str, list[float]]) -> dict[str, float]:
        names = sorted(stored)
        local = torch.tensor([sum(stored[n]) / len(stored[n]) for n in names], dtype=torch.float64,
                             device=self.args.device)
        return dict(zip(names, self.accelerator.reduce(local, reduction="mean").tolist()))

    # ------------------------------------------------------------------------------------------ optimizer
    def optimizer_parameter_groups(self, model=None) -> list[dict]:
        """Trainable parameters in named groups: LM body (weight decay except biases and norms), thought
        embeddings (lr x thought_embedding_lr_scale, no decay), mixing head (lr x mixing_head_lr_scale).

        Each group has a "name"; empty groups are left out, frozen parameters too.
        """
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        args = self.args
        decay = set(self.get_decay_parameter_names(model))
        groups = {
            "body": dict(lr=args.learning_rate, weight_decay=args.weight_decay),
            "body_no_decay": dict(lr=args.learning_rate, weight_decay=0.0),
            "thought_embeddings": dict(lr=args.learning_rate * args.thought_embedding_lr_scale, weight_decay=0.0),
            "mixing_head": dict(lr=args.learning_rate * args.mixing_head_lr_scale, weight_decay=args.weight_decay),
            "mixing_head_no_decay": dict(lr=args.learning_rate * args.mixing_head_lr_scale, weight_decay=0.0),
        }
        members = defaultdict(list)
        for name, parameter in model.named_parameters():
            if not parameter.requires_grad:
                continue
            if name == "thought_embeddings":
                group = "thought_embeddings"
            else:
                group = "mixing_head" if name.startswith("mixing_head.") else "body"
                group += "" if name in decay else "_no_decay"
            members[group].append(parameter)
        return [dict(name=group, params=members[group], **settings) for group, settings in groups.items()
                if members[group]]

    def create_optimizer(self, model=None):
        """Trainer's optimizer (``optim``, betas, eps, ...) over :meth:`optimizer_parameter_groups`."""
        if self.optimizer is None:
            opt_model = model if model is not None else self.model
            groups = self.optimizer_parameter_groups(opt_model)
            if not groups:
                raise ValueError("The model has no trainable parameters (all have requires_grad=False).")
            optimizer_cls, optimizer_kwargs = (self.optimizer_cls_and_kwargs
                                               or self.get_optimizer_cls_and_kwargs(self.args, opt_model))
            if {"params", "model", "optimizer_dict"} & set(optimizer_kwargs):
                raise ValueError(f"optim={self.args.optim!r} builds its own parameter groups, which would drop the "
                                 "thought-embedding and mixing-head learning rates; use an optimizer such as "
                                 "adamw_torch.")
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    # ---------------------------------------------------------------------------------------- checkpoints
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Write the model with ``QuietStarForCausalLM.save_pretrained`` and the training arguments beside it."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        logger.info(f"Saving Quiet-STaR model to {output_dir}")
        # Under FSDP, save_model hands over the full state dict it gathered from every process.
        self.accelerator.unwrap_model(self.model).save_pretrained(output_dir, state_dict=state_dict)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _get_output_dir(self, trial) -> str:
        """Where Trainer writes a checkpoint folder: the staging folder while :meth:`_save_checkpoint` runs."""
        return self._checkpoint_staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint (model, optimizer, scheduler, RNG states, trainer state), written inside
        ``.staging-checkpoint-N`` and renamed to ``checkpoint-N`` when every process has finished writing. A run
        killed while saving leaves only the staging folder, which resuming never picks up
        (``get_last_checkpoint`` matches ``checkpoint-N`` only) and the next save of that step clears."""
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, f".staging-{name}")
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._checkpoint_staging = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._checkpoint_staging = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            replace_folder(os.path.join(staging, name), final)
            shutil.rmtree(staging, ignore_errors=True)
            best = self.state.best_model_checkpoint
            if best is not None and best.startswith(staging):
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Load the weights of a checkpoint this trainer wrote (used by ``train(resume_from_checkpoint=...)``)."""
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        load_checkpoint_weights(model, resume_from_checkpoint, sharded=self.is_fsdp_enabled)

    def _load_best_model(self) -> None:
        logger.info(f"Loading best model from {self.state.best_model_checkpoint} (score: {self.state.best_metric}).")
        self._load_from_checkpoint(self.state.best_model_checkpoint)
