"""The record of one evaluation, as ``quietstar-eval`` (``eval/run.py``) writes it to JSON and the model card and the
run report read it."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

PAPER_METRIC = "mean renormalised probability of the gold answer"
ACCURACY_METRIC = "accuracy"


@dataclass(kw_only=True)
class EvalResult:
    """One evaluation: what was scored, how, the score and the per-item records.

    ``baseline``: scored by the LM without thoughts. ``mixing_weight``: the mixing weight w over the scored positions
    of a thinking evaluation (quietstar.scoring.weight_summary: positions, mean, q05, q25, q50, q75, q95), None
    when not recorded (no thoughts, w forced to 0, generated text). ``quietstar_config``: the model's Quiet-STaR
    config as it
    scored (``QuietStarConfig.to_dict()``; None for a plain LM). ``settings``: the options that shaped the
    numbers (seed, batch size, thoughts, votes, ...). ``items``: one record per item, shaped by the protocol.
    The JSON keys are the field names, in this order.
    """

    task: str
    protocol: str | None = None
    model: str | None = None
    baseline: bool = False
    score: float
    n: int | None = None
    data_source: str | None = None
    metric: str | None = None
    quietstar_config: dict | None = None
    settings: dict = field(default_factory=dict)
    items: list[dict] = field(default_factory=list)
    mixing_weight: dict | None = None

    @property
    def mode(self) -> str:
        """How the score was computed: by the LM without thoughts, or thinking with N thoughts of T tokens."""
        if self.baseline:
            return "no thoughts (baseline)"
        if self.settings.get("zero_weight"):
            return "w = 0 (the trained text path)"
        config = self.quietstar_config
        kind = "null thoughts" if self.settings.get("thoughts") == "null" else "thoughts"
        if isinstance(config, dict) and {"num_thoughts", "num_thought_tokens"} <= set(config):
            return f"{kind} (N={config['num_thoughts']}, T={config['num_thought_tokens']})"
        return kind

    def to_dict(self) -> dict:
        """The JSON record; ``mixing_weight`` only when recorded, so results written before it read back unchanged."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not (f.name == "mixing_weight" and self.mixing_weight is None)}

    @classmethod
    def from_dict(cls, data) -> EvalResult:
        """The result in ``data``, a dict read from a results JSON file (fields beyond ``task`` and ``score`` may be
        missing); ValueError saying what is wrong when it is not one."""
        if not isinstance(data, dict) or "task" not in data or "score" not in data:
            raise ValueError("not an evaluation result: expected a JSON object with at least the fields task and "
                             "score (written by quietstar-eval / eval/run.py: task, protocol, score, n, baseline, ...)")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"not an evaluation result: unknown fields {', '.join(unknown)}")
        if not isinstance(data["score"], (int, float)) or isinstance(data["score"], bool):
            raise ValueError(f"not an evaluation result: score is {data['score']!r}, not a number")
        return cls(**data)

    def save(self, path: str | os.PathLike) -> None:
        """Write the result as indented JSON to ``path`` (its folder is created)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str | os.PathLike) -> EvalResult:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))
