"""text_path="thought_lora": LoRA adapters that act on thought-branch tokens only.

What must hold: every prediction made without thoughts is exactly the base model's (by construction, not by
training luck); the parallel thought computation still equals running the plain model on each explicit branch (with
the adapters on the branch tokens only); sampling, the gradient pass and generation agree; activation checkpointing
replays the gate; save, load and export keep the adapter; merging is refused; contradictory settings are refused.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_model, padded_batch, randomize_mixing_head, transformers_eager
from quietstar import QuietStarForCausalLM
from quietstar.generation import generate_reference
from quietstar.cli.export import ExportError, export
from quietstar.lora import add_lora, lora_config
from quietstar.thoughts import expanded_pass, sample_thoughts
from quietstar.training import ModelArguments
from quietstar.training.build import build_model
from quietstar.config import QuietStarConfig

LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
TOL = dict(rtol=1e-5, atol=1e-5)


def thought_lora_model(arch="llama", seed=0, **config):
    """A tiny model with thought-only adapters whose B matrices are random (peft starts them at zero)."""
    model = make_model(arch, seed=seed, text_path="thought_lora", **config)
    original = copy.deepcopy(model.base)
    add_lora(model, lora_config(LORA))
    generator = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, parameter in model.base.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    randomize_mixing_head(model)
    return model.eval(), original.eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_text_predictions_are_the_base_models(arch):
    model, original = thought_lora_model(arch)
    ids, mask = padded_batch(lengths=(11, 8))
    thoughts = model.sample_thoughts(ids, mask)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, thoughts=thoughts)
        with model.lora.disable_adapter():
            unadapted = model(ids, attention_mask=mask, thoughts=thoughts)
        expected = original(input_ids=ids, attention_mask=mask).logits
        plain = model.base(input_ids=ids, attention_mask=mask).logits  # the LM alone, adapters attached
    columns = mask.bool()
    # Bit for bit: the text tokens of the thought-expanded pass never see an adapter ...
    torch.testing.assert_close(out.base_logits, unadapted.base_logits, rtol=0, atol=0)
    torch.testing.assert_close(plain[columns], expected[columns], rtol=0, atol=0)
    # ... and the expanded pass's text part is the plain LM (up to the order of float sums).
    torch.testing.assert_close(out.base_logits[columns], expected[columns], **TOL)


def test_adapters_change_the_thought_path():
    """The gate is not simply off: the same thoughts give other thought logits without the adapters."""
    model, _ = thought_lora_model()
    ids, mask = padded_batch(lengths=(9, 9), left_padding_rows=())
    thoughts = model.sample_thoughts(ids, mask)
    with torch.no_grad():
        with_adapters = model(ids, attention_mask=mask, thoughts=thoughts).thought_logits
        with model.lora.disable_adapter():
            without = model(ids, attention_mask=mask, thoughts=thoughts).thought_logits
    assert (with_adapters - without).abs().max() > 1e-2


def explicit_logits(model, sequence, text_length):
    branch = (torch.arange(len(sequence)) >= text_length)[None]
    with torch.no_grad(), transformers_eager(model):
        return model.base(inputs_embeds=model.embed(sequence[None]), **model.branch_kwargs(branch)).logits[0]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_parallel_equals_sequential_with_thought_adapters(arch):
    model, _ = thought_lora_model(arch)
    cfg = model.quietstar_config
    T, A = cfg.num_thought_tokens, cfg.num_lookahead_tokens
    ids, mask = padded_batch(lengths=(11, 8))
    thoughts, sampling_logits = sample_thoughts(model, ids, mask.bool(), return_logits=True)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, thoughts=thoughts)
        _, branch_hidden = expanded_pass(model, ids, mask.bool(), thoughts)
        grad_pass_sampling = model.lm_head(branch_hidden[..., :T, :])
    sot, eot = model.thought_token_ids
    checked = 0
    for b in range(ids.shape[0]):
        columns = mask[b].nonzero().flatten()
        real = ids[b][mask[b].bool()]
        for j in sorted({0, len(real) // 2, len(real) - A - 1}):
            for n in range(cfg.num_thoughts):
                column = columns[j]
                sequence = torch.cat([real[: j + 1], torch.tensor([sot]), thoughts[b, n, column], torch.tensor([eot]),
                                      real[j + 1 : j + A]])
                logits = explicit_logits(model, sequence, j + 1)
                slots = logits[j + 1 : j + 1 + T]
                visible = [t for t in range(logits.shape[-1]) if t not in model.thought_token_ids]
                torch.testing.assert_close(sampling_logits[b, n, column][:, visible], slots[:, visible], **TOL)
                torch.testing.assert_close(grad_pass_sampling[b, n, column], slots, **TOL)
                torch.testing.assert_close(out.thought_logits[b, n, column], logits[j + T + 2 : j + T + 2 + A], **TOL)
                checked += 1
    assert checked >= 4


def test_activation_checkpointing_replays_the_gate():
    model, _ = thought_lora_model()
    model.train()
    ids, mask = padded_batch(lengths=(9, 7))
    thoughts = model.sample_thoughts(ids, mask)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.activation_checkpointing_enable()
        model.zero_grad()
        model(ids, attention_mask=mask, labels=ids, thoughts=thoughts).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert any("lora_A" in name for name in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_generation_equals_the_slow_definition():
    model, _ = thought_lora_model()
    prompt = torch.tensor([[5, 70, 71, 9, 10, 11]])
    generator = torch.Generator().manual_seed(3)
    fast = model.generate(prompt, max_new_tokens=5, generator=generator)
    slow, slow_thoughts, slow_logits = generate_reference(model, prompt, thoughts=fast.thoughts)
    assert torch.equal(fast.sequences, slow)
    torch.testing.assert_close(fast.logits, slow_logits, **TOL)


def test_save_load_export_and_merge(tmp_path):
    model, original = thought_lora_model()
    ids, mask = padded_batch(lengths=(9, 9), left_padding_rows=())
    thoughts = model.sample_thoughts(ids, mask)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = QuietStarForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.quietstar_config.text_path == "thought_lora"
    with torch.no_grad():
        a = model(ids, attention_mask=mask, thoughts=thoughts)
        b = loaded(ids, attention_mask=mask, thoughts=thoughts)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)
    # The folder's LM is the base model: stock transformers loads the text path unchanged.
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits[..., :-2], original(input_ids=ids).logits[..., :-2],
                                   rtol=0, atol=0)
    with pytest.raises(ValueError, match="thought tokens only"):
        loaded.merge_lora()
    with pytest.raises(ExportError, match="thought tokens only"):
        export(tmp_path / "ckpt", tmp_path / "merged", merge_lora=True)
    exported = QuietStarForCausalLM.from_pretrained(export(tmp_path / "ckpt", tmp_path / "export")).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(ids, attention_mask=mask, thoughts=thoughts).logits, a.logits,
                                   rtol=0, atol=0)


def test_two_steps_move_adapters_embeddings_and_head_but_not_the_lm():
    model, _ = thought_lora_model()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids, mask = padded_batch(lengths=(9, 9), left_padding_rows=())
    for _ in range(2):
        optimizer.zero_grad()
        model(ids, attention_mask=mask, labels=ids).loss.backward()
        optimizer.step()
    for name, parameter in model.named_parameters():
        moved = not torch.equal(before[name], parameter)
        should = "lora_" in name or name == "thought_embeddings" or name.startswith("mixing_head.")
        assert moved == should, f"{name}: moved={moved}"


@pytest.mark.parametrize("text_path, peft, message", [
    ("frozen", LORA, "text_path: frozen keeps the LM's weights fixed, but peft"),
    ("thought_lora", None, "no peft section"),
    ("thought_lora", {**LORA, "target_modules": ["q_proj", "lm_head"]}, "outside them"),
])
def test_contradictory_settings_are_refused(text_path, peft, message):
    args = ModelArguments(model_config={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1},
                          tokenizer_name_or_path="builtin-bytes", peft=peft)
    with pytest.raises(ValueError, match=message):
        build_model(args, QuietStarConfig(text_path=text_path))


def test_frozen_text_path_trains_only_thought_parts():
    args = ModelArguments(model_config={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1},
                          tokenizer_name_or_path="builtin-bytes")
    model = build_model(args, QuietStarConfig(text_path="frozen"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"thought_embeddings"} | {f"mixing_head.{n}" for n, _ in model.mixing_head.named_parameters()}
