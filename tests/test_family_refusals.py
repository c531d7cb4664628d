"""What the thought layout cannot take, refused by name rather than computed wrongly: bidirectional attention (an
encoder), sparse attention through a learned indexer (DeepSeek sparse attention), sinks that vary by token, an
additive position bias (Inkling), keys beyond the call's tokens (DeepSeek-V4's compressed entries), and decoder layers
that do not pass the call's keywords on to their attention (StableLM)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from quietstar import QuietStarConfig, QuietStarForCausalLM
from quietstar.attention import ThoughtLayout, dispatch
from quietstar.tiny import TINY_ARCHITECTURES, byte_tokenizer, tiny_model


def _from_base(arch, **overrides):
    tokenizer = byte_tokenizer()
    base = tiny_model(arch, vocab_size=len(tokenizer), **overrides).eval()
    config = QuietStarConfig(num_thought_tokens=2, num_lookahead_tokens=2)
    return QuietStarForCausalLM.from_base(base, tokenizer, config)


def _inputs(n, d=8, heads=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(1, heads, n, d, generator=generator) for _ in range(3))


def test_an_encoder_is_refused_as_bidirectional():
    with pytest.raises(ValueError, match="attends bidirectionally.*is_decoder=True"):
        _from_base("bert", is_decoder=False)


def test_a_learned_indexer_is_refused():
    """DeepSeek-V3.2: the latent attention of tiny deepseek_v3, with an indexer keeping 4 keys per query."""
    latent = {key: value for key, value in TINY_ARCHITECTURES["deepseek_v3"].items() if key != "model_type"}
    config = AutoConfig.for_model("deepseek_v32", vocab_size=260, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, index_topk=4, index_n_heads=2,
                                  index_head_dim=16, **latent)
    assert config.layer_types == ["indexed_attention"] * 2
    base = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ValueError, match="attends sparsely.*'indexed_attention'.*learned indexer"):
        QuietStarForCausalLM.from_base(base, byte_tokenizer(), QuietStarConfig())


@pytest.mark.parametrize("keyword, value, named", [("sinks", torch.zeros(1, 2, 6, 1), "sinks that vary by token"),
                                                   ("position_bias", torch.zeros(1, 2, 6, 6), "position bias")])
def test_what_the_layout_cannot_take_is_refused(keyword, value, named):
    q, k, v = _inputs(6)
    with pytest.raises(ValueError, match=f"Module passes .*{named}"):
        dispatch.quietstar_attention(torch.nn.Module(), q, k, v, None, **{keyword: value})


def test_keys_beyond_the_calls_tokens_are_refused():
    """DeepSeek-V4's compressed attention appends entries of its own to the keys; the layout cannot place them."""
    module = torch.nn.Module()
    module.layer_idx = 0
    q, k, v = _inputs(5)
    layout = ThoughtLayout("prefix", torch.ones(1, 4, dtype=torch.bool), 1, num_thought_tokens=1)
    with pytest.raises(ValueError, match="expects 4 keys per row .* over 5: .*entries of its own"):
        dispatch.quietstar_attention(module, q[:, :, :4], k, v, None, thought_layout=layout)


def test_layers_that_drop_the_calls_keywords_are_refused():
    """StableLM's decoder layers do not pass the model call's keywords on: the thought layout never reaches them."""
    config = AutoConfig.for_model("stablelm", vocab_size=260, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    base = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ValueError, match="Only 0 of StableLmForCausalLM's 2 layers .* keywords"):
        QuietStarForCausalLM.from_base(base, byte_tokenizer(), QuietStarConfig())


def _tiny_family(model_type):
    """A tiny random model of ``model_type`` built as the families survey builds it (tests/family_configs.py)."""
    from family_configs import causal_lm_class, tiny_config

    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    base = causal_lm_class(model_type)._from_config(tiny_config(model_type, len(tokenizer)), dtype=torch.float32)
    return base.eval(), tokenizer


@pytest.mark.parametrize("model_type, named", [
    ("musicgen", "ModuleList, not one token table"),  # one input table per audio codebook
    ("mllama", "output head predicts 258 ids but its input table holds 266 rows"),  # extra image rows
    ("gemma4_text", "cannot run from input vectors that are not rows of its embedding table"),
    ("xlstm", "Only 0 of xLSTMForCausalLM's 2 layers attend"),  # refused before the resize, which breaks on it
])
def test_token_tables_quietstar_cannot_extend_are_refused_untouched(model_type, named):
    base, tokenizer = _tiny_family(model_type)
    rows = base.get_input_embeddings()
    size = len(tokenizer)
    with pytest.raises(ValueError, match=named):
        QuietStarForCausalLM.from_base(base, tokenizer, QuietStarConfig())
    assert len(tokenizer) == size and base.get_input_embeddings() is rows  # nothing added, nothing resized
