"""The two evaluation protocols; each returns ``(score, per-item records)``.

``paper``: the paper's zero-shot protocol (official ``eval_helpers.py``). The text is
``"Q: " + question + "\\nA:" + answer + "\\n"`` with answer = what follows ``####`` in GSM8K (``" 42"``)
and ``" X"`` in CommonsenseQA, whose question lists its choices as ``"(A) ...\\n(B) ..."``. The score of an
item is the product, over the tokens after the prompt, of the probability of the true token renormalised
over the *valid answer tokens* (:func:`~quietstar.evaluation.answer_tokens.valid_answer_tokens`); tokens outside
that set (a lone space, ``,`` or ``-``) are skipped, as the official code does. The reported score is the mean
over items. The log-probabilities come from a scorer of :mod:`quietstar.scoring` (thought-mixed, or the LM alone).

``accuracy``: GSM8K zero-shot chain of thought (official ``zero-shotcot-eval.py``): prompt
``"Q: {question}\\nA: Let's think step by step."``, generate up to ``max_reasoning_tokens`` (cut at a new
``"Q:"`` or ``"\\n\\n\\n"``), append ``"\\nTherefore, the answer (arabic numerals) is"``, generate
``answer_tokens`` more; the answer is the first integer there (commas removed, sign ignored, as the
official code); majority vote over ``votes`` samples (greedy when 1). CommonsenseQA: the paper prompt with its
listed choices, each option ``" A"`` .. ``" E"`` scored by the sum of its tokens' log-probabilities; highest wins.
Thoughts over the shared prompt are sampled once per question and reused for every option.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..padding import right_pad
from .answer_tokens import answer_token_span, common_prefix_length, valid_answer_tokens
from .prompts import (ANSWER_MARKER, CSQA_LABELS, FINAL_ANSWER_TEXT, REASONING_STOP_STRINGS, cot_prompt,
                      csqa_question_text, cut_reasoning, extract_first_integer, gsm8k_gold_text, majority_vote,
                      paper_prompt_and_answer)

PROTOCOLS = ("paper", "accuracy")


# ------------------------------------------------------------------------------------ paper protocol
def paper_item_score(log_probs: torch.Tensor, ids: list[int], start: int, valid: torch.Tensor, tokenizer) -> dict:
    """Score of one item from its ``log_probs [L, V]``: the product over answer tokens ``ids[start:]`` that
    are valid of the true token's probability renormalised over ``valid`` (a LongTensor of token ids)."""
    valid_set = set(valid.tolist())
    log_score, scored, skipped = 0.0, [], []
    for t in range(start, len(ids)):
        token = ids[t]
        if token not in valid_set:
            skipped.append(tokenizer.decode([token]))
            continue
        row = log_probs[t - 1]
        log_score += float(row[token] - torch.logsumexp(row[valid], dim=0))
        scored.append(tokenizer.decode([token]))
    return {"score": math.exp(log_score), "log_score": log_score, "scored_tokens": scored, "skipped_tokens": skipped}


def run_paper(task, rows, scorer, tokenizer, batch_size, device) -> tuple[float, list[dict]]:
    """Mean over items of the renormalised probability of the gold answer (see the module docstring)."""
    valid = torch.tensor(valid_answer_tokens(tokenizer, task), device=device)
    records = []
    for begin in tqdm(range(0, len(rows), batch_size), desc=f"{task} paper", unit="batch"):
        batch = rows[begin : begin + batch_size]
        spans = [answer_token_span(tokenizer, *paper_prompt_and_answer(task, row)) for row in batch]
        ids, mask = right_pad([s[0] for s in spans], tokenizer.pad_token_id, device)
        log_probs = scorer(ids, mask)
        for offset, (row, (item_ids, start)) in enumerate(zip(batch, spans)):
            gold = gsm8k_gold_text(row).strip() if task == "gsm8k" else row["answer_key"]
            record = {"index": begin + offset, "gold": gold}
            record.update(paper_item_score(log_probs[offset], item_ids, start, valid, tokenizer))
            records.append(record)
    score = sum(r["score"] for r in records) / len(records)
    return score, records


# --------------------------------------------------------------------------------- accuracy protocol
def run_csqa_accuracy(rows, scorer, tokenizer, device, labels=CSQA_LABELS) -> tuple[float, list[dict]]:
    """Pick the option ``" X"`` with the highest summed log-probability after the paper prompt."""
    records = []
    for index, row in enumerate(tqdm(rows, desc="commonsense_qa accuracy", unit="question")):
        prompt = csqa_question_text(row) + ANSWER_MARKER
        options = list(row["labels"]) or list(labels)
        spans = [answer_token_span(tokenizer, prompt, " " + label) for label in options]
        ids, mask = right_pad([s[0] for s in spans], tokenizer.pad_token_id, device)
        shared = min(common_prefix_length(spans[0][0], s[0]) for s in spans)
        log_probs = scorer(ids, mask, shared_prefix=shared)
        scores = {}
        for row_index, (label, (item_ids, start)) in enumerate(zip(options, spans)):
            scores[label] = sum(float(log_probs[row_index, t - 1, item_ids[t]]) for t in range(start, len(item_ids)))
        prediction = max(options, key=lambda label: scores[label])
        records.append({"index": index, "gold": row["answer_key"], "prediction": prediction,
                        "correct": prediction == row["answer_key"], "option_logprobs": scores})
    return sum(r["correct"] for r in records) / len(records), records


def run_gsm8k_accuracy(rows, text_generator, batch_size, votes, temperature, max_reasoning_tokens,
                       answer_tokens) -> tuple[float, list[dict]]:
    """Zero-shot chain of thought with a majority vote over ``votes`` samples per problem; ``text_generator`` is
    one of :mod:`quietstar.evaluation.generators`."""
    do_sample = votes > 1
    per_batch = max(1, batch_size // votes)
    records = []
    for begin in tqdm(range(0, len(rows), per_batch), desc="gsm8k accuracy", unit="batch"):
        batch = rows[begin : begin + per_batch]
        prompts = [cot_prompt(row) for row in batch for _ in range(votes)]
        reasoning = [cut_reasoning(t) for t in text_generator(prompts, max_reasoning_tokens, do_sample, temperature,
                                                               REASONING_STOP_STRINGS)]
        final_prompts = [(p + r).rstrip() + FINAL_ANSWER_TEXT for p, r in zip(prompts, reasoning)]
        answers = text_generator(final_prompts, answer_tokens, do_sample, temperature)
        for offset, row in enumerate(batch):
            chunk = slice(offset * votes, (offset + 1) * votes)
            extracted = [extract_first_integer(a) for a in answers[chunk]]
            prediction = majority_vote(extracted)
            gold = extract_first_integer(row["answer"].split("#### ")[-1])
            records.append({"index": begin + offset, "gold": gold, "prediction": prediction,
                            "correct": prediction is not None and prediction == gold, "votes": extracted,
                            "samples": [r.rstrip() + FINAL_ANSWER_TEXT + a
                                        for r, a in zip(reasoning[chunk], answers[chunk])]})
    return sum(r["correct"] for r in records) / len(records), records
