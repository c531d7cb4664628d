"""The two thought tokens are never text: they are excluded from every distribution over text."""

from __future__ import annotations

import torch


def mask_thought_tokens(logits: torch.Tensor, thought_token_ids: tuple[int, int]) -> torch.Tensor:
    """Logits ``[..., V]`` with the <|startofthought|> and <|endofthought|> columns set to -inf.

    Applied to the sampling distribution (thoughts never contain them) and to every distribution a
    loss scores, so the freshly added, untrained vocabulary rows cannot shift the base model's
    predictions: at initialisation the text distribution is exactly the base model's.
    """
    masked = logits.clone()
    masked[..., list(thought_token_ids)] = float("-inf")
    return masked
