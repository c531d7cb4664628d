"""Tiny configs of transformers' causal-LM families, built without downloads, for tests/families_survey.py.

A family's default config is made small by rules over its fields (widths, depths, head sizes, expert counts, layer
kinds), then built again from those values through the family's own config class, so that every field the class
derives (``head_dim`` from width and heads, ``qk_head_dim`` from the MLA parts, ``layer_types`` from a pattern)
follows the new sizes. Sub-configs (a VLM's text and vision towers, an audio encoder) are shrunk by the same rules.
``OVERRIDES`` holds what the rules cannot know, per family, each with its reason.
"""

from __future__ import annotations

import inspect
import re

WINDOW = 5  # shorter than the oracle's rows plus a branch, so sliding windows are crossed
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=False)
# Other sizes by name. MLA keeps a value head (16) narrower than its query/key head (nope 16 + rope 8), as in
# DeepSeek's configs, so the survey sees that difference; Mamba mixers keep heads * head size = 2 * width.
HEAD_SIZES = dict(qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, kv_lora_rank=32, q_lora_rank=48,
                  rotary_dim=8, linear_head_dim=16, linear_num_heads=4, index_head_dim=16, index_n_heads=2,
                  index_topk=8, mamba_d_head=16, mamba_headdim=16, mamba_n_heads=8, n_mamba_heads=2,
                  mamba_d_ssm=128, mamba_d_state=16, mamba_dt_rank=8, hidden_size_global=64,
                  expert_ffn_hidden_size=128, num_encoder_layers=2, num_decoder_layers=2, encoder_layers=2,
                  decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                  decoder_ffn_dim=128, d_model=64, d_ff=128, d_kv=16)
EXPERT_COUNTS = ("zero_expert_num", "num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")
EXPERTS_PER_TOKEN = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "moe_top_k", "n_group",
                     "topk_group", "num_expert_group")
# Token ids beyond the tiny vocabulary become the byte tokenizer's own: <|endoftext|> = 256, <|pad|> = 257.
SPECIAL_IDS = dict(pad_token_id=257, bos_token_id=256, eos_token_id=256, decoder_start_token_id=256)

_QSA_INDEXER = dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8,
                    indexer_compress_ratio=4)  # Qwen4-Exp's indexed attention needs all five or none
# Dots 3: MLA with head_dim = nope + rope, and its sliding layers' own attention sizes (swa_*).
_DOTS3_TEXT = dict(num_key_value_heads=4, head_dim=24, swa_num_attention_heads=4, swa_num_key_value_heads=4,
                   swa_q_lora_rank=48, swa_kv_lora_rank=32, swa_head_dim=24, swa_qk_nope_head_dim=16,
                   swa_v_head_dim=16, swa_qk_rope_head_dim=8)
OVERRIDES: dict[str, dict] = {
    # Defaults of None where the family's model needs numbers.
    "dots1": dict(n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1),
    "deepseek_v2": dict(num_experts_per_tok=2),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),
    "qwen4_exp": _QSA_INDEXER,
    "qwen4_exp_text": _QSA_INDEXER,
    # Defaults the family's own model cannot run with.
    "cohere_compass_text": dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    "reformer": dict(axial_pos_embds_dim=[32, 32], axial_pos_shape=[16, 32]),  # dims sum to the width
    "xmod": dict(default_language="en_XX"),  # the language adapter its forward picks
    "dbrx": dict(attn_config=dict(rope_theta=10000.0, clip_qkv=8.0)),  # read unconditionally by its attention
    "musicgen": dict(num_codebooks=1),  # input ids are [batch * codebooks, length]: one codebook takes a plain row
    "musicgen_melody": dict(num_codebooks=1),
    # Architecture checks the generic sizes break.
    "dots3_note": _DOTS3_TEXT,
    "dots3_note_text": _DOTS3_TEXT,
    "blt": dict(encoder_hash_byte_group_vocab=512),  # 3M rows of hashed byte-group embeddings otherwise
    "mamba2": dict(num_heads=8),  # Mamba heads: num_heads * head_dim = expand * hidden_size
    "gemma3n_text": dict(num_kv_shared_layers=0),  # with 2 layers, the 15 KV-sharing layers would leave none to share
    # Kolibri 1.1: a sliding layer and an indexed (indexer) layer, each reading its own K/V; the indexer's sizes
    # within the tiny model's 4 query heads and short rows.
    "kolibri1_1": dict(layer_types=["sliding_attention", "indexed_attention"], index_layers=[1], kv_source_layers=[0, 1],
                       index_num_heads=2, index_topk=8, index_pool_size=64, index_compression=4,
                       index_num_local_tokens=4, index_num_sink_tokens=1),
}


def _writable(part, key: str) -> bool:
    """A field the config stores (not a read-only property derived from others)."""
    static = inspect.getattr_static(type(part), key, None)
    return not (isinstance(static, property) and static.fset is None)


