"""A schedule of thought lengths over training (Fast Quiet-STaR: long thoughts first, then shorter ones).

In a config: ``thought_curriculum: ["0:16/8", "100:12/4", "200:8/4"]``: from optimizer step 0 train with 16
thought tokens and 8 lookahead tokens, from step 100 with 12/4, from step 200 on with 8/4. The stage in force is
a function of the global step alone, so a resumed run picks up the right one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

from transformers import TrainerCallback

from ..config import QuietStarConfig

_STAGE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*/\s*(\d+)\s*$")


class Stage(NamedTuple):
    start_step: int
    num_thought_tokens: int
    num_lookahead_tokens: int


def parse_curriculum(entries: list[str]) -> list[Stage]:
    """``["STEP:T/A", ...]`` -> stages; the first must start at step 0 and steps must increase."""
    stages = []
    for entry in entries:
        match = _STAGE.match(str(entry))
        if match is None:
            raise ValueError(f"thought_curriculum entry {entry!r} is not STEP:THOUGHT_TOKENS/LOOKAHEAD, e.g. '100:12/4'.")
        stage = Stage(*(int(g) for g in match.groups()))
        if stage.num_thought_tokens < 1 or stage.num_lookahead_tokens < 1:
            raise ValueError(f"thought_curriculum entry {entry!r}: thought and lookahead lengths must be >= 1.")
        stages.append(stage)
    if not stages:
        raise ValueError("thought_curriculum is empty; leave it unset for fixed thought lengths.")
    if stages[0].start_step != 0:
        raise ValueError(f"thought_curriculum must start at step 0, got {entries[0]!r}.")
    steps = [s.start_step for s in stages]
    if steps != sorted(set(steps)):
        raise ValueError(f"thought_curriculum steps must increase, got {steps}.")
    return stages


def longest_thought_lengths(config: QuietStarConfig, stages: Sequence[Stage] = ()) -> tuple[int, int]:
    """``(T, A)``: the longest thought and lookahead lengths of a run with ``config`` and the curriculum ``stages``,
    the config's own included (they hold until the first stage is applied). What every length-dependent check allows
    for: rows of at least A + 2 tokens (the data filter), positions (checks.check_positions), memory (memory.py)."""
    return (max([config.num_thought_tokens, *(s.num_thought_tokens for s in stages)]),
            max([config.num_lookahead_tokens, *(s.num_lookahead_tokens for s in stages)]))


def stage_at(stages: list[Stage], step: int) -> Stage:
    """The stage in force at ``step`` (the last one starting at or before it)."""
    return [s for s in stages if s.start_step <= step][-1]


class CurriculumCallback(TrainerCallback):
    """Sets the model's thought and lookahead lengths before every optimizer step from the schedule."""

    def __init__(self, model, stages: list[Stage]):
        self.model, self.stages = model, stages

    def apply(self, step: int) -> Stage:
        stage = stage_at(self.stages, step)
        self.model.set_thought_lengths(num_thought_tokens=stage.num_thought_tokens,
                                       num_lookahead_tokens=stage.num_lookahead_tokens)
        return stage

    def on_train_begin(self, args, state, control, **kwargs):
        self.apply(state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self.apply(state.global_step)
