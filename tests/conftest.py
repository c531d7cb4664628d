"""Shared fixtures: tiny random models of several families, built locally (no downloads)."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors only in the interpreter, which must be on before they are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from quietstar import AttentionSettings, QuietStarConfig, QuietStarForCausalLM, QuietStarLossConfig
from quietstar.tiny import byte_tokenizer, tiny_model

ARCHITECTURES = ["llama", "mistral", "qwen2"]
# Two GSM8K and two CommonsenseQA items in the offline data's row format (quietstar.evaluation.data).
GSM8K_ROWS = [{"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"},
              {"question": "Tom has 3 apples and buys 39 more. How many?", "answer": "3 + 39 = 42\n#### 42"}]
CSQA_ROWS = [{"id": "a", "question": "Where do fish live?", "labels": list("ABCDE"),
              "texts": ["sea", "tree", "sky", "desk", "moon"], "answer_key": "A"},
             {"id": "b", "question": "What is hot?", "labels": list("ABCDE"),
              "texts": ["ice", "fire", "snow", "rain", "wind"], "answer_key": "B"}]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def make_model(arch: str = "llama", seed: int = 0, **settings) -> QuietStarForCausalLM:
    """A tiny Quiet-STaR model; defaults T=3, A=3, N=2. ``settings``: fields of QuietStarConfig, QuietStarLossConfig
    (the model's loss_config) and AttentionSettings, each to its own."""
    loss = {k: settings.pop(k) for k in QuietStarLossConfig.field_names() & set(settings)}
    attention = {k: settings.pop(k) for k in AttentionSettings.field_names() & set(settings)}
    values = dict(num_thought_tokens=3, num_lookahead_tokens=3, num_thoughts=2)
    values.update(settings)
    tokenizer = byte_tokenizer()
    base = tiny_model(arch, vocab_size=len(tokenizer), seed=seed)
    # eval(): families with dropout (gpt2) would otherwise differ from run to run.
    return QuietStarForCausalLM.from_base(base, tokenizer, QuietStarConfig(**values),
                                          loss_config=QuietStarLossConfig(**loss),
                                          attention=AttentionSettings(**attention)).eval()


def randomize_mixing_head(model: QuietStarForCausalLM, scale: float = 0.5, seed: int = 1) -> None:
    """Make the zero-initialised last mixing layer non-zero, so thoughts matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        last = model.mixing_head.net[-1].weight
        last.copy_(torch.randn(last.shape, generator=generator) * scale)


def padded_batch(lengths=(11, 8), seed: int = 0, left_padding_rows=(1,)):
    """Random byte ids ``[B, Lmax]`` and a mask; rows in ``left_padding_rows`` are left-padded, others right-padded."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), 256, dtype=torch.long)  # 256 is the byte tokenizer's eos; any id works
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        tokens = torch.randint(0, 256, (n,), generator=generator)
        span = slice(width - n, width) if row in left_padding_rows else slice(0, n)
        ids[row, span], mask[row, span] = tokens, 1
    return ids, mask


@contextlib.contextmanager
def transformers_eager(model: QuietStarForCausalLM):
    """Run the base model with transformers' own eager attention: an oracle independent of ours."""
    model.base.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.base.set_attn_implementation("quietstar")
