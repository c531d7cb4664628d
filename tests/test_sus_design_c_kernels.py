"""Design C's Triton kernels (quietstar/ops/sus/design_c_kernels.py) against its PyTorch reference
(design_c_reference.py).

On CPU under TRITON_INTERPRET=1 (conftest) at tiny odd sizes, fp32 and fp16; compiled on a GPU; compiled for sm_90
without a GPU (scripts/compile_check.py's stand-in driver) where Triton's NVIDIA backend is installed. Outputs are
poisoned with NaN before each launch. Kernel and reference draw from the same seed, so they open the same cells
and keep the same entries (up to a draw falling within fp32 rounding of its threshold).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from quietstar.ops.sus import attention, design_c_reference, reference  # noqa: E402
from quietstar.ops.sus import design_c_launch as launch_c  # noqa: E402
from quietstar.ops.sus.reference import attention_forward  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float16: dict(rtol=2e-2, atol=2e-2),
             torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}
EXACT_FP32 = dict(fp32_precision="ieee")

# (batch, heads, kv heads, head dim, text tokens L, thoughts N, branch length S, causal, left padding, key tile)
CASES = {
    "causal-odd": (1, 2, 1, 16, 37, 0, 0, True, 0, 16),
    "causal-gqa3": (2, 3, 1, 32, 19, 0, 0, True, 0, 16),
    "noncausal": (1, 2, 2, 16, 29, 0, 0, False, 0, 16),
    "single-token": (1, 1, 1, 16, 1, 0, 0, True, 0, 16),
    "thoughts": (2, 4, 2, 16, 7, 2, 3, True, 2, 16),
    "thoughts-long-branch": (1, 2, 1, 16, 5, 1, 19, True, 1, 16),
    "tile-64": (1, 1, 1, 16, 70, 0, 0, True, 0, 64),
    "head-dim-128": (1, 2, 1, 128, 18, 1, 2, True, 0, 16),
}


def _problem(case, dtype, seed=0):
    B, H, Hkv, d, L, N, S, causal, pad, tile = case
    n = L + N * L * S
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, d, generator=g).to(DEVICE, dtype) for h in (H, Hkv, Hkv))
    do = torch.randn(B, H, n, d, generator=g).to(DEVICE, dtype)
    key_valid = None
    if pad:
        key_valid = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
        key_valid[-1, :pad] = False
    pattern = dict(num_text=L, branch_length=S if N else 0, causal=causal, key_valid=key_valid)
    return q, k, v, do, pattern, d**-0.5, tile


def _poisoned(*tensors):
    return tuple(torch.full_like(t, float("nan")) for t in tensors)


def _compare(got, want, dtype):
    assert not torch.isnan(got).any(), "a kernel left part of its output unwritten"
    torch.testing.assert_close(got.float(), want.float(), **TOLERANCE[dtype])


def _reference_cells(q, k, scale, pattern, tile, c, seed):
    """Level 1 by the reference: pi where the cell opens, else 0."""
    B, H, n, _ = q.shape
    qf, kf = q.float(), reference.expand_heads(k.float(), H)
    pieces, probs, _, _ = reference.all_probs(qf, kf, scale, pattern["num_text"], pattern["branch_length"],
                                               pattern["causal"], pattern["key_valid"], None, None)
    mass = design_c_reference.tile_mass(pieces, probs, B, H, n, pattern["num_text"], tile)
    cell_open, pi = design_c_reference.open_cells(mass, c, seed)
    return torch.where(cell_open, pi, torch.zeros_like(pi))


def _dtypes():
    return [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", _dtypes(), ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_forward_opens_the_cells_the_reference_opens(name, dtype):
    q, k, v, do, pattern, scale, tile = _problem(CASES[name], dtype)
    o_ref, lse_ref = attention_forward(q, k, v, scale, **pattern)
    o, lse = _poisoned(q, lse_ref)
    cell_pi = torch.full((*lse_ref.shape, design_c_reference.num_key_tiles(q.shape[2], pattern["num_text"], tile)),
                         float("nan"), device=DEVICE)
    launch_c.triton_forward(q, k, v, scale, **pattern, c=2.0, seed=77, out=(o, lse, cell_pi), tile=tile, **EXACT_FP32)
    _compare(o, o_ref, dtype)
    finite = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), finite)
    _compare(lse[finite], lse_ref[finite], dtype)
    want = _reference_cells(q, k, scale, pattern, tile, 2.0, 77)
    assert not torch.isnan(cell_pi).any()
    assert torch.equal(cell_pi > 0, want > 0)  # the same cells open
    assert 0 < (want > 0).float().mean() < 1 or q.shape[2] == 1  # some open, some closed: the draw is tested
    _compare(cell_pi, want, dtype)


@pytest.mark.parametrize("dtype", _dtypes(), ids=str)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("c", [1.5, 6.0])
def test_backward_matches_reference(name, dtype, c):
    q, k, v, do, pattern, scale, tile = _problem(CASES[name], dtype, seed=1)
    o_ref, lse_ref = attention_forward(q, k, v, scale, **pattern)
    want = design_c_reference.attention_backward(q, k, v, o_ref, lse_ref, do, scale, **pattern, c=c, seed=4321,
                                                 tile=tile)
    _, _, cell_pi = launch_c.triton_forward(q, k, v, scale, **pattern, c=c, seed=4321, tile=tile, **EXACT_FP32)
    grads = _poisoned(q, k, v)
    launch_c.triton_backward(q, k, v, o_ref.to(dtype), lse_ref, cell_pi, do, scale, **pattern, c=c, seed=4321,
                             out=grads, tile=tile, **EXACT_FP32)
    for got, expected in zip(grads, want):
        _compare(got, expected, dtype)


def test_opened_cells_list_every_open_cell_once_by_tile():
    g = torch.Generator().manual_seed(0)
    cell_pi = torch.rand(2, 3, 20, 4, generator=g)
    cell_pi[cell_pi < 0.6] = 0  # closed cells
    cell_pi[0, 1, 5:] = 0  # tiles nobody opened
    cells = launch_c.opened_cells(cell_pi)
    assert cells.count.sum() == (cell_pi > 0).sum() == cells.rows.numel()
    for bh in range(6):
        for tile in range(4):
            cell = bh * 4 + tile
            listed = slice(cells.first[cell], cells.first[cell] + cells.count[cell])
            b, h = divmod(bh, 3)
            rows = cells.rows[listed].long()
            assert torch.equal(rows, (cell_pi[b, h, :, tile] > 0).nonzero()[:, 0])
            assert torch.equal(cells.pi[listed], cell_pi[b, h, rows, tile])
    assert launch_c.opened_cells(torch.zeros(1, 1, 3, 2)).count.sum() == 0


def test_huge_c_equals_the_exact_gradient():
    q, k, v, do, pattern, scale, tile = _problem(CASES["thoughts"], torch.float32, seed=2)
    o, lse, cell_pi = launch_c.triton_forward(q, k, v, scale, **pattern, c=1e30, seed=5, tile=tile, **EXACT_FP32)
    exact = design_c_reference.attention_backward(q, k, v, o, lse, do, scale, **pattern, c=None)
    huge = launch_c.triton_backward(q, k, v, o, lse, cell_pi, do, scale, **pattern, c=1e30, seed=5, tile=tile,
                                    **EXACT_FP32)
    for got, want in zip(huge, exact):
        _compare(got, want, torch.float32)


def test_autograd_function_with_design_c_matches_the_reference_end_to_end():
    q, k, v, do, pattern, _, _ = _problem(CASES["thoughts"], torch.float32, seed=3)
    results = []
    for backend in ("torch", "triton"):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = attention(*leaves, c=2.0, seed=77, backend=backend, sus_design="c", **pattern, **EXACT_FP32)
        results.append((out, *torch.autograd.grad(out, leaves, do)))
    for got, want in zip(*results):
        _compare(got, want, torch.float32)


def test_a_tile_table_past_32_bit_offsets_is_refused():
    with pytest.raises(ValueError, match="sus_design='a'"):
        launch_c.check_tile_sizes(2**21, 2**15)
    launch_c.check_tile_sizes(2**14, 2**8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n", [1000, 2049])
def test_design_c_matches_the_reference_at_gpu_sizes(n):
    q, k, v, do, pattern, _, _ = _problem((2, 8, 2, 64, n, 0, 0, True, 0, 64), torch.bfloat16, seed=n)
    results = []
    for backend in ("torch", "triton"):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = attention(*leaves, c=32.0, seed=3, backend=backend, sus_design="c", **pattern)
        results.append((out, *torch.autograd.grad(out, leaves, do)))
    for got, want in zip(*results):
        _compare(got, want, torch.bfloat16)


_COMPILE = """
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)  # off before the kernels are defined
sys.path.insert(0, "scripts")
import compile_check, torch
compile_check._use_arch(90)
from quietstar.ops.sus import design_c_launch as lc, design_c_reference
d = int(sys.argv[1])
L, N, S, B, H, HK = 37, 2, 5, 2, 4, 2  # compile_check's padded thought layout
n, tiles = L + N * L * S, design_c_reference.num_key_tiles(L + N * L * S, L)
q, k = torch.zeros(B, H, n, d, dtype=torch.bfloat16), torch.zeros(B, HK, n, d, dtype=torch.bfloat16)
lse, cell_pi = torch.zeros(B, H, n), torch.zeros(B, H, n, tiles)
cells = lc.OpenedCells(torch.zeros(1, dtype=torch.int32), torch.zeros(1), torch.zeros(B * H * tiles, dtype=torch.int64),
                       torch.zeros(B * H * tiles, dtype=torch.int32))
