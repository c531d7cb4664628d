"""Whether a run computes in bf16: ``bf16: auto`` turns bf16 autocast on only where the hardware computes it natively.

A CPU without bf16 instructions (AMX or AVX512_BF16; e.g. a Zen 3 with AVX2 only) runs bf16 through emulation:
a 2048x576 by 576x1536 matmul took 3.07 s in bf16 (plain or under autocast) against 0.031 s in fp32 on a Zen 3,
about 100x slower, so a run that halves its step time on a CPU with AMX seems to hang on one without.
``bench/cpu_bf16.py`` measures the ratio on the machine at hand.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
from transformers.hf_argparser import string_to_bool
from transformers.utils import is_torch_bf16_gpu_available

AUTO = "auto"
Bf16Setting = bool | Literal["auto"]
# bf16 / fp32 time of a 2048x576 by 576x1536 matmul on a Zen 3 (AVX2, no bf16 instructions): 3.07 s / 0.031 s.
EMULATED_CPU_SLOWDOWN = 100
# torch.cpu.get_capabilities() keys of the x86 instructions that compute bf16 matmuls natively.
NATIVE_CPU_FEATURES = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class Bf16Choice:
    """What a bf16 setting resolves to: ``enabled`` (bf16 autocast on), ``note`` (one line saying what ``auto``
    chose and why, for the user at start; None for an explicit setting) and ``warning`` (None unless an explicit
    ``true`` will be slow)."""

    enabled: bool
    note: str | None = None
    warning: str | None = None


def parse_bf16(text: str) -> Bf16Setting:
    """A command-line bf16 value: "auto", or what a transformers bool flag takes (true/false, yes/no, 1/0)."""
    return AUTO if text == AUTO else string_to_bool(text)


def native_bf16(device_type: str) -> str | None:
    """The hardware feature with which a run on ``device_type`` ("cpu", "cuda", ...) computes bf16 natively, e.g.
    "AMX_BF16" or "compute capability 9.0"; None where bf16 would be emulated or is unsupported."""
    if device_type == "cpu":
        capabilities = torch.cpu.get_capabilities()
        return next((name.upper() for name in NATIVE_CPU_FEATURES if capabilities.get(name)), None)
    if device_type == "cuda":
        if torch.version.hip:
            return "ROCm"
        major, minor = torch.cuda.get_device_capability()
        return f"compute capability {major}.{minor}" if major >= 8 else None  # Ampere and later
    return device_type if is_torch_bf16_gpu_available() else None  # what transformers checks for xpu, mps, npu...


def run_device_type(use_cpu: bool) -> str:
    """The device type a Trainer run computes on: "cpu" when asked (``use_cpu``, ``accelerate launch --cpu``) or
    when there is no accelerator, else the accelerator's ("cuda", "xpu", "mps", ...)."""
    if use_cpu or os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes"):
        return "cpu"
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    return "cpu" if accelerator is None else accelerator.type


def _describe(device_type: str) -> str:
    if device_type == "cpu":
        return f"this CPU ({torch.backends.cpu.get_cpu_capability()})"
    return f"this {device_type} device"


def resolve_bf16(requested: Bf16Setting, device_type: str) -> Bf16Choice:
    """Resolve a ``bf16`` setting (True, False or "auto") for a run on ``device_type``: auto is bf16 autocast where
    :func:`native_bf16` finds native support, else fp32; an explicit True stays on and, on a CPU without native
    bf16, carries a warning with the slowdown."""
    if requested not in (True, False, AUTO):
        raise ValueError(f"bf16 must be true, false or {AUTO!r}, got {requested!r}.")
    feature = native_bf16(device_type)
    if requested == AUTO:
        if feature:
            return Bf16Choice(True, note=f"bf16: auto -> bf16 autocast: {_describe(device_type)} computes bf16 "
                                         f"natively ({feature}); --bf16 false trains in fp32.")
        slow = (f"no bf16 instructions ({' or '.join(f.upper() for f in NATIVE_CPU_FEATURES)}), so bf16 would be "
                f"emulated, ~{EMULATED_CPU_SLOWDOWN}x slower" if device_type == "cpu" else "no native bf16")
        return Bf16Choice(False, note=f"bf16: auto -> fp32: {_describe(device_type)} has {slow}; --bf16 true "
                                      "forces bf16 autocast.")
    if requested and device_type == "cpu" and not feature:
        return Bf16Choice(True, warning=(
            f"bf16: true on {_describe(device_type)}, which has no bf16 instructions "
            f"({' or '.join(f.upper() for f in NATIVE_CPU_FEATURES)}): PyTorch emulates bf16, and its matmuls run "
            f"about {EMULATED_CPU_SLOWDOWN}x slower than in fp32 (measured on a Zen 3; bench/cpu_bf16.py measures this "
            "machine). --bf16 auto (or false) trains in fp32."))
    return Bf16Choice(bool(requested))
