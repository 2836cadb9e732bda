"""Smoke test of benchmarks/calibration_speed.py: the quick version runs and our numbers agree with
the peers'. Timings are printed by the benchmark but not asserted (a shared CI machine's load
makes them meaningless as pass/fail criteria)."""

from __future__ import annotations

import importlib.util
import sys
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


def test_gate_soundness_benchmark_writes_one_record_per_cell(tmp_path: Path, monkeypatch) -> None:
    spec = importlib.util.spec_from_file_location("gate_soundness", BENCH.parent / "gate_soundness.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gate_soundness", bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    out = tmp_path / "cells.json"
    rows = bench.main(["--quick", "--sizes", "200", "--boundary-trials", "12", "--power-trials", "4", "--workers", "1",
                       "--json", str(out)])
    import json

    records = json.loads(out.read_text())
    assert records == rows and len(records) == len({(r["gate"], r["metric"], r["scenario"], r["true_value"],
                                                     r["limit"], r["n"]) for r in records})
    gates = {r["gate"] for r in records}
    assert gates == {"max_ece", "min_accuracy", "max_nll", "max_ece_increase", "max_accuracy_drop"}
    for r in records:
        assert {"scenario", "gate", "n", "true_value", "limit", "trials", "passes", "rate", "wilson_low",
                "wilson_high"} <= set(r)
        assert r["wilson_low"] <= r["rate"] <= r["wilson_high"]
