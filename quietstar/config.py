"""QuietStarConfig: the model-side hyperparameters of Quiet-STaR (DESIGN §1), saved with checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

MIXING_MODES = ("logits", "logprobs")
ATTENTION_BACKENDS = ("auto", "eager", "triton")


@dataclass
class QuietStarConfig:
    """Hyperparameters of the thought process, the mixing head and the losses.

    Names follow DESIGN §1: T = ``num_thought_tokens``, A = ``num_lookahead_tokens``,
    N = ``num_thoughts``; a branch holds S = T + A + 1 tokens.
    """

    num_thought_tokens: int = field(
        default=9,
        metadata={"help": "T: tokens sampled per thought (the official n_ahead minus 3; the paper used 9 to 21)."},
    )
    num_lookahead_tokens: int = field(
        default=4,
        metadata={"help": "A: true tokens scored after each thought (extended teacher forcing; official n_ahead_talk)."},
    )
    num_thoughts: int = field(
        default=2,
        metadata={"help": "N: thoughts sampled per position; their mean reward is the REINFORCE baseline (n_passes)."},
    )
    thought_temperature: float = field(
        default=1.0, metadata={"help": "Temperature at which thought tokens are sampled during training."}
    )
    reinforce_temperature: float = field(
        default=3.0, metadata={"help": "tau_RL: temperature of the log-softmax in the policy-gradient loss."}
    )
    base_loss_weight: float = field(
        default=0.5,
        metadata={"help": "beta: weight of the base-model NLL; the mixed NLL gets 1 - beta."},
    )
    policy_weight: float = field(
        default=1e6, metadata={"help": "lambda: weight of the REINFORCE loss (1e6 in the official code)."}
    )
    clip_negative_advantage: bool = field(
        default=True, metadata={"help": "Train only on thoughts better than the mean of their position (r+ = max(r, 0))."}
    )
    mixing: str = field(
        default="logits",
        metadata={
            "help": "'logits': z = (1-w) z_base + w z_thought with an unbounded w (official code; starts exactly at "
            "the base model). 'logprobs': log p = (1-s) log p_base + s log p_thought with s = sigmoid(w) "
            "(the paper's text; starts at an even mix)."
        },
    )
    start_thought_token: str = field(default="<|startofthought|>", metadata={"help": "Token that opens a thought."})
    end_thought_token: str = field(default="<|endofthought|>", metadata={"help": "Token that closes a thought."})
    thought_init_text: str = field(
        default="---",
        metadata={"help": "The thought tokens' embeddings start as the embedding of this text's first token."},
    )
    attention_backend: str = field(
        default="auto",
        metadata={"help": "Backend of the 'quietstar' attention in the gradient pass: 'eager' (PyTorch, the "
                          "reference), 'triton' (the SUS kernels of quietstar.ops.sus; CUDA) or 'auto' (Triton on "
                          "CUDA; on CPU the exact flash fast path for unpadded rows, else eager)."},
    )
    sus_c: float | None = field(
        default=None,
        metadata={"help": "SUS backprop (DESIGN §3) in the gradient pass: keep each attention weight P in the "
                          "backward with probability min(1, c P), rescaled. None: exact backward. The paper found "
                          "c of 25-30 costs about 1% extra gradient variance at n = 2000."},
    )

    def __post_init__(self):
        for name in ("num_thought_tokens", "num_lookahead_tokens", "num_thoughts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"QuietStarConfig.{name} must be a positive integer, got {value!r}.")
        for name in ("thought_temperature", "reinforce_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"QuietStarConfig.{name} must be > 0, got {getattr(self, name)!r}.")
        if not 0.0 <= self.base_loss_weight <= 1.0:
            raise ValueError(f"QuietStarConfig.base_loss_weight must be in [0, 1], got {self.base_loss_weight!r}.")
        if self.policy_weight < 0:
            raise ValueError(f"QuietStarConfig.policy_weight must be >= 0, got {self.policy_weight!r}.")
        if self.mixing not in MIXING_MODES:
            raise ValueError(f"QuietStarConfig.mixing must be one of {MIXING_MODES}, got {self.mixing!r}.")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"QuietStarConfig.attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}."
            )
        if self.sus_c is not None and (isinstance(self.sus_c, bool) or not self.sus_c > 0):
            raise ValueError(f"QuietStarConfig.sus_c must be > 0 (or None for the exact backward), got {self.sus_c!r}.")
        if self.start_thought_token == self.end_thought_token:
            raise ValueError("QuietStarConfig.start_thought_token and end_thought_token must differ.")
        if not self.thought_init_text:
            raise ValueError("QuietStarConfig.thought_init_text must be a non-empty string.")

    @property
    def branch_length(self) -> int:
        """S = T + A + 1: <sot>, T thought tokens, <eot>, then A - 1 teacher-forced true tokens."""
        return self.num_thought_tokens + self.num_lookahead_tokens + 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "QuietStarConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown QuietStarConfig fields {unknown}; valid fields are {sorted(known)}.")
        return cls(**values)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "QuietStarConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))
