"""Per-token NLL of held-out text under several views, and the paired comparisons that say whether thoughts help.

Every document contributes its first ``max_length`` tokens (a fixed window, so runs are comparable). The NLL of
token j + 1 is scored at position j; with thoughts it is the next-token distribution after one thought
(quietstar.scoring.ThoughtScorer). The views (:data:`VIEWS`, built by :func:`controlled_scorers`):

- ``base``: the LM the run started from; ``no_thoughts``: the trained LM alone;
- ``real``: the trained model after its own sampled thoughts;
- ``other_document``: the same model, each position given the thought sampled at the same position of another
  document (in-distribution thoughts with no information about this one): real − other_document is what a thought
  says about its own text;
- ``causal_shuffle``: each position given a thought of its own row from at least A + 1 positions earlier (it saw
  none of the tokens scored there);
- ``null``: every thought replaced by filler (real − null also measures that filler is off-distribution);
- the trained controls (quietstar.report.controls), each a run folder or stated missing, never the base model:
  ``finetune`` (the same adapters, data, seed and schedule trained as a plain LM, equal steps), ``finetune_flops``
  (the same at equal training FLOPs) and ``null_trained`` (the same recipe with every thought fixed to filler,
  scored with filler).

A view with no thought for a token (other_document past the other document's end, causal_shuffle in the first
A + 1 positions) has NaN there; a comparison uses the tokens both views score and says how many it left out. The
hardest 10 % of a comparison are chosen by a model outside the compared pair (:func:`difficulty_reference`), so
regression to the mean cannot favour either side.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
from tqdm.auto import tqdm

from ..padding import right_pad
from ..scoring import BaseScorer, ThoughtScorer, ThoughtSource, weight_summary
from .stats import paired_bootstrap

VIEWS = ("base", "finetune", "finetune_flops", "null_trained", "no_thoughts", "real", "other_document",
         "causal_shuffle", "null")
# The differences a controlled report states, as (first view, second view): NLL(first) - NLL(second) per token.
COMPARISONS = (("real", "other_document"), ("real", "causal_shuffle"), ("real", "null"), ("real", "finetune"),
               ("real", "finetune_flops"), ("real", "null_trained"), ("finetune", "base"), ("no_thoughts", "base"),
               ("null", "base"))
# The models that may choose the hardest tokens of a comparison, in order of preference; never one of the pair.
DIFFICULTY_MODELS = ("base", "finetune", "finetune_flops", "no_thoughts", "null_trained")
HARDEST_FRACTION = 0.1


def fixed_windows(documents: list[str], tokenizer, max_length: int, min_tokens: int = 2) -> list[list[int]]:
    """The first ``max_length`` token ids of each document that has at least ``min_tokens`` tokens."""
    encoded = tokenizer(documents)["input_ids"]
    return [ids[:max_length] for ids in encoded if len(ids) >= min_tokens]


def _per_row(values: torch.Tensor, mask: torch.Tensor) -> list[np.ndarray]:
    """``values [B, L - 1]`` at the real next tokens of each row (``mask [B, L]``) -> B arrays."""
    valid = mask[:, 1:].bool()
    return [values[row][valid[row]].cpu().numpy() for row in range(values.shape[0])]


def _token_nll(log_probs: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> list[np.ndarray]:
    """Per row, the NLL of each real next token: log_probs ``[B, L, V]`` (NaN rows: not scored), ids/mask ``[B, L]``."""
    return _per_row(-log_probs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1), mask)


def batches(num_windows: int, batch_size: int) -> list[range]:
    """Consecutive batches of at most ``batch_size`` windows, as even as possible, and never of one window while
    there are two or more (other_document needs two documents per batch): a ``batch_size`` of 1 acts as 2, and with 2
    and an odd number of windows one batch holds three."""
    count = max(1, min(-(-num_windows // batch_size), num_windows // 2))
    return [range(int(part[0]), int(part[-1]) + 1) for part in np.array_split(np.arange(num_windows), count)
            if len(part)] if num_windows else []


@torch.no_grad()
def heldout_token_nll(windows: list[list[int]], pad_id: int, scorers: dict, batch_size: int = 4):
    """``(nll, weights)``: ``{name: per-token NLL over all windows, concatenated}`` for each scorer (``[B, L]`` ids ->
    ``[B, L, V]`` next-token log-probabilities), NaN where a view has no thought for the token; and for each
    thought scorer ``{name: the mixing weight w per token}`` (NaN likewise). Every array lists the same tokens in the
    same order (:func:`token_documents`)."""
    results = {name: [] for name in scorers}
    weights = {name: [] for name, scorer in scorers.items() if isinstance(scorer, ThoughtScorer)
               and not scorer.zero_weight}
    for part in tqdm(batches(len(windows), batch_size), desc="held-out NLL", unit="batch"):
        ids, mask = right_pad([windows[i] for i in part], pad_id)
        for name, scorer in scorers.items():
            log_probs = scorer(ids, mask)
            results[name].extend(_token_nll(log_probs, ids, mask))
            if name in weights:
                weights[name].extend(_per_row(scorer.last_weights[:, :-1], mask))
    concatenated = lambda arrays: {name: np.concatenate(parts) for name, parts in arrays.items()}  # noqa: E731
    return concatenated(results), concatenated(weights)


def token_documents(windows: list[list[int]]) -> np.ndarray:
    """The document index of every scored token, in the order :func:`heldout_token_nll` lists them."""
    return np.concatenate([np.full(len(w) - 1, i) for i, w in enumerate(windows)]) if windows else np.zeros(0, int)


def _lm_scorer(lm, thought_token_ids) -> BaseScorer:
    """A plain LM's scorer; an LM whose vocabulary already holds the thought tokens never predicts them either."""
    vocabulary = lm.get_output_embeddings().weight.shape[0]
    return BaseScorer(lm, [t for t in thought_token_ids if t < vocabulary])


