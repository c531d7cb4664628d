"""The second, gradient-free thought-expanded pass of the position-contrastive reward (docs/design.md §1, "Losses"):
every thought replayed ``shift`` positions after the one it was sampled at, scored there like the reward scores it
at home (quietstar.losses.moved_gains, contrastive_rewards)."""

from __future__ import annotations

import torch

from .losses import IGNORE_INDEX, lookahead_targets, token_nll
from .vocab import mask_thought_tokens


@torch.no_grad()
def moved_thought_nll(model, input_ids, key_padding, labels, thoughts, shift: int, reward_source: str) -> torch.Tensor:
    """NLL of the reward source (the loss config's ``reward_source``: "thought" or "mixed") with every thought moved ``shift`` positions later:
    ``[B, N, L, A]``, indexed by the position the thought is scored at (column j' holds the thought sampled at
    j' - shift; columns j' < shift hold thoughts from the row's end, and are never read).

    input_ids/labels ``[B, L]``, key_padding ``[B, L]`` bool, thoughts ``[B, N, L, T]``. Real tokens are contiguous
    in a row (padding sits at its ends), so a shift of columns is a shift of real positions.
    """
    cfg = model.quietstar_config
    moved = thoughts.roll(shift, dims=2)
    thought_source = reward_source == "thought"
    out = model(input_ids, attention_mask=key_padding.long(), thoughts=moved, output_logits=thought_source)
    logits = mask_thought_tokens(out.thought_logits, model.thought_token_ids) if thought_source else out.logits
    targets, _ = lookahead_targets(labels.masked_fill(~key_padding, IGNORE_INDEX), key_padding,
                                   cfg.num_lookahead_tokens)
    return token_nll(logits, targets[:, None].expand(logits.shape[:-1]))
