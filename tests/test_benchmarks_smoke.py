"""Smoke test of benchmarks/calibration_speed.py: the quick version runs and our numbers agree with
the peers'. Timings are printed by the benchmark but not asserted (a shared CI machine's load
makes them meaningless as pass/fail criteria)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "calibration_speed.py"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("calibration_speed", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_benchmark_runs_and_agrees_with_peers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load_benchmark()
    results = bench.main(["--quick", "--json", str(tmp_path / "speed.json")])
    out = capsys.readouterr().out
    assert "| temperature fit |" in out and "| ECE (15 bins) |" in out
    assert (tmp_path / "speed.json").is_file()

    t = results["temperature"]
    # netcal fits T by L-BFGS-B with numerical gradients at scipy's default tolerances
    assert t["rel_diff"] < 1e-3, t
    assert 1.5 < t["T_ours"] < 2.5  # labels were drawn at T = 2: an interior optimum
    assert t["rel_diff_bracketed"] < 1e-9, t  # the ablation solves the same problem
    e = results["ece"]
    # torchmetrics bins float32 confidences on float32 linspace edges: agreement to float32 precision
    assert e["abs_diff"] < 1e-6, e
    ci = results["bootstrap"]["ci"]
    assert ci["low"] <= ci["estimate"] <= ci["high"]
    for key in ("ours_s", "netcal_s", "bracketed_s"):
        assert t[key] > 0
