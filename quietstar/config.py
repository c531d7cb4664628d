"""QuietStarConfig: the model-side hyperparameters of Quiet-STaR (docs/design.md §1), saved with checkpoints
(quietstar/checkpoint.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

MIXING_MODES = ("logits", "logprobs")
ATTENTION_BACKENDS = ("auto", "eager", "flex", "triton")
SUS_DESIGNS = ("a", "c")  # a: each weight drawn alone (quietstar/ops/sus/reference.py); c: per (row, key tile) first
REWARD_SOURCES = ("mixed", "thought")
REWARD_PRECISIONS = ("fp32", "autocast")
ADVANTAGE_NORMALIZATIONS = ("none", "batch_std")
TEXT_PATHS = ("train", "frozen", "thought_lora")
TRITON_FP32_PRECISIONS = ("tf32", "ieee")

# The official code's loss settings (docs/design.md §1): a preset, not the default (see QuietStarConfig.official).
OFFICIAL_LOSS = dict(reinforce_temperature=3.0, clip_negative_advantage=True, policy_weight=1e6, reward_source="mixed",
                     reward_precision="autocast", advantage_normalization="none", thought_nll_weight=0.0)

# Fields added after checkpoints were first written, with the behaviour of the code that wrote those checkpoints.
ADDED_FIELDS_BEFORE = dict(reward_source="mixed", reward_precision="autocast", advantage_normalization="none",
                           thought_nll_weight=0.0, text_path="train", triton_fp32_precision="ieee", sus_design="a")


@dataclass
class QuietStarConfig:
    """Hyperparameters of the thought process, the mixing head and the losses.

    Names follow docs/design.md §1: T = ``num_thought_tokens``, A = ``num_lookahead_tokens``,
    N = ``num_thoughts``; a branch holds S = T + A + 1 tokens.

    The loss defaults are the recipe that does not wreck the LM (docs/recipe.md): scoring at the sampling
    temperature with centred, unclipped, batch-normalised advantages, a reward from the thought path alone computed
    in fp32, and a thought-path NLL term. :meth:`official` gives the official code's settings instead.
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
        default=1.0,
        metadata={"help": "tau_RL: temperature of the log-softmax in the policy-gradient loss. Equal to "
                          "thought_temperature it is the true policy's log-probability (an unbiased REINFORCE "
                          "gradient); the official 3 sharpens every distribution whatever the rewards say."},
    )
    base_loss_weight: float = field(
        default=0.5,
        metadata={"help": "beta: weight of the base-model NLL; the mixed NLL gets 1 - beta."},
    )
    policy_weight: float = field(
        default=1.0,
        metadata={"help": "lambda: weight of the REINFORCE loss. With advantage_normalization 'batch_std' it is the "
                          "RL gradient relative to the NLL gradient; the official code used 1e6 with raw advantages."},
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
        metadata={"help": "Backend of the 'quietstar' attention: 'eager' (PyTorch, the reference, in every phase), "
                          "'flex' (PyTorch's FlexAttention with the thought layout as a block mask, in the exact "
                          "gradient pass; CUDA), 'triton' (the kernels of quietstar.ops.sus in the gradient pass, exact "
                          "or SUS; CUDA) or 'auto' (on CUDA FlexAttention for an exact gradient pass and Triton for "
                          "SUS; on CPU the exact flash fast path for unpadded rows, else eager). "
                          "quietstar.attention.dispatch.resolve_backend applies it."},
    )
    sus_c: float | None = field(
        default=None,
        metadata={"help": "SUS backprop (docs/design.md §3) in the gradient pass: keep each attention weight P in the "
                          "backward with probability min(1, c P), rescaled. None: exact backward. The paper found "
                          "c of 25-30 costs about one percent extra gradient variance at n = 2000."},
    )
    sus_design: str = field(
        default="a",
        metadata={"help": "How SUS (sus_c) draws its mask: 'a' (each attention weight on its own) or 'c' (first each "
                          "(row, 64-key tile) with probability min(1, c * its mass), then the entries of an opened "
                          "tile; the backward visits the opened tiles only). Same per-weight probability, both "
                          "unbiased; quietstar/ops/sus/row_tiles.py."},
    )

    triton_fp32_precision: str = field(
        default="tf32",
        metadata={"help": "How the Triton kernels (attention_backend 'triton', or SUS under 'auto' on CUDA) multiply fp32 "
                          "inputs: 'tf32' (tensor cores, about 1e-3 relative error per product) or 'ieee' (exact fp32, "
                          "several times slower; the setting the tests compare against the fp32 reference with). fp16 "
                          "and bf16 inputs ignore it."},
    )

    # --- added by issue 21 (loss): recipe mechanisms for thoughts that carry their position (docs/design.md §1,
    # "Losses"). Loss fields: when merging config-split, move them into the loss config. Their defaults are the
    # behaviour of the code before them, so older checkpoints need no ADDED_FIELDS_BEFORE entry.
    entropy_bonus_weight: float = field(
        default=0.0,
        metadata={"help": "eta: weight of the entropy bonus L_ent = -mean entropy (nats) of the distributions the "
                          "thought tokens were drawn from (at thought_temperature), over the positions of L_RL: keeps "
                          "the thought policy exploring instead of collapsing onto one generic thought. 0: off."},
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
                          "num_lookahead_tokens, so its targets there are disjoint from its own). None: "
                          "num_lookahead_tokens."},
    )

    def __post_init__(self):
        for name in ("num_thought_tokens", "num_lookahead_tokens", "num_thoughts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"QuietStarConfig.{name} must be a positive integer, got {value!r}.")
        for name, allowed in (("reward_source", REWARD_SOURCES), ("reward_precision", REWARD_PRECISIONS),
                              ("advantage_normalization", ADVANTAGE_NORMALIZATIONS), ("text_path", TEXT_PATHS),
                              ("triton_fp32_precision", TRITON_FP32_PRECISIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"QuietStarConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        if not self.advantage_std_floor > 0:
            raise ValueError(f"QuietStarConfig.advantage_std_floor must be > 0, got {self.advantage_std_floor!r}.")
        if not self.thought_nll_weight >= 0:
            raise ValueError(f"QuietStarConfig.thought_nll_weight must be >= 0, got {self.thought_nll_weight!r}.")
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
        if self.sus_design not in SUS_DESIGNS:
            raise ValueError(f"QuietStarConfig.sus_design must be one of {SUS_DESIGNS}, got {self.sus_design!r}.")
        if self.sus_c is not None and self.attention_backend == "flex":
            raise ValueError("QuietStarConfig.sus_c needs a SUS backward, which attention_backend='flex' does not have; "
                             "use 'auto' or 'triton' (or 'eager' for the PyTorch reference).")
        if self.start_thought_token == self.end_thought_token:
            raise ValueError("QuietStarConfig.start_thought_token and end_thought_token must differ.")
        if not self.thought_init_text:
            raise ValueError("QuietStarConfig.thought_init_text must be a non-empty string.")
        for name in ("entropy_bonus_weight", "contrastive_reward_weight"):
            if isinstance(getattr(self, name), bool) or not getattr(self, name) >= 0:
                raise ValueError(f"QuietStarConfig.{name} must be >= 0 (0 turns it off), got {getattr(self, name)!r}.")
        shift = self.contrastive_shift
        if shift is not None and (not isinstance(shift, int) or isinstance(shift, bool) or shift < 1):
            raise ValueError(f"QuietStarConfig.contrastive_shift must be a positive integer (at least "
                             f"num_lookahead_tokens), or None for num_lookahead_tokens; got {shift!r}.")

    @property
    def branch_length(self) -> int:
        """S = T + A + 1: <sot>, T thought tokens, <eot>, then A - 1 teacher-forced true tokens."""
        return self.num_thought_tokens + self.num_lookahead_tokens + 1

    @property
    def contrastive_distance(self) -> int:
        """How many positions later the position-contrastive reward replays each thought (contrastive_shift, or A).
        Checked here, where it is used, rather than in __post_init__: evaluation and the layout probe change A
        (set_thought_lengths) on models that never compute the contrastive reward."""
        shift = self.contrastive_shift
        if shift is not None and shift < self.num_lookahead_tokens:
            raise ValueError(f"QuietStarConfig.contrastive_shift = {shift} is below num_lookahead_tokens = "
                             f"{self.num_lookahead_tokens}: a thought moved fewer positions would be scored on some of "
                             "its own targets. Raise contrastive_shift, or set it to None (= num_lookahead_tokens).")
        return self.num_lookahead_tokens if shift is None else shift

    @classmethod
    def official(cls, **overrides) -> "QuietStarConfig":
        """The official code's loss settings (lambda = 1e6, tau_RL = 3, clipped raw advantages, rewards from the
        mixed prediction under autocast, no thought-path NLL); ``overrides`` change any field."""
        return cls(**{**OFFICIAL_LOSS, **overrides})

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
