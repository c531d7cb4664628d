"""What bench/step.py and bench/efficiency.py time: the model, one measurement cell, and one training step.

Model: a random Llama (hidden 256, 4 layers, 4 attention heads, 2 key/value heads, intermediate 688,
vocabulary 1024), fp32 on CPU (bf16 with ``device="cuda"``). A step is forward + backward + AdamW of one of
three implementations: ``plain`` (an ordinary causal-LM step over B * (1 + N*S) rows of L tokens, the
efficiency's denominator), ``ours`` (QuietStarForCausalLM) and ``dense`` (the official scheme,
quietstar/official_dense.py).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

MODEL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=688, vocab_size=1024)
ARCHITECTURE = "random Llama: hidden 256, 4 layers, 4 heads, 2 KV heads, intermediate 688, vocab 1024"
MODEL_DESCRIPTION = f"{ARCHITECTURE}, fp32, CPU"
TEXT_TOKEN_RANGE = 256  # random text ids stay below the thought-token ids the tokenizer adds
# The step's settings when a script does not set them (bench/step.py's flags default to these).
STEP_DEFAULTS = dict(batch=1, lookahead_tokens=4, num_thoughts=2, threads=2, dense_attention="sdpa", seed=0)


def model_description(device: str) -> str:
    return MODEL_DESCRIPTION if device == "cpu" else f"{ARCHITECTURE}, bf16, {device.upper()}"


def step_settings(**overrides) -> argparse.Namespace:
    """The settings :func:`build_step` reads, as STEP_DEFAULTS with ``overrides``."""
    return argparse.Namespace(**{**STEP_DEFAULTS, **overrides})


@dataclass
class Cell:
    """One measurement: an implementation at one text length L and thought length T."""

    impl: str  # "plain", "ours" or "dense"
    length: int
    thought_tokens: int
    status: str = "pending"  # "ok", "timeout", "oom-risk", "error"
    note: str = ""
    step_seconds: list = field(default_factory=list)  # every timed step
    foreign_cores: list = field(default_factory=list)  # CPU cores other processes used during each timed step
    seconds: float | None = None  # median of the quiet timed steps (of all of them when none was quiet)
    quiet_steps: int = 0
    warmup_seconds: float | None = None
    peak_bytes: int | None = None
    predicted_peak_bytes: int | None = None
    memory_method: str = ""

    @property
    def key(self):
        return self.impl, self.length, self.thought_tokens


def branch_length(args, thought_tokens: int) -> int:
    """S = T + A + 1."""
    return thought_tokens + args.lookahead_tokens + 1


def positions_per_row(args, length: int, thought_tokens: int) -> int:
    """Token positions a Quiet-STaR step processes per text row: L * (1 + N*S)."""
    return length * (1 + args.num_thoughts * branch_length(args, thought_tokens))


def build_step(args, cell: Cell, device: str = "cpu", attention_backend: str = "auto"):
    """Model, optimizer and batch of one cell; returns a function that runs one training step.

    ``attention_backend``: the Quiet-STaR model's (AttentionSettings.attention_backend).
    """
    import torch

    from quietstar import AttentionSettings, QuietStarConfig, QuietStarForCausalLM
    from quietstar.official_dense import dense_forward
    from quietstar.tiny import byte_tokenizer, tiny_model

    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the dtype the GPU kernels are built for
    base = tiny_model("llama", seed=args.seed, **MODEL).to(device, dtype)
    generator = torch.Generator().manual_seed(args.seed)
    S = branch_length(args, cell.thought_tokens)
    if cell.impl == "plain":
        base.set_attn_implementation("sdpa")
        rows = args.batch * (1 + args.num_thoughts * S)
        ids = torch.randint(0, TEXT_TOKEN_RANGE, (rows, cell.length), generator=generator).to(device)
        model = base

        def loss():
            return base(input_ids=ids, labels=ids).loss
    else:
        config = QuietStarConfig(num_thought_tokens=cell.thought_tokens, num_lookahead_tokens=args.lookahead_tokens,
                                 num_thoughts=args.num_thoughts)
        model = QuietStarForCausalLM.from_base(base, byte_tokenizer(), config,
                                               attention=AttentionSettings(attention_backend=attention_backend))
        model = model.to(device, dtype)
        ids = torch.randint(0, TEXT_TOKEN_RANGE, (args.batch, cell.length), generator=generator).to(device)
        if device != "cpu":
            generator = torch.Generator(device).manual_seed(args.seed)  # thoughts are drawn where the logits are
        if cell.impl == "ours":
            def loss():
                return model(ids, labels=ids, output_logits=False, generator=generator).loss
        else:
            model.base.set_attn_implementation(args.dense_attention)  # for the whole life of this process

            def loss():
                return dense_forward(model, ids, labels=ids, generator=generator).loss
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.001)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()  # the step's time is the GPU's, not the launches'

    return step
