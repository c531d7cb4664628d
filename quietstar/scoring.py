"""Next-token log-probabilities for scoring text: after thoughts, or from the LM alone. Shared by the evaluations
(quietstar.evaluation), the lm-eval model and the run report (quietstar.report).

Thoughts for scoring come from a :class:`ThoughtSource`: sampled by the model (the real thing), null (every thought
replaced by filler: the mixing path without information, the first control) or shuffled (the same sampled thoughts
moved to other positions of the same row: thoughts without information about their own position, the second
control). A scorer uses one thought per position unless asked to average the N thoughts (an ensemble, which gains
by Jensen's inequality alone and must be labelled as such).
"""

from __future__ import annotations

import math

import torch

THOUGHT_SOURCES = ("sampled", "null", "shuffled")


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


def shuffle_positions(thoughts: torch.Tensor, key_padding: torch.Tensor, generator: torch.Generator | None = None):
    """The thoughts ``[B, N, L, T]`` moved among the real positions of their own row (``key_padding [B, L]``): a
    random cycle through all of them, so no thought stays where it was (rows with one real position excepted)."""
    out = thoughts.clone()
    for row in range(thoughts.shape[0]):
        columns = key_padding[row].nonzero().flatten()
        if len(columns) < 2:
            continue
        order = columns[torch.randperm(len(columns), generator=generator, device="cpu").to(columns.device)]
        # order[i] receives the thought of order[i + 1]: one cycle through every real position.
        out[row, :, order] = thoughts[row, :, order.roll(-1)]
    return out


class ThoughtSource:
    """Thoughts for a batch: ``source(input_ids, attention_mask) -> [B, N, L, T]``.

    The sampled thoughts of the last batch are kept, so "sampled" and "shuffled" sources that share one
    ``ThoughtSource`` see the same draw (paired comparisons). ``kind``: one of THOUGHT_SOURCES.
    """

    def __init__(self, model, generator: torch.Generator | None = None, greedy: bool = False):
        self.model, self.generator, self.greedy = model, generator, greedy
        self._last = None  # (ids, mask, thoughts)

    def sampled(self, input_ids, attention_mask):
        last = self._last
        if last is None or not (torch.equal(last[0], input_ids) and torch.equal(last[1], attention_mask)):
            thoughts = self.model.sample_thoughts(input_ids, attention_mask, generator=self.generator,
                                                  greedy=self.greedy)
            self._last = last = (input_ids, attention_mask, thoughts)
        return last[2]

    def get(self, kind: str):
        """The function giving thoughts of ``kind`` for a batch."""
        if kind == "sampled":
            return self.sampled
        if kind == "null":
            return lambda ids, mask: null_thoughts(self.model, ids)
        if kind == "shuffled":
            return lambda ids, mask: shuffle_positions(self.sampled(ids, mask), mask.bool(), self.generator)
        raise ValueError(f"Unknown thought source {kind!r}; use one of {THOUGHT_SOURCES}.")


class ThoughtScorer:
    """Next-token log-probabilities after thoughts ``[B, L, V]`` (position j: the distribution of token j + 1).

    ``thoughts``: "sampled", "null" or "shuffled" (see the module docstring); ``source``: a shared
    :class:`ThoughtSource` (for paired views), by default one of this scorer's own. ``ensemble``: average the
    probabilities of the model's N thoughts (the paper protocol; labelled an ensemble); otherwise the model must think
    one thought per position (``model.set_thought_lengths(num_thoughts=1)``).
    """

    def __init__(self, model, generator=None, greedy_thoughts=False, thoughts: str = "sampled",
                 source: ThoughtSource | None = None, ensemble: bool = False):
        if not ensemble and model.quietstar_config.num_thoughts != 1:
            raise ValueError(f"The model thinks N = {model.quietstar_config.num_thoughts} thoughts per position; score "
                             "with one (model.set_thought_lengths(num_thoughts=1)) or pass ensemble=True to average "
                             "them (an ensemble gains by averaging alone; label it so).")
        self.model, self.ensemble = model, ensemble
        self.source = (source or ThoughtSource(model, generator, greedy_thoughts)).get(thoughts)

    @torch.no_grad()
    def __call__(self, input_ids, attention_mask, shared_prefix: int = 0):
        """``shared_prefix`` > 0: every row starts with the same that many tokens; their thoughts (which
        see only that prefix) are the first row's, so the rows are compared on equal thoughts."""
        thoughts = self.source(input_ids, attention_mask)
        if shared_prefix > 0:
            thoughts = thoughts.clone()
            thoughts[:, :, :shared_prefix] = thoughts[:1, :, :shared_prefix]
        out = self.model(input_ids, attention_mask=attention_mask, thoughts=thoughts, output_logits=False)
        log_probs = out.logits[:, :, :, 0].float().log_softmax(-1)  # [B, N, L, V]
        return torch.logsumexp(log_probs, dim=1) - math.log(log_probs.shape[1])


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
