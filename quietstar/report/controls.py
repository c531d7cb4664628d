"""The trained controls of a run report: which run folder each is, whether it matches the run it controls, and its
training compute.

Three controls separate what a thought says from what training did (docs/design.md §7):

- ``finetune``: the same adapters (rank, modules), data, seed and schedule trained as a plain LM on the text path
  without thoughts, for the same number of steps (``--finetune-control``);
- ``finetune_flops``: the same at equal training FLOPs, i.e. for :func:`flops_factor` times the steps
  (``--finetune-flops-control``);
- ``null_trained``: the same Quiet-STaR recipe with every thought fixed to filler from step 0, scored with filler
  (``--null-trained-control``).

Training compute counts token positions as quietstar.training.compute does (the numbers a run records in its
``StepCost`` and ``python -m quietstar.training.compute RUN`` prints): a Quiet-STaR step's gradient pass covers
L·(1 + N·S) positions per row (S = T + A + 1, the branch length) and its no-grad sampling L + N·L·T, counted at a
third; a plain LM step L. A control that is not given is stated missing in the report; nothing stands in for it
(least of all the base model).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from ..training.compute import FORWARD_SHARE, loss_mechanisms, positions_per_row
from ..training.run_files import read_run_config

CONTROLS = ("finetune", "finetune_flops", "null_trained")
# The QuietStarTrainingArguments.control each view's folder must have been trained with; the run itself: "none".
CONTROL_KIND = {"finetune": "finetune", "finetune_flops": "finetune", "null_trained": "null_thoughts"}
CONTROL_TITLES = {"finetune": "plain-LM fine-tune, equal steps", "finetune_flops": "plain-LM fine-tune, equal FLOPs",
                  "null_trained": "trained with filler thoughts, scored with filler"}
# How far a control's steps or positions may be from what equal steps / equal FLOPs ask (rounding to whole steps).
FLOPS_TOLERANCE = 0.05


def positions_per_step(run_config: dict, thinking: bool) -> float:
    """Token positions one optimizer step costs (one process; every process of a run does the same): batch ×
    accumulation rows, each a gradient pass plus FORWARD_SHARE × the sampling pass when the run thinks
    (quietstar.training.compute.positions_per_row). ``run_config``: a run folder's run_config.json."""
    training, data = run_config["QuietStarTrainingArguments"], run_config["DataArguments"]
    rows = int(training["per_device_train_batch_size"]) * int(training["gradient_accumulation_steps"])
    thoughts = run_config["QuietStarConfig"]
    gradient, sampling = positions_per_row("none" if thinking else "finetune", int(data["max_length"]),
                                           int(thoughts["num_thoughts"]), int(thoughts["num_thought_tokens"]),
                                           int(thoughts["num_lookahead_tokens"]),
                                           float(thoughts.get("thought_fraction", 1.0)),
                                           **loss_mechanisms(run_config.get("QuietStarLossConfig", {})))
    return rows * (gradient + FORWARD_SHARE * sampling)


def training_positions(run_config: dict, thinking: bool) -> float:
    """Token positions of the whole training run: max_steps × :func:`positions_per_step`."""
    return int(run_config["QuietStarTrainingArguments"]["max_steps"]) * positions_per_step(run_config, thinking)


def flops_factor(run_config: dict) -> float:
    """How many plain-LM steps (same batch and L) one Quiet-STaR step of this run costs: 1 + N·S + (1 + N·T) / 3."""
    return positions_per_step(run_config, thinking=True) / positions_per_step(run_config, thinking=False)


@dataclass
class Control:
    """One trained control as the report states it: its view name, run folder, steps, training positions, and its
    compute relative to the run it controls (``compute_ratio``: its positions / the run's)."""

    view: str
    run_dir: str
    steps: int
    positions: float
    compute_ratio: float

    def describe(self) -> str:
        return (f"{CONTROL_TITLES[self.view]}: `{self.run_dir}`, {self.steps} steps, {self.positions:,.0f} training token "
                f"positions ({self.compute_ratio:.3g} × the run's)")

    def to_dict(self) -> dict:
        return asdict(self)


