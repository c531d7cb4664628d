"""The save format of a Quiet-STaR model: its file names, the one writer, the one reader of each file, and the check
that a folder is a complete save.

A save is a folder that stock transformers loads as a plain LM, plus the Quiet-STaR parts:

- the LM: ``config.json``, ``generation_config.json``, ``model.safetensors`` (or a shard index and its shards); the
  embedding rows of the two thought tokens hold the trained thought vectors. A LoRA model keeps the LM without its
  adapters there and the adapter in ``adapter/`` (quietstar/lora.py; ``adapter_config.json`` and
  ``adapter_model.safetensors`` as ``PeftModel.save_pretrained`` writes them): in a subfolder, because transformers
  treats a folder holding ``adapter_config.json`` as an adapter and loads its base from the Hub;
- the tokenizer files, the two thought tokens added as special tokens;
- ``quietstar.safetensors``: ``thought_embeddings [2, D]`` (fp32) and the mixing head's tensors as
  ``mixing_head.<name>``;
- ``quietstar_config.json``: ``{"quietstar": QuietStarConfig fields, "thought_token_ids": [start, end],
  "pad_token_id": id, "base_model": Hub id or null}``. It is written last, so a folder without it is an incomplete
  save, and loading refuses it.

Only what the model is gets saved: the loss settings belong to the run (its ``run_config.json``), the attention
settings to the process. Older saves still load: a config saved before a QuietStarConfig field existed gets what the
code did then (config.ADDED_FIELDS_BEFORE); the first version wrote no ``base_model``; saves written before the
split also hold the loss fields, which become the loaded model's ``loss_config`` (what a call with labels gave
then; fields they lack get loss_config.SAVED_LOSS_FIELDS_BEFORE), and the attention fields, which are ignored with a
warning (a GPU run's ``attention_backend: triton`` must not stop the model on a CPU). tests/test_checkpoint.py loads
such saves.

:func:`read_checkpoint` checks every file of a save before it is published (export, push); a missing or corrupt one
raises :class:`CheckpointError` naming it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass

import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .attention import ATTENTION_NAME, AttentionSettings
from .compat import check_model_supported
from .config import QuietStarConfig
from .loss_config import SAVED_LOSS_FIELDS_BEFORE, QuietStarLossConfig
from .lora import ADAPTER_FOLDER, lm_state_dict_without_lora, load_lora

CONFIG_FILE = "quietstar_config.json"
WEIGHTS_FILE = "quietstar.safetensors"
LM_CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
LM_WEIGHTS_FILE = "model.safetensors"
LM_WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_JSON_FILES = ("tokenizer.json", "special_tokens_map.json", "added_tokens.json", "vocab.json")
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
MIXING_HEAD_PREFIX = "mixing_head."


class CheckpointError(ValueError):
    """A missing or corrupt file of a save (or one read beside it), in one line that names the file."""


@dataclass(frozen=True)
class SavedQuietStar:
    """What ``quietstar_config.json`` holds: the model config, the ids of <|startofthought|> and
    <|endofthought|>, the pad id, and the Hub id of the LM the model was built from (None when not from the Hub).
    ``loss_config``: the loss a save written before the loss left the model config was trained with (None for
    later saves, which hold none); it is read, never written."""

    config: QuietStarConfig
    thought_token_ids: tuple[int, int]
    pad_token_id: int
    base_model: str | None = None
    loss_config: QuietStarLossConfig | None = None

    def to_dict(self) -> dict:
        return {"quietstar": self.config.to_dict(), "thought_token_ids": list(self.thought_token_ids),
                "pad_token_id": self.pad_token_id, "base_model": self.base_model}


def is_quietstar_save(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a Quiet-STaR save (rather than a plain LM): it has ``quietstar_config.json``."""
    return os.path.isfile(os.path.join(folder, CONFIG_FILE))


