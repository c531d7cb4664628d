"""The texts the protocols show the model and how answers are read back from what it writes (the official
``eval_helpers.py`` and ``zero-shotcot-eval.py`` of Quiet-STaR)."""

from __future__ import annotations

import re
from collections import Counter

ANSWER_MARKER = "\nA:"
COT_PROMPT_SUFFIX = "\nA: Let's think step by step."
FINAL_ANSWER_TEXT = "\nTherefore, the answer (arabic numerals) is"
REASONING_STOP_STRINGS = ("Q:", "\n\n\n")
CSQA_LABELS = ("A", "B", "C", "D", "E")


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


def cot_prompt(row: dict) -> str:
    """The GSM8K zero-shot chain-of-thought prompt ``"Q: {question}\\nA: Let's think step by step."``."""
    return "Q: " + row["question"] + COT_PROMPT_SUFFIX


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
