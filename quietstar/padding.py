"""Padding: the pad token of a tokenizer that has none, and right-padded batches of token ids."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch.nn.utils.rnn import pad_sequence


def ensure_pad_token(tokenizer) -> int:
    """Give ``tokenizer`` its eos token as pad when it has no pad token (with a warning); return the pad id.
    Padding positions are masked out of attention and losses, so which token fills them does not matter."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("The tokenizer has neither a pad token nor an eos token; set tokenizer.pad_token first.")
        warnings.warn("The tokenizer has no pad token; using its eos token as pad.", stacklevel=2)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.pad_token_id


def right_pad(sequences: Sequence[Sequence[int] | torch.Tensor], pad_id: int,
              device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """B token-id sequences of lengths n_b -> ``input_ids [B, max n_b]`` (``pad_id`` after each sequence) and
    ``attention_mask [B, max n_b]`` (1 on the tokens, 0 on the padding), both int64, on ``device`` (default CPU)."""
    if len(sequences) == 0:
        raise ValueError("right_pad needs at least one sequence.")
    rows = [torch.as_tensor(s, dtype=torch.long).cpu().reshape(-1) for s in sequences]
    input_ids = pad_sequence(rows, batch_first=True, padding_value=pad_id)
    lengths = torch.tensor([len(row) for row in rows])
    attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
    return input_ids.to(device), attention_mask.to(device)