def _same(name: str, ours, theirs, control_dir: str, view: str) -> None:
    if ours != theirs:
        raise ValueError(f"The {view} control {control_dir} differs from the run in {name}: {theirs!r} vs {ours!r}. "
                         "A control must repeat the run's recipe; train it with the run's config and the control "
                         "option.")


def _check_kind(control: dict, control_dir: str, view: str) -> None:
    """The control folder was trained as the kind of control ``view`` needs (:data:`CONTROL_KIND`): a plain recipe
    run or another control's folder given in its place would be compared as if it were that control."""
    needed = CONTROL_KIND[view]
    training = control["QuietStarTrainingArguments"]
    if "control" not in training:
        raise ValueError(f"The {view} control {control_dir} records no QuietStarTrainingArguments.control in its "
                         f"run_config.json (written before the field existed), so it cannot be told to be a {needed} "
                         f"control; retrain it with `control: {needed}` in its config.")
    if training["control"] != needed:
        raise ValueError(f"The {view} control {control_dir} was trained with control: {training['control']}, but the "
                         f"{view} control needs control: {needed}; give the run folder trained with "
                         f"`control: {needed}` in its config.")


def check_control(view: str, control_dir: str, run_config: dict) -> Control:
    """The control ``view`` in ``control_dir`` checked against the run it controls: trained as that kind of
    control (QuietStarTrainingArguments.control, :data:`CONTROL_KIND`; the run's own is ``none``), the same data,
    L, batch, seed and base model, and equal steps (``finetune``, ``null_trained``) or equal training positions
    within :data:`FLOPS_TOLERANCE` (``finetune_flops``). ValueError naming the mismatch otherwise."""
    if view not in CONTROLS:
        raise ValueError(f"Unknown control {view!r}; valid: {', '.join(CONTROLS)}.")
    # A run written before the field existed is a plain run: the controls came with the field.
    run_kind = run_config["QuietStarTrainingArguments"].get("control", "none")
    if run_kind != "none":
        raise ValueError(f"The run being reported (given the {view} control {control_dir}) was trained with "
                         f"control: {run_kind}, so it is itself a control; a run to report needs control: none. "
                         "Report the run trained with control: none and give this one as its control.")
    if not os.path.isdir(control_dir):
        raise FileNotFoundError(f"The {view} control folder {control_dir} does not exist.")
    control = read_run_config(control_dir)
    _check_kind(control, control_dir, view)
    for section, name in (("ModelArguments", "model_name_or_path"), ("DataArguments", "dataset"),
                          ("DataArguments", "max_length"), ("QuietStarTrainingArguments", "seed"),
                          ("QuietStarTrainingArguments", "per_device_train_batch_size"),
                          ("QuietStarTrainingArguments", "gradient_accumulation_steps"),
                          ("QuietStarTrainingArguments", "learning_rate")):
        _same(f"{section}.{name}", run_config[section][name], control[section][name], control_dir, view)
    thinking = view == "null_trained"
    steps = int(control["QuietStarTrainingArguments"]["max_steps"])
    run_steps = int(run_config["QuietStarTrainingArguments"]["max_steps"])
    positions, run_positions = training_positions(control, thinking), training_positions(run_config, True)
    ratio = positions / run_positions
    if view == "finetune_flops":
        if abs(ratio - 1) > FLOPS_TOLERANCE:
            wanted = round(run_steps * flops_factor(run_config))
            raise ValueError(f"The finetune_flops control {control_dir} trained {steps} steps ({ratio:.3g} × the "
                             f"run's token positions); equal FLOPs needs {wanted} steps (the run's {run_steps} × "
                             f"{flops_factor(run_config):.4g}; quietstar.training.compute).")
    else:
        _same("QuietStarTrainingArguments.max_steps", run_steps, steps, control_dir, view)
    return Control(view, control_dir, steps, positions, ratio)