def controlled_scorers(trained, original_lm, generator: torch.Generator, causal_gap: int, finetune_lm=None,
                       finetune_flops_lm=None, null_trained=None) -> dict:
    """The views of the module docstring as scorers. ``trained`` must think one thought per position
    (quietstar.scoring.configure_for_scoring); ``original_lm``: the base LM; ``causal_gap``: A + 1 for the A the run
    trained with; ``finetune_lm`` / ``finetune_flops_lm``: the plain-LM controls; ``null_trained``: the Quiet-STaR
    model trained with filler thoughts (scored with filler). None: the view is left out (the report states it
    missing); nothing stands in for a missing control."""
    source = ThoughtSource(trained, generator, causal_gap=causal_gap)
    scorers = {"no_thoughts": BaseScorer(trained.base, trained.thought_token_ids)}
    for kind in ("sampled", "other_document", "causal_shuffle", "null"):
        scorers["real" if kind == "sampled" else kind] = ThoughtScorer(trained, thoughts=kind, source=source)
    for name, lm in (("base", original_lm), ("finetune", finetune_lm), ("finetune_flops", finetune_flops_lm)):
        if lm is not None:
            scorers[name] = _lm_scorer(lm, trained.thought_token_ids)
    if null_trained is not None:
        scorers["null_trained"] = ThoughtScorer(null_trained, thoughts="null")
    return {name: scorers[name] for name in VIEWS if name in scorers}


def check_controls_differ(nll: dict[str, np.ndarray]) -> None:
    """Refuse a trained control that scores every token exactly as the base model or the real view does: it is not
    the control it claims to be (an untrained model, or the trained model itself)."""
    for control in ("finetune", "finetune_flops", "null_trained"):
        for other in ("base", "real"):
            if control in nll and other in nll and np.array_equal(nll[control], nll[other], equal_nan=True):
                raise ValueError(f"The {control} control scores every held-out token exactly as the {other} view: it "
                                 f"is not a separately trained model. Give the run folder the control training wrote.")


def difficulty_reference(first: str, second: str, nll: dict[str, np.ndarray]) -> str | None:
    """The model that chooses the hardest tokens of the comparison first − second: the first of
    :data:`DIFFICULTY_MODELS` that is present, is neither of the pair, and does not score every token exactly as one
    of them (an LM equal to the base model by construction is the base model). None: no such model; the comparison
    has no hardest-tokens subset."""
    for name in DIFFICULTY_MODELS:
        if name in (first, second) or name not in nll:
            continue
        if any(np.array_equal(nll[name], nll[view], equal_nan=True) for view in (first, second)):
            continue
        return name
    return None


