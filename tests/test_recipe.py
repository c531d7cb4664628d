"""The recipe's mechanisms (docs/recipe.md): fp32 reward path, thought-path rewards, validation, the policy-weight
schedule and the diagnostics the trainer logs."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_model, padded_batch, randomize_mixing_head
from quietstar import AttentionSettings, QuietStarConfig, QuietStarLossConfig
from quietstar.checkpoint import CONFIG_FILE, read_saved_quietstar
from quietstar.loss_config import OFFICIAL_LOSS
from quietstar.mixing import mix
from quietstar.thoughts import expanded_pass
from quietstar.training import QuietStarTrainer, QuietStarTrainingArguments, build_window_dataset
from quietstar.training.data import synthetic_arithmetic_documents


@pytest.mark.parametrize("mixing", ["logits", "logprobs"])
@pytest.mark.parametrize("precision", ["fp32", "autocast"])
def test_reward_path_precision_under_autocast(precision, mixing):
    model = make_model(reward_precision=precision, mixing=mixing)
    randomize_mixing_head(model)
    ids, mask = padded_batch(lengths=(9, 9), left_padding_rows=())
    thoughts = model.sample_thoughts(ids, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = model(ids, attention_mask=mask, labels=ids, thoughts=thoughts)
        text_hidden, branch_hidden = expanded_pass(model, ids, mask.bool(), thoughts)
    expected = torch.float32 if precision == "fp32" else torch.bfloat16
    assert out.thought_logits.dtype == expected
    # log-prob mixing always mixes log-softmaxes in fp32; logit mixing follows the reward path's precision
    assert out.logits.dtype == (torch.float32 if mixing == "logprobs" else expected)
    if precision == "fp32":  # the mixed logits are an fp32 function of the (bf16) hidden states
        T, A = model.quietstar_config.num_thought_tokens, model.quietstar_config.num_lookahead_tokens
        thought_hidden = branch_hidden[..., T + 1: T + 1 + A, :].float()
        L = ids.shape[1]
        shifted = (torch.arange(L)[:, None] + torch.arange(A)).clamp(max=L - 1)
        base_hidden = text_hidden[:, shifted].unsqueeze(1).expand_as(thought_hidden).float()
        with torch.no_grad():
            w = model.mixing_head(base_hidden, thought_hidden)
            if mixing == "logits":
                manual = model.lm_head((1 - w.unsqueeze(-1)) * base_hidden + w.unsqueeze(-1) * thought_hidden)
            else:  # the base logits too are recomputed in fp32 from the (bf16) text hidden states
                base_logits = model.lm_head(text_hidden.float())[:, shifted].unsqueeze(1)
                manual = mix(base_logits, model.lm_head(thought_hidden), torch.sigmoid(w), "logprobs")
        manual[..., list(model.thought_token_ids)] = float("-inf")
        torch.testing.assert_close(out.logits, manual, rtol=1e-5, atol=1e-5)


def test_thought_rewards_do_not_depend_on_the_mixing_weight():
    ids, mask = padded_batch(lengths=(9, 9), left_padding_rows=())
    for source, depends in (("thought", False), ("mixed", True)):
        model = make_model(reward_source=source)
        randomize_mixing_head(model, scale=0.5)
        thoughts = model.sample_thoughts(ids, mask)
        before = model(ids, attention_mask=mask, labels=ids, thoughts=thoughts).metrics["reward_mean"]
        with torch.no_grad():
            model.mixing_head.net[-1].weight.mul_(3.0)
        after = model(ids, attention_mask=mask, labels=ids, thoughts=thoughts).metrics["reward_mean"]
        assert (abs(after - before) > 1e-4) == depends, source


def test_thought_rewards_are_live_where_mixed_rewards_are_dead():
    """At w = 0 (the start) mixed rewards tie exactly; thought rewards already rank the thoughts."""
    ids, mask = padded_batch(lengths=(9, 9), left_padding_rows=())
    mixed = make_model(reward_source="mixed")(ids, attention_mask=mask, labels=ids).metrics
    thought = make_model(reward_source="thought")(ids, attention_mask=mask, labels=ids).metrics
    assert mixed["tied_reward_fraction"] == 1.0 and mixed["zero_mixing_weight_fraction"] == 1.0
    assert thought["tied_reward_fraction"] < 0.5 and thought["policy_loss"] != 0.0


@pytest.mark.parametrize("config_class, field, value, message", [
    (QuietStarLossConfig, "reward_source", "both", "reward_source must be one of"),
    (QuietStarLossConfig, "reward_precision", "fp16", "reward_precision must be one of"),
    (QuietStarLossConfig, "advantage_normalization", "z", "advantage_normalization must be one of"),
    (QuietStarConfig, "text_path", "lora", "text_path must be one of"),
    (AttentionSettings, "triton_fp32_precision", "fp64", "triton_fp32_precision must be one of"),
    (QuietStarLossConfig, "advantage_std_floor", 0.0, "advantage_std_floor must be > 0"),
    (QuietStarLossConfig, "thought_nll_weight", -1.0, "thought_nll_weight must be >= 0"),
])
def test_bad_recipe_fields_are_refused(config_class, field, value, message):
    with pytest.raises(ValueError, match=message):
        config_class(**{field: value})


def test_presets_and_configs_saved_before_the_recipe(tmp_path):
    official = QuietStarLossConfig.official(thought_nll_weight=0.25)
    assert {k: getattr(official, k) for k in OFFICIAL_LOSS if k != "thought_nll_weight"} == {
        k: v for k, v in OFFICIAL_LOSS.items() if k != "thought_nll_weight"} and official.thought_nll_weight == 0.25
    recipe = QuietStarLossConfig()
    assert (recipe.reinforce_temperature, recipe.clip_negative_advantage) == (QuietStarConfig().thought_temperature,
                                                                              False)
    # A checkpoint written before these fields existed was trained with the official loss: it loads as such (the
    # loss fields of a save from before the split become the loaded model's loss_config).
    old_fields = {**QuietStarConfig().to_dict(), **QuietStarLossConfig.official().to_dict()}
    saved = {k: v for k, v in old_fields.items()
             if k not in ("reward_source", "reward_precision", "advantage_normalization", "thought_nll_weight",
                          "text_path")}
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"quietstar": saved, "thought_token_ids": [1, 2],
                                                    "pad_token_id": 0}))
    read = read_saved_quietstar(tmp_path)
    assert read.loss_config == QuietStarLossConfig.official() and read.config == QuietStarConfig()


def test_policy_weight_schedule(tmp_path):
    args = QuietStarTrainingArguments(output_dir=str(tmp_path), policy_weight_warmup_steps=2, policy_weight_ramp_steps=4,
                                      use_cpu=True, report_to="none")
    assert [args.policy_weight_factor(step) for step in range(8)] == [0, 0, 0.25, 0.5, 0.75, 1, 1, 1]
    with pytest.raises(ValueError, match="policy_weight_ramp_steps must be an integer >= 0"):
        QuietStarTrainingArguments(output_dir=str(tmp_path), policy_weight_ramp_steps=-1)


def test_trainer_logs_the_schedule_and_the_diagnostics(tmp_path):
    model = make_model(num_thought_tokens=2, num_lookahead_tokens=2, policy_weight=4.0).train()
    args = QuietStarTrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3,
        use_cpu=True, report_to="none", disable_tqdm=True, save_strategy="no", logging_steps=1, seed=0,
        max_grad_norm=1.0, policy_weight_warmup_steps=1, policy_weight_ramp_steps=2, loss_term_grad_norm_steps=2)
    dataset = build_window_dataset(synthetic_arithmetic_documents(8), model.tokenizer, 24, 4)
    QuietStarTrainer(model=model, args=args, train_dataset=dataset).train()
    logs = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in line]
    assert [entry["policy_weight"] for entry in logs] == [0.0, 2.0, 4.0, 4.0]
    for entry in logs:
        for name in ("grad_norm/body", "grad_norm/thought_embeddings", "grad_norm/mixing_head", "thought_entropy",
                     "tied_reward_fraction", "zero_mixing_weight_fraction", "mixing_head_live_units"):
            assert name in entry, name
        assert entry["grad_norm/body"] > 0
    # Per-term norms on steps 0 and 2 only; the policy term is off during the warm-up (lambda = 0).
    assert [("grad_norm/nll" in entry) for entry in logs] == [True, False, True, False]
    assert logs[0]["grad_norm/policy"] == 0.0 and logs[2]["grad_norm/policy"] > 0
