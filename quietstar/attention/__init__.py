"""The "quietstar" attention, registered with transformers' AttentionInterface (docs/design.md §2, "The attention seam").

A model loaded with ``attn_implementation="quietstar"`` calls :func:`quietstar_attention` in every
layer. Without a ``thought_layout`` keyword it is ordinary causal attention (with the 2-D padding
mask that :func:`padding_mask` hands over instead of a dense 4-D mask); with one, it applies the
thought visibility rule. Files: ``layout.py`` (the layout of a model call; the rule itself is :mod:`quietstar.ops.visibility`),
``eager.py`` (the exact PyTorch reference), ``settings.py`` (how attention runs in this process, never saved),
``backends.py`` (the capability table of every backend and the resolver that reads it), ``dispatch.py`` (the entry
point, one function per phase). The fast paths live in :mod:`quietstar.ops` (``flash_cpu``, ``sus``).
"""

from __future__ import annotations

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ..ops.visibility import branch_visibility, prefix_visibility
from .dispatch import quietstar_attention
from .layout import ThoughtLayout
from .settings import AttentionSettings

ATTENTION_NAME = "quietstar"

__all__ = [
    "ATTENTION_NAME",
    "AttentionSettings",
    "ThoughtLayout",
    "branch_visibility",
    "padding_mask",
    "prefix_visibility",
    "quietstar_attention",
]


def padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """Mask function for AttentionMaskInterface: pass the 2-D padding mask through, build nothing dense."""
    return attention_mask


AttentionInterface.register(ATTENTION_NAME, quietstar_attention)
AttentionMaskInterface.register(ATTENTION_NAME, padding_mask)