def hardest_tokens(difficulty: np.ndarray, fraction: float = HARDEST_FRACTION,
                   among: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of the ``fraction`` of tokens (of those in ``among``, default all) with the highest
    ``difficulty``."""
    among = np.ones(len(difficulty), dtype=bool) if among is None else among
    candidates = np.flatnonzero(among)
    count = max(1, int(round(fraction * len(candidates))))
    mask = np.zeros(len(difficulty), dtype=bool)
    mask[candidates[np.argsort(-difficulty[candidates], kind="stable")[:count]]] = True
    return mask


def compare_pair(nll: dict[str, np.ndarray], first: str, second: str, documents: np.ndarray,
                 num_resamples: int = 2000, seed: int = 0) -> dict:
    """NLL(first) − NLL(second) over the tokens both score: ``{"all": interval, "hardest": interval or None,
    "reference": the model that chose the hardest tokens or None, "tokens", "excluded"}`` (intervals:
    stats.paired_bootstrap)."""
    difference = nll[first] - nll[second]
    scored = np.isfinite(difference)
    reference = difficulty_reference(first, second, nll)
    out = {"tokens": int(scored.sum()), "excluded": int((~scored).sum()), "reference": reference,
           "all": paired_bootstrap(np.where(scored, difference, 0.0), documents, scored, num_resamples, seed=seed),
           "hardest": None}
    if reference is not None:
        hard = hardest_tokens(nll[reference], among=scored & np.isfinite(nll[reference]))
        out["hardest"] = paired_bootstrap(np.where(scored, difference, 0.0), documents, hard, num_resamples, seed=seed)
    return out


def compare_views(nll: dict[str, np.ndarray], documents: np.ndarray, num_resamples: int = 2000,
                  seed: int = 0) -> dict[str, dict]:
    """:func:`compare_pair` for every comparison of :data:`COMPARISONS` whose views are present:
    ``{"real_minus_null": {...}, ...}``."""
    return {f"{first}_minus_{second}": compare_pair(nll, first, second, documents, num_resamples, seed)
            for first, second in COMPARISONS if first in nll and second in nll}


def summarize(nll: dict[str, np.ndarray]) -> dict:
    """Mean NLL of each view over the tokens it scores, and how many that is: ``{"tokens", "scored", "mean"}``.
    No per-view hardest-tokens mean: the tokens would be chosen by one of the views it is set beside."""
    first = next(iter(nll.values()))
    return {"tokens": int(len(first)),
            "scored": {name: int(np.isfinite(values).sum()) for name, values in nll.items()},
            "mean": {name: float(np.nanmean(values)) for name, values in nll.items()}}


def binned_change(nll: dict[str, np.ndarray], num_bins: int = 10) -> dict:
    """The paper's figure as numbers, without regression to the mean: for every comparison of :data:`COMPARISONS`
    whose views are present and that has a model outside the pair (:func:`difficulty_reference`), the tokens both
    views score in ``num_bins`` equal-count bins of that model's NLL (easy to hard), with per bin the mean difficulty
    and the mean NLL difference. ``{"first_minus_second": {"reference", "bin_mean_nll", "bin_tokens", "change"}}``."""
    out = {}
    for first, second in COMPARISONS:
        if first not in nll or second not in nll:
            continue
        reference = difficulty_reference(first, second, nll)
        if reference is None:
            continue
        difference = nll[first] - nll[second]
        keep = np.flatnonzero(np.isfinite(difference) & np.isfinite(nll[reference]))
        order = keep[np.argsort(nll[reference][keep], kind="stable")]
        bins = [b for b in np.array_split(order, num_bins) if len(b)]
        out[f"{first}_minus_{second}"] = {
            "reference": reference, "bin_mean_nll": [float(nll[reference][b].mean()) for b in bins],
            "bin_tokens": [int(len(b)) for b in bins], "change": [float(difference[b].mean()) for b in bins]}
    return out


def save_token_nll(path: str, nll: dict[str, np.ndarray], documents: np.ndarray, windows: list[list[int]],
                   source: str, weights: dict[str, np.ndarray] | None = None, controls: dict | None = None) -> None:
    """Write the per-token NLL of every view, the mixing weight per token of every thought view, the document of
    every token and what identifies the held-out set (``.npz``, float32), so that runs (seeds) can be pooled token by
    token and every table be recomputed from it (:func:`load_token_nll`). ``controls``: what each control view is
    (quietstar.report.controls), stored as JSON."""
    np.savez_compressed(path, documents=documents.astype(np.int32),
                        fingerprint=np.array(heldout_fingerprint(windows, source)),
                        controls=np.array(json.dumps(controls or {})),
                        **{f"nll_{name}": values.astype(np.float32) for name, values in nll.items()},
                        **{f"weight_{name}": values.astype(np.float32) for name, values in (weights or {}).items()})


def load_token_nll(path: str) -> dict:
    """What :func:`save_token_nll` wrote: ``{"nll": {view: array}, "weights": {view: array}, "documents",
    "fingerprint", "controls"}``."""
    with np.load(path) as data:
        return {"nll": {key.removeprefix("nll_"): data[key] for key in data.files if key.startswith("nll_")},
                "weights": {key.removeprefix("weight_"): data[key] for key in data.files
                            if key.startswith("weight_")},
                "documents": data["documents"], "fingerprint": str(data["fingerprint"]),
                "controls": json.loads(str(data["controls"])) if "controls" in data.files else {}}


def weight_summaries(weights: dict[str, np.ndarray]) -> dict:
    """quietstar.scoring.weight_summary of every view's per-token mixing weights (NaN: not scored)."""
    return {name: weight_summary(values[np.isfinite(values)]) for name, values in weights.items()}


def heldout_fingerprint(windows: list[list[int]], source: str) -> str:
    """The source, the number of documents and tokens, and a hash of every token id: equal only for the same set."""
    digest = hashlib.sha256(np.concatenate([np.asarray(w, dtype=np.int64) for w in windows]).tobytes()).hexdigest()
    return f"{source}|{len(windows)} documents|{sum(len(w) for w in windows)} tokens|{digest[:16]}"
