"""The decoder/head split of families that differ from lm_head(get_decoder()(x)): an output head with a transform
before the projection (BERT-style decoders, ELECTRA's in two parts), positions that start past 0 (RoBERTa), a get_decoder() that returns the
whole LM (Llama 4). Found generically, and a wrong choice refused
by from_base's probes. The families themselves run in tests/test_parallel_equals_sequential.py and
tests/test_generation.py (tiny bert, roberta, electra, llama4_text)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import quietstar.compat as compat
import quietstar.modeling as modeling
from quietstar import QuietStarConfig, QuietStarForCausalLM
from quietstar.tiny import byte_tokenizer, tiny_model


def _from_base(arch, **overrides):
    tokenizer = byte_tokenizer()
    base = tiny_model(arch, vocab_size=len(tokenizer), **overrides).eval()
    config = QuietStarConfig(num_thought_tokens=2, num_lookahead_tokens=2)
    return QuietStarForCausalLM.from_base(base, tokenizer, config)


@pytest.mark.parametrize("arch, head, affine, first_position", [
    ("llama", ("lm_head",), True, 0), ("bert", ("cls",), False, 0), ("roberta", ("lm_head",), False, 2),
    ("electra", ("generator_predictions", "generator_lm_head"), False, 0)])
def test_the_head_and_the_first_position_are_the_familys(arch, head, affine, first_position):
    model = _from_base(arch)
    assert model.output_head_names == head and model.head_is_affine is affine
    assert model.first_position_id == first_position
    assert any(part is model.lm_head for part in model.base.get_submodule(head[-1]).modules())


@pytest.mark.parametrize("arch, wrong", [("bert", ("cls.predictions.decoder",)), ("electra", ("generator_lm_head",))])
def test_a_head_without_its_transform_is_refused(arch, wrong, monkeypatch):
    monkeypatch.setattr(compat, "output_head_names", lambda base: wrong)
    with pytest.raises(ValueError, match="logits differ|failed Quiet-STaR's probe"):
        _from_base(arch)


def test_positions_from_zero_in_roberta_are_refused(monkeypatch):
    monkeypatch.setattr(modeling, "first_position_id", lambda base: 0)
    with pytest.raises(ValueError, match="differently in one expanded pass"):
        _from_base("roberta")


def test_the_decoder_is_found_where_get_decoder_returns_the_whole_lm():
    model = _from_base("llama4_text")
    assert model.base.get_decoder() is model.base  # transformers' lookup misses Llama 4's decoder
    assert model.body is model.base.model and model.output_head_names == ("lm_head",)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.parametrize("tied", [False, True])
def test_a_bert_style_head_round_trips_its_bias(arch, tied, tmp_path):
    """Resizing for the thought tokens must leave the head's own bias at the new size, tied where it was
    (transformers resizes only the projection's)."""
    model = _from_base(arch, tie_word_embeddings=tied)
    with torch.no_grad():
        model.lm_head.bias.normal_()
    ids = torch.arange(3, 12)[None]
    model.save_pretrained(tmp_path / "saved")
    loaded = QuietStarForCausalLM.from_pretrained(tmp_path / "saved").eval()
    thoughts = model.sample_thoughts(ids)
    with torch.no_grad():
        expected = model(ids, thoughts=thoughts).base_logits
        torch.testing.assert_close(loaded(ids, thoughts=thoughts).base_logits, expected)


@pytest.mark.parametrize("model_type, sizes, width", [("electra", dict(embedding_size=32, is_decoder=True), 64),
                                                     ("opt", dict(word_embed_proj_dim=32, ffn_dim=128), 32)])
def test_the_mixing_head_reads_the_final_hidden_states_width(model_type, sizes, width):
    """ELECTRA projects its embeddings up to hidden_size, OPT its final states down to word_embed_proj_dim."""
    config = AutoConfig.for_model(model_type, vocab_size=260, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, **sizes)
    base = AutoModelForCausalLM.from_config(config).eval()
    model = QuietStarForCausalLM.from_base(base, byte_tokenizer(), QuietStarConfig(num_lookahead_tokens=2))
    assert model.mixing_head.net[0].in_features == 2 * width
    ids = torch.arange(3, 12)[None]
    assert torch.isfinite(model(ids, labels=ids).loss)
