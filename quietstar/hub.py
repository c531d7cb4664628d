"""Export a Quiet-STaR checkpoint as a Hub-ready folder with a model card, and push it to the Hugging Face Hub.

An export holds what :meth:`QuietStarForCausalLM.save_pretrained` writes and nothing of the training state:

- ``config.json``, ``generation_config.json``, ``model.safetensors`` (or an index and its shards) and the tokenizer
  files: a stock transformers LM folder; the vocabulary includes <|startofthought|> and <|endofthought|>, whose
  embedding rows hold the trained thought vectors;
- ``quietstar.safetensors`` (thought embeddings, mixing head) and ``quietstar_config.json``;
- ``README.md``, the model card.

LoRA layout: a checkpoint whose LM was trained through a peft LoRA adapter is a complete Quiet-STaR save of the
LM the adapter was applied to, plus the adapter in ``CHECKPOINT/adapter/`` (``adapter_config.json`` and
``adapter_model.safetensors``, as ``PeftModel.save_pretrained`` writes them). The adapter lives in a subfolder
because transformers treats a folder with ``adapter_config.json`` as an adapter and loads its base from the Hub.
``export(..., merge_lora=True)`` merges it into the LM (``merge_and_unload``) and writes the merged full LM.
Adapters that act on thought tokens only (``text_path: thought_lora``) cannot be merged (merged, they would change
every text prediction): their export keeps ``adapter/`` beside the unchanged base LM, and merging is refused.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass, fields

from huggingface_hub import HfApi, ModelCardData
from huggingface_hub.errors import HFValidationError, HfHubHTTPError
from huggingface_hub.utils import httpx, validate_repo_id
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer

from .checkpoint import CONFIG_FILE, LM_CONFIG_FILE, WEIGHTS_FILE, SavedQuietStar, read_saved_quietstar
from .config import QuietStarConfig
from .evaluation.result import EvalResult
from .files import replace_folder
from .lora import ADAPTER_FOLDER
from .modeling import QuietStarForCausalLM
from .report.markdown import markdown_table

GENERATION_CONFIG_FILE = "generation_config.json"
LM_WEIGHTS_FILE = "model.safetensors"
LM_WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_JSON_FILES = ("tokenizer.json", "special_tokens_map.json", "added_tokens.json", "vocab.json")
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
EVAL_RESULTS_PATTERN = "*results*.json"
MODEL_CARD_FILE = "README.md"
CARD_TAGS = ["quiet-star", "reasoning"]
TRAINING_TABLE_COLUMNS = ("loss", "base_nll", "mixed_nll_0", "reward_mean", "mixing_weight_mean")
TRAINING_TABLE_ROWS = 8


class ExportError(Exception):
    """A bad checkpoint, destination or push, in one line that names the file, folder or repository."""


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _read_json(path: str):
    """The parsed JSON file at ``path``; ExportError naming it when it is missing or does not parse."""
    if not os.path.isfile(path):
        raise ExportError(f"{path} is missing.")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ExportError(f"{path} is corrupt (not readable JSON: {_one_line(error)}).") from error


def _safetensors_keys(path: str) -> set[str]:
    """The tensor names in the safetensors file at ``path``; ExportError naming it when missing or corrupt."""
    if not os.path.isfile(path):
        raise ExportError(f"{path} is missing.")
    try:
        with safe_open(path, framework="pt") as f:
            return set(f.keys())
    except Exception as error:  # safetensors raises its own error type for truncated or garbled files
        raise ExportError(f"{path} is corrupt (not a readable safetensors file: {_one_line(error)}).") from error


# ------------------------------------------------------------------------------------------------ checkpoint
@dataclass
class Checkpoint:
    """A validated Quiet-STaR save: its folder, the LM weight files (names in it), the loaded tokenizer and what
    ``quietstar_config.json`` holds."""

    folder: str
    weight_files: list[str]
    tokenizer: object
    saved: SavedQuietStar


def _lm_weight_files(folder: str) -> list[str]:
    """``model.safetensors``, or the shard index and every shard it names, each checked to parse."""
    index_path = os.path.join(folder, LM_WEIGHTS_INDEX_FILE)
    if os.path.isfile(index_path):
        index = _read_json(index_path)
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise ExportError(f"{index_path} is corrupt (it has no weight_map).")
        shards = sorted(set(index["weight_map"].values()))
        for shard in shards:
            _safetensors_keys(os.path.join(folder, shard))
        return [LM_WEIGHTS_INDEX_FILE, *shards]
    if not os.path.isfile(os.path.join(folder, LM_WEIGHTS_FILE)):
        raise ExportError(f"{os.path.join(folder, LM_WEIGHTS_FILE)} is missing (and there is no "
                          f"{LM_WEIGHTS_INDEX_FILE}): the checkpoint has no LM weights.")
    _safetensors_keys(os.path.join(folder, LM_WEIGHTS_FILE))
    return [LM_WEIGHTS_FILE]


def _read_saved_quietstar(folder: str) -> SavedQuietStar:
    """:func:`quietstar.checkpoint.read_saved_quietstar`, its errors as ExportError."""
    try:
        return read_saved_quietstar(folder)
    except (OSError, ValueError) as error:
        raise ExportError(str(error)) from error


def _load_tokenizer(folder: str, config: QuietStarConfig, token_ids: tuple[int, int]):
    """The checkpoint's tokenizer, checked to know each thought token as one token with its saved id."""
    config_path = os.path.join(folder, TOKENIZER_CONFIG_FILE)
    _read_json(config_path)
    for name in TOKENIZER_JSON_FILES:
        if os.path.exists(os.path.join(folder, name)):
            _read_json(os.path.join(folder, name))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as error:  # transformers raises many types for a broken tokenizer
        raise ExportError(f"The tokenizer files in {folder} do not load ({_one_line(error)}).") from error
    for token, token_id in zip((config.start_thought_token, config.end_thought_token), token_ids):
        if tokenizer.tokenize(token) != [token] or tokenizer.convert_tokens_to_ids(token) != token_id:
            raise ExportError(f"The tokenizer in {folder} does not have {token} as the single token {token_id} that "
                              f"{os.path.join(folder, CONFIG_FILE)} names.")
    return tokenizer


