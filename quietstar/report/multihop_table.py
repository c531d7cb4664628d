"""The multi-hop results table, written by code from the records of ``scripts/multihop_eval.py``.

Every ``<results>/multihop/<name>.json`` that is a multihop_eval record (quietstar.cli.multihop: keys ``settings``,
``hops``, ``untrained``, ``quietstar_config``) is one arm; files that are not (the ``<name>.run_config.json`` copies)
are skipped. Beside a record, ``<name>.run_config.json`` (the training run's config) says what the arm is; without
one the record is of an untrained model. :func:`render_block` writes one table per k, one row per record;
:func:`forest_rows` gives the figure's numbers (quietstar.report.plots.plot_multihop_arms).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass

from ..config import QuietStarConfig
from ..loss_config import QuietStarLossConfig
from .stats import format_interval, verdict

RECORD_KEYS = frozenset({"settings", "hops", "untrained", "quietstar_config"})
FOREST_PLOT = "arms.png"
FOREST_HOPS = 2
# (label in the figure, path, comparison): the two key differences, mixed prediction.
FOREST_COMPARISONS = (("learned − shuffled", "mixed", "learned - shuffled"),
                      ("gold − gold-wrong", "mixed", "gold - gold_wrong"))
# The files of an arm the table links, by suffix, with their link text.
ARM_FILES = ((".md", "table"), (".json", "json"), (".run_config.json", "run_config"), (".metrics.jsonl", "metrics"))
_DEFAULTS = {f.name: f.default for cls in (QuietStarConfig, QuietStarLossConfig) for f in dataclasses.fields(cls)}
# The settings that distinguish arms: (run_config section, field, how a non-default value reads). Saves written before
# the loss left the model config hold the loss fields under QuietStarConfig, so every section is searched.
ARM_SETTINGS = (
    ("QuietStarConfig", "num_thoughts", lambda v: f"N={v}"),
    ("QuietStarConfig", "num_thought_tokens", lambda v: f"T={v}"),
    ("QuietStarConfig", "thought_init_text", lambda v: f"thoughts start as {json.dumps(v)}"),
    ("QuietStarConfig", "thought_fraction", lambda v: f"thoughts at {v:g} of positions"),
    ("QuietStarLossConfig", "entropy_bonus_weight", lambda v: f"entropy {v:g}"),
    ("QuietStarLossConfig", "contrastive_reward_weight", lambda v: f"contrastive {v:g}"),
    ("QuietStarLossConfig", "hindsight_tokens", lambda v: f"hindsight proposals h={v}"),
    ("QuietStarLossConfig", "hindsight_thoughts", lambda v: f"K={v} proposals"),
)


@dataclass
class Arm:
    """One multihop_eval record: its file name without ``.json``, the record, and the run_config copy beside it (None
    for an untrained model)."""

    name: str
    record: dict
    run_config: dict | None


def is_record(data) -> bool:
    """Whether parsed JSON is a multihop_eval record."""
    return isinstance(data, dict) and RECORD_KEYS <= set(data)


def load_arms(folder: str) -> list[Arm]:
    """The records of ``folder`` sorted by name (none when the folder is missing)."""
    if not os.path.isdir(folder):
        return []
    arms = []
    for file in sorted(os.listdir(folder)):
        if not file.endswith(".json") or file.endswith(".run_config.json"):
            continue
        with open(os.path.join(folder, file)) as f:
            record = json.load(f)
        if not is_record(record):
            continue
        name = file[: -len(".json")]
        config_path = os.path.join(folder, name + ".run_config.json")
        run_config = None
        if os.path.isfile(config_path):
            with open(config_path) as f:
                run_config = json.load(f)
        arms.append(Arm(name, record, run_config))
    return arms


def setting(run_config: dict, section: str, name: str):
    """The value of ``name`` in ``section`` of a run_config, else in any other section; missing: the library
    default (``dataclasses.MISSING`` when the library has none)."""
    for key in (section, *run_config):
        if isinstance(run_config.get(key), dict) and name in run_config[key]:
            return run_config[key][name]
    return _DEFAULTS.get(name, dataclasses.MISSING)


def _non_default(values, names: tuple[str, ...] | None = None) -> list[str]:
    """The readings of ARM_SETTINGS (only ``names`` when given) whose value ``values(section, name)`` is set and not
    the library default (any set value, when the library has none)."""
    parts = []
    for section, name, reads in ARM_SETTINGS:
        if names is not None and name not in names:
            continue
        value = values(section, name)
        if value is dataclasses.MISSING or value is None or value == _DEFAULTS.get(name, dataclasses.MISSING):
            continue
        parts.append(reads(value))
    return parts


def describe_arm(arm: Arm, hops: int) -> str:
    """What distinguishes ``arm``: the settings that differ from the library defaults, the gold warm start, the k it
    was trained at when not ``hops``, then steps and seed; an arm without run_config is "untrained", with the
    thought tokens it was scored with (its N is the scoring's, 1, so not an arm setting)."""
    if arm.run_config is None:
        config = arm.record["quietstar_config"]
        parts = _non_default(lambda section, name: config.get(name, dataclasses.MISSING),
                             ("num_thought_tokens", "thought_init_text"))
        return ", ".join(["untrained", *parts])
    config = arm.run_config
    parts = _non_default(lambda section, name: setting(config, section, name))
    training = config.get("QuietStarTrainingArguments", {})
    gold_steps = training.get("gold_thought_steps", 0)  # absent: written before the warm start existed (off)
    if gold_steps:
        parts.append(f"gold warm start {gold_steps} steps")
    if training.get("gold_thought_interval", 0):
        parts.append(f"then a gold step every {training['gold_thought_interval']}")
    trained_hops = config.get("DataArguments", {}).get("multihop_hops")
    if trained_hops is not None and trained_hops != hops:
        parts.append(f"trained at k={trained_hops}")
    checkpoint = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(str(arm.record.get("model", "")).rstrip("/")))
    steps = f"step {checkpoint.group(1)} of {training.get('max_steps')}" if checkpoint else \
        f"{training.get('max_steps')} steps"
    return f"{', '.join(parts) or 'library defaults'}; {steps}, seed {training.get('seed')}"


