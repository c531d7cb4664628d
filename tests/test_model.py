"""QuietStarForCausalLM: building from a base model, bad input, refusals, save/load, gradient checkpointing."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from conftest import make_model, padded_batch, randomize_mixing_head
from quietstar import AttentionSettings, QuietStarConfig, QuietStarForCausalLM, QuietStarLossConfig
from quietstar.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from quietstar.tiny import byte_tokenizer, tiny_model


def test_from_base_adds_two_special_tokens_initialised_from_dashes():
    tokenizer = byte_tokenizer()
    base = tiny_model("llama", vocab_size=len(tokenizer))
    size = len(tokenizer)
    dash = tokenizer("---", add_special_tokens=False).input_ids[0]
    dash_vector = base.get_input_embeddings().weight[dash].clone()
    model = QuietStarForCausalLM.from_base(base, tokenizer, QuietStarConfig())
    assert len(tokenizer) == size + 2
    assert model.base.get_input_embeddings().num_embeddings == size + 2
    assert model.base.get_output_embeddings().weight.shape[0] == size + 2
    sot, eot = model.thought_token_ids
    assert tokenizer.convert_ids_to_tokens([sot, eot]) == ["<|startofthought|>", "<|endofthought|>"]
    assert tokenizer("a<|startofthought|>b", add_special_tokens=False).input_ids[1] == sot
    torch.testing.assert_close(model.thought_embeddings, dash_vector.expand(2, -1))
    torch.testing.assert_close(model.embed(torch.tensor([sot, eot])), dash_vector.expand(2, -1))


def test_thought_tokens_already_in_the_tokenizer_are_reused():
    tokenizer = byte_tokenizer()
    tokenizer.add_tokens(["<|startofthought|>", "<|endofthought|>"], special_tokens=True)
    size = len(tokenizer)
    base = tiny_model("llama", vocab_size=size)
    model = QuietStarForCausalLM.from_base(base, tokenizer, QuietStarConfig())
    assert len(tokenizer) == size and model.base.get_input_embeddings().num_embeddings == size
    assert model.thought_token_ids == (size - 2, size - 1)


def test_tokenizer_without_pad_token_uses_eos_with_a_warning():
    tokenizer = byte_tokenizer(with_pad=False)
    base = tiny_model("llama", vocab_size=len(tokenizer))
    with pytest.warns(UserWarning, match="no pad token"):
        model = QuietStarForCausalLM.from_base(base, tokenizer, QuietStarConfig())
    assert model.pad_token_id == tokenizer.eos_token_id


def test_embed_replaces_only_thought_tokens_and_follows_the_trained_vectors():
    model = make_model()
    sot, eot = model.thought_token_ids
    ids = torch.tensor([[5, sot, 7, eot, 9]])
    with torch.no_grad():
        model.thought_embeddings.copy_(torch.randn(2, model.thought_embeddings.shape[1]))
    out = model.embed(ids)
    plain = model.base.get_input_embeddings()(ids)
    torch.testing.assert_close(out[0, [0, 2, 4]], plain[0, [0, 2, 4]])
    torch.testing.assert_close(out[0, 1], model.thought_embeddings[0])
    torch.testing.assert_close(out[0, 3], model.thought_embeddings[1])


@pytest.mark.parametrize(
    "config_class, values, message",
    [
        (QuietStarConfig, dict(num_thought_tokens=0), "num_thought_tokens must be a positive integer"),
        (QuietStarConfig, dict(num_lookahead_tokens=-1), "num_lookahead_tokens"),
        (QuietStarConfig, dict(num_thoughts=1.5), "num_thoughts"),
        (QuietStarConfig, dict(mixing="sum"), "mixing must be one of"),
        (QuietStarConfig, dict(thought_temperature=0), "thought_temperature must be > 0"),
        (QuietStarLossConfig, dict(base_loss_weight=1.5), "base_loss_weight must be in"),
        (QuietStarLossConfig, dict(reinforce_temperature=0), "reinforce_temperature must be > 0"),
        (QuietStarLossConfig, dict(policy_weight=-1.0), "policy_weight must be >= 0"),
        (AttentionSettings, dict(attention_backend="flash"), "attention_backend must be one of"),
        (QuietStarConfig, dict(start_thought_token="<t>", end_thought_token="<t>"), "must differ"),
    ],
)
def test_config_errors_name_the_field(config_class, values, message):
    with pytest.raises(ValueError, match=message):
        config_class(**values)


def test_config_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="Unknown QuietStarConfig fields"):
        QuietStarConfig.from_dict({"n_ahead": 12})


def test_rows_shorter_than_lookahead_plus_two_are_refused():
    model = make_model(num_lookahead_tokens=3)
    ids, mask = padded_batch(lengths=(9, 4))
    with pytest.raises(ValueError, match="num_lookahead_tokens \\+ 2 = 5"):
        model(ids, attention_mask=mask)
    ids, mask = padded_batch(lengths=(9, 5))
    model(ids, attention_mask=mask)


def test_bad_shapes_are_refused():
    model = make_model()
    ids, mask = padded_batch()
    with pytest.raises(ValueError, match="thoughts must have shape"):
        model(ids, attention_mask=mask, thoughts=torch.zeros(2, 2, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(ids, attention_mask=mask[:, 1:])


def test_models_with_unsupported_attention_are_refused():
    tokenizer = byte_tokenizer()
    not_routed = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "bloom", vocab_size=len(tokenizer), hidden_size=64, n_layer=2, n_head=4))
    with pytest.raises(ValueError, match="does not route through transformers' AttentionInterface"):
        QuietStarForCausalLM.from_base(not_routed, byte_tokenizer(), QuietStarConfig())


def test_models_that_mix_tokens_outside_attention_are_refused():
    # A token shift before the MLP (as convolutional or recurrent families have) is right on plain text, so the
    # prefix probe passes; in the expanded row it would mix neighbouring branches.
    tokenizer = byte_tokenizer()
    base = tiny_model("llama", vocab_size=len(tokenizer))

    def token_shift(module, args):
        (hidden,) = args
        return (hidden + 0.5 * torch.nn.functional.pad(hidden, (0, 0, 1, 0))[:, :-1],)

    base.model.layers[0].mlp.register_forward_pre_hook(token_shift)
    with pytest.raises(ValueError, match="mixes tokens outside attention"):
        QuietStarForCausalLM.from_base(base, tokenizer, QuietStarConfig())


def test_sliding_window_shorter_than_the_row_runs_and_the_window_matters():
    """Rows longer than the window are computed (the oracle checks how); a wider window changes the result."""
    ids, mask = padded_batch(lengths=(9, 7))
    losses = []
    for window in (4, 64):
        tokenizer = byte_tokenizer()
        base = tiny_model("mistral", vocab_size=len(tokenizer), sliding_window=window)
        model = QuietStarForCausalLM.from_base(base, tokenizer, QuietStarConfig(num_thought_tokens=2,
                                                                                num_lookahead_tokens=2))
        torch.manual_seed(0)
        losses.append(model(ids, attention_mask=mask, labels=ids).loss.detach())
    assert torch.isfinite(losses[0]) and not torch.allclose(losses[0], losses[1])


def test_without_a_layout_the_attention_is_an_ordinary_causal_lm():
    model = make_model("qwen2")
    ids, mask = padded_batch()
    ours = model.base(input_ids=ids, attention_mask=mask).logits
    model.base.set_attn_implementation("eager")
    reference = model.base(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], reference[real], rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = make_model(policy_weight=5.0)
    randomize_mixing_head(model)
    model.train()
    ids, mask = padded_batch()
    thoughts = model.sample_thoughts(ids, mask)

    def grads():
        model.zero_grad()
        out = model(ids, attention_mask=mask, labels=ids, thoughts=thoughts)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, plain = grads()
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    loss_ckpt, checkpointed = grads()
    torch.testing.assert_close(loss_ckpt, loss)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_save_and_load_restore_the_model_exactly(tmp_path):
    model = make_model("qwen2", mixing="logprobs", num_thoughts=3)
    randomize_mixing_head(model)
    with torch.no_grad():
        model.thought_embeddings.add_(1.0)
    ids, mask = padded_batch()
    thoughts = model.sample_thoughts(ids, mask)
    expected = model(ids, attention_mask=mask, labels=ids, thoughts=thoughts)
    model.save_pretrained(tmp_path)
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".saving")]

    loaded = QuietStarForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.quietstar_config == model.quietstar_config
    assert loaded.thought_token_ids == model.thought_token_ids
    got = loaded(ids, attention_mask=mask, labels=ids, thoughts=thoughts)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=0)

    # The folder is also a stock transformers LM whose embedding rows carry the trained thought vectors.
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    sot = tokenizer.convert_tokens_to_ids("<|startofthought|>")
    torch.testing.assert_close(plain.get_input_embeddings().weight[sot], model.thought_embeddings[0])
    assert set(load_file(tmp_path / WEIGHTS_FILE)) >= {"thought_embeddings", "mixing_head.net.4.weight"}


def test_loading_an_incomplete_or_corrupt_save_names_the_file(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    (tmp_path / WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(OSError, match=WEIGHTS_FILE):
        QuietStarForCausalLM.from_pretrained(tmp_path)
    (tmp_path / CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        QuietStarForCausalLM.from_pretrained(tmp_path)


def test_the_base_model_id_is_recorded_when_it_came_from_the_hub(tmp_path):
    tokenizer = byte_tokenizer()
    base = tiny_model("llama", vocab_size=len(tokenizer))
    base.name_or_path = "someone/some-model"  # as from_pretrained("someone/some-model") sets it
    model = QuietStarForCausalLM.from_base(base, tokenizer, QuietStarConfig())
    model.save_pretrained(tmp_path)
    assert QuietStarForCausalLM.from_pretrained(tmp_path).base_model_id == "someone/some-model"
    local = make_model()  # built from a config: no Hub id to record
    assert local.base_model_id is None