def read_checkpoint(folder: str | os.PathLike) -> Checkpoint:
    """Check that ``folder`` is a complete Quiet-STaR save; ExportError naming the first missing or corrupt file.

    Checked: ``config.json`` (parses, known model type), the LM weights (each safetensors file's header),
    ``quietstar_config.json``, ``quietstar.safetensors`` (has the thought embeddings) and the tokenizer.
    """
    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        raise ExportError(f"Checkpoint folder {folder} does not exist.")
    lm_config_path = os.path.join(folder, LM_CONFIG_FILE)
    lm_config = _read_json(lm_config_path)
    try:
        AutoConfig.for_model(**lm_config)
    except (TypeError, ValueError, KeyError) as error:
        raise ExportError(f"{lm_config_path} is corrupt ({_one_line(error)}).") from error
    weight_files = _lm_weight_files(folder)
    saved = _read_saved_quietstar(folder)
    if "thought_embeddings" not in _safetensors_keys(os.path.join(folder, WEIGHTS_FILE)):
        raise ExportError(f"{os.path.join(folder, WEIGHTS_FILE)} is corrupt (it has no thought_embeddings).")
    if os.path.exists(os.path.join(folder, ADAPTER_CONFIG_FILE)):
        raise ExportError(f"{os.path.join(folder, ADAPTER_CONFIG_FILE)}: a LoRA adapter belongs in "
                          f"{os.path.join(folder, ADAPTER_FOLDER)}/ (see quietstar/hub.py), not beside the LM.")
    return Checkpoint(folder, weight_files, _load_tokenizer(folder, saved.config, saved.thought_token_ids), saved)


