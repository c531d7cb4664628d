"""Which position id a family gives a row's first token.

Quiet-STaR passes position ids explicitly (branch slot s of position j sits at pos_j + 1 + s), so they must start
where the family's own numbering does: 0 in most families, padding_idx + 1 in RoBERTa-style embeddings, which number
positions after the padding index (transformers' ``create_position_ids_from_inputs_embeds``).
"""

from __future__ import annotations

import torch

from .head import decoder


def first_position_id(base) -> int:
    """The position id ``base`` gives the first token of a row it is handed as embeddings, without position ids."""
    for module in decoder(base).modules():
        number = getattr(module, "create_position_ids_from_inputs_embeds", None)
        if number is not None:
            return int(number(torch.zeros(1, 1, 1), module.padding_idx)[0, 0])
    return 0
