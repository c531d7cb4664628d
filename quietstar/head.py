"""The family's split into a decoder (ids or embeddings -> final hidden states) and an output head: logits from final
hidden states, with the scaling or soft-capping some families add.

Most causal LMs compute ``logits = lm_head(h)``. BERT-style decoders (BERT, RoBERTa, ERNIE, ...) put a transform
(dense, activation, layer norm) before the projection (:func:`output_head_names`). Some
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


def output_head_names(base) -> tuple[str, ...]:
    """The names, in ``base``, of the modules that turn final hidden states into logits, applied in this order (before
    :class:`LogitTransform`).

    The top-level parts of ``base`` after the one holding its decoder, up to the one holding its output embeddings:
    that part alone in most families (``lm_head``; in BERT-style ones ``cls`` or ``lm_head``, a transform and the
    projection), ELECTRA's ``generator_predictions`` (a transform) then ``generator_lm_head``.
    ``quietstar.compat.check_model_supported`` probes that they give the family's logits from the decoder's output.
    """
    embeddings, body = base.get_output_embeddings(), decoder(base)
    children = list(base.named_children())
    holds = lambda child, module: any(part is module for part in child.modules())  # noqa: E731
    head = next((i for i, (_, child) in enumerate(children) if holds(child, embeddings) and not holds(child, body)), None)
    if head is None:  # the projection sits inside the decoder's part
        return (next(name for name, module in base.named_modules() if module is embeddings),)
    body_part = next((i for i, (_, child) in enumerate(children[:head]) if holds(child, body)), head - 1)
    return tuple(name for name, _ in children[body_part + 1 : head + 1])


def hidden_width(base, names: tuple[str, ...]) -> int:
    """The width of the final hidden states, which the output head ``names`` reads: the input features of its first
    linear layer. It can differ from the input embeddings' (ELECTRA projects them up to hidden_size, OPT projects its
    final states down to word_embed_proj_dim) and from the config's hidden_size (OPT)."""
    return next(module.in_features for name in names for module in base.get_submodule(name).modules()
                if isinstance(getattr(module, "in_features", None), int))


def apply_output_head(base, names: tuple[str, ...], hidden: torch.Tensor) -> torch.Tensor:
    """The modules ``names`` of ``base`` (:func:`output_head_names`) applied in turn to ``hidden``."""
    for name in names:
        hidden = base.get_submodule(name)(hidden)
    return hidden


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
