"""Text continuations for the evaluations: thought-aware (``QuietStarForCausalLM.generate``) or from the LM alone,
generated in chunks that stop once every row has reached a stop string or eos. Shared by the GSM8K accuracy
protocol and the lm-eval model's ``generate_until``."""

from __future__ import annotations

import torch


def eos_in(tokenizer, tokens) -> bool:
    return tokenizer.eos_token_id is not None and bool((tokens == tokenizer.eos_token_id).any())


def decode_continuation(tokenizer, tokens) -> str:
    """Text of generated ``tokens`` up to the first eos (later chunks may go on after it)."""
    tokens = tokens.tolist()
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
    return tokenizer.decode(tokens, skip_special_tokens=True)


def generate_until_stop(generate_chunk, ids, mask, max_new_tokens, stop_strings, tokenizer, chunk_tokens=32):
    """Generate ``max_new_tokens`` tokens in chunks, stopping early once every row's continuation holds an
    eos token or one of ``stop_strings``. ``generate_chunk(ids, mask, n) -> [B, width + n']`` continues
    left-padded rows (re-reading the prefix each chunk gives the same distribution as one long call).
    Returns the sequences ``[B, P + M]``."""
    prompt_width, produced = ids.shape[1], 0
    while produced < max_new_tokens:
        n = min(chunk_tokens, max_new_tokens - produced)
        sequences = generate_chunk(ids, mask, n)
        new = sequences[:, ids.shape[1]:]
        if new.shape[1] == 0:
            break
        ids, mask, produced = sequences, torch.cat([mask, torch.ones_like(new)], dim=1), produced + new.shape[1]
        texts = [decode_continuation(tokenizer, row[prompt_width:]) for row in ids]
        ended = [eos_in(tokenizer, row[prompt_width:]) or any(s in text for s in stop_strings)
                 for row, text in zip(ids, texts)]
        if all(ended):
            break
    return ids


class ThoughtTextGenerator:
    """Continuations of texts from thought-aware generation (``QuietStarForCausalLM.generate``)."""

    def __init__(self, model, tokenizer, generator=None, greedy_thoughts=False):
        self.model, self.tokenizer, self.generator, self.greedy_thoughts = model, tokenizer, generator, greedy_thoughts

    def generate_chunk(self, ids, mask, max_new_tokens, do_sample, temperature):
        out = self.model.generate(ids, mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                  temperature=temperature, greedy_thoughts=self.greedy_thoughts,
                                  generator=self.generator, eos_token_id=self.tokenizer.eos_token_id)
        return out.sequences

    @torch.no_grad()
    def __call__(self, texts, max_new_tokens, do_sample, temperature, stop_strings=()):
        self.tokenizer.padding_side = "left"
        enc = self.tokenizer(texts, return_tensors="pt", padding=True)
        device = next(self.model.parameters()).device
        chunk = lambda ids, mask, n: self.generate_chunk(ids, mask, n, do_sample, temperature)  # noqa: E731
        sequences = generate_until_stop(chunk, enc.input_ids.to(device), enc.attention_mask.to(device),
                                        max_new_tokens, stop_strings, self.tokenizer)
        width = enc.input_ids.shape[1]
        return [decode_continuation(self.tokenizer, s[width:]) for s in sequences]


class BaseTextGenerator(ThoughtTextGenerator):
    """Continuations from the LM alone (transformers ``generate``), thought tokens suppressed, no top-k/top-p."""

    def __init__(self, lm, tokenizer, thought_token_ids=()):
        super().__init__(lm, tokenizer)
        self.thought_token_ids = list(thought_token_ids)

    def generate_chunk(self, ids, mask, max_new_tokens, do_sample, temperature):
        extra = dict(temperature=temperature, top_k=0, top_p=1.0) if do_sample else {}
        return self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                   do_sample=do_sample, pad_token_id=self.tokenizer.pad_token_id,
                                   eos_token_id=self.tokenizer.eos_token_id,
                                   suppress_tokens=self.thought_token_ids or None, **extra)
