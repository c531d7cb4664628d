"""Refuse models the quietstar attention would compute wrongly, with a message that says why."""

from __future__ import annotations

import torch

from .attention import ATTENTION_NAME, ThoughtLayout
from .head import LogitTransform

_UNSUPPORTED_CONFIG = {
    "attn_logit_softcapping": "attention-logit soft-capping",
}


def check_model_supported(base) -> None:
    """Raise ValueError unless every layer of ``base`` attends through the "quietstar" function exactly.

    Checks the config for features the function does not implement, then runs a 6-token probe:
    every decoder layer must call the function, and the family's head of ``body(x)`` (quietstar.head) must equal
    the model's own logits under its "eager" attention.
    """
    name = type(base).__name__
    for key, feature in _UNSUPPORTED_CONFIG.items():
        if getattr(base.config, key, None):
            raise ValueError(f"{name} uses {feature} ({key}={getattr(base.config, key)}), which Quiet-STaR's attention "
                             "does not implement; its thoughts would be computed wrongly.")
    if base.config._attn_implementation != ATTENTION_NAME:
        raise ValueError(f"{name} did not accept attn_implementation='{ATTENTION_NAME}': its attention does not route "
                         "through transformers' AttentionInterface, so Quiet-STaR cannot lay out thoughts in it.")
    num_layers = base.config.num_hidden_layers
    device = base.get_input_embeddings().weight.device
    ids = torch.arange(3, 9, device=device)[None] % base.config.vocab_size
    layout = ThoughtLayout("prefix", torch.ones_like(ids, dtype=torch.bool), 1, num_thought_tokens=1, backend="eager")
    was_training = base.training
    base.eval()  # dropout would make the two runs differ
    try:
        with torch.no_grad():
            hidden = base.get_decoder()(input_ids=ids, thought_layout=layout, use_cache=False).last_hidden_state
            ours = LogitTransform.from_config(base.config)(base.get_output_embeddings()(hidden)).float()
            base.set_attn_implementation("eager")
            reference = base(input_ids=ids, use_cache=False).logits.float()
    finally:
        base.set_attn_implementation(ATTENTION_NAME)
        base.train(was_training)
    attended = len(layout.text_cache)
    if attended < num_layers:
        raise ValueError(f"Only {attended} of {name}'s {num_layers} layers attend through "
                         "transformers' AttentionInterface; Quiet-STaR needs all of them to.")
    if attended > num_layers:
        raise ValueError(f"{name} ran {attended} attention layers but its config declares num_hidden_layers="
                         f"{num_layers} (an encoder-decoder's decoder?); Quiet-STaR needs a decoder-only LM whose "
                         "layers all attend through transformers' AttentionInterface.")
    tolerance = 1e-3 if hidden.dtype == torch.float32 else 3e-2
    error = (ours - reference).abs().max() / reference.abs().max().clamp(min=1e-6)
    if not error <= tolerance:
        raise ValueError(f"{name}'s logits differ from lm_head(final hidden state) under the quietstar attention "
                         f"(relative error {error:.2e}); the model does something Quiet-STaR's attention or head "
                         "split does not implement (a logit change other than quietstar.head's scaling and "
                         "soft-capping, a custom attention rule).")