def find_lora_adapter(folder: str | os.PathLike) -> str | None:
    """``folder/adapter`` when it holds a peft LoRA adapter (both files parse), else None."""
    adapter = os.path.join(os.path.abspath(folder), ADAPTER_FOLDER)
    if not os.path.isdir(adapter):
        return None
    adapter_config = _read_json(os.path.join(adapter, ADAPTER_CONFIG_FILE))
    if adapter_config.get("peft_type") != "LORA":
        raise ExportError(f"{os.path.join(adapter, ADAPTER_CONFIG_FILE)} is not a LoRA adapter "
                          f"(peft_type {adapter_config.get('peft_type')!r}).")
    _safetensors_keys(os.path.join(adapter, ADAPTER_WEIGHTS_FILE))
    return adapter


# ------------------------------------------------------------------------------------- metrics and results
def read_log_history(checkpoint: str | os.PathLike) -> list[dict]:
    """``log_history`` of the ``trainer_state.json`` in ``checkpoint``, else in its parent run folder, else []."""
    checkpoint = os.path.abspath(checkpoint)
    for folder in (checkpoint, os.path.dirname(checkpoint)):
        path = os.path.join(folder, TRAINER_STATE_FILE)
        if os.path.isfile(path):
            state = _read_json(path)
            if not isinstance(state, dict) or not isinstance(state.get("log_history", []), list):
                raise ExportError(f"{path} is corrupt (it has no log_history list).")
            return [entry for entry in state.get("log_history", []) if isinstance(entry, dict)]
    return []


def read_eval_result(path: str | os.PathLike) -> EvalResult:
    """The result in a JSON file written by quietstar-eval / eval/run.py (:class:`EvalResult`). ExportError naming
    the file when it is anything else."""
    path = os.path.abspath(path)
    try:
        return EvalResult.from_dict(_read_json(path))
    except ValueError as error:
        raise ExportError(f"{path} is {error}.") from error


def find_eval_results(checkpoint: str | os.PathLike) -> list[EvalResult]:
    """Evaluation results in ``checkpoint/*results*.json``; files of other shapes (the Trainer's
    ``train_results.json``, ``all_results.json``, ...) are skipped."""
    found = []
    for path in sorted(glob.glob(os.path.join(os.path.abspath(checkpoint), EVAL_RESULTS_PATTERN))):
        try:
            found.append(EvalResult.from_dict(_read_json(path)))
        except ValueError:
            continue
    return found


# --------------------------------------------------------------------------------------------- model card
def _config_section(config: QuietStarConfig) -> str:
    rows = [[f"`{f.name}`", f"`{getattr(config, f.name)}`", f.metadata.get("help", "")] for f in fields(config)]
    return "## Quiet-STaR configuration\n\n" + markdown_table(["field", "value", "meaning"], rows)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _training_section(log_history: list[dict]) -> str:
    """Last value of every logged metric, and a few rows of the training log."""
    last = {}
    for entry in log_history:
        for name, value in entry.items():
            if name not in ("step", "epoch") and _is_number(value):
                last[name] = (value, entry.get("step"))
    steps = max((entry.get("step", 0) for entry in log_history), default=0)
    text = f"## Training\n\n{steps} optimizer steps. Last logged values:\n\n"
    text += markdown_table(["metric", "value", "step"],
                           [[f"`{name}`", value, step] for name, (value, step) in last.items()])
    train_rows = [entry for entry in log_history if "loss" in entry]
    columns = [name for name in TRAINING_TABLE_COLUMNS if any(name in entry for entry in train_rows)]
    if train_rows:
        count = min(TRAINING_TABLE_ROWS, len(train_rows))
        picked = [train_rows[round(i * (len(train_rows) - 1) / max(count - 1, 1))] for i in range(count)]
        text += "\n\nTraining log:\n\n" + markdown_table(["step", *columns],
                                                 [[entry.get("step"), *(entry.get(c) for c in columns)]
                                                  for entry in picked])
    return text


def _eval_section(results: list[EvalResult]) -> str:
    rows = [[r.task, r.protocol, r.mode, r.metric, r.score, r.n] for r in results]
    return "## Evaluation\n\n" + markdown_table(["task", "protocol", "mode", "metric", "score", "n"], rows)


