"""Which tokens an answer is made of, found for any tokenizer by tokenizing in context: the renormalisation set
of the paper score, and where an answer starts in a tokenized prompt."""

from __future__ import annotations

import re

from .data import TASKS
from .prompts import ANSWER_MARKER, CSQA_LABELS


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def answer_token_span(tokenizer, prompt: str, answer: str) -> tuple[list[int], int]:
    """Token ids of ``prompt + answer`` (with the tokenizer's special tokens) and the index of the first
    answer token: where that tokenization stops agreeing with the prompt's own."""
    prompt_ids = tokenizer(prompt).input_ids
    ids = tokenizer(prompt + answer).input_ids
    return ids, common_prefix_length(prompt_ids, ids)


def token_surfaces(tokenizer, context_ids: list[int], token_ids) -> dict[int, str]:
    """The text each token adds when decoded right after ``context_ids`` (so a leading-space marker such as
    ``"▁"`` or ``"Ġ"`` becomes a real space, and byte tokens like ``<0x0A>`` their character)."""
    head = tokenizer.decode(context_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    surfaces = {}
    for t in token_ids:
        text = tokenizer.decode(list(context_ids) + [t], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        surfaces[t] = text[len(head):] if text.startswith(head) else None
    return surfaces


def valid_answer_tokens(tokenizer, task: str, labels=CSQA_LABELS) -> list[int]:
    """Ids of the tokens an answer is made of, for any tokenizer: the renormalisation set of the paper score.

    Method ("tokenize in context"): tokenize probe answers exactly as they appear after the answer marker,
    ``"Q: ...\\nA:" + answer + "\\n"``; probes are every number 0..9999 (also written with thousands commas
    from 1,000) for GSM8K and every choice letter for CommonsenseQA. Of the tokens after the prompt, keep
    those whose text in context (:func:`token_surfaces`) is made only of digits (resp. is one choice
    letter), with at most one leading space, and those that are exactly ``"\\n"``. So:
    - per-digit tokenizers (Mistral/Llama sentencepiece, Qwen, SmolLM2, the byte tokenizer) give the ten
      digit tokens and the newline token; a separate space token (``"▁"``) is not valid and is skipped;
      for Mistral-7B this is exactly the official list (digits 28734..28787 and 13; letters 330, 365, 334,
      384, 413 = ``"▁A"`` .. ``"▁E"`` and 13);
    - tokenizers with leading-space tokens give ``" A"``-style tokens (``"ĠA"``), and number-merging ones
      (GPT-2, Llama-3) also their multi-digit tokens (``"Ġ42"``, ``"123"``) as produced for those probes;
    - byte-fallback duplicates (``<0x34>`` for ``"4"``) are never produced in context, so they are not valid.
    """
    if task == "gsm8k":
        context, pattern = "Q: 1 + 1?" + ANSWER_MARKER, re.compile(r" ?[0-9]+")
        probes = [f" {n}\n" for n in range(10000)] + [f" {n:,}\n" for n in range(1000, 10000)]
    elif task == "commonsense_qa":
        context = "Q: ?\n" + "\n".join(f"({x}) a" for x in labels) + ANSWER_MARKER
        pattern = re.compile(" ?(" + "|".join(re.escape(x) for x in labels) + ")")
        probes = [f" {x}\n" for x in labels]
    else:
        raise ValueError(f"Unknown task {task!r}; valid tasks: {', '.join(TASKS)}.")
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    seen = set()
    for ids in tokenizer([context + p for p in probes], add_special_tokens=False).input_ids:
        seen.update(ids[common_prefix_length(context_ids, ids):])
    anchor = context_ids[-1:]
    surfaces = token_surfaces(tokenizer, anchor, sorted(seen))
    return sorted(t for t, s in surfaces.items() if s is not None and (s == "\n" or pattern.fullmatch(s)))
