"""What a run computes, counted in token positions, and the step count that gives a finetune control equal FLOPs.

A Quiet-STaR step runs, per row of L tokens, a gradient pass (forward and backward) over L (1 + N S) positions
(the text and N S branch tokens per position; docs/design.md §7) and a no-grad sampling pass over L + N L T
positions (the text once, then T steps of N L tokens); thinking at a fraction q of the positions
(``thought_fraction``) puts branches at M = ceil(q L) positions only: L + N M S and L + N M T. Two mechanisms add
no-grad forwards: hindsight proposals (``hindsight_tokens``) replay every thought under the other view (N M T more),
and the position-contrastive reward (``contrastive_reward_weight``) a second thought-expanded pass (L + N M S more).
A plain LM step runs the gradient pass over L positions. A forward costs about a third of a forward and backward, so
a sampling position counts a third of a gradient position. Attention's cost beyond the per-token matmuls is left out
(it grows with context length, which thoughts keep short). The null-thoughts control samples nothing; the finetune control is the
plain step.

    python -m quietstar.training.compute runs/smollm2-135m-cpu

prints, for a finished thinking run, how many plain steps of the same rows cost what the run cost: the finetune
control's ``max_steps`` for the equal-FLOPs comparison.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from ..anchors import anchors_per_row
from ..config import QuietStarConfig
from ..loss_config import QuietStarLossConfig
from .curriculum import Stage

FORWARD_SHARE = 1 / 3  # a forward over a position, as a share of a forward and backward


@dataclass
class StepCost:
    """Token positions a run computes (written to run_config.json as "StepCost").

    ``*_per_step`` are at the run's first thought lengths (a curriculum changes them later);
    ``training_token_positions`` is the whole run's total of gradient positions plus FORWARD_SHARE x sampling
    positions, over ``max_steps`` (None when the run is sized in epochs).
    """

    control: str
    rows_per_step: int
    max_length: int
    max_steps: int
    gradient_token_positions_per_step: int
    sampling_token_positions_per_step: int
    training_token_positions: float | None


def positions_per_row(control: str, max_length: int, num_thoughts: int, num_thought_tokens: int,
                      num_lookahead_tokens: int, thought_fraction: float = 1.0, *, hindsight: bool = False,
                      contrastive: bool = False) -> tuple[int, int]:
    """(gradient-pass positions, no-grad forward positions) of one row of ``max_length`` tokens under ``control``;
    sampled thoughts grow at ceil(``thought_fraction`` * L) positions (filler thoughts, which choose no anchors, at
    all L). ``hindsight``/``contrastive``: the loss config draws hindsight proposals / computes the
    position-contrastive reward (module doc)."""
    L, N, T = max_length, num_thoughts, num_thought_tokens
    if control == "finetune":
        return L, 0
    S = T + num_lookahead_tokens + 1
    if control == "null_thoughts":
        return L * (1 + N * S), 0
    M = anchors_per_row(L, thought_fraction)
    forward = L + N * M * T * (2 if hindsight else 1) + (L + N * M * S if contrastive else 0)
    return L + N * M * S, forward


def step_cost(control: str, config: QuietStarConfig, stages: list[Stage], max_length: int, rows_per_step: int,
              max_steps: int, loss_config: QuietStarLossConfig | None = None) -> StepCost:
    """The :class:`StepCost` of a run; ``stages`` is its thought curriculum ([] for fixed lengths); ``loss_config``
    the run's (its mechanisms that add passes)."""
    mechanisms = loss_mechanisms(loss_config.to_dict() if loss_config is not None else {})

    def per_step(T: int, A: int) -> tuple[int, int]:
        gradient, sampling = positions_per_row(control, max_length, config.num_thoughts, T, A, config.thought_fraction,
                                               **mechanisms)
        return gradient * rows_per_step, sampling * rows_per_step

    first = per_step(config.num_thought_tokens, config.num_lookahead_tokens)
    total = None
    if max_steps > 0:
        spans = [Stage(0, config.num_thought_tokens, config.num_lookahead_tokens)] if not stages else stages
        total = 0.0
        for index, stage in enumerate(spans):
            end = spans[index + 1].start_step if index + 1 < len(spans) else max_steps
            steps = max(0, min(end, max_steps) - stage.start_step)
            gradient, sampling = per_step(stage.num_thought_tokens, stage.num_lookahead_tokens)
            total += steps * (gradient + FORWARD_SHARE * sampling)
    return StepCost(control, rows_per_step, max_length, max_steps, *first, total)


def loss_mechanisms(loss_fields: dict) -> dict:
    """The passes a loss config adds (keywords of :func:`positions_per_row`), from its fields (a run_config.json's
    "QuietStarLossConfig" section; older runs lack the fields: none)."""
    return dict(hindsight=int(loss_fields.get("hindsight_tokens") or 0) > 0,
                contrastive=float(loss_fields.get("contrastive_reward_weight") or 0) > 0)


def equal_flops_steps(cost: dict) -> tuple[float, int]:
    """(factor, steps) for a thinking run's "StepCost" section ``cost``: plain steps over the same rows per step and
    window length whose token positions equal the run's, as a multiple of its steps and as a step count (rounded up)."""
    if cost.get("training_token_positions") is None:
        raise ValueError("The run was sized in epochs (max_steps unset), so its total cost is not recorded; give the "
                         "thinking run a max_steps.")
    plain_step = cost["rows_per_step"] * cost["max_length"]
    steps = math.ceil(cost["training_token_positions"] / plain_step - 1e-9)
    return cost["training_token_positions"] / (plain_step * cost["max_steps"]), steps


def main(argv: list[str] | None = None) -> None:
    from .run_files import read_run_config

    parser = argparse.ArgumentParser(description="The finetune control's max_steps for equal training FLOPs.")
    parser.add_argument("run_dir", help="A thinking run's folder (its run_config.json).")
    run_dir = parser.parse_args(argv).run_dir
    cost = read_run_config(run_dir).get("StepCost")
    if cost is None:
        raise SystemExit(f"{run_dir}/run_config.json has no StepCost section (written by an older quietstar-train).")
    factor, steps = equal_flops_steps(cost)
    print(f"{run_dir}: {cost['max_steps']} steps of {cost['rows_per_step']} rows x {cost['max_length']} tokens cost "
          f"{cost['training_token_positions']:.4g} token positions, {factor:.4g} x as many as plain steps. Equal FLOPs: "
          f"train the finetune control with --max_steps {steps}.")


if __name__ == "__main__":
    main()