def _usage_section(repo: str, config: QuietStarConfig, token_ids: list[int]) -> str:
    start, end = config.start_thought_token, config.end_thought_token
    return f"""## Use with quietstar (thinking before every token)

```python
from huggingface_hub import snapshot_download
from quietstar import QuietStarForCausalLM

model = QuietStarForCausalLM.from_pretrained(snapshot_download("{repo}")).eval()
ids = model.tokenizer("Q: 12 * 7 = ? A:", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=32, greedy_thoughts=True)
print(model.tokenizer.decode(out.sequences[0], skip_special_tokens=True))
```

`out.thoughts` holds the thought behind each new token, `out.mixing_weights` how much it was trusted.

## Use as a plain language model

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo}")
tokenizer = AutoTokenizer.from_pretrained("{repo}")
ids = tokenizer("Q: 12 * 7 = ? A:", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=32, suppress_tokens={token_ids})  # never emit {start} / {end}
print(tokenizer.decode(out[0], skip_special_tokens=True))
```

As a plain LM the model does not think: transformers ignores `{WEIGHTS_FILE}` and `{CONFIG_FILE}`, so there
are no thoughts and no mixing head, and each token is predicted from the text alone. That is the "base" path
Quiet-STaR also trained (weight `base_loss_weight` on its NLL); what is lost is the gain from thinking."""


def write_model_card(folder: str | os.PathLike, *, name: str | None = None, repo_id: str | None = None,
                     base_model: str | None = None, license: str | None = None, log_history: list[dict] = (),
                     eval_results: list[EvalResult] = ()) -> str:
    """Write ``folder/README.md`` for the export in ``folder``; return its path.

    ``name`` titles the card (default: the repository's or the folder's name); ``repo_id`` goes in the usage
    code; ``base_model`` and ``license`` (Hub identifiers) in the YAML header; ``log_history`` (a Trainer's)
    gives the training section and ``eval_results`` (see :func:`read_eval_result`) the evaluation section.
    """
    folder = os.path.abspath(folder)
    name = name or (repo_id or folder).rstrip("/").split("/")[-1]
    saved = _read_saved_quietstar(folder)
    config, token_ids = saved.config, list(saved.thought_token_ids)
    lm_config = _read_json(os.path.join(folder, LM_CONFIG_FILE))
    architecture = (lm_config.get("architectures") or [lm_config.get("model_type", "unknown")])[0]
    metadata = ModelCardData(library_name="transformers", pipeline_tag="text-generation", base_model=base_model,
                             license=license, tags=CARD_TAGS).to_yaml()
    sections = [
        f"---\n{metadata}\n---\n\n# {name}",
        f"A [Quiet-STaR](https://arxiv.org/abs/2403.09629) model: before every token it thinks, sampling a "
        f"{config.num_thought_tokens}-token thought between `{config.start_thought_token}` and "
        f"`{config.end_thought_token}`, and a mixing head blends the prediction made after the thought with the "
        f"one made without it. Trained with quietstar.\n\n"
        f"- Base model: {f'[{base_model}](https://huggingface.co/{base_model})' if base_model else 'not recorded'} "
        f"({architecture})\n"
        f"- Thought tokens (added to the vocabulary): `{config.start_thought_token}` = {token_ids[0]}, "
        f"`{config.end_thought_token}` = {token_ids[1]}",
        _usage_section(repo_id or f"<user>/{name}", config, token_ids),
        _config_section(config),
    ]
    if log_history:
        sections.append(_training_section(log_history))
    if eval_results:
        sections.append(_eval_section(eval_results))
    path = os.path.join(folder, MODEL_CARD_FILE)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n\n".join(sections) + "\n")
    return path


# -------------------------------------------------------------------------------------------------- export
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


# ---------------------------------------------------------------------------------------------------- push
def push_to_hub(folder: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Upload the export in ``folder`` to the model repository ``repo_id`` (created if needed); return its URL.

    ``token``: a Hugging Face token (default: the logged-in one). Failures raise ExportError saying whether the
    Hub was unreachable or refused; the local folder is never modified.
    """
    folder = os.path.abspath(folder)
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
