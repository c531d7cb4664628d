"""Next-token log-probabilities for scoring text: after thoughts, or from the LM alone. Shared by the evaluations
(quietstar.evaluation), the lm-eval model and the run report (quietstar.report).

Thoughts for scoring come from a :class:`ThoughtSource`, one of :data:`THOUGHT_SOURCES`:

- ``sampled``: the model's own thoughts (the real thing);
- ``null``: every thought replaced by filler. The mixing path without information; since the model never saw
  filler in training (unless trained with it), real − null also measures that filler is off-distribution;
- ``other_document``: each position gets the thought sampled at the same text position of another document of the
  batch (a random derangement of the rows): in-distribution thoughts that know nothing about this document. Real −
  other-document is the measure of what a thought says about its own text;
- ``causal_shuffle``: each position j gets the thought sampled at a position j' <= j - gap of its own row, drawn
  uniformly (gap = A + 1 for a model trained with A lookahead tokens), so the thought saw none of the tokens it is
  scored on and none it was trained to predict there.

A position with no such thought (the other document is shorter; j < gap) is not scored: its log-probabilities are
NaN, and comparisons leave it out and count it. A model that thinks at a fraction q < 1 of the positions
(``thought_fraction``) is scored as it trains: every view's thoughts act only at the anchors the training rule
chooses from the text (:func:`scoring_anchors`), and every other position takes the text path's prediction (w = 0).
A scorer uses one thought per position unless asked to average the N thoughts (an ensemble, which gains by Jensen's
inequality alone and must be labelled as such).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .anchors import anchor_mask, at_anchors, into_positions
from .thoughts import text_anchors
from .vocab import mask_thought_tokens

THOUGHT_SOURCES = ("sampled", "null", "other_document", "causal_shuffle")
WEIGHT_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def configure_for_scoring(model, num_thoughts: int = 1, num_thought_tokens: int | None = None) -> None:
    """Set ``model`` up for scoring: A = 1 (only the s = 0 prediction is scored, and it does not depend on A), N =
    ``num_thoughts`` (1 unless an ensemble is wanted), T = ``num_thought_tokens`` (None: the model's)."""
    if num_thoughts < 1:
        raise ValueError(f"num_thoughts must be >= 1, got {num_thoughts}.")
    model.set_thought_lengths(num_thought_tokens=num_thought_tokens, num_lookahead_tokens=1, num_thoughts=num_thoughts)


def null_thoughts(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Every thought as T copies of the filler token (the first token of ``thought_init_text``, "---" by default):
    ``[B, N, L, T]``."""
    cfg = model.quietstar_config
    B, L = input_ids.shape
    return input_ids.new_full((B, cfg.num_thoughts, L, cfg.num_thought_tokens), model.filler_token_id)


def document_derangement(num_rows: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniformly random permutation of ``range(num_rows)`` with no fixed point (``[B]``; row b takes from
    ``partner[b]``). One row has no other document: ValueError."""
    if num_rows < 2:
        raise ValueError("other_document needs at least two documents in a batch; score with batch_size >= 2.")
    while True:  # rejection: about e tries on average
        partner = torch.randperm(num_rows, generator=generator)
        if not bool((partner == torch.arange(num_rows)).any()):
            return partner


def other_document_sources(key_padding: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """Where each position's thought comes from: ``[B, L]`` column of row ``partner[b]`` holding the partner's token at
    the same text position (the k-th real token of both rows), -1 where the partner has no k-th token or position j
    is padding. ``key_padding [B, L]`` bool, ``partner [B]``."""
    B, L = key_padding.shape
    sources = torch.full((B, L), -1, dtype=torch.long)
    columns = [key_padding[row].nonzero().flatten().cpu() for row in range(B)]
    for row in range(B):
        own, theirs = columns[row], columns[int(partner[row])]
        shared = min(len(own), len(theirs))
        sources[row, own[:shared]] = theirs[:shared]
    return sources.to(key_padding.device)


def causal_sources(key_padding: torch.Tensor, gap: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Where each position's thought comes from in a causal shuffle: ``[B, L]``, for real position j a real column j'
    of the same row with j' <= j - ``gap`` drawn uniformly, -1 where there is none (the first ``gap`` real
    positions) or j is padding."""
    if gap < 1:
        raise ValueError(f"The causal gap must be >= 1 (a thought from an earlier position), got {gap}.")
    B, L = key_padding.shape
    sources = torch.full((B, L), -1, dtype=torch.long)
    for row in range(B):
        columns = key_padding[row].nonzero().flatten().cpu()
        for k in range(gap, len(columns)):
            # columns[:k - gap + 1] are the real positions at least gap tokens before the k-th (rows are contiguous).
            pick = torch.randint(0, k - gap + 1, (1,), generator=generator)
            sources[row, columns[k]] = columns[pick]
    return sources.to(key_padding.device)


def gather_thoughts(thoughts: torch.Tensor, rows: torch.Tensor, sources: torch.Tensor, filler: torch.Tensor):
    """``(moved [B, N, L, T], usable [B, L])``: position (b, j) holds ``thoughts[rows[b], :, sources[b, j]]``, or
    ``filler [B, N, L, T]`` where ``sources`` is -1 (not usable). ``rows [B]``, ``sources [B, L]``."""
    usable = sources >= 0
    picked = thoughts[rows[:, None], :, sources.clamp(min=0)]  # [B, L, N, T]
    moved = torch.where(usable[:, None, :, None], picked.transpose(1, 2), filler)
    return moved, usable


class ThoughtSource:
    """Thoughts for a batch: ``source.get(kind)(input_ids, attention_mask) -> (thoughts [B, N, L, T], usable [B, L])``;
    ``usable`` is False where the kind has no thought for a position (see the module docstring).

    The sampled thoughts of the last batch are kept, so the views that share one ``ThoughtSource`` see the same draw
    (paired comparisons): other_document and causal_shuffle move exactly the thoughts the real view used.
    ``causal_gap``: the gap of causal_shuffle (A + 1 for a model trained with A lookahead tokens).
    """

    def __init__(self, model, generator: torch.Generator | None = None, greedy: bool = False, causal_gap: int = 2):
        self.model, self.generator, self.greedy, self.causal_gap = model, generator, greedy, causal_gap
        self._last = None  # (ids, mask, thoughts)

    def sampled(self, input_ids, attention_mask):
        last = self._last
        if last is None or not (torch.equal(last[0], input_ids) and torch.equal(last[1], attention_mask)):
            thoughts = self.model.sample_thoughts(input_ids, attention_mask, generator=self.generator,
                                                  greedy=self.greedy)
            self._last = last = (input_ids, attention_mask, thoughts)
        return last[2]

    def _cpu_generator(self):
        """Index draws run on the CPU; a CUDA generator seeds a CPU one so they stay reproducible."""
        if self.generator is None or self.generator.device.type == "cpu":
            return self.generator
        return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=self.generator,
                                                              device=self.generator.device)))

    def other_document(self, input_ids, attention_mask):
        thoughts = self.sampled(input_ids, attention_mask)
        key_padding = attention_mask.bool()
        partner = document_derangement(input_ids.shape[0], self._cpu_generator()).to(input_ids.device)
        sources = other_document_sources(key_padding, partner)
        return gather_thoughts(thoughts, partner, sources, null_thoughts(self.model, input_ids))

    def causal_shuffle(self, input_ids, attention_mask):
        thoughts = self.sampled(input_ids, attention_mask)
        sources = causal_sources(attention_mask.bool(), self.causal_gap, self._cpu_generator())
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return gather_thoughts(thoughts, rows, sources, null_thoughts(self.model, input_ids))

    def get(self, kind: str):
        """The function giving ``(thoughts, usable)`` of ``kind`` for a batch."""
        everywhere = lambda ids: torch.ones(ids.shape, dtype=torch.bool, device=ids.device)  # noqa: E731
        if kind == "sampled":
            return lambda ids, mask: (self.sampled(ids, mask), everywhere(ids))
        if kind == "null":
            return lambda ids, mask: (null_thoughts(self.model, ids), everywhere(ids))
        if kind == "other_document":
            return self.other_document
        if kind == "causal_shuffle":
            return self.causal_shuffle
        raise ValueError(f"Unknown thought source {kind!r}; use one of {', '.join(THOUGHT_SOURCES)}.")


def thinks_at_anchors(model) -> bool:
    """Whether ``model`` thinks at anchors only: ``thought_fraction`` < 1 with sampled thoughts (a model trained with
    filler thoughts chose no anchors; it thought everywhere)."""
    cfg = model.quietstar_config
    return cfg.thought_fraction < 1 and cfg.thoughts == "sampled"


def scoring_anchors(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Where a model with ``thought_fraction`` q < 1 thinks when scoring: ``anchors [B, M]``
    (quietstar.anchors), the ceil(q * n_b) positions of row b (n_b real tokens) of highest next-token entropy of
    its text path, among the positions whose next token is real: training's rule, with the one token scoring reads
    ahead in place of training's A (quietstar.thoughts.text_anchors)."""
    return text_anchors(model, input_ids, attention_mask.bool(), has_real_next_token(attention_mask))


def has_real_next_token(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` bool: real positions whose next token is real too (the positions a next-token score exists for)."""
    real = attention_mask.bool()
    out = real.clone()
    out[:, :-1] &= real[:, 1:]
    out[:, -1] = False
    return out


def weight_summary(weights: np.ndarray) -> dict:
    """The mixing weight w over scored positions: ``{"positions", "mean", "q05", "q25", "q50", "q75", "q95"}``."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.size == 0:
        return {"positions": 0}
    quantiles = np.quantile(weights, WEIGHT_QUANTILES)
    return {"positions": int(weights.size), "mean": float(weights.mean()),
            **{f"q{round(100 * q):02d}": float(v) for q, v in zip(WEIGHT_QUANTILES, quantiles)}}


class ThoughtScorer:
    """Next-token log-probabilities after thoughts ``[B, L, V]`` (position j: the distribution of token j + 1; NaN
    where the thought source has no thought for j).

    ``thoughts``: one of :data:`THOUGHT_SOURCES` (see the module docstring); ``source``: a shared
    :class:`ThoughtSource` (for paired views), by default one of this scorer's own. ``ensemble``: average the
    probabilities of the model's N thoughts (the paper protocol; labelled an ensemble); otherwise the model must think
    one thought per position (``model.set_thought_lengths(num_thoughts=1)``). ``zero_weight``: the mixing weight
    forced to 0, i.e. the text-path logits of the same expanded forward (``out.base_logits``): the trained model's own
    LM, which is the base model only when the text path was protected (never the base model by assignment). Its
    thoughts are filler: the text path does not attend to them.

    A model that thinks at anchors only (:func:`thinks_at_anchors`) is scored there with thoughts and with its text
    path's prediction elsewhere (:func:`scoring_anchors`; w = 0 there); ``last_anchors [B, L]`` holds the last batch's
    anchors (None for a model that thinks everywhere).

    ``weights`` collects the mixing weight w (s = 0, every thought) at each scored position: a real position with a
    real next token (:func:`weight_summary` summarises it); ``last_weights [B, L]``: the last batch's w (the mean of
    the N thoughts'), NaN where not usable.
    """

    def __init__(self, model, generator=None, greedy_thoughts=False, thoughts: str = "sampled",
                 source: ThoughtSource | None = None, ensemble: bool = False, zero_weight: bool = False):
        if not ensemble and model.quietstar_config.num_thoughts != 1:
            raise ValueError(f"The model thinks N = {model.quietstar_config.num_thoughts} thoughts per position; score "
                             "with one (model.set_thought_lengths(num_thoughts=1)) or pass ensemble=True to average "
                             "them (an ensemble gains by averaging alone; label it so).")
        self.model, self.ensemble, self.zero_weight = model, ensemble, zero_weight
        source = source or ThoughtSource(model, generator, greedy_thoughts)
        self.source = source.get("null" if zero_weight else thoughts)
        self.weights: list[np.ndarray] = []
        self.last_weights: torch.Tensor | None = None
        self.last_anchors: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, input_ids, attention_mask, shared_prefix: int = 0):
        """``shared_prefix`` > 0: every row starts with the same that many tokens; their thoughts (which
        see only that prefix) are the first row's, so the rows are compared on equal thoughts."""
        thoughts, usable = self.source(input_ids, attention_mask)
        if shared_prefix > 0:
            thoughts = thoughts.clone()
            thoughts[:, :, :shared_prefix] = thoughts[:1, :, :shared_prefix]
        anchors = None
        if not self.zero_weight and thinks_at_anchors(self.model):
            anchors = scoring_anchors(self.model, input_ids, attention_mask)  # [B, M]
            thoughts = at_anchors(thoughts.transpose(1, 2), anchors).transpose(1, 2)  # [B, N, M, T]
            self.last_anchors = anchor_mask(anchors, input_ids.shape[1])
        out = self.model(input_ids, attention_mask=attention_mask, thoughts=thoughts, anchors=anchors,
                         output_logits=False)
        if self.zero_weight:
            log_probs = mask_thought_tokens(out.base_logits, self.model.thought_token_ids).float().log_softmax(-1)
        else:
            weights = out.mixing_weights[..., 0].float()  # [B, N, L or M], s = 0
            log_probs = out.logits[:, :, :, 0].float().log_softmax(-1)  # [B, N, L or M, V]
            if anchors is not None:  # the text path's prediction (w = 0) wherever the model does not think
                text = mask_thought_tokens(out.base_logits, self.model.thought_token_ids).float().log_softmax(-1)
                log_probs = into_positions(text[:, None].expand(-1, log_probs.shape[1], -1, -1), log_probs, anchors)
                weights = into_positions(torch.zeros_like(log_probs[..., :1]), weights[..., None], anchors)[..., 0]
            self.last_weights = weights.mean(dim=1).masked_fill(~usable, float("nan"))
            scored = has_real_next_token(attention_mask) & usable
            self.weights.append(weights.transpose(1, 2)[scored].flatten().cpu().numpy())
            log_probs = torch.logsumexp(log_probs, dim=1) - math.log(log_probs.shape[1])
        return log_probs.masked_fill(~usable[..., None], float("nan"))

    def weight_summary(self) -> dict:
        """:func:`weight_summary` of every weight this scorer has collected."""
        return weight_summary(np.concatenate(self.weights) if self.weights else np.zeros(0))


class BaseScorer:
    """Next-token log-probabilities of the LM alone (no thoughts), thought tokens excluded, ``[B, L, V]``."""

    def __init__(self, lm, thought_token_ids=()):
        self.lm, self.thought_token_ids = lm, list(thought_token_ids)

    @torch.no_grad()
    def __call__(self, input_ids, attention_mask, shared_prefix: int = 0):
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        if self.thought_token_ids:
            logits[..., self.thought_token_ids] = float("-inf")
        return logits.log_softmax(-1)
