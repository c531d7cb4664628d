"""Issue 21: the gold-thought warm start of the multi-hop task (``gold_thought_steps``): the per-token gold annotations,
their windows and padding, the insertion into sampled thoughts, the trainer's use of them, and the checks."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from quietstar import QuietStarConfig
from quietstar import modeling as modeling_module
from quietstar.report.multihop import view_thoughts
from quietstar.tasks.multihop import MultihopGenerator, MultihopSpec, gold_intermediates, insert_gold_thoughts
from quietstar.tiny import byte_tokenizer
from quietstar.training import (
    DataArguments,
    ModelArguments,
    QuietStarTrainer,
    QuietStarTrainingArguments,
    WindowCollator,
    build_datasets,
    build_model,
)
from quietstar.training.checks import check_gold_thoughts
from quietstar.training.curriculum import parse_curriculum
from quietstar.training.run_files import read_run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_LM = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 2, "num_key_value_heads": 1}
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def multihop_args(**values) -> DataArguments:
    return DataArguments(**{"dataset": "synthetic-multihop", "num_documents": 7, "multihop_hops": 3,
                            "multihop_entities": 6, "multihop_queries": 4, "max_length": 512, **values})


# ------------------------------------------------------------------------------------------- annotations
@pytest.mark.parametrize("hops", [2, 3])
def test_annotations_sit_before_each_answer_and_hold_its_intermediates(hops):
    tokenizer = byte_tokenizer()
    for document in MultihopGenerator(tokenizer, MultihopSpec(hops=hops, num_entities=7, num_queries=5)).documents(5):
        gold = gold_intermediates(document, hops)
        assert gold.shape == (len(document.input_ids), hops - 1)
        annotated = np.flatnonzero(gold[:, 0] >= 0)
        # Read back from the text alone: the annotated positions are the tokens right before each answer.
        assert sorted(annotated + 1) == sorted(q.answer_index for q in document.queries)
        for query in document.queries:
            row = gold[query.answer_index - 1]
            assert [tokenizer.decode([int(t)]).strip() for t in row] == [e.text for e in query.intermediates]
        assert (gold[np.setdiff1d(np.arange(len(gold)), annotated)] == -1).all()


def test_insertion_equals_the_evaluations_gold_view_in_every_thought():
    tokenizer = byte_tokenizer()
    spec = MultihopSpec(hops=3, num_entities=6, num_queries=4)
    documents = MultihopGenerator(tokenizer, spec).documents(3, seed=1)
    L = max(len(d.input_ids) for d in documents)
    B, N, T, filler = len(documents), 3, 5, 7
    sampled = torch.randint(20, 200, (B, N, L, T), generator=torch.Generator().manual_seed(0))
    gold = torch.full((B, L, 2), -1, dtype=torch.long)
    for row, document in enumerate(documents):
        gold[row, : len(document.input_ids)] = torch.from_numpy(gold_intermediates(document, 3))
    inserted = insert_gold_thoughts(sampled, gold, filler)
    for n in range(N):  # the evaluation's loop over queries, one thought at a time, is the reference
        expected = view_thoughts("gold", sampled[:, n : n + 1], documents, filler)[:, 0]
        assert torch.equal(inserted[:, n], expected)
    changed = (inserted != sampled).any(-1).any(1)  # [B, L]: positions whose thoughts were replaced
    for row, document in enumerate(documents):
        assert set(torch.nonzero(changed[row]).flatten().tolist()) <= {q.answer_index - 1 for q in document.queries}
    with pytest.raises(ValueError, match="do not fit"):
        insert_gold_thoughts(sampled[..., :1], gold, filler)
    with pytest.raises(ValueError, match="must be"):
        insert_gold_thoughts(sampled, gold[:, :-1], filler)


def test_windows_and_padding_keep_annotations_on_their_tokens():
    tokenizer = byte_tokenizer()
    args = multihop_args(max_length=41, num_eval_documents=2)
    plain, _ = build_datasets(args, tokenizer, min_tokens=4, seed=3)
    train, evaluation = build_datasets(args, tokenizer, min_tokens=4, seed=3, gold_intermediates=True)
    assert len(train) == len(plain) == 5 and len(evaluation) == 2
    documents = MultihopGenerator(tokenizer, args.multihop_spec()).documents(7, seed=3)
    for index in range(len(train)):
        item = train[index]
        assert torch.equal(item["input_ids"], plain[index]["input_ids"])  # the same random window
        full = list(documents[index].input_ids)
        window = item["input_ids"].tolist()
        starts = [s for s in range(len(full) - len(window) + 1) if full[s : s + len(window)] == window]
        expected = gold_intermediates(documents[index], 3)[starts[0] : starts[0] + len(window)]
        assert np.array_equal(item["gold_intermediates"].numpy(), expected)
    batch = WindowCollator(pad_token_id=0)([train[0], {"input_ids": train[1]["input_ids"][:9],
                                                       "gold_intermediates": train[1]["gold_intermediates"][:9]}])
    assert batch["gold_intermediates"].shape == (2, batch["input_ids"].shape[1], 2)
    assert (batch["gold_intermediates"][1, 9:] == -1).all()
    with pytest.raises(ValueError, match="synthetic-multihop"):
        build_datasets(DataArguments(dataset="synthetic-arithmetic", num_documents=6), tokenizer, 4,
                       gold_intermediates=True)


# --------------------------------------------------------------------------------------------- trainer
def training_args(tmp_path, **overrides) -> QuietStarTrainingArguments:
    values = dict(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                  use_cpu=True, report_to="none", disable_tqdm=True, save_strategy="no", logging_steps=1, seed=0,
                  gold_thought_steps=2, policy_weight_warmup_steps=0)
    values.update(overrides)
    return QuietStarTrainingArguments(**values)


def test_trainer_inserts_gold_thoughts_and_turns_the_policy_off_for_the_warm_start_only(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = build_model(ModelArguments(model_config=TINY_LM, tokenizer_name_or_path="builtin-bytes", peft=LORA),
                        QuietStarConfig(num_thought_tokens=3, num_lookahead_tokens=1, num_thoughts=2,
                                        text_path="thought_lora"))
    model.loss_config = dataclasses.replace(model.loss_config, entropy_bonus_weight=0.1)
    train, _ = build_datasets(multihop_args(max_length=64), model.tokenizer, min_tokens=3, gold_intermediates=True)
    forwards, samples = [], []
    forward = modeling_module.QuietStarForCausalLM.forward
    sample = modeling_module.QuietStarForCausalLM.sample_thoughts

    def record_sample(self, *args, **kwargs):
        thoughts = sample(self, *args, **kwargs)
        samples.append(thoughts.clone())
        return thoughts

    def record_forward(self, input_ids, attention_mask=None, labels=None, thoughts=None, loss_config=None, **kw):
        forwards.append(dict(input_ids=input_ids.clone(), given=None if thoughts is None else thoughts.clone(),
                             loss_config=loss_config))
        return forward(self, input_ids, attention_mask=attention_mask, labels=labels, thoughts=thoughts,
                       loss_config=loss_config, **kw)

    monkeypatch.setattr(modeling_module.QuietStarForCausalLM, "sample_thoughts", record_sample)
    monkeypatch.setattr(modeling_module.QuietStarForCausalLM, "forward", record_forward)
    trainer = QuietStarTrainer(model=model, args=training_args(tmp_path), train_dataset=train)
    trainer.train()
    assert len(forwards) == len(samples) == 3  # one draw per step: the trainer's in the warm start, then the model's
    calls = [dict(call, sampled=sampled) for call, sampled in zip(forwards, samples)]
    filler = model.filler_token_id
    for step, call in enumerate(calls):
        if step < 2:  # the warm start: sampled thoughts, gold at the query positions, no policy terms
            given, sampled, ids = call["given"], call["sampled"], call["input_ids"]
            assert call["loss_config"].policy_weight == 0 and call["loss_config"].entropy_bonus_weight == 0
            replaced = (given != sampled).any(-1).any(1)  # [B, L]
            for row in range(ids.shape[0]):
                for position in torch.nonzero(replaced[row]).flatten().tolist():
                    # A query's prompt ends here (the byte tokenizer's space token follows its ':').
                    assert model.tokenizer.decode(ids[row, : position + 1]).rstrip(" ").endswith(":")
                    thought = given[row, :, position]
                    assert bool((thought[:, 0] == filler).all())  # T - (k - 1) = 1 filler, then 2 entities
                    assert bool((thought == thought[0]).all())  # the same gold thought in all N
            assert bool(replaced.any())
        else:  # afterwards the model samples its own thoughts and the policy is on
            assert call["given"] is None
            assert call["loss_config"].policy_weight == model.loss_config.policy_weight > 0
            assert call["loss_config"].entropy_bonus_weight == 0.1
    logged = [entry["gold_thoughts"] for entry in trainer.state.log_history if "gold_thoughts" in entry]
    assert logged == [1.0, 1.0, 0.0]


def test_interleaved_gold_steps_follow_the_warm_start_on_their_interval(tmp_path):
    args = training_args(tmp_path, gold_thought_steps=3, gold_thought_interval=4)
    assert [step for step in range(16) if args.is_gold_step(step)] == [0, 1, 2, 3, 7, 11, 15]
    args = training_args(tmp_path, gold_thought_steps=0, gold_thought_interval=3)
    assert args.uses_gold_thoughts and [step for step in range(7) if args.is_gold_step(step)] == [0, 3, 6]
    args = training_args(tmp_path, gold_thought_steps=2)
    assert [step for step in range(6) if args.is_gold_step(step)] == [0, 1]
    assert not training_args(tmp_path, gold_thought_steps=0).uses_gold_thoughts
    with pytest.raises(ValueError, match="gold_thought_interval must be an integer >= 0"):
        training_args(tmp_path, gold_thought_interval=-2)
    with pytest.raises(ValueError, match="arms of the thinking run"):
        training_args(tmp_path, gold_thought_steps=0, gold_thought_interval=2, control="null_thoughts")


def test_trainer_interleaves_gold_steps_after_the_warm_start(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelArguments(model_config=TINY_LM, tokenizer_name_or_path="builtin-bytes", peft=LORA),
                        QuietStarConfig(num_thought_tokens=3, num_lookahead_tokens=1, num_thoughts=2,
                                        text_path="thought_lora"))
    train, _ = build_datasets(multihop_args(max_length=64), model.tokenizer, min_tokens=3, gold_intermediates=True)
    args = training_args(tmp_path, max_steps=6, gold_thought_steps=1, gold_thought_interval=2)
    trainer = QuietStarTrainer(model=model, args=args, train_dataset=train)
    trainer.train()
    logged = [entry["gold_thoughts"] for entry in trainer.state.log_history if "gold_thoughts" in entry]
    policy = [entry["policy_weight"] for entry in trainer.state.log_history if "policy_weight" in entry]
    assert logged == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert [weight > 0 for weight in policy] == [False, False, True, False, True, False]


def test_gold_thoughts_are_refused_where_they_cannot_apply(tmp_path):
    check_gold_thoughts(False, "synthetic-arithmetic", 1, 1)  # off: nothing to check
    with pytest.raises(ValueError, match="dataset is 'synthetic-arithmetic'"):
        check_gold_thoughts(True, "synthetic-arithmetic", 2, 4)
    with pytest.raises(ValueError, match="no intermediate"):
        check_gold_thoughts(True, "synthetic-multihop", 1, 4)
    with pytest.raises(ValueError, match="at least 2"):
        check_gold_thoughts(True, "synthetic-multihop", 3, 4, parse_curriculum(["0:4/1", "3:1/1"]))
    check_gold_thoughts(True, "synthetic-multihop", 3, 2)
    with pytest.raises(ValueError, match="control: finetune inserts no"):
        training_args(tmp_path, control="finetune")
    with pytest.raises(ValueError, match="integer >= 0"):
        training_args(tmp_path, gold_thought_steps=-1)
    model = build_model(ModelArguments(model_config=TINY_LM, tokenizer_name_or_path="builtin-bytes"),
                        QuietStarConfig(num_thought_tokens=3, num_lookahead_tokens=1))
    train, _ = build_datasets(multihop_args(max_length=64), model.tokenizer, min_tokens=3)  # no annotations
    trainer = QuietStarTrainer(model=model, args=training_args(tmp_path, max_steps=1), train_dataset=train)
    with pytest.raises(ValueError, match="gold_intermediates=True"):
        trainer.train()


def test_the_command_trains_the_arm_and_records_it(tmp_path):
    from quietstar.cli.train import main

    main(["--config", os.path.join(REPO, "configs", "tiny-cpu.yaml"), "--output_dir", str(tmp_path / "arm"),
          "--dataset", "synthetic-multihop", "--multihop_hops", "2", "--multihop_entities", "5",
          "--multihop_queries", "3", "--num_documents", "12", "--max_length", "80", "--num_thought_tokens", "2",
          "--num_lookahead_tokens", "1", "--max_steps", "3", "--gold_thought_steps", "2",
          "--policy_weight_warmup_steps", "2", "--save_steps", "3", "--report_to", "none", "--disable_tqdm", "true",
          "--per_device_train_batch_size", "2", "--logging_steps", "1"])
    assert read_run_config(tmp_path / "arm")["QuietStarTrainingArguments"]["gold_thought_steps"] == 2
    with open(tmp_path / "arm" / "metrics.jsonl") as f:
        logged = [json.loads(line) for line in f]
    assert [entry["gold_thoughts"] for entry in logged if "gold_thoughts" in entry] == [1.0, 1.0, 0.0]
    with pytest.raises(SystemExit, match="dataset is 'synthetic-arithmetic'"):
        main(["--config", os.path.join(REPO, "configs", "tiny-cpu.yaml"), "--output_dir", str(tmp_path / "bad"),
              "--gold_thought_steps", "2"])
