"""Smoke test of benchmarks/calibration_speed.py: the quick version runs and our numbers agree with
the peers'. Timings are printed by the benchmark but not asserted (a shared CI machine's load
makes them meaningless as pass/fail criteria)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "calibration_speed.py"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("calibration_speed", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
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


@pytest.mark.slow
def test_gate_soundness_benchmark_writes_one_record_per_cell(tmp_path: Path, monkeypatch) -> None:
    spec = importlib.util.spec_from_file_location("gate_soundness", BENCH.parent / "gate_soundness.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gate_soundness", bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    out = tmp_path / "cells.json"
    rows = bench.main(
        [
            "--quick",
            "--sizes",
            "200",
            "--boundary-trials",
            "12",
            "--power-trials",
            "4",
            "--workers",
            "1",
            "--json",
            str(out),
        ]
    )
    import json

    records = json.loads(out.read_text())
    assert records == rows and len(records) == len(
        {(r["gate"], r["metric"], r["scenario"], r["true_value"], r["limit"], r["n"]) for r in records}
    )
    gates = {r["gate"] for r in records}
    assert gates == {"max_ece", "min_accuracy", "max_nll", "max_ece_increase", "max_accuracy_drop"}
    for r in records:
        assert {
            "scenario",
            "gate",
            "n",
            "true_value",
            "limit",
            "trials",
            "passes",
            "rate",
            "wilson_low",
            "wilson_high",
        } <= set(r)
        assert r["wilson_low"] <= r["rate"] <= r["wilson_high"]


def _load(name: str, monkeypatch):
    spec = importlib.util.spec_from_file_location(name, BENCH.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_decision_guarantees_quick_run_reports_every_rule_and_score(tmp_path: Path, monkeypatch, capsys) -> None:
    """Synthetic logits (no CIFAR training), 20 calibration draws per case: the pipeline's procedure
    runs end to end and the report is complete and self-consistent."""
    import json

    bench = _load("decision_guarantees", monkeypatch)
    out = tmp_path / "decisions.json"
    rows = bench.main(["--quick", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "### PAC thresholds" in printed and "### Conformal sets" in printed and "wall time" in printed
    assert json.loads(out.read_text())["rows"] == rows
    pac = [r for r in rows if r["table"] == "pac"]
    assert {(r["pool"], r["variant"], r["rule"]) for r in pac} == {
        (p, v, rule)
        for p in ("synthetic10", "synthetic2")
        for v in ("pool", "control", "split")
        for rule in ("min_precision", "min_recall", "max_risk")
    }
    for r in pac:
        assert r["trials"] == 20 and r["wilson_low"] <= r["rate"] <= r["wilson_high"]
        # a chosen threshold whose own certified bound misses the target is a wrong answer, whatever the luck
        assert r.get("bound_below_target", 0) == 0, r
    assert any(r["trials"] > r["infeasible"] for r in pac if r["rule"] == "min_recall")
    conformal = [r for r in rows if r["table"] == "conformal"]
    assert {r["score"] for r in conformal} == {"lac", "aps", "raps"} and len(conformal) == 18
    for r in conformal:
        classes = 10 if r["pool"] == "synthetic10" else 2
        assert 1.0 <= r["mean_size"] <= classes
        # 20 draws x thousands of points: the marginal miscoverage sits near alpha = 0.1 (LAC and
        # RAPS on 10 classes), and never far above it for any score
        assert r["miscoverage_mean"] < 0.13, r
        if r["pool"] == "synthetic10":
            assert r["miscoverage_mean"] > 0.07, r
    assert {r["table"] for r in rows} == {"pac", "conformal", "bounds"}


def test_threshold_stability_quick_run_compares_raw_and_calibrated(tmp_path: Path, monkeypatch, capsys) -> None:
    bench = _load("threshold_stability", monkeypatch)
    result = bench.main(["--quick", "--json", str(tmp_path / "stability.json")])["synthetic"]
    printed = capsys.readouterr().out
    assert "| rule | probabilities |" in printed and (tmp_path / "stability.json").is_file()
    rows = {(r["mode"], r["rule"]): r for r in result["rows"]}
    assert set(rows) == {
        (m, r) for m in ("raw", "calibrated") for r in ("cost 1:1", "cost 1:4", "precision >= 0.8", "recall >= 0.95")
    }
    # the cost threshold is fixed by the costs: no spread across seeds, before or after calibration
    for mode in ("raw", "calibrated"):
        assert rows[(mode, "cost 1:1")]["threshold"]["std"] == 0.0
        assert rows[(mode, "cost 1:4")]["threshold"]["mean"] == pytest.approx(0.2)
    # with two classes T only relabels the scores: at 0.5 the decisions are the same ones
    for metric in ("precision", "recall", "rate"):
        assert rows[("raw", "cost 1:1")][metric] == rows[("calibrated", "cost 1:1")][metric], metric
    # the synthetic seeds differ only in over-confidence (x0.6 .. x1.6): calibration undoes it, so
    # the asymmetric-cost decisions spread less across seeds after it than before
    assert rows[("calibrated", "cost 1:4")]["rate"]["std"] < rows[("raw", "cost 1:4")]["rate"]["std"]


@pytest.mark.slow
def test_train_step_benchmark_pairs_the_project_with_a_bare_loop_doing_the_same_work(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """Tiny settings: the structure of the report and that the bare loop trains the same weights;
    no speed is asserted (benchmarks/train_step.py measures that on the default job)."""
    from calibflow.data.prepare import write_digits

    spec = importlib.util.spec_from_file_location("train_step", BENCH.parent / "train_step.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "train_step", bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    write_digits(tmp_path / "digits", classes=(0, 1, 2), per_class=30)
    before = torch.get_num_threads()
    results = bench.main(
        [
            "--set",
            f"data.path={tmp_path / 'digits'}",
            "--set",
            "train.epochs=2",
            "--set",
            "model.width=4",
            "--repeats",
            "2",
            "--val-every",
            "1",
            "--threads-table",
            "--table-epochs",
            "1",
            "--busy",
            "1",
            "--json",
            str(tmp_path / "train_step.json"),
        ]
    )
    out = capsys.readouterr().out
    assert "| bare loop |" in out and "| train_classifier, val_every 5 |" in out and "| busy processes |" in out
    ratio = results["ratio"]
    assert ratio["same_weights"] is True  # the bare loop is the same training, minus the project's extras
    assert [row["val_every"] for row in ratio["project"]] == [5, 1]
    for row in ratio["project"]:
        assert (
            len(row["ratio"]["values"]) == 2 and row["ratio"]["low"] <= row["ratio"]["median"] <= row["ratio"]["high"]
        )
    assert {(row["busy_processes"], row["threads"]) for row in results["threads"]} == {(0, 1), (0, 2), (1, 1), (1, 2)}
    assert all(row["logits_images_per_second"]["median"] > 0 for row in results["threads"])
    assert "background_cores" in ratio and all("background_cores" in row for row in results["threads"])
    assert torch.get_num_threads() == before
    assert bench.exit_code(results, check=False) == 0
    slow = {"ratio": {"project": [{"ratio": {"median": 0.9}}]}}
    assert bench.exit_code(slow, check=True) == 1 and bench.exit_code(slow, check=False) == 0