def _derived(part) -> set[str]:
    """Fields the config class computes in ``__post_init__`` from others, whatever it is given (``head_dim`` of
    MLA, Zamba2's attention and Mamba head sizes): setting them would contradict the sizes they follow."""
    names = set()
    for cls in type(part).__mro__:
        post_init = cls.__dict__.get("__post_init__")
        if post_init is None:
            continue
        for match in re.finditer(r"^        self\.(\w+) = (.*)$", inspect.getsource(post_init), re.MULTILINE):
            if f"self.{match[1]}" not in match[2]:  # not a default that keeps a given value
                names.add(match[1])
    return names


def _layer_kinds(values: list, num_layers: int) -> list:
    """A per-layer list cut to ``num_layers``: one layer of each of its first kinds (local and global, dense and
    sparse, where the family mixes them)."""
    kinds = list(dict.fromkeys(values))
    return (kinds * num_layers)[:num_layers]


def shrunk(part, vocab_size: int) -> dict:
    """The changes that make one config (or sub-config) tiny: ``{field: value}``, sub-configs as nested dicts."""
    fields = vars(part)
    aliases = getattr(part, "attribute_map", {}) or {}
    derived = _derived(part)
    changes: dict = {}
    for key, value in {**SIZES, **HEAD_SIZES}.items():
        name = aliases.get(key, key)
        if name in fields and _writable(part, name) and name not in derived:
            changes[name] = value
    for key, value in fields.items():
        if key in changes or isinstance(value, bool) or not isinstance(value, int) or not _writable(part, key):
            continue
        if key.endswith("intermediate_size") or key.endswith("intermediate_dim"):
            changes[key] = 128
        elif key in EXPERT_COUNTS:
            changes[key] = 4
        elif key in EXPERTS_PER_TOKEN:
            changes[key] = min(value, 2)
    if "kv_lora_rank" in fields:  # MLA: keys and values per query head, from the latent; RoPE on the rope part
        changes["num_key_value_heads"] = SIZES["num_attention_heads"]
        if "head_dim" in changes:
            changes["head_dim"] = HEAD_SIZES["qk_rope_head_dim"]
    for key in fields:
        if key.startswith("vocab_size"):  # Gemma-3n/4's per-layer input embeddings have their own vocabulary
            changes[key] = vocab_size
    for key, special in SPECIAL_IDS.items():
        value = fields.get(key)
        if isinstance(value, int) and value >= vocab_size:
            changes[key] = special
        elif isinstance(value, list) and any(v >= vocab_size for v in value):
            changes[key] = special
    for key, value in fields.items():  # image/video/audio placeholders: indexable, unused by text rows
        if key.endswith(("_token_id", "_token_index")) and key not in SPECIAL_IDS and isinstance(value, int) \
                and value >= vocab_size:
            changes[key] = SPECIAL_IDS["pad_token_id"]
    if "is_decoder" in fields:  # BERT-style and seq2seq families: their causal-LM use is as a (causal) decoder
        changes["is_decoder"] = True
    if fields.get("sliding_window"):
        changes["sliding_window"] = WINDOW
        if "use_sliding_window" in fields:
            changes["use_sliding_window"] = True
    if fields.get("attn_logit_softcapping"):  # a cap that bends scores made large enough to reach it (random
        changes["attn_logit_softcapping"] = 1.0  # scores at the usual initializer range are ~0.02: no cap bends them)
        changes["initializer_range"] = 0.2
    layers_field = aliases.get("num_hidden_layers", "num_hidden_layers")
    num_layers, default_layers = changes.get(layers_field), fields.get(layers_field)
    for key, value in fields.items():  # per-layer lists (layer_types, mlp_layer_types, ...)
        if (num_layers and isinstance(value, list) and len(value) == default_layers and _writable(part, key)
                and all(isinstance(kind, str) for kind in value)):
            changes[key] = _layer_kinds(value, num_layers)
    for name in getattr(part, "sub_configs", {}) or {}:
        sub = fields.get(name)
        if sub is not None and hasattr(sub, "to_dict"):
            changes[name] = {"model_type": sub.model_type, **shrunk(sub, vocab_size)}
    return changes


def _merged(changes: dict, overrides: dict) -> dict:
    merged = dict(changes)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def causal_lm_class(model_type: str):
    """The family's class in transformers' causal-LM mapping."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.for_model(model_type))]


def tiny_config(model_type: str, vocab_size: int):
    """The family's default config made tiny: 2 layers, width 64, 4 heads of 16, 4 experts, a short window."""
    from transformers import AutoConfig

    config_class = type(AutoConfig.for_model(model_type))
    model_config_class = causal_lm_class(model_type).config_class
    if model_config_class in config_class.sub_configs.values():  # the causal LM is the text model (or decoder)
        config_class = model_config_class
    default = config_class()
    return config_class(**_merged(shrunk(default, vocab_size), OVERRIDES.get(model_type, {})))
