"""Export a Quiet-STaR checkpoint as a Hub-ready folder with a model card, and optionally push it.

    quietstar-export CHECKPOINT OUT [--merge-lora] [--push-to-hub REPO [--private]] [--overwrite]
                     [--eval-results FILE ...] [--base-model HUB_ID] [--license ID]
    (from a checkout: python scripts/export.py CHECKPOINT OUT ...)

The command and the library functions it runs (:func:`export`, :func:`push_to_hub`). An export holds what
:meth:`QuietStarForCausalLM.save_pretrained` writes (quietstar/checkpoint.py) and nothing of the training state:

- ``config.json``, ``generation_config.json``, ``model.safetensors`` (or an index and its shards) and the tokenizer
  files: a stock transformers LM folder that loads with ``AutoModelForCausalLM``; the vocabulary includes
  <|startofthought|> and <|endofthought|>, whose embedding rows hold the trained thought vectors;
- ``quietstar.safetensors`` (thought embeddings, mixing head) and ``quietstar_config.json``, with which
  ``QuietStarForCausalLM.from_pretrained`` loads the thinking model;
- ``README.md``, the model card (quietstar/report/model_card.py).

LoRA: a checkpoint whose LM was trained through a peft LoRA adapter keeps it in ``CHECKPOINT/adapter/``.
``--merge-lora`` (``merge_lora=True``) merges it into the LM (``merge_and_unload``) and writes the merged full LM.
Adapters that act on thought tokens only (``text_path: thought_lora``) cannot be merged (merged, they would change
every text prediction): their export keeps ``adapter/`` beside the unchanged base LM, and merging is refused.

On bad input the command exits non-zero with a one-line error; the functions raise :class:`ExportError`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import sys
import tempfile

from huggingface_hub import HfApi
from huggingface_hub.errors import HFValidationError, HfHubHTTPError
from huggingface_hub.utils import httpx, validate_repo_id
from transformers.utils import logging as transformers_logging

from ..checkpoint import (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, CONFIG_FILE, GENERATION_CONFIG_FILE,
                          LM_CONFIG_FILE, WEIGHTS_FILE, Checkpoint, CheckpointError, find_lora_adapter,
                          read_checkpoint)
from ..files import replace_folder
from ..lora import ADAPTER_FOLDER
from ..modeling import QuietStarForCausalLM
from ..report.model_card import find_eval_results, read_eval_result, read_log_history, write_model_card


class ExportError(Exception):
    """A bad checkpoint, destination or push, in one line that names the file, folder or repository."""


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


@contextlib.contextmanager
def _as_export_errors():
    """A missing or corrupt file (quietstar.checkpoint.CheckpointError) as an ExportError with its message."""
    try:
        yield
    except CheckpointError as error:
        raise ExportError(str(error)) from error


def _write_model_files(checkpoint: Checkpoint, staging: str) -> None:
    """Copy the LM, the Quiet-STaR files and the tokenizer (re-saved) of ``checkpoint`` into ``staging``."""
    names = [LM_CONFIG_FILE, *checkpoint.weight_files, WEIGHTS_FILE, CONFIG_FILE]
    if os.path.isfile(os.path.join(checkpoint.folder, GENERATION_CONFIG_FILE)):
        names.append(GENERATION_CONFIG_FILE)
    for name in names:
        shutil.copyfile(os.path.join(checkpoint.folder, name), os.path.join(staging, name))
    checkpoint.tokenizer.save_pretrained(staging)


def _write_merged_model(checkpoint: Checkpoint, staging: str) -> None:
    """Load the Quiet-STaR model with its LoRA adapter, merge the adapter into the LM, save into ``staging``."""
    model = QuietStarForCausalLM.from_pretrained(checkpoint.folder, dtype="auto")  # attaches the adapter
    model.merge_lora()
    model.save_pretrained(staging)


def _check_destination(checkpoint: str, out: str, overwrite: bool) -> None:
    if os.path.lexists(out) and not overwrite:
        raise ExportError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it.")
    real_checkpoint, real_out = os.path.realpath(checkpoint), os.path.realpath(out)
    if real_checkpoint == real_out or real_checkpoint.startswith(real_out + os.sep):
        raise ExportError(f"Exporting to {out} would replace the checkpoint {checkpoint}; choose another folder.")


def export(checkpoint: str | os.PathLike, out: str | os.PathLike, merge_lora: bool = False, overwrite: bool = False,
           eval_results: list[str | os.PathLike] = (), base_model: str | None = None, license: str | None = None,
           repo_id: str | None = None) -> str:
    """Export the Quiet-STaR save ``checkpoint`` to the folder ``out`` (module docstring); return its path.

    The checkpoint is validated first (:func:`read_checkpoint`). ``merge_lora`` merges the LoRA adapter in
    ``checkpoint/adapter/`` into the LM; a checkpoint with an adapter needs it, one without refuses it.
    ``eval_results``: JSON files of quietstar-eval (eval/run.py), added to those found in the checkpoint.
    ``base_model``, ``license``, ``repo_id``: for the model card. The folder is built beside ``out`` and renamed into place:
    an existing ``out`` is refused unless ``overwrite``, and a failed export leaves it untouched.
    """
    checkpoint, out = os.path.abspath(checkpoint), os.path.abspath(out)
    _check_destination(checkpoint, out, overwrite)
    with _as_export_errors():
        checked = read_checkpoint(checkpoint)
        adapter = find_lora_adapter(checkpoint)
    thought_only = adapter is not None and checked.saved.config.text_path == "thought_lora"
    if merge_lora and thought_only:
        raise ExportError(f"{checkpoint} has LoRA adapters that act on thought tokens only (text_path: thought_lora); "
                          "merged into the LM they would change every text prediction. Export without merge_lora "
                          "(--merge-lora): the adapter is kept in adapter/ beside the unchanged base LM.")
    if merge_lora and adapter is None:
        raise ExportError(f"merge_lora was asked but {checkpoint} has no LoRA adapter (expected "
                          f"{ADAPTER_FOLDER}/{ADAPTER_CONFIG_FILE} and {ADAPTER_FOLDER}/{ADAPTER_WEIGHTS_FILE}).")
    if adapter is not None and not merge_lora and not thought_only:
        raise ExportError(f"{checkpoint} has a LoRA adapter in {adapter}; pass merge_lora=True (--merge-lora) to "
                          "merge it into the exported LM, which would otherwise lose it.")
    base_model = base_model or checked.saved.base_model
    with _as_export_errors():
        results = find_eval_results(checkpoint) + [read_eval_result(path) for path in eval_results]
        log_history = read_log_history(checkpoint)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.exporting-", dir=os.path.dirname(out))
    try:
        if adapter is None or thought_only:
            _write_model_files(checked, staging)
            if thought_only:
                shutil.copytree(adapter, os.path.join(staging, ADAPTER_FOLDER))
        else:
            _write_merged_model(checked, staging)
        write_model_card(staging, name=os.path.basename(out), repo_id=repo_id, base_model=base_model,
                         license=license, log_history=log_history, eval_results=results)
        os.chmod(staging, 0o755)
        replace_folder(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def push_to_hub(folder: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Upload the export in ``folder`` to the model repository ``repo_id`` (created if needed); return its URL.

    ``token``: a Hugging Face token (default: the logged-in one). Failures raise ExportError saying whether the
    Hub was unreachable or refused; the local folder is never modified.
    """
    folder = os.path.abspath(folder)
    with _as_export_errors():
        read_checkpoint(folder)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ExportError(f"{repo_id!r} is not a Hub repository id ({_one_line(error)}).") from error
    later = (f"the exported folder at {folder} is intact; push it later with `hf upload {repo_id} "
             f"{shlex.quote(folder)} .{' --private' if private else ''}`.")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message="Upload Quiet-STaR model")
    except HfHubHTTPError as error:  # the Hub answered with an error status (bad token, no permission, ...)
        raise ExportError(f"the Hugging Face Hub refused the upload to {repo_id} ({_one_line(error)}); "
                          f"{later}") from error
    except (ConnectionError, TimeoutError, httpx.TransportError) as error:  # offline mode, DNS, refused, timeout
        raise ExportError(f"could not reach the Hugging Face Hub ({_one_line(error)}); {later}") from error
    return str(url)


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a folder written by QuietStarForCausalLM.save_pretrained / the trainer")
    parser.add_argument("out", help="the folder to create")
    parser.add_argument("--merge-lora", action="store_true",
                        help="merge the LoRA adapter in CHECKPOINT/adapter/ into the exported LM")
    parser.add_argument("--push-to-hub", metavar="REPO", help="after exporting, upload OUT to this Hub repository")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--eval-results", nargs="+", default=[], metavar="FILE",
                        help="results JSON files of quietstar-eval (eval/run.py) for the model card")
    parser.add_argument("--base-model", metavar="HUB_ID", help="the model Quiet-STaR training started from")
    parser.add_argument("--license", metavar="ID", help="license identifier for the model card, e.g. apache-2.0")
    args = parser.parse_args(argv)
    if args.private and not args.push_to_hub:
        parser.error("--private needs --push-to-hub")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    transformers_logging.disable_progress_bar()  # keep the output to its result lines
    try:
        path = export(args.checkpoint, args.out, merge_lora=args.merge_lora, overwrite=args.overwrite,
                      eval_results=args.eval_results, base_model=args.base_model, license=args.license,
                      repo_id=args.push_to_hub)
        print(f"Exported {args.checkpoint} to {path}")
        if args.push_to_hub:
            print(f"Pushed to {push_to_hub(path, args.push_to_hub, private=args.private)}")
    except ExportError as error:
        sys.exit(f"export.py: error: {error}")


if __name__ == "__main__":
    main()
