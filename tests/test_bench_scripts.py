"""The step benchmarks run end to end at small sizes (tests never assert timings, only the bookkeeping)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")


def _script(name):
    sys.path.insert(0, SCRIPTS)  # the benchmark scripts import their siblings
    try:
        spec = importlib.util.spec_from_file_location(name, os.path.join(SCRIPTS, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(SCRIPTS)
    return module


def test_paired_efficiency_rounds_are_ratios_of_their_own_two_steps(tmp_path, capsys):
    out = tmp_path / "efficiency.json"
    _script("bench_efficiency").main(["--cells", "16:2", "--rounds", "3", "--threads", "1", "--out", str(out)])
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
        _script("bench_efficiency").parse_args(["--cells", "256x9"])