def read_saved_quietstar(folder: str | os.PathLike) -> SavedQuietStar:
    """Parse ``folder/quietstar_config.json``. FileNotFoundError when it is missing, ValueError naming the file and
    the problem when it does not parse or lacks a field."""
    path = os.path.join(os.fspath(folder), CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: {folder} is not a complete Quiet-STaR save.")
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except ValueError as error:  # bad JSON or bad UTF-8
        raise ValueError(f"{path} is corrupt (not readable JSON: {_one_line(error)}).") from error
    try:
        config, loss_config = _split_saved_fields(saved["quietstar"], path)
        token_ids = tuple(int(i) for i in saved["thought_token_ids"])
        pad_token_id = int(saved["pad_token_id"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path} is corrupt ({type(error).__name__}: {_one_line(error)}).") from error
    if len(token_ids) != 2:
        raise ValueError(f"{path} is corrupt (thought_token_ids must hold 2 ids, got {list(token_ids)}).")
    return SavedQuietStar(config, token_ids, pad_token_id, saved.get("base_model"), loss_config)


def _split_saved_fields(values: dict, path: str) -> tuple[QuietStarConfig, QuietStarLossConfig | None]:
    """The model config of a saved ``"quietstar"`` section, and the loss config an older save also holds. Attention
    fields of an older save are run settings of its process: ignored, with a warning when they are not the defaults."""
    values = dict(values)
    loss = {name: values.pop(name) for name in QuietStarLossConfig.field_names() if name in values}
    defaults = AttentionSettings().to_dict()
    attention = {name: values.pop(name) for name in defaults if name in values}
    ignored = {name: value for name, value in attention.items() if value != defaults[name]}
    if ignored:
        settings = ", ".join(f"{name}={value!r}" for name, value in ignored.items())
        warnings.warn(f"{path}: run settings in the old save ignored ({settings}); the model runs with the default "
                      "attention settings. Set them with model.set_attention(...) (or the run's YAML keys of the same "
                      "names).", stacklevel=3)
    loss_config = QuietStarLossConfig(**{**SAVED_LOSS_FIELDS_BEFORE, **loss}) if loss else None
    return QuietStarConfig.from_dict(values), loss_config


def read_quietstar_weights(folder: str | os.PathLike) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``thought_embeddings [2, D]`` and the mixing head's state dict from ``folder/quietstar.safetensors``; OSError
    naming the file when it is missing or unreadable."""
    path = os.path.join(os.fspath(folder), WEIGHTS_FILE)
    try:
        tensors = load_file(path)
    except Exception as error:  # a truncated or missing file: name it
        raise OSError(f"Could not read {path}: {error}") from error
    if "thought_embeddings" not in tensors:
        raise OSError(f"Could not read {path}: it has no thought_embeddings.")
    head = {k.removeprefix(MIXING_HEAD_PREFIX): v for k, v in tensors.items() if k != "thought_embeddings"}
    return tensors["thought_embeddings"], head


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _module_name(root: torch.nn.Module, module: torch.nn.Module) -> str:
    """The name of ``module`` inside ``root`` (for example ``model.embed_tokens``)."""
    return next(name for name, candidate in root.named_modules() if candidate is module)


def _gathered_lm_weights(model, state_dict: dict) -> dict[str, torch.Tensor]:
    """The LM's weights from the full model's gathered ``state_dict``, with what ``write_thought_embeddings`` does
    to the module done to this copy (and to a tied output embedding, which is the same tensor in the module)."""
    base = model.base
    lm_weights = {k.removeprefix("base."): v for k, v in state_dict.items() if k.startswith("base.")}
    embedding_key = _module_name(base, base.get_input_embeddings()) + ".weight"
    embedding = lm_weights[embedding_key].clone()
    embedding[list(model.thought_token_ids)] = state_dict["thought_embeddings"].to(embedding.dtype)
    lm_weights[embedding_key] = embedding
    if model.lm_head.weight is base.get_input_embeddings().weight:
        lm_weights[_module_name(base, model.lm_head) + ".weight"] = embedding
    return lm_weights


def save(model, path: str | os.PathLike, state_dict: dict | None = None) -> None:
    """Write ``model``, a QuietStarForCausalLM, to the folder ``path`` (module docstring); see
    :meth:`QuietStarForCausalLM.save_pretrained`, which calls it.

    ``state_dict``: the model's full state dict when the parameters themselves are sharded (FSDP); by default the
    parameters are read directly. Files are written to a temporary folder inside ``path`` first and moved into place
    one by one, ``quietstar_config.json`` last: a save that fails while writing leaves ``path`` as it was.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    if state_dict is None:
        model.write_thought_embeddings()
        thought_embeddings = model.thought_embeddings.detach()
        head = model.mixing_head.state_dict()
    else:
        if model.lora is not None:
            raise ValueError("Saving from a gathered state dict is not implemented for LoRA models.")
        thought_embeddings = state_dict["thought_embeddings"]
        head = {k.removeprefix(MIXING_HEAD_PREFIX): v for k, v in state_dict.items()
                if k.startswith(MIXING_HEAD_PREFIX)}
    staging = tempfile.mkdtemp(prefix=".saving-", dir=path)
    try:
        if state_dict is not None:
            model.base.save_pretrained(staging, state_dict=_gathered_lm_weights(model, state_dict))
        elif model.lora is None:
            model.base.save_pretrained(staging)
        else:  # the LM without adapters, as stock transformers loads it, and the adapter beside it
            model.base.save_pretrained(staging, state_dict=lm_state_dict_without_lora(model.base))
            model.lora.save_pretrained(os.path.join(staging, ADAPTER_FOLDER))
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(staging)
        tensors = {"thought_embeddings": thought_embeddings.detach()}
        tensors.update({f"{MIXING_HEAD_PREFIX}{k}": v.detach() for k, v in head.items()})
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, os.path.join(staging, WEIGHTS_FILE))
        saved = SavedQuietStar(model.quietstar_config, model.thought_token_ids, model.pad_token_id,
                               model.base_model_id)
        with open(os.path.join(staging, CONFIG_FILE), "w") as f:
            json.dump(saved.to_dict(), f, indent=2)
        for name in sorted(os.listdir(staging), key=lambda n: n == CONFIG_FILE):
            target = os.path.join(path, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(os.path.join(staging, name), target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load(model_class: type, path: str | os.PathLike, dtype=torch.float32, **kwargs):
    """Load what :func:`save` wrote, from a folder or a Hub id, as a ``model_class`` (QuietStarForCausalLM, whose
    ``from_pretrained`` calls this); ``kwargs`` go to ``AutoModelForCausalLM.from_pretrained``. The model gets the
    default attention settings, and the recipe loss unless the save is older and holds the loss it was trained with
    (module docstring)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        path = snapshot_download(path)
    saved = read_saved_quietstar(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=ATTENTION_NAME, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    check_model_supported(base)
    model = model_class(base, tokenizer, saved.config, saved.thought_token_ids, saved.pad_token_id,
                        base_model_id=saved.base_model)
    if saved.loss_config is not None:
        model.loss_config = saved.loss_config
    thought_embeddings, head = read_quietstar_weights(path)
    with torch.no_grad():
        model.thought_embeddings.copy_(thought_embeddings)
    model.mixing_head.load_state_dict(head)
    device = base.get_input_embeddings().weight.device
    load_lora(model, path)
    return model.to(device)


def read_json(path: str | os.PathLike):
    """The parsed JSON file at ``path``; CheckpointError naming it when it is missing or does not parse."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing.")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is corrupt (not readable JSON: {_one_line(error)}).") from error


def _safetensors_keys(path: str) -> set[str]:
    """The tensor names in the safetensors file at ``path``; CheckpointError naming it when missing or corrupt."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing.")
    try:
        with safe_open(path, framework="pt") as f:
            return set(f.keys())
    except Exception as error:  # safetensors raises its own error type for truncated or garbled files
        raise CheckpointError(f"{path} is corrupt (not a readable safetensors file: {_one_line(error)}).") from error


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
        index = read_json(index_path)
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise CheckpointError(f"{index_path} is corrupt (it has no weight_map).")
        shards = sorted(set(index["weight_map"].values()))
        for shard in shards:
            _safetensors_keys(os.path.join(folder, shard))
        return [LM_WEIGHTS_INDEX_FILE, *shards]
    if not os.path.isfile(os.path.join(folder, LM_WEIGHTS_FILE)):
        raise CheckpointError(f"{os.path.join(folder, LM_WEIGHTS_FILE)} is missing (and there is no "
                              f"{LM_WEIGHTS_INDEX_FILE}): the checkpoint has no LM weights.")
    _safetensors_keys(os.path.join(folder, LM_WEIGHTS_FILE))
    return [LM_WEIGHTS_FILE]


def _load_tokenizer(folder: str, config: QuietStarConfig, token_ids: tuple[int, int]):
    """The checkpoint's tokenizer, checked to know each thought token as one token with its saved id."""
    read_json(os.path.join(folder, TOKENIZER_CONFIG_FILE))
    for name in TOKENIZER_JSON_FILES:
        if os.path.exists(os.path.join(folder, name)):
            read_json(os.path.join(folder, name))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as error:  # transformers raises many types for a broken tokenizer
        raise CheckpointError(f"The tokenizer files in {folder} do not load ({_one_line(error)}).") from error
    for token, token_id in zip((config.start_thought_token, config.end_thought_token), token_ids):
        if tokenizer.tokenize(token) != [token] or tokenizer.convert_tokens_to_ids(token) != token_id:
            raise CheckpointError(f"The tokenizer in {folder} does not have {token} as the single token {token_id} "
                                  f"that {os.path.join(folder, CONFIG_FILE)} names.")
    return tokenizer


def read_checkpoint(folder: str | os.PathLike) -> Checkpoint:
    """Check that ``folder`` is a complete Quiet-STaR save; CheckpointError naming the first missing or corrupt file.

    Checked: ``config.json`` (parses, known model type), the LM weights (each safetensors file's header),
    ``quietstar_config.json``, ``quietstar.safetensors`` (has the thought embeddings) and the tokenizer.
    """
    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        raise CheckpointError(f"Checkpoint folder {folder} does not exist.")
    lm_config_path = os.path.join(folder, LM_CONFIG_FILE)
    lm_config = read_json(lm_config_path)
    try:
        AutoConfig.for_model(**lm_config)
    except (TypeError, ValueError, KeyError) as error:
        raise CheckpointError(f"{lm_config_path} is corrupt ({_one_line(error)}).") from error
    weight_files = _lm_weight_files(folder)
    try:
        saved = read_saved_quietstar(folder)
    except (OSError, ValueError) as error:
        raise CheckpointError(str(error)) from error
    if "thought_embeddings" not in _safetensors_keys(os.path.join(folder, WEIGHTS_FILE)):
        raise CheckpointError(f"{os.path.join(folder, WEIGHTS_FILE)} is corrupt (it has no thought_embeddings).")
    if os.path.exists(os.path.join(folder, ADAPTER_CONFIG_FILE)):
        raise CheckpointError(f"{os.path.join(folder, ADAPTER_CONFIG_FILE)}: a LoRA adapter belongs in "
                              f"{os.path.join(folder, ADAPTER_FOLDER)}/ (see quietstar/checkpoint.py), not beside the "
                              "LM.")
    return Checkpoint(folder, weight_files, _load_tokenizer(folder, saved.config, saved.thought_token_ids), saved)


def find_lora_adapter(folder: str | os.PathLike) -> str | None:
    """``folder/adapter`` when it holds a peft LoRA adapter (both files parse), else None."""
    adapter = os.path.join(os.path.abspath(folder), ADAPTER_FOLDER)
    if not os.path.isdir(adapter):
        return None
    adapter_config = read_json(os.path.join(adapter, ADAPTER_CONFIG_FILE))
    if adapter_config.get("peft_type") != "LORA":
        raise CheckpointError(f"{os.path.join(adapter, ADAPTER_CONFIG_FILE)} is not a LoRA adapter "
                              f"(peft_type {adapter_config.get('peft_type')!r}).")
    _safetensors_keys(os.path.join(adapter, ADAPTER_WEIGHTS_FILE))
    return adapter