def _difference(comparison: dict) -> str:
    """``+0.117 [+0.049, +0.185] better``: a difference of log p (higher is better) with its verdict."""
    return f"{format_interval(comparison)} {verdict(comparison, lower_is_better=False)}"


def _fraction(interval: dict) -> str:
    """``0.139 [0.100, 0.178]``: a rate with its interval."""
    return f"{interval['mean']:.3f} [{interval['low']:.3f}, {interval['high']:.3f}]"


def _links(arm: Arm, folder: str, link_dir: str) -> str:
    return " · ".join(f"[{text}]({link_dir}/{arm.name}{suffix})" for suffix, text in ARM_FILES
                      if os.path.isfile(os.path.join(folder, arm.name + suffix)))


HEADER = ["run", "arm", "documents / queries", "learned − shuffled", "learned − null", "gold − null",
          "gold − gold-wrong", "learned accuracy", "intermediate − chance", "thought path: learned − shuffled",
          "thought path: gold − gold-wrong", "files"]


def arm_row(arm: Arm, hops: int, folder: str, link_dir: str) -> list[str]:
    """The table row of ``arm`` at k = ``hops``."""
    summary = arm.record["hops"][str(hops)]
    mixed, thought = summary["mixed"]["comparisons"], summary["thought_path"]["comparisons"]
    content = summary["content"]
    return [f"`{arm.name}`", describe_arm(arm, hops), f"{summary['num_documents']} / {summary['num_queries']}",
            *(_difference(mixed[key]["logp"]) for key in ("learned - shuffled", "learned - null", "gold - null",
                                                          "gold - gold_wrong")),
            _fraction(summary["mixed"]["views"]["learned"]["accuracy"]),
            _difference(content["intermediate - chance"]) if content else "— (no intermediate at k = 1)",
            _difference(thought["learned - shuffled"]["logp"]), _difference(thought["gold - gold_wrong"]["logp"]),
            _links(arm, folder, link_dir)]


def deployed_line(arm: Arm, hops: str) -> str:
    """A list item: how often the rule of ``arm`` (a model that thinks at anchors only) chose the answer position at
    k = ``hops``, and its change from no thoughts as deployed."""
    deployed = arm.record["hops"][hops]["deployed"]
    return (f"- `{arm.name}`, k = {hops}: the rule chose {_fraction(deployed['answer_at_anchor'])} of the answer "
            f"positions; as deployed − no thoughts: log p {_difference(deployed['logp - no_thoughts'])}, accuracy "
            f"{_difference(deployed['accuracy - no_thoughts'])}.")


def render_block(arms: list[Arm], folder: str, link_dir: str) -> str:
    """The markdown of the ``multihop`` block: one table per k present in ``arms`` (read from ``folder``; links
    relative to the page: ``link_dir``), and the figure when some arm has k = FOREST_HOPS."""
    source = f"`{link_dir}/*.json`"
    if not arms:
        return f"Generated by `python scripts/results_tables.py`: no multihop_eval records in {source} yet."
    parts = [f"Generated by `python scripts/results_tables.py` from the `scripts/multihop_eval.py` records {source} "
             "(the arm from the `<name>.run_config.json` copy beside each; none: an untrained model). Differences of "
             "the mean log p of the answer (nats; above zero the first view is better) with a paired bootstrap 95 % "
             "interval over documents and its verdict, mixed prediction unless the column says thought path (the "
             "prediction from the thought alone); learned accuracy: the answer wins among the document's entities; "
             "intermediate − chance: how much more often a learned thought holds an intermediate entity than a "
             "decoy.", ""]
    for hops in sorted({int(k) for arm in arms for k in arm.record["hops"]}):
        rows = [arm_row(arm, hops, folder, link_dir) for arm in arms if str(hops) in arm.record["hops"]]
        parts += [f"k = {hops}:", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER),
                  *("| " + " | ".join(row) + " |" for row in rows), ""]
    deployed = [deployed_line(arm, hops) for arm in arms for hops in sorted(arm.record["hops"], key=int)
                if arm.record["hops"][hops].get("deployed")]
    if deployed:
        parts += ["Arms that think at anchors only score a thought at every answer position above; as deployed they "
                  "think at an answer only where their rule chooses it (the learned view there, the LM alone "
                  "elsewhere; mixed prediction):", "", *deployed, ""]
    if forest_rows(arms):
        caption = f"learned − shuffled and gold − gold-wrong per arm, k = {FOREST_HOPS}"
        parts += [f"![{caption}]({link_dir}/{FOREST_PLOT})", ""]
    return "\n".join(parts)


def forest_rows(arms: list[Arm]) -> list[tuple[str, dict[str, dict]]]:
    """``[(arm name, {figure label: {"mean", "low", "high"}})]``: the figure's differences of every arm with k =
    FOREST_HOPS, in name order."""
    rows = []
    for arm in arms:
        summary = arm.record["hops"].get(str(FOREST_HOPS))
        if summary is not None:
            rows.append((arm.name, {label: summary[path]["comparisons"][key]["logp"]
                                    for label, path, key in FOREST_COMPARISONS}))
    return rows
