"""Next-token log-probabilities for scoring text: after thoughts (mixed, averaged over the N samples), or from the
LM alone. Shared by the evaluations (eval/run.py) and the run report (quietstar.report)."""

from __future__ import annotations

import math

import torch


class ThoughtScorer:
    """Next-token log-probabilities after thoughts: log of the softmax of the mixed logits averaged over
    the N thought samples, ``[B, L, V]`` (position j: the distribution of token j + 1)."""

    def __init__(self, model, generator=None, greedy_thoughts=False):
        self.model, self.generator, self.greedy_thoughts = model, generator, greedy_thoughts

    @torch.no_grad()
    def __call__(self, input_ids, attention_mask, shared_prefix: int = 0):
        """``shared_prefix`` > 0: every row starts with the same that many tokens; their thoughts (which
        see only that prefix) are sampled once and reused, so the rows are compared on equal thoughts."""
        thoughts = self.model.sample_thoughts(input_ids, attention_mask, generator=self.generator,
                                              greedy=self.greedy_thoughts)
        if shared_prefix > 0:
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
