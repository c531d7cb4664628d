"""Per-token NLL of held-out text: the base model before training, and the trained model without and with thoughts.

Every document contributes its first ``max_length`` tokens (a fixed window, so runs are comparable). The NLL of
token j + 1 is scored at position j; with thoughts it is the next-token distribution after the thoughts,
averaged over the N samples as in the paper protocol (quietstar.scoring.ThoughtScorer).
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ..scoring import BaseScorer, ThoughtScorer


def fixed_windows(documents: list[str], tokenizer, max_length: int, min_tokens: int = 2) -> list[list[int]]:
    """The first ``max_length`` token ids of each document that has at least ``min_tokens`` tokens."""
    encoded = tokenizer(documents)["input_ids"]
    return [ids[:max_length] for ids in encoded if len(ids) >= min_tokens]


def _token_nll(log_probs: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> list[np.ndarray]:
    """Per row, the NLL of each real next token: log_probs ``[B, L, V]``, ids/mask ``[B, L]`` -> B arrays."""
    nll = -log_probs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    valid = mask[:, 1:].bool()
    return [nll[row][valid[row]].cpu().numpy() for row in range(ids.shape[0])]


def _padded(windows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(w) for w in windows)
    ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, window in enumerate(windows):
        ids[row, : len(window)] = torch.tensor(window)
        mask[row, : len(window)] = 1
    return ids, mask


@torch.no_grad()
def heldout_token_nll(windows: list[list[int]], pad_id: int, scorers: dict, batch_size: int = 4) -> dict[str, np.ndarray]:
    """{name: per-token NLL over all windows, concatenated} for each scorer (``[B, L]`` ids -> ``[B, L, V]``
    next-token log-probabilities). Every array lists the same tokens in the same order."""
    results = {name: [] for name in scorers}
    for begin in tqdm(range(0, len(windows), batch_size), desc="held-out NLL", unit="batch"):
        ids, mask = _padded(windows[begin : begin + batch_size], pad_id)
        for name, scorer in scorers.items():
            results[name].extend(_token_nll(scorer(ids, mask), ids, mask))
    return {name: np.concatenate(arrays) for name, arrays in results.items()}


def standard_scorers(trained, original_lm, generator: torch.Generator) -> dict:
    """The three views the report compares: ``before`` (the original LM), ``after_no_thoughts`` (the trained LM
    alone) and ``after_thoughts`` (the trained model thinking at every position)."""
    return {
        "before": BaseScorer(original_lm),
        "after_no_thoughts": BaseScorer(trained.base, trained.thought_token_ids),
        "after_thoughts": ThoughtScorer(trained, generator),
    }


def summarize(nll: dict[str, np.ndarray], hardest_fraction: float = 0.1, reference: str = "before") -> dict:
    """Mean NLL of each view over all tokens and over the hardest ``hardest_fraction`` of tokens (by the NLL of
    ``reference``), with the number of tokens in each."""
    difficulty = nll[reference]
    count = max(1, int(round(hardest_fraction * len(difficulty))))
    hardest = np.argsort(-difficulty, kind="stable")[:count]
    return {
        "tokens": int(len(difficulty)),
        "hardest_tokens": count,
        "mean": {name: float(values.mean()) for name, values in nll.items()},
        "hardest_mean": {name: float(values[hardest].mean()) for name, values in nll.items()},
    }


def binned_change(nll: dict[str, np.ndarray], num_bins: int = 10, reference: str = "before") -> dict:
    """The paper's figure as numbers: tokens in ``num_bins`` equal-count bins of ``reference`` NLL (easy to hard);
    per bin the mean reference NLL and, for every other view, the mean NLL change from the reference."""
    difficulty = nll[reference]
    order = np.argsort(difficulty, kind="stable")
    bins = [b for b in np.array_split(order, num_bins) if len(b)]
    return {
        "bin_mean_nll": [float(difficulty[b].mean()) for b in bins],
        "bin_tokens": [int(len(b)) for b in bins],
        "change": {name: [float((values[b] - difficulty[b]).mean()) for b in bins]
                   for name, values in nll.items() if name != reference},
    }