pattern = dict(num_text=L, branch_length=S, causal=True, key_valid=torch.ones(B, L, dtype=torch.bool),
               fp32_precision="tf32", arch=90)
for name, (kernel, grid, arguments) in {
        "forward": lc.forward_launch(q, k, k, q, lse, cell_pi, 0.125, c=32.0, seed=1, **pattern),
        "backward": lc.backward_launch(q, k, k, q, lse, lse, q.float(), k, k, cells, 0.125, c=32.0, seed=1, **pattern)}.items():
    ptx = kernel.warmup(grid=grid, **arguments).asm["ptx"]
    registers, stores, loads = compile_check._register_report(ptx, 90)
    print(json.dumps(dict(kernel=name, tensor_cores=compile_check.tensor_core_instruction(ptx), registers=registers,
                          spills=stores + loads)))
"""


NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@pytest.mark.skipif(not any((NVIDIA_BIN / name).exists() for name in ("ptxas", "ptxas-blackwell")),
                    reason="needs Triton's NVIDIA backend with its ptxas")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_design_c_kernels_compile_for_sm90_with_wgmma_and_no_spills(head_dim, tmp_path):
    """Through scripts/compile_check.py's stand-in driver, without a GPU: bf16, the padded thought layout."""
    repo = Path(__file__).resolve().parents[1]
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", _COMPILE, str(head_dim)], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [row["kernel"] for row in rows] == ["forward", "backward"]
    for row in rows:
        assert row["tensor_cores"] == "wgmma" and row["spills"] == 0 and row["registers"] > 0, row
