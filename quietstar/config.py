"""QuietStarConfig: what a Quiet-STaR model is (docs/design.md §1), saved with every checkpoint
(quietstar/checkpoint.py) and compared when a run resumes.

How the loss is weighed is a run setting (quietstar/loss_config.py), and how attention runs a process setting
(quietstar/attention/settings.py); neither is saved with the model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

MIXING_MODES = ("logits", "logprobs", "bounded")
BOUNDED_MIXING_MODES = ("logprobs", "bounded")  # w in [0, 1]
TEXT_PATHS = ("train", "frozen", "thought_lora")
THOUGHT_KINDS = ("sampled", "filler")

# Fields added after checkpoints were first written, with the behaviour of the code that wrote those checkpoints.
ADDED_FIELDS_BEFORE = dict(text_path="train")


@dataclass
class QuietStarConfig:
    """The thought process, the mixing and the thought tokens: what the weights were trained for.

    Names follow docs/design.md §1: T = ``num_thought_tokens``, A = ``num_lookahead_tokens``,
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
    thought_fraction: float = field(
        default=1.0,
        metadata={"help": "q in (0, 1]: the share of text positions a training step thinks at. Below 1, each row "
                          "thinks only at its ceil(q * real tokens) positions of highest base next-token entropy "
                          "(anchors, chosen from the text pass), so sampling and the gradient pass hold N*M*S branch "
                          "tokens instead of N*L*S; the other positions take the base prediction. Runs on the eager "
                          "attention only (docs/design.md §7, 'Thinking where it matters'). 1: every position."},
    )
    text_path: str = field(
        default="train",
        metadata={"help": f"One of {TEXT_PATHS}: how training may change the predictions made without thoughts. "
                          "'train': the LM trains on every token (official). 'frozen': the LM's weights do not train; "
                          "only the thought embeddings and the mixing head do. 'thought_lora': LoRA adapters (the "
                          "run's peft settings) act on thought-branch tokens only, so the text tokens, and every "
                          "prediction made without thoughts, stay exactly the base model's."},
    )
    mixing: str = field(
        default="logits",
        metadata={
            "help": "'logits': z = (1-w) z_base + w z_thought with an unbounded w (official code; starts exactly at "
            "the base model). 'logprobs': log p = (1-s) log p_base + s log p_thought with s = sigmoid(w) "
            "(the paper's text; starts at an even mix). 'bounded': z = (1-w) z_base + w z_thought with "
            "w = sigmoid(u + logit(0.01)) in (0, 1) (starts at w = 0.01: near, not exactly at, the base model; "
            "docs/design.md §1)."
        },
    )
    start_thought_token: str = field(default="<|startofthought|>", metadata={"help": "Token that opens a thought."})
    end_thought_token: str = field(default="<|endofthought|>", metadata={"help": "Token that closes a thought."})
    thought_init_text: str = field(
        default="---",
        metadata={"help": "The thought tokens' embeddings start as the embedding of this text's first token."},
    )
    thoughts: str = field(
        default="sampled",
        metadata={"help": f"One of {THOUGHT_KINDS}. 'sampled': Quiet-STaR's sampled thoughts. 'filler': every thought "
                          "is T copies of the filler token (the first token of thought_init_text, what the null "
                          "scoring view uses): a model trained by the null-thoughts control (set by the training "
                          "option control: null_thoughts, not by hand), which thinks filler wherever it thinks."},
    )

    def __post_init__(self):
        for name in ("num_thought_tokens", "num_lookahead_tokens", "num_thoughts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"QuietStarConfig.{name} must be a positive integer, got {value!r}.")
        if self.text_path not in TEXT_PATHS:
            raise ValueError(f"QuietStarConfig.text_path must be one of {TEXT_PATHS}, got {self.text_path!r}.")
        if not self.thought_temperature > 0:
            raise ValueError(f"QuietStarConfig.thought_temperature must be > 0, got {self.thought_temperature!r}.")
        fraction = self.thought_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"QuietStarConfig.thought_fraction must be in (0, 1], got {self.thought_fraction!r}.")
        if self.mixing not in MIXING_MODES:
            raise ValueError(f"QuietStarConfig.mixing must be one of {MIXING_MODES}, got {self.mixing!r}.")
        if self.thoughts not in THOUGHT_KINDS:
            raise ValueError(f"QuietStarConfig.thoughts must be one of {THOUGHT_KINDS}, got {self.thoughts!r}.")
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
        # A config saved before a field existed was trained without it: fill in what the code did then.
        return cls(**{**ADDED_FIELDS_BEFORE, **values})
