"""quietstar/padding.py: the pad token a tokenizer lacks, and right-padded batches."""

from __future__ import annotations

import warnings

import pytest
import torch

from quietstar.padding import ensure_pad_token, right_pad
from quietstar.tiny import byte_tokenizer


def test_right_pad_puts_each_sequence_first_and_pads_after_it():
    sequences = [[5, 6, 7], [8], torch.tensor([9, 10, 11, 12, 13]), []]
    ids, mask = right_pad(sequences, pad_id=-3)
    expected = [[5, 6, 7, -3, -3], [8, -3, -3, -3, -3], [9, 10, 11, 12, 13], [-3, -3, -3, -3, -3]]
    assert ids.tolist() == expected and ids.dtype == torch.long
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]
    assert mask.dtype == torch.long and ids.device.type == "cpu"
    with pytest.raises(ValueError, match="at least one sequence"):
        right_pad([], pad_id=0)


def test_a_tokenizer_without_pad_token_gets_its_eos_with_a_warning_and_one_with_a_pad_keeps_it():
    tokenizer = byte_tokenizer(with_pad=False)
    with pytest.warns(UserWarning, match="no pad token"):
        assert ensure_pad_token(tokenizer) == tokenizer.eos_token_id
    assert tokenizer.pad_token == tokenizer.eos_token
    padded = byte_tokenizer()
    pad_id = padded.pad_token_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pad_id != padded.eos_token_id and ensure_pad_token(padded) == pad_id
