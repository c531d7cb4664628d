"""The Triton kernels compile for sm_80 and sm_90 without a GPU (scripts/compile_check.py), one variant per kernel
and arch: bf16, head dim 128, SUS backward, the padded thought layout (every constexpr branch of the visibility
rule on), i.e. the largest tiles and the most registers. The script compiles every variant; this keeps CI at six
compilations (about 30 s on two cores) and checks the figures it reports.

Runs the script in a subprocess with TRITON_INTERPRET unset (conftest sets it on CPU; the kernels must be defined
with it off); skipped only where Triton's NVIDIA backend and its ptxas are absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "compile_check.py"
NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
pytestmark = pytest.mark.skipif(not any((NVIDIA_BIN / name).exists() for name in ("ptxas", "ptxas-blackwell")),
                                reason="needs Triton's NVIDIA backend with its ptxas")


def test_every_kernel_compiles_for_sm80_and_sm90_with_tensor_cores_and_no_sm90_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--variants", "representative", "--jobs", "2",
                           "--json", str(report)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(report.read_text())["rows"]
    assert {(row["arch"], row["kernel"]) for row in rows} == {(a, k) for a in (80, 90) for k in ("forward", "dq", "dkdv")}
    for row in rows:
        assert row["ok"] and row["registers"] > 0 and row["shared_kib"] > 0, row
        assert row["tensor_cores"] == ("wgmma" if row["arch"] == 90 else "mma"), row
        if row["arch"] == 90:
            assert row["spill_stores"] == row["spill_loads"] == 0, row


def test_the_variant_lists_cover_what_the_launches_take():
    interpret = os.environ.get("TRITON_INTERPRET")  # the script turns it off on import; later tests need it
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import compile_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret
    table = compile_check.variants("table")
    assert len(table) == len(set(table)) == 2 * (4 * 4 + 2 * 4 * 4 * 2)  # archs x (forward + two backward kernels)
    everything = compile_check.variants("all")
    assert {v.pattern for v in everything} == set(compile_check.PATTERNS) and set(table) < set(everything)
    assert compile_check.tensor_core_instruction("wgmma.mma_async.sync.aligned") == "wgmma"
    assert compile_check.tensor_core_instruction("mma.sync.aligned.m16n8k16") == "mma"
    assert compile_check.tensor_core_instruction("fma.rn.f32") == "fma"
