"""The family's split into a decoder (ids or embeddings -> final hidden states) and an output head: logits from final
hidden states, with the scaling or soft-capping some families add.

Most causal LMs compute ``logits = lm_head(h)``. BERT-style decoders (BERT, RoBERTa, ERNIE, ...) put a transform
(dense, activation, layer norm) before the projection, in one module that holds it (:func:`output_head_name`). Some
change the logits after the projection, and every place Quiet-STaR turns a hidden state into logits (base, sampling,
thought and mixed predictions, generation) must do the same:

- Granite (``logits_scaling``): ``lm_head(h) / logits_scaling``;
- Cohere (``logit_scale``): ``lm_head(h) * logit_scale``;
- Gemma 2/3 and others (``final_logit_softcapping``): ``cap * tanh(z / cap)`` after any scaling.

``quietstar.compat.check_model_supported`` probes that this reproduces the family's own logits, so a family with
another change is refused rather than computed wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def decoder(base):
    """The decoder stack of ``base``: ``get_decoder()``, or where that returns the whole LM (Llama 4's causal LM names
    its base model after an attribute it does not have), the top-level part of ``base`` holding the input embeddings.
    """
    found = base.get_decoder()
    if found is not base:
        return found
    embeddings = base.get_input_embeddings()
    return next((child for child in base.children() if any(part is embeddings for part in child.modules())), found)


def output_head_name(base) -> str:
    """The name, in ``base``, of the module that turns final hidden states into logits (before :class:`LogitTransform`).

    The top-level part of ``base`` that holds its output embeddings but not its decoder: the output embeddings
    themselves (``lm_head``) in most families, the transform and the projection together in BERT-style ones (``cls``,
    ``lm_head``). ``quietstar.compat.check_model_supported`` probes that calling it on the decoder's output gives the
    family's logits.
    """
    embeddings, body = base.get_output_embeddings(), decoder(base)
    for name, child in base.named_children():
        parts = list(child.modules())
        if any(part is embeddings for part in parts) and not any(part is body for part in parts):
            return name
    return next(name for name, module in base.named_modules() if module is embeddings)


@dataclass(frozen=True)
class LogitTransform:
    """``z -> softcap(scale * z)`` applied to ``lm_head(h)``; ``softcap`` None means none."""

    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def from_config(cls, config) -> "LogitTransform":
        """Read the family's own fields from an LM config (its text config for multimodal ones)."""
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        scale = 1.0
        if getattr(config, "logits_scaling", None):
            scale /= float(config.logits_scaling)
        if getattr(config, "logit_scale", None):
            scale *= float(config.logit_scale)
        softcap = getattr(config, "final_logit_softcapping", None)
        return cls(scale=scale, softcap=float(softcap) if softcap else None)

    @property
    def is_affine(self) -> bool:
        """True when the transform is linear, so mixing hidden states equals mixing logits."""
        return self.softcap is None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
