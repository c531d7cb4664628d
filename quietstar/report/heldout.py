"""Per-token NLL of held-out text under several views, and the paired comparisons that say whether thoughts help.

Every document contributes its first ``max_length`` tokens (a fixed window, so runs are comparable). The NLL of
token j + 1 is scored at position j; with thoughts it is the next-token distribution after one thought
(quietstar.scoring.ThoughtScorer). The views (:func:`controlled_scorers`):

- ``base``: the LM the run started from; ``no_thoughts``: the trained LM alone;
- ``real``: the trained model after its own sampled thoughts;
- ``null``: the same model with every thought replaced by filler (the mixing path without information);
- ``shuffled``: the same sampled thoughts, moved to other positions of the same document;
- ``control``: the equal-compute control. With a protected text path (``text_path`` frozen or thought_lora) the
  trained model without thoughts is the base model by construction, so the control is the base model; otherwise it
  is a plain LM trained on the same data, steps and seed, when one is given.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ..padding import right_pad
from ..scoring import BaseScorer, ThoughtScorer, ThoughtSource
from .stats import paired_bootstrap

# The differences a controlled report states, as (first view, second view): NLL(first) - NLL(second) per token.
COMPARISONS = (("real", "null"), ("real", "shuffled"), ("real", "control"), ("no_thoughts", "base"),
               ("null", "base"))


def fixed_windows(documents: list[str], tokenizer, max_length: int, min_tokens: int = 2) -> list[list[int]]:
    """The first ``max_length`` token ids of each document that has at least ``min_tokens`` tokens."""
    encoded = tokenizer(documents)["input_ids"]
    return [ids[:max_length] for ids in encoded if len(ids) >= min_tokens]


def _token_nll(log_probs: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> list[np.ndarray]:
    """Per row, the NLL of each real next token: log_probs ``[B, L, V]``, ids/mask ``[B, L]`` -> B arrays."""
    nll = -log_probs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    valid = mask[:, 1:].bool()
    return [nll[row][valid[row]].cpu().numpy() for row in range(ids.shape[0])]


@torch.no_grad()
def heldout_token_nll(windows: list[list[int]], pad_id: int, scorers: dict, batch_size: int = 4) -> dict[str, np.ndarray]:
    """{name: per-token NLL over all windows, concatenated} for each scorer (``[B, L]`` ids -> ``[B, L, V]``
    next-token log-probabilities). Every array lists the same tokens in the same order."""
    results = {name: [] for name in scorers}
    for begin in tqdm(range(0, len(windows), batch_size), desc="held-out NLL", unit="batch"):
        ids, mask = right_pad(windows[begin : begin + batch_size], pad_id)
        for name, scorer in scorers.items():
            results[name].extend(_token_nll(scorer(ids, mask), ids, mask))
    return {name: np.concatenate(arrays) for name, arrays in results.items()}


def token_documents(windows: list[list[int]]) -> np.ndarray:
    """The document index of every scored token, in the order :func:`heldout_token_nll` lists them."""
    return np.concatenate([np.full(len(w) - 1, i) for i, w in enumerate(windows)]) if windows else np.zeros(0, int)


def controlled_scorers(trained, original_lm, generator: torch.Generator, control_lm=None) -> dict:
    """The views of the module docstring as scorers. ``trained`` must think one thought per position
    (quietstar.scoring.configure_for_scoring); ``original_lm``: the base LM (None: no base view); ``control_lm``: an
    equal-compute plain LM (None: the base model when the text path is protected, else no control view)."""
    source = ThoughtSource(trained, generator)
    scorers = {"no_thoughts": BaseScorer(trained.base, trained.thought_token_ids),
               "real": ThoughtScorer(trained, thoughts="sampled", source=source),
               "null": ThoughtScorer(trained, thoughts="null", source=source),
               "shuffled": ThoughtScorer(trained, thoughts="shuffled", source=source)}
    if control_lm is None and trained.quietstar_config.text_path in ("frozen", "thought_lora"):
        control_lm = original_lm
    for name, lm in (("base", original_lm), ("control", control_lm)):
        if lm is not None:  # an LM whose vocabulary already holds the thought tokens never predicts them either
            vocabulary = lm.get_output_embeddings().weight.shape[0]
            scorers[name] = BaseScorer(lm, [t for t in trained.thought_token_ids if t < vocabulary])
    return scorers


def hardest_tokens(nll: dict[str, np.ndarray], reference: str, fraction: float = 0.1) -> np.ndarray:
    """Boolean mask of the ``fraction`` of tokens with the highest ``reference`` NLL."""
    difficulty = nll[reference]
    count = max(1, int(round(fraction * len(difficulty))))
    mask = np.zeros(len(difficulty), dtype=bool)
    mask[np.argsort(-difficulty, kind="stable")[:count]] = True
    return mask


def compare_views(nll: dict[str, np.ndarray], documents: np.ndarray, reference: str = "base",
                  num_resamples: int = 2000, seed: int = 0) -> dict[str, dict[str, float]]:
    """Paired differences of :data:`COMPARISONS` whose views are present, overall and on the hardest 10 % (by the
    ``reference`` view): ``{"real_minus_null_all": {"mean", "low", "high"}, "real_minus_null_hardest": ..., ...}``."""
    hard = hardest_tokens(nll, reference)
    out = {}
    for first, second in COMPARISONS:
        if first in nll and second in nll:
            difference = nll[first] - nll[second]
            for subset, mask in (("all", None), ("hardest", hard)):
                out[f"{first}_minus_{second}_{subset}"] = paired_bootstrap(difference, documents, mask,
                                                                          num_resamples, seed=seed)
    return out


def summarize(nll: dict[str, np.ndarray], hardest_fraction: float = 0.1, reference: str = "base") -> dict:
    """Mean NLL of each view over all tokens and over the hardest ``hardest_fraction`` of tokens (by the NLL of
    ``reference``), with the number of tokens in each."""
    hardest = hardest_tokens(nll, reference, hardest_fraction)
    return {
        "tokens": int(len(hardest)),
        "hardest_tokens": int(hardest.sum()),
        "mean": {name: float(values.mean()) for name, values in nll.items()},
        "hardest_mean": {name: float(values[hardest].mean()) for name, values in nll.items()},
    }


def binned_change(nll: dict[str, np.ndarray], num_bins: int = 10, reference: str = "base") -> dict:
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


def save_token_nll(path: str, nll: dict[str, np.ndarray], documents: np.ndarray, windows: list[list[int]],
                   source: str) -> None:
    """Write the per-token NLL of every view (``.npz``) with what identifies the held-out set, so that runs (seeds)
    can be pooled token by token (:func:`load_token_nll`)."""
    np.savez_compressed(path, documents=documents, fingerprint=np.array(heldout_fingerprint(windows, source)),
                        **{f"nll_{name}": values for name, values in nll.items()})


def load_token_nll(path: str) -> tuple[dict[str, np.ndarray], np.ndarray, str]:
    """``(nll by view, documents, fingerprint)`` written by :func:`save_token_nll`."""
    with np.load(path) as data:
        nll = {key.removeprefix("nll_"): data[key] for key in data.files if key.startswith("nll_")}
        return nll, data["documents"], str(data["fingerprint"])


def heldout_fingerprint(windows: list[list[int]], source: str) -> str:
    """The source, the number of documents and tokens, and a hash of every token id: equal only for the same set."""
    import hashlib

    digest = hashlib.sha256(np.concatenate([np.asarray(w, dtype=np.int64) for w in windows]).tobytes()).hexdigest()
    return f"{source}|{len(windows)} documents|{sum(len(w) for w in windows)} tokens|{digest[:16]}"
