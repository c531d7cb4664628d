"""AttentionSettings: how the "quietstar" attention runs in this process (docs/design.md §2, "Attention settings").

A process setting, not part of the model: never saved. A model starts with the defaults (``"auto"``, exact
backward); ``model.set_attention(...)`` changes them, and training sets them from the run's YAML keys of the same
names. :func:`quietstar.attention.backends.resolve` turns them, on a device, into the backends that serve each phase.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..ops.sus.limits import FP32_PRECISIONS as TRITON_FP32_PRECISIONS
from ..ops.sus.limits import SUS_DESIGNS

ATTENTION_BACKENDS = ("auto", "eager", "flex", "triton")


@dataclass(frozen=True)
class AttentionSettings:
    """The attention backend, SUS backprop, and the Triton kernels' fp32 precision."""

    attention_backend: str = field(
        default="auto",
        metadata={"help": "Backend of the 'quietstar' attention: 'eager' (PyTorch, the reference, in every phase), "
                          "'flex' (PyTorch's FlexAttention with the thought layout as a block mask, in the exact "
                          "gradient pass; CUDA), 'triton' (the kernels of quietstar.ops.sus in the gradient pass, "
                          "exact or SUS; CUDA) or 'auto' (on CUDA FlexAttention for an exact gradient pass and Triton "
                          "for SUS; on CPU the exact flash fast path for unpadded rows, else eager). "
                          "quietstar.attention.backends.resolve applies it."},
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
                          "unbiased; quietstar/ops/sus/."},
    )
    triton_fp32_precision: str = field(
        default="tf32",
        metadata={"help": "How the Triton kernels (attention_backend 'triton', or SUS under 'auto' on CUDA) multiply "
                          "fp32 inputs: 'tf32' (tensor cores, about 1e-3 relative error per product) or 'ieee' (exact "
                          "fp32, several times slower; the setting the tests compare against the fp32 reference "
                          "with). fp16 and bf16 inputs ignore it."},
    )

    def __post_init__(self):
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}.")
        if self.sus_c is not None and (isinstance(self.sus_c, bool) or not self.sus_c > 0):
            raise ValueError(f"sus_c must be > 0 (or None for the exact backward), got {self.sus_c!r}.")
        if self.sus_design not in SUS_DESIGNS:
            raise ValueError(f"sus_design must be one of {SUS_DESIGNS}, got {self.sus_design!r}.")
        if self.triton_fp32_precision not in TRITON_FP32_PRECISIONS:
            raise ValueError(f"triton_fp32_precision must be one of {TRITON_FP32_PRECISIONS}, got "
                             f"{self.triton_fp32_precision!r}.")
        if self.sus_c is not None and self.attention_backend == "flex":
            raise ValueError("sus_c needs a SUS backward, which attention_backend='flex' does not have; use 'auto' or "
                             "'triton' (or 'eager' for the PyTorch reference).")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls))
