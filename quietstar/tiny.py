"""Tiny random models and a byte-level tokenizer built locally: tests and the CPU demo need no downloads."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"


def byte_tokenizer(with_pad: bool = True) -> PreTrainedTokenizerFast:
    """One token per byte (256) plus <|endoftext|> (and <|pad|>): every text round-trips exactly."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN)
    if with_pad:
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return tokenizer


TINY_ARCHITECTURES = {
    "llama": dict(model_type="llama"),
    "mistral": dict(model_type="mistral", sliding_window=None),
    "qwen2": dict(model_type="qwen2", use_sliding_window=False),
    "qwen3": dict(model_type="qwen3", head_dim=16),
    "gemma": dict(model_type="gemma", head_dim=16),
    "olmo2": dict(model_type="olmo2", pad_token_id=None),
    "phi3": dict(model_type="phi3", pad_token_id=None),
    "gpt_neox": dict(model_type="gpt_neox"),
    "gpt2": dict(model_type="gpt2", bos_token_id=None, eos_token_id=None),
    # Families whose logits are not lm_head(h) alone (quietstar.head): scaled, or soft-capped.
    "granite": dict(model_type="granite", logits_scaling=4.0),
    "cohere": dict(model_type="cohere", logit_scale=0.5, bos_token_id=None, eos_token_id=None),
    # Gemma 2: attention-logit soft-capping with a cap of 1 on scores made large by a 10x initializer range (at the
    # usual 0.02 random scores are ~0.02 and no cap bends them), and local layers (window 5, shorter than a row plus a
    # branch) alternating with global ones.
    "gemma2": dict(model_type="gemma2", head_dim=16, final_logit_softcapping=3.0, attn_logit_softcapping=1.0,
                   initializer_range=0.2,
                   sliding_window=5, layer_types=["sliding_attention", "full_attention"]),
    # Sliding windows shorter than the tests' rows (and, for mistral_window, than a branch of 7 tokens).
    "mistral_window": dict(model_type="mistral", sliding_window=4),
    "gemma3_text": dict(model_type="gemma3_text", head_dim=16, sliding_window=6,
                        layer_types=["full_attention", "sliding_attention"]),
    # BERT-style decoders: a transform (dense, activation, layer norm) before the projection in the output head;
    # RoBERTa numbers positions from padding_idx + 1.
    "bert": dict(model_type="bert", is_decoder=True),
    "roberta": dict(model_type="roberta", is_decoder=True),
    # ELECTRA's generator: its head is two top-level parts (a transform to the embedding width 32, then lm_head).
    "electra": dict(model_type="electra", is_decoder=True, embedding_size=32),
    # Attention sinks (one logit per head in every softmax), local and global layers, a mixture of 4 experts.
    "gpt_oss": dict(model_type="gpt_oss", head_dim=16, sliding_window=4, layer_types=["sliding_attention",
                    "full_attention"], num_local_experts=4, num_experts_per_tok=2),
    # Llama 4: get_decoder() returns the whole LM (quietstar.head.decoder finds the decoder), a mixture of 4 experts.
    "llama4_text": dict(model_type="llama4_text", head_dim=16, num_local_experts=4, intermediate_size_mlp=128),
    # Multi-head latent attention: keys of 8 + 16 dims per head (RoPE and not), values of 12; one key/value head per
    # query head. One dense layer, then a mixture of 4 experts.
    "deepseek_v3": dict(model_type="deepseek_v3", num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
                        qk_rope_head_dim=8, head_dim=8, qk_nope_head_dim=16, v_head_dim=12, first_k_dense_replace=1,
                        n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, moe_intermediate_size=32),
}


def tiny_model(model_type: str = "llama", vocab_size: int = 258, seed: int = 0, **overrides):
    """A randomly initialised causal LM of the given family: hidden 64, 2 layers, 4 heads, 2 KV heads (unless the
    family's entry says otherwise), fp32."""
    values = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    values.update(TINY_ARCHITECTURES[model_type], **overrides)
    config = AutoConfig.for_model(**values)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
