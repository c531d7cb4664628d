"""The Triton kernels compile for sm_80 and sm_90 without a GPU (scripts/compile_check.py), one variant per kernel
(design A's three, design C's two) and arch: bf16, head dim 128, SUS backward, the padded thought layout (every
constexpr branch of the visibility rule on), i.e. the largest tiles and the most registers. The script compiles
every variant; this keeps CI at ten compilations (design C's four take about 11 s of it) and checks the figures it
reports.

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


def test_every_kernel_compiles_for_sm80_and_sm90_with_tensor_cores_and_no_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--variants", "representative", "--jobs", "2",
                           "--json", str(report)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(report.read_text())["rows"]
    kernels = ("forward", "dq", "dkdv", "design_c_forward", "design_c_backward")
    assert {(row["arch"], row["kernel"]) for row in rows} == {(a, k) for a in (80, 90) for k in kernels}
    for row in rows:
        assert row["ok"] and row["registers"] > 0 and row["shared_kib"] > 0, row
        assert row["tensor_cores"] == ("wgmma" if row["arch"] == 90 else "mma"), row
        if not (row["kernel"].startswith("design_c_") and row["arch"] == 80):  # design C's sm_80 tiles spill at d 128
            assert row["spill_stores"] == row["spill_loads"] == 0, row
        # The tile loop: its dots on tensor cores, the visibility rule and the SUS hash as integer work per score.
        per_score = row["per_score"]
        assert per_score["mma"] > 0 and per_score["int/cmp/sel"] > per_score["mma"] and per_score["fp"] > 0, row
        assert sum(row["loop_instructions"].values()) * 32 * row["num_warps"] == pytest.approx(
            sum(per_score.values()) * row["block_m"] * row["block_n"], rel=1e-2), row


def _compile_check():
    interpret = os.environ.get("TRITON_INTERPRET")  # the script turns it off on import; later tests need it
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import compile_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret
    return compile_check


def test_the_variant_lists_cover_what_the_launches_take(monkeypatch):
    compile_check = _compile_check()
    table = compile_check.variants("table")
    # archs x (forward + two backward kernels, exact and SUS + design C's two SUS-only kernels)
    assert len(table) == len(set(table)) == 2 * (4 * 4 + 2 * 4 * 4 * 2 + 2 * 4 * 4)
    everything = compile_check.variants("all")
    assert {v.pattern for v in everything} == set(compile_check.PATTERNS) and set(table) < set(everything)
    design_c = [v for v in everything if v.kernel.startswith("design_c_")]
    assert {v.kernel for v in design_c} == {"design_c_forward", "design_c_backward"}
    assert all(v.sus and not v.backward for v in design_c)  # always sampled, named without a mode
    assert "thought-window-softcap" not in {v.pattern for v in design_c}  # design C takes no window
    assert len(design_c) == 2 * 2 * 4 * 4 * (len(compile_check.PATTERNS) - 1)
    assert compile_check.tensor_core_instruction("wgmma.mma_async.sync.aligned") == "wgmma"
    assert compile_check.tensor_core_instruction("mma.sync.aligned.m16n8k16") == "mma"
    assert compile_check.tensor_core_instruction("fma.rn.f32") == "fma"
    # A kernel registered in design_a_launch.py joins every list.
    from quietstar.ops.sus import common_launch, design_a_launch

    extra = common_launch.LaunchedKernel("extra", True, design_a_launch.LAUNCHED_KERNELS[1].example)
    monkeypatch.setattr(design_a_launch, "LAUNCHED_KERNELS", (*design_a_launch.LAUNCHED_KERNELS, extra))
    added = [v for v in compile_check.variants("table") if v.kernel == "extra"]
    assert len(added) == 2 * 4 * 4 * 2 and {v.sus for v in added} == {False, True}
    assert "extra" in {v.kernel for v in compile_check.variants("representative")}


# nvdisasm's layout: an outer loop (.L_x_1) around three inner ones: .L_x_2 without tensor cores (not a tile loop),
# .L_x_3 with a forward branch (the kept-tile test) and the smaller .L_x_6; the end branches to itself (the trap, no
# loop).
SASS = """\
backward_dq_kernel:
        /*0000*/                   S2R R0, SR_CTAID.X ;
.L_x_1:
        /*0010*/                   IMAD R1, R0, 0x2, RZ ;
.L_x_2:
        /*0020*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0030*/               @P0 BRA `(.L_x_2) ;
.L_x_3:
        /*0040*/                   ISETP.GE.AND P1, PT, R1, 0x10, PT ;
        /*0050*/                   FSEL R3, R3, -INF , P1 ;
        /*0060*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*0070*/                   MUFU.EX2 R3, R3 ;
        /*0080*/              @!P1 BRA `(.L_x_4) ;
        /*0090*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*00a0*/                   LDS.128 R4, [R2] ;
.L_x_4:
        /*00b0*/                   FFMA R5, R5, R6, R7 ;
        /*00c0*/                   LOP3.LUT R1, R1, 0x3, RZ, 0xc0, !PT ;
        /*00d0*/              @!P2 BRA `(.L_x_3) ;
.L_x_6:
        /*00d4*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*00d8*/               @P2 BRA `(.L_x_6) ;
        /*00e0*/               @P3 BRA `(.L_x_1) ;
        /*00f0*/                   EXIT ;
.L_x_5:
        /*0100*/                   BRA `(.L_x_5);
"""


def test_the_tile_loops_are_the_innermost_loops_with_tensor_cores_counted_by_class():
    compile_check = _compile_check()
    assert compile_check.tile_loops(SASS) == [{"mma": 2, "int/cmp/sel": 3, "fp": 2, "memory": 1, "other": 2},
                                              {"mma": 1, "int/cmp/sel": 0, "fp": 0, "memory": 0, "other": 1}]
    assert compile_check.tile_loops(SASS.replace("HMMA", "FFMA").replace("HGMMA", "FFMA")) == [  # the FMA path
        {"mma": 0, "int/cmp/sel": 3, "fp": 4, "memory": 1, "other": 2},
        {"mma": 0, "int/cmp/sel": 0, "fp": 0, "memory": 1, "other": 1},
        {"mma": 0, "int/cmp/sel": 0, "fp": 1, "memory": 0, "other": 1}]
    assert compile_check.tile_loops(SASS.split(".L_x_1:")[0]) == []  # no loop

