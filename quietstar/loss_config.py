"""QuietStarLossConfig: how the Quiet-STaR loss is weighed (docs/design.md §1, "Losses"). A run setting, not part
of the model: training writes it to the run's ``run_config.json``, never into a checkpoint.

One set of defaults, the recipe that does not wreck the LM (docs/recipe.md); :meth:`QuietStarLossConfig.official`
gives the official code's settings. :func:`quietstar.losses.quietstar_loss` takes one, and so does a model call
with ``labels`` (``model(ids, labels=ids, loss_config=...)``; by default the model's ``loss_config``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .config import BOUNDED_MIXING_MODES

REWARD_SOURCES = ("mixed", "thought")
REWARD_PRECISIONS = ("fp32", "autocast")
ADVANTAGE_NORMALIZATIONS = ("none", "batch_std")
MIXING_PRIOR_REFERENCES = ("thought", "mixed")

# The official code's loss settings (docs/design.md §1): a preset, not the default (QuietStarLossConfig.official).
OFFICIAL_LOSS = dict(reinforce_temperature=3.0, clip_negative_advantage=True, policy_weight=1e6, reward_source="mixed",
                     reward_precision="autocast", advantage_normalization="none", thought_nll_weight=0.0)

# Saves written before the loss left the model config held its fields, some of them only from a later version on:
# a field such a save lacks gets what the code that wrote it did (quietstar/checkpoint.py reads them).
SAVED_LOSS_FIELDS_BEFORE = dict(reward_source="mixed", reward_precision="autocast", advantage_normalization="none",
                                thought_nll_weight=0.0)


@dataclass(frozen=True)
class QuietStarLossConfig:
    """The weights and choices of L = L_NLL + gamma * L_thought + lambda * L_RL (quietstar.losses.quietstar_loss).

    The defaults are the recipe: scoring at the sampling temperature with centred, unclipped, batch-normalised
    advantages, a reward from the thought path alone computed in fp32, and a thought-path NLL term.
    """

    base_loss_weight: float = field(
        default=0.5,
        metadata={"help": "beta: weight of the base-model NLL; the mixed NLL gets 1 - beta."},
    )
    policy_weight: float = field(
        default=1.0,
        metadata={"help": "lambda: weight of the REINFORCE loss. With advantage_normalization 'batch_std' it is the "
                          "RL gradient relative to the NLL gradient; the official code used 1e6 with raw advantages."},
    )
    reinforce_temperature: float = field(
        default=1.0,
        metadata={"help": "tau_RL: temperature of the log-softmax in the policy-gradient loss. Equal to "
                          "thought_temperature it is the true policy's log-probability (an unbiased REINFORCE "
                          "gradient); the official 3 sharpens every distribution whatever the rewards say."},
    )
    clip_negative_advantage: bool = field(
        default=False,
        metadata={"help": "Train only on thoughts better than the mean of their position (r+ = max(r, 0); the "
                          "official code). Clipping gives the policy gradient a non-zero mean even when rewards carry "
                          "no information; false keeps it centred and unbiased."},
    )
    reward_source: str = field(
        default="thought",
        metadata={"help": f"One of {REWARD_SOURCES}. 'mixed': R = -sum_s NLL of the mixed prediction (official; "
                          "proportional to the mixing weight w, so zero while w = 0). 'thought': R = -sum_s NLL of "
                          "lm_head(h_thought) alone, independent of w (a thought's own likelihood gain)."},
    )
    reward_precision: str = field(
        default="fp32",
        metadata={"help": f"One of {REWARD_PRECISIONS}. 'fp32': the reward path (mixing head, thought-path lm_head, "
                          "the cross-entropies that make rewards) runs in fp32 even under bf16 autocast, where the "
                          "reward difference between two thoughts is otherwise mostly rounding noise. 'autocast': as "
                          "the surrounding autocast (official)."},
    )
    advantage_normalization: str = field(
        default="batch_std",
        metadata={"help": f"One of {ADVANTAGE_NORMALIZATIONS}. 'batch_std': divide the centred advantages by their "
                          "standard deviation over the batch (at least advantage_std_floor), so that policy_weight "
                          "means the same whatever the reward scale. 'none': raw advantages (official)."},
    )
    advantage_std_floor: float = field(
        default=0.01,
        metadata={"help": "Smallest standard deviation (in nats) that 'batch_std' divides by: a batch whose thoughts "
                          "all score alike is not blown up into a large gradient."},
    )
    thought_nll_weight: float = field(
        default=0.5,
        metadata={"help": "gamma: weight of the NLL of lm_head(h_thought) alone (the thought path's own prediction of "
                          "the lookahead tokens), so the model learns to read its thoughts while the mixing weight is "
                          "small. 0: no such term (official)."},
    )
    mixing_prior_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the mixing-weight prior L_prior = mean over valid (n, j, s) of w * max(0, "
                          "NLL_thought - NLL_base) (NLLs detached; quietstar.losses.mixing_prior): it pulls w towards "
                          "0 wherever the thought path does not beat the base prediction. Needs a bounded w (the "
                          "model's mixing: bounded or logprobs). 0: no prior."},
    )
    mixing_prior_reference: str = field(
        default="thought",
        metadata={"help": f"One of {MIXING_PRIOR_REFERENCES}: the prediction the prior compares with the base one. "
                          "'thought': the thought path alone, max(0, NLL_thought - NLL_base), as the issue states "
                          "it; it charges w wherever the thought path alone loses, which at small scale is almost "
                          "everywhere. 'mixed': the mixed prediction, max(0, NLL_mixed - NLL_base), which is itself "
                          "about w times the thought path's loss, so it charges high w where mixing hurts and "
                          "vanishes as w -> 0 (it cannot switch thinking off where it never hurt)."},
    )
    entropy_bonus_weight: float = field(
        default=0.0,
        metadata={"help": "eta: weight of the entropy bonus L_ent = -mean entropy (nats) of the distributions the "
                          "thought tokens were drawn from (at the model's thought_temperature), over the positions of "
                          "L_RL: keeps the thought policy exploring instead of collapsing onto one generic thought. "
                          "0: off."},
    )
    contrastive_reward_weight: float = field(
        default=0.0,
        metadata={"help": "alpha: position-contrastive reward R' = R - alpha * G_moved, where G_moved is the thought's "
                          "gain (base NLL minus the reward source's NLL) when replayed contrastive_shift positions "
                          "later, so a thought that helps anywhere earns less than one that helps where it was "
                          "thought. Costs a second, gradient-free thought-expanded pass. Positions without a later "
                          "partner take no part in L_RL. 0: off (no extra pass)."},
    )
    contrastive_shift: int | None = field(
        default=None,
        metadata={"help": "How many positions later the position-contrastive reward replays each thought (at least "
                          "the model's num_lookahead_tokens, so its targets there are disjoint from its own). None: "
                          "num_lookahead_tokens."},
    )
    hindsight_tokens: int = field(
        default=0,
        metadata={"help": "h: hindsight proposals (quietstar.hindsight). hindsight_thoughts of the N thoughts of each "
                          "position are drawn by the model after it has also read the next h text tokens, the rest "
                          "by the policy, and every loss term is reweighted to the policy by bounded importance "
                          "weights, so that thoughts which explain what comes are tried more often. Costs T more "
                          "gradient-free sampling steps (each thought replayed under the other view). Sampled on the "
                          "eager attention; not with thought_fraction < 1. 0: off."},
    )
    hindsight_thoughts: int = field(
        default=1,
        metadata={"help": "K: how many of the N thoughts of each position the hindsight proposal draws when "
                          "hindsight_tokens > 0; 1 <= K < num_thoughts: the policy keeps N - K draws, which bounds "
                          "the importance weights by N / (N - K)."},
    )

    def __post_init__(self):
        for name, allowed in (("reward_source", REWARD_SOURCES), ("reward_precision", REWARD_PRECISIONS),
                              ("advantage_normalization", ADVANTAGE_NORMALIZATIONS),
                              ("mixing_prior_reference", MIXING_PRIOR_REFERENCES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"QuietStarLossConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        if not self.advantage_std_floor > 0:
            raise ValueError(f"QuietStarLossConfig.advantage_std_floor must be > 0, got {self.advantage_std_floor!r}.")
        if not self.thought_nll_weight >= 0:
            raise ValueError(f"QuietStarLossConfig.thought_nll_weight must be >= 0, got {self.thought_nll_weight!r}.")
        if not self.reinforce_temperature > 0:
            raise ValueError(
                f"QuietStarLossConfig.reinforce_temperature must be > 0, got {self.reinforce_temperature!r}.")
        if not 0.0 <= self.base_loss_weight <= 1.0:
            raise ValueError(f"QuietStarLossConfig.base_loss_weight must be in [0, 1], got {self.base_loss_weight!r}.")
        if not self.policy_weight >= 0:
            raise ValueError(f"QuietStarLossConfig.policy_weight must be >= 0, got {self.policy_weight!r}.")
        if isinstance(self.mixing_prior_weight, bool) or not (math.isfinite(self.mixing_prior_weight)
                                                            and self.mixing_prior_weight >= 0):
            raise ValueError("QuietStarLossConfig.mixing_prior_weight must be a finite number >= 0, got "
                             f"{self.mixing_prior_weight!r}.")

        for name in ("entropy_bonus_weight", "contrastive_reward_weight"):
            if isinstance(getattr(self, name), bool) or not getattr(self, name) >= 0:
                raise ValueError(f"QuietStarLossConfig.{name} must be >= 0 (0 turns it off), got {getattr(self, name)!r}.")
        for name, least in (("hindsight_tokens", 0), ("hindsight_thoughts", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"QuietStarLossConfig.{name} must be an integer >= {least}, got {value!r}.")
        shift = self.contrastive_shift
        if shift is not None and (not isinstance(shift, int) or isinstance(shift, bool) or shift < 1):
            raise ValueError(f"QuietStarLossConfig.contrastive_shift must be a positive integer (at least "
                             f"num_lookahead_tokens), or None for num_lookahead_tokens; got {shift!r}.")

    def contrastive_distance(self, num_lookahead_tokens: int) -> int:
        """How many positions later the position-contrastive reward replays each thought (contrastive_shift, or A).
        Checked where it is used, against the model's A at that call: evaluation and the layout probe change A
        (set_thought_lengths) on models that never compute the contrastive reward."""
        shift = self.contrastive_shift
        if shift is not None and shift < num_lookahead_tokens:
            raise ValueError(f"QuietStarLossConfig.contrastive_shift = {shift} is below num_lookahead_tokens = "
                             f"{num_lookahead_tokens}: a thought moved fewer positions would be scored on some of "
                             "its own targets. Raise contrastive_shift, or set it to None (= num_lookahead_tokens).")
        return num_lookahead_tokens if shift is None else shift

    def check_hindsight(self, num_thoughts: int, thought_fraction: float) -> None:
        """Refuse hindsight proposals the model cannot draw: K >= N (the policy would draw nothing and the weights
        would be unbounded) or thoughts at anchors (``thought_fraction`` < 1)."""
        if self.hindsight_tokens == 0:
            return
        if self.hindsight_thoughts >= num_thoughts:
            raise ValueError(f"QuietStarLossConfig.hindsight_thoughts = {self.hindsight_thoughts} must be below "
                             f"num_thoughts = {num_thoughts}: the policy must draw some of the thoughts of each "
                             "position. Lower hindsight_thoughts or raise num_thoughts.")
        if thought_fraction < 1:
            raise ValueError(f"hindsight_tokens > 0 samples proposals at every position, and thought_fraction = "
                             f"{thought_fraction} thinks at anchors only; set one of them off.")

    def check_mixing(self, mixing: str) -> None:
        """Refuse the mixing prior on a model whose w is unbounded (``mixing``: the model config's mode): w could go
        below 0, and the prior would reward that."""
        if self.mixing_prior_weight > 0 and mixing not in BOUNDED_MIXING_MODES:
            raise ValueError(f"QuietStarLossConfig.mixing_prior_weight needs a mixing weight bounded to [0, 1] (the "
                             f"model's mixing one of {BOUNDED_MIXING_MODES}); with mixing {mixing!r} w can go below 0 "
                             "and the prior would reward that. Set mixing: bounded, or mixing_prior_weight: 0.")

    @property
    def needs_thought_logits(self) -> bool:
        """Whether the loss reads the thought path's own predictions (its reward, its NLL term or the mixing prior)."""
        return (self.reward_source == "thought" or self.thought_nll_weight > 0
                or (self.mixing_prior_weight > 0 and self.mixing_prior_reference == "thought"))

    @classmethod
    def official(cls, **overrides) -> "QuietStarLossConfig":
        """The official code's loss settings (lambda = 1e6, tau_RL = 3, clipped raw advantages, rewards from the
        mixed prediction under autocast, no thought-path NLL); ``overrides`` change any field."""
        return cls(**{**OFFICIAL_LOSS, **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls))
