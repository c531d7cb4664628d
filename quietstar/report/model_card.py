"""The model card (``README.md``) of an exported Quiet-STaR model, and the training log and evaluation results it
reports, read from beside the checkpoint.

The card holds the Hub's YAML header (library, pipeline, base model, license, tags), what the model is, how to use
it with quietstar and as a plain LM, its Quiet-STaR configuration, the last logged training metrics and a few rows
of the training log (from the Trainer's ``trainer_state.json``), and the evaluation results (:class:`EvalResult`
JSON files of quietstar-eval).
"""

from __future__ import annotations

import glob
import os
from dataclasses import fields

from huggingface_hub import ModelCardData

from ..checkpoint import CONFIG_FILE, LM_CONFIG_FILE, WEIGHTS_FILE, CheckpointError, read_json, read_saved_quietstar
from ..config import QuietStarConfig
from ..evaluation.result import EvalResult
from .markdown import markdown_table

TRAINER_STATE_FILE = "trainer_state.json"
EVAL_RESULTS_PATTERN = "*results*.json"
MODEL_CARD_FILE = "README.md"
CARD_TAGS = ["quiet-star", "reasoning"]
TRAINING_TABLE_COLUMNS = ("loss", "base_nll", "mixed_nll_0", "reward_mean", "mixing_weight_mean")
TRAINING_TABLE_ROWS = 8


def read_log_history(checkpoint: str | os.PathLike) -> list[dict]:
    """``log_history`` of the ``trainer_state.json`` in ``checkpoint``, else in its parent run folder, else []."""
    checkpoint = os.path.abspath(checkpoint)
    for folder in (checkpoint, os.path.dirname(checkpoint)):
        path = os.path.join(folder, TRAINER_STATE_FILE)
        if os.path.isfile(path):
            state = read_json(path)
            if not isinstance(state, dict) or not isinstance(state.get("log_history", []), list):
                raise CheckpointError(f"{path} is corrupt (it has no log_history list).")
            return [entry for entry in state.get("log_history", []) if isinstance(entry, dict)]
    return []


def read_eval_result(path: str | os.PathLike) -> EvalResult:
    """The result in a JSON file written by quietstar-eval / eval/run.py (:class:`EvalResult`). CheckpointError naming
    the file when it is anything else."""
    path = os.path.abspath(path)
    data = read_json(path)
    try:
        return EvalResult.from_dict(data)
    except ValueError as error:
        raise CheckpointError(f"{path} is {error}.") from error


def find_eval_results(checkpoint: str | os.PathLike) -> list[EvalResult]:
    """Evaluation results in ``checkpoint/*results*.json``; files of other shapes (the Trainer's
    ``train_results.json``, ``all_results.json``, ...) are skipped."""
    found = []
    for path in sorted(glob.glob(os.path.join(os.path.abspath(checkpoint), EVAL_RESULTS_PATTERN))):
        data = read_json(path)  # an unreadable file is an error, not skipped
        try:
            found.append(EvalResult.from_dict(data))
        except ValueError:
            continue
    return found


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
    saved = read_saved_quietstar(folder)
    config, token_ids = saved.config, list(saved.thought_token_ids)
    lm_config = read_json(os.path.join(folder, LM_CONFIG_FILE))
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
