"""Every benchmark's smoke mode (`python benchmarks/NAME.py --smoke --out DIR`: the real code at tiny
sizes), so that a benchmark broken by a change to the library fails CI instead of rotting until
someone needs its numbers.

The test is parametrized over the listing of benchmarks/ (every .py file whose name does not start
with an underscore): a new benchmark without a smoke mode, or without a check below, fails here.
Each run must write DIR/NAME.md (a provenance header naming the --smoke command and the commit, and
well-formed tables without NaN) and DIR/NAME.json (the figures behind the tables, all finite), and
its check asserts what the figures must satisfy at any size: peers agree, intervals contain their
estimate, every scenario and arm is there. Timings are never asserted: a shared CI machine's load
makes them meaningless as pass/fail criteria.

The benchmarks that run `calibflow run` (Prefect, MLflow, DVC) are marked e2e, the longer others
slow; `make test-all` (CI) runs them all."""

from __future__ import annotations

import importlib
import json
import math
import re
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import _common  # noqa: E402

NAMES = sorted(p.stem for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))
E2E = {
    "accuracy_estimation",
    "command_latency",
    "data_scale",
    "default_run",
    "finetune_own_weights",
    "recorded_run",
    "run_timing",
    "soft_labels",
}
# over about 5 s on 2 busy cores (calibration_speed: importing netcal and torchmetrics), or needing
# the git history (gate_soundness_baseline reads the old gates from commit 345bcd0)
SLOW = {
    "calibration_speed",
    "ddp_accuracy",
    "gate_soundness_baseline",
    "gpu_train",
    "shift_and_ood",
    "train_time_calibration",
}
# These read a project with a registered model: they read the one run_timing's smoke run makes and
# trains (each would otherwise train its own, a `calibflow run` apiece).
ON_PROJECT = {"accuracy_estimation", "command_latency"}
TIMEOUT_S = 900  # a hung benchmark fails instead of holding CI


@pytest.fixture(scope="session")
def run_timing_out(tmp_path_factory) -> Path:
    """run_timing's smoke run, once a session: its `calibflow run --force` in the tiny project it
    builds (DIR/project) registers the model the ON_PROJECT benchmarks read."""
    out = tmp_path_factory.mktemp("run_timing") / "out"
    run_smoke("run_timing", out)
    return out


def run_smoke(name: str, out: Path, *extra: str) -> None:
    """The end-to-end benchmarks in a fresh process, as a user starts them (they start `calibflow`
    processes of their own anyway); the others in this one, by their main(), so that torch and the
    library are imported once for all of them rather than once each."""
    argv = ["--smoke", "--out", str(out), *extra]
    if name not in E2E:
        importlib.import_module(name).main(argv)
        return
    command = [sys.executable, str(BENCHMARKS / f"{name}.py"), *argv]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, (
        f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    )


def tables(markdown: str) -> list[list[list[str]]]:
    """Every markdown table of the text, as rows of stripped cells (header and separator included)."""
    found, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            current.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif current:
            found.append(current)
            current = []
    return found


def numbers(value) -> list[float]:
    """Every number in a JSON value (booleans are not numbers here)."""
    if isinstance(value, dict):
        return [x for v in value.values() for x in numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in numbers(v)]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)]
    return []


def between(low: float, value: float, high: float, slack: float = 1e-12) -> bool:
    return low - slack <= value <= high + slack


# ------------------------------------------------------------------ what each benchmark must show


def check_accuracy_estimation(data: dict, markdown: str) -> None:
    assert set(data["methods"]) == {"cbpe", "atc_ne", "atc_mc"}
    # clean, then the 9 corruptions at severity 1
    assert len(data["cells"]) == 10 and data["cells"][0]["corruption"] == "clean"
    for cell in data["cells"]:
        assert between(0, cell["truth"], 1)
        for method in data["methods"]:
            estimate = cell[method]
            assert between(0, estimate["lower"], 1) and between(0, estimate["upper"], 1)
            assert between(estimate["lower"], estimate["estimate"], estimate["upper"], 1e-9), (method, estimate)
    for summary in data["methods"].values():
        assert summary["mean_absolute_error"] <= summary["max_absolute_error"] <= 1
        assert 0 <= summary["covered"] <= len(data["cells"])
    assert "| cbpe |" in markdown and "| gaussian_noise s1 |" in markdown


def check_calibration_speed(data: dict, markdown: str) -> None:
    t = data["temperature"]
    # netcal fits T by L-BFGS-B with numerical gradients at scipy's default tolerances
    assert t["rel_diff"] < 1e-3, t
    assert 1.5 < t["T_ours"] < 2.5  # labels were drawn at T = 2: an interior optimum
    assert t["rel_diff_bracketed"] < 1e-9, t  # the ablation solves the same problem
    # torchmetrics bins float32 confidences on float32 linspace edges: agreement to float32 precision
    assert data["ece"]["abs_diff"] < 1e-6, data["ece"]
    ci = data["bootstrap"]["ci"]
    assert ci["low"] <= ci["estimate"] <= ci["high"]
    assert all(t[key] > 0 for key in ("ours_s", "netcal_s", "bracketed_s"))
    assert "| temperature fit |" in markdown and "| ECE (15 bins) |" in markdown


def check_command_latency(data: dict, markdown: str) -> None:
    seconds = data["seconds"]["this code"]
    assert set(seconds) == {"--help", "status", "gate", "evaluate", "predict (1 image)"}
    assert all(len(values) == 1 and values[0] > 0 for values in seconds.values())
    for name in seconds:
        assert f"| `calibflow {name}` |" in markdown


def check_ddp_accuracy(data: dict, markdown: str) -> None:
    assert [row["seed"] for row in data["seeds"]] == [0] and data["nproc"] == 2
    assert all(between(0, row[side], 1) for row in data["seeds"] for side in ("one", "ddp"))
    # one seed: no standard deviation to give, and the table says so rather than inventing one
    assert data["one"]["sd"] is None and data["difference"]["standard_error"] is None
    assert data["difference"]["mean"] == pytest.approx(data["seeds"][0]["ddp"] - data["seeds"][0]["one"])
    assert data["ddp"]["seconds"] > 0 and "| 1 process |" in markdown and "n/a" in markdown


def check_decision_guarantees(data: dict, markdown: str) -> None:
    rows = data["rows"]
    pac = [r for r in rows if r["table"] == "pac"]
    assert {(r["pool"], r["variant"], r["rule"]) for r in pac} == {
        (p, v, rule)
        for p in ("synthetic10", "synthetic2")
        for v in ("pool", "control", "split")
        for rule in ("min_precision", "min_recall", "max_risk")
    }
    for r in pac:
        assert r["trials"] == data["splits"] == 10 and r["wilson_low"] <= r["rate"] <= r["wilson_high"]
        # a chosen threshold whose own certified bound misses the target is a wrong answer, whatever the luck
        assert r.get("bound_below_target", 0) == 0, r
    assert any(r["trials"] > r["infeasible"] for r in pac if r["rule"] == "min_recall")
    conformal = [r for r in rows if r["table"] == "conformal"]
    assert {r["score"] for r in conformal} == {"lac", "aps", "raps"} and len(conformal) == 18
    for r in conformal:
        classes = 10 if r["pool"] == "synthetic10" else 2
        assert 1.0 <= r["mean_size"] <= classes
        # 10 draws x thousands of points: the marginal miscoverage sits near alpha = 0.1 on 10 classes
        assert r["miscoverage_mean"] < 0.15, r
        if r["pool"] == "synthetic10":
            assert r["miscoverage_mean"] > 0.05, r
    assert {r["table"] for r in rows} == {"pac", "conformal", "bounds"}
    assert "### PAC thresholds" in markdown and "### Conformal sets" in markdown


def _check_gate_rows(rows: list[dict], gates: set[str]) -> None:
    assert {r["gate"] for r in rows} == gates
    for r in rows:
        assert r["n"] == 200 and r["trials"] > 0
        assert between(r["wilson_low"], r["rate"], r["wilson_high"]) and between(0, r["rate"], 1), r


GATES = {"max_ece", "min_accuracy", "max_nll", "max_ece_increase", "max_accuracy_drop"}


def check_data_scale(data: dict, markdown: str) -> None:
    """Both input paths read every image; each run is measured, streamed and in memory."""
    for n, row in data["inputs"].items():
        assert all(r["images"] == int(n) for rows in row["runs"].values() for r in rows)
        assert row["ratio"] > 0 and min(row["peak_memory_mb"].values()) > 0
    for pair in data["runs"].values():
        assert [r["streamed"] for r in pair] == [True, False]
        assert all(r["peak_memory_mb"] > 0 and 0 <= r["suite_share"] <= 1 and r["train_s"] > 0 for r in pair)
    assert "| target |" in markdown and "Streamed peak memory" in markdown
    suite = data["suite_alone"]  # both ways of reading the cells write the same logits
    assert suite["same_logits"] and suite["cells"] == 9 and suite["images"] > 0
    assert suite["cells_at_once"] >= 1 and all(len(p) == 1 for p in suite["passes"].values())


def check_gpu_train(data: dict, markdown: str) -> None:
    """Both arms trained every epoch on the same train split; the table's ratio is calibflow's
    median of the timed epoch over the reference's."""
    settings, passes = data["settings"], data["passes"]
    assert set(passes) == {"reference", "calibflow"} and data["train_images"] > 0
    for runs in passes.values():
        assert len(runs) == settings["repeats"]
        assert all(len(r["images_per_second"]) == settings["epochs"] and min(r["images_per_second"]) > 0 for r in runs)
    # the reference read the whole train split every epoch (calibflow's train_model reads the same split)
    assert all(r["images"] == [data["train_images"]] * settings["epochs"] for r in passes["reference"])
    timed = {arm: statistics.median(r["images_per_second"][1] for r in runs) for arm, runs in passes.items()}
    rows = {row[0]: row for row in tables(markdown)[0][2:]}
    assert rows["calibflow"][-1] == f"{timed['calibflow'] / timed['reference']:.2f}x", rows
    assert rows["reference"][-1] == "1.00x" and f"{data['train_images']:,} photos" in markdown


def check_finetune_own_weights(data: dict, markdown: str) -> None:
    """Every arm ran on the one seed (the smoke's gates pass any model, so each registered), from the
    weights the pretraining run registered; what the benchmark recomputes from each run's checkpoint
    on its test split is what the run logged; the arms of a seed share their test images."""
    setup, runs = data["setup"], data["runs"]
    assert setup["arms"] == ["scratch", "finetune", "frozen"] and setup["seeds"] == [0]
    assert len(setup["pretrain_classes"]) == 8 and setup["few_classes"] == ["cat", "dog"]
    assert data["pretrain"]["registered"] and data["pretrain"]["version"] == "1"
    assert [(r["arm"], r["seed"], r["exit_code"]) for r in runs] == [(arm, 0, 0) for arm in setup["arms"]], runs
    for r in runs:
        assert r["registered"] and r["verdict"] == "passed" and r["reproduced"], r
        assert r["test_images"] == setup["few_test_images"] and r["train_images"] == setup["few_train_images"]
        assert all(between(0, r[key], 1) for key in ("accuracy", "ece_before", "ece_after"))
        # top-label confidence of 2 classes: at least 1/2
        assert all(between(0.5, r[key], 1) for key in ("confidence_before", "confidence_after")), r
        assert r["temperature"] > 0
        # scaling by a temperature never changes which class is predicted
        assert r["accuracy"] == r["accuracy_before"]
    weights = {r["arm"]: "model.weights_path=" in r["command"] for r in runs}
    assert weights == {"scratch": False, "finetune": True, "frozen": True}
    assert "train.backbone_lr_factor=0.1" in runs[1]["command"] and "train.freeze_backbone=true" in runs[2]["command"]
    for arm in ("finetune", "frozen"):
        diff = data["summary"]["paired"][arm]["accuracy"]
        by_arm = {r["arm"]: r["accuracy"] for r in runs}
        assert diff["mean"] == pytest.approx(by_arm[arm] - by_arm["scratch"]) and diff["n"] == 1
    assert "| arm - scratch |" in markdown and "**What pretraining did**" in markdown


def check_soft_labels(data: dict, markdown: str) -> None:
    """Every arm (hard, soft, sampled targets) ran on the one seed and registered, on the same test
    images; the benchmark's recomputation from each checkpoint is what the run logged; every figure is
    in its range: a cross-entropy against the soft targets is at least their entropy, scaling by a
    temperature changes no prediction, and a blend's top label weighs 0.5 to 0.7."""
    setup, runs = data["setup"], data["runs"]
    assert setup["arms"] == ["hard", "soft", "sampled"] and setup["seeds"] == [0]
    assert [(r["arm"], r["seed"], r["exit_code"]) for r in runs] == [(arm, 0, 0) for arm in setup["arms"]], runs
    classes = 3  # the smoke's digit classes
    for r in runs:
        assert r["registered"] and r["reproduced"] and r["targets"] == r["arm"], r
        assert f"train.targets={r['arm']}" in r["command"] and r["temperature"] > 0 and r["soft_temperature"] > 0
        assert r["logged"]["accuracy"] == r["recomputed"]["accuracy"] == r["all"]["before"]["accuracy"]
        assert r["test_images"] == runs[0]["test_images"]  # the arms of a seed share their test split
        n = r["test_images"]
        assert n["clean"] > 0 and n["blended"] > 0 and n["clean"] + n["blended"] == n["all"]
        assert between(0.5, r["blended"]["target_confidence"], 0.7) and r["blended"]["target_entropy"] > 0
        for subset in ("all", "clean", "blended"):
            before, after, soft_t = r[subset]["before"], r[subset]["after"], r[subset]["soft_T"]
            assert before["accuracy"] == after["accuracy"] == soft_t["accuracy"], (r["arm"], subset)
            for stage in (before, after, soft_t):
                assert all(between(0, stage[k], 1) for k in ("accuracy", "ece", "soft_ece", "soft_accuracy")), stage
                assert between(1 / classes, stage["confidence"], 1), stage
                least = r["blended"]["target_entropy"] if subset == "blended" else 0.0
                assert stage["soft_nll"] >= least - 1e-9, (r["arm"], subset, stage)
            # on clean (one-hot) images the soft metrics are the hard ones
            if subset == "clean":
                assert before["soft_accuracy"] == pytest.approx(before["accuracy"])
                assert before["soft_ece"] == pytest.approx(before["ece"])
    by_arm = {r["arm"]: r for r in runs}
    for arm in ("soft", "sampled"):
        diff = data["summary"]["paired"][arm]["blended/before/confidence"]
        expected = by_arm[arm]["blended"]["before"]["confidence"] - by_arm["hard"]["blended"]["before"]["confidence"]
        assert diff["n"] == 1 and diff["mean"] == pytest.approx(expected)
    assert "| arm - hard |" in markdown and "**Soft against sampled**" in markdown
    assert "Is hard-label training over-confident on the blends?" in markdown


def check_gate_soundness(data: list[dict], markdown: str) -> None:
    _check_gate_rows(data, GATES | {"max_brier_increase"})
    keys = {(r["gate"], r["metric"], r["scenario"], r["true_value"], r["limit"], r["n"]) for r in data}
    # 21 boundary cells with 2 power cells each, 4 information cells, 8 CD-loop target cells
    assert len(keys) == len(data) == 75
    assert {r["kind"] for r in data} == {"false promotion", "false rejection", "passes (pointwise error = limit)"}
    targets = [r for r in data if r["target"] is not None]
    assert len(targets) == 8 and {r["scenario"] for r in targets} == {
        "identical retrain",
        "recalibrated champion",
        "new-seed retrain",
    }
    assert "boundary cells: 21;" in markdown and "| target |" in markdown


def check_gate_soundness_baseline(data: list[dict], markdown: str) -> None:
    _check_gate_rows(data, GATES)
    assert len(data) == 36 and {r["implementation"] for r in data} == {"345bcd0"}  # 12 boundary x 3
    assert {r["metric"] for r in data} == {"ece"}  # the old gates had no smooth ECE
    assert "| max_ece | spread binary |" in markdown


def check_real_logits(data: dict, markdown: str) -> None:
    pool = data["smoke"]
    assert pool["seeds"] == [0, 1] and pool["test_images"] == 40 and pool["classes"] == 2
    assert len(pool["accuracy"]) == 2 and all(between(0, a, 1) for a in pool["accuracy"])
    assert "| smoke | cat, dog |" in markdown


def check_real_logits_cache(out: Path, data: dict) -> None:
    import numpy as np

    with np.load(out / "cache" / f"smoke-{data['smoke']['key']}.npz") as cached:
        assert cached["logits"].shape == (2, 40, 2) and np.isfinite(cached["logits"]).all()
        assert cached["labels"].tolist() == [0] * 20 + [1] * 20


def check_run_timing(data: dict, markdown: str) -> None:
    (label,) = data["runs"]
    assert label == "this code, local-server"
    (run,) = data["runs"][label]
    assert run["wall"] == pytest.approx(run["work"] + run["fixed"])
    assert 0 < run["work"] < run["wall"]  # training is work; starting the interpreter is not
    assert run["interpreter, imports, Prefect API start, flow run creation"] > 0
    assert "| **fixed** |" in markdown and "target <= 10 s" in markdown


def check_shift_and_ood(data: dict, markdown: str) -> None:
    calibration = data["calibration"]
    assert [row["probabilities"].split(" (")[0] for row in calibration] == [
        "softmax",
        "temperature scaling",
        "shift-aware",
    ]
    for row in calibration:
        assert len(row["suite_ece_by_severity"]) == 5
        assert all(between(0, row[key], 1) for key in ("test_accuracy", "test_ece", "suite_mean_ece"))
    # scaling by a temperature never changes which class is predicted
    assert len({row["test_accuracy"] for row in calibration}) == 1
    assert {(row["model"], row["score"]) for row in data["ood"]} == {
        (model, score) for model in ("plain", "with outlier exposure") for score in ("msp", "energy")
    }
    assert all(between(0, row[key], 1) for row in data["ood"] for key in ("auroc", "aupr", "fpr95"))
    assert "| model | score | AUROC |" in markdown


def check_threshold_stability(data: dict, markdown: str) -> None:
    rows = {(r["mode"], r["rule"]): r for r in data["pools"]["synthetic"]["rows"]}
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
    assert "| rule | probabilities |" in markdown


def check_train_step(data: dict, markdown: str) -> None:
    ratio = data["ratio"]
    assert ratio["same_weights"] is True  # the bare loop is the same training, minus the project's extras
    assert [row["val_every"] for row in ratio["project"]] == [5, 1]
    for row in ratio["project"]:
        assert len(row["ratio"]["values"]) == 1 and row["ratio"]["values"][0] > 0
    assert {(row["busy_processes"], row["threads"]) for row in data["threads"]} == {(0, 1), (0, 2), (1, 1), (1, 2)}
    assert all(row["logits_images_per_second"]["median"] > 0 for row in data["threads"])
    assert "| bare loop |" in markdown and "| train_classifier, val_every 5 |" in markdown
    # the configured small_cnn and a photo-sized one, both convolutional: channels_last picked
    assert len(data["layouts"]) == 2 and all(row["layout"] == "channels_last" for row in data["layouts"])
    assert all(row["ratio"]["median"] > 0 for row in data["layouts"])


def check_inference_speed(data: dict, markdown: str) -> None:
    rows = {row["arch"]: row for row in data["rows"]}
    assert set(rows) == {"small_cnn", "resnet18"}
    for row in rows.values():
        # every BatchNorm of these networks follows a convolution: all folded, the logits kept to rounding
        assert row["batch_norms"] > 0 and row["folded"] == row["batch_norms"]
        assert row["layout"] == "channels_last"
        assert 0 < row["max_logit_difference"] <= 1e-5 * max(1.0, row["logit_scale"])
        assert all(row["ratio"][arm]["median"] > 0 for arm in ("channels_last", "prepared"))
    assert "| small_cnn width 4 | 32 |" in markdown


def check_train_time_calibration(data: list[dict], markdown: str) -> None:
    assert [row["method"] for row in data] == ["cross_entropy", "mixup", "ensemble"]
    members = {row["method"]: len(row["temperatures"]) for row in data}
    assert members == {"cross_entropy": 1, "mixup": 1, "ensemble": 3}
    for row in data:
        assert row["n_train"] > 0 and row["n_test"] > 0 and row["predict_ms_per_image"] > 0
        for when in ("before", "after"):
            m = row[when]
            assert between(0, m["ece"], 1) and m["ece_low"] <= m["ece_high"], m
        if len(row["temperatures"]) == 1:
            # one network, one temperature: the predicted class stays (an ensemble's mean may move)
            assert row["before"]["accuracy"] == row["after"]["accuracy"]
    assert "| deep ensemble of 3 |" in markdown and "Mukhoti et al. 2020" in markdown


def check_recorded_run(data: dict, markdown: str) -> None:
    """The run went end to end on photos of mixed sizes (the smoke's gates pass any model: it
    registered), framed to data.image_size, and its memory, wall time and tasks were measured."""
    assert data["exit_code"] == 0 and data["verdict"].startswith("calibflow run: registered"), data["verdict"]
    assert data["images"] == 60 and data["side"] == 32
    assert data["peak_memory_mb"] > 100 and data["wall_s"] > 0
    assert data["task_seconds"]["train-model"] > 0 and "collect-shift-logits" in data["task_seconds"]
    after = data["summary"]["test_after"]
    assert 0 <= after["accuracy"] <= 1 and after["ece"] >= 0
    assert "**Outcome:** registered (exit 0)" in markdown and "| train-model |" in markdown


def check_default_run(data: dict, markdown: str) -> None:
    assert data["smoke"] is True and data["runs"]


CHECKS: dict[str, Callable] = {
    "accuracy_estimation": check_accuracy_estimation,
    "calibration_speed": check_calibration_speed,
    "command_latency": check_command_latency,
    "ddp_accuracy": check_ddp_accuracy,
    "decision_guarantees": check_decision_guarantees,
    "data_scale": check_data_scale,
    "default_run": check_default_run,
    "finetune_own_weights": check_finetune_own_weights,
    "gpu_train": check_gpu_train,
    "inference_speed": check_inference_speed,
    "gate_plan_power": lambda data, markdown: importlib.import_module("gate_plan_power").check_smoke(data, markdown),
    "gate_soundness": check_gate_soundness,
    "gate_soundness_baseline": check_gate_soundness_baseline,
    "real_logits": check_real_logits,
    "recorded_run": check_recorded_run,
    "run_timing": check_run_timing,
    "shift_and_ood": check_shift_and_ood,
    "soft_labels": check_soft_labels,
    "threshold_stability": check_threshold_stability,
    "train_step": check_train_step,
    "train_time_calibration": check_train_time_calibration,
}


def _marks(name: str) -> list:
    return [mark for group, mark in ((E2E, pytest.mark.e2e), (SLOW, pytest.mark.slow)) if name in group]


@pytest.mark.parametrize("name", [pytest.param(name, marks=_marks(name)) for name in NAMES])
def test_smoke_mode_runs_and_writes_its_results(name: str, tmp_path: Path, request) -> None:
    assert name in CHECKS, f"benchmarks/{name}.py: give it a --smoke mode and a check in this file"
    if name == "run_timing":
        out = request.getfixturevalue("run_timing_out")
    else:
        out = tmp_path / "out"
        extra = ["--repo", str(request.getfixturevalue("run_timing_out") / "project")] if name in ON_PROJECT else []
        run_smoke(name, out, *extra)

    markdown = (out / f"{name}.md").read_text()
    header = "\n".join(markdown.splitlines()[:5])
    assert f"benchmarks/{name}.py --smoke" in header and "commit" in header, header
    found = tables(markdown)
    assert found, f"{name}.md has no table"
    for table in found:
        assert len(table) >= 3 and set("".join(table[1])) <= set("-: "), table[:2]  # header, separator, rows
        assert all(len(row) == len(table[0]) for row in table), table
        cells = " ".join(cell for row in table for cell in row)
        assert not re.search(r"\b(nan|inf)\b", cells, re.IGNORECASE), cells
    data = json.loads((out / f"{name}.json").read_text())
    assert all(math.isfinite(x) for x in numbers(data)), f"{name}.json holds a NaN or an infinity"
    CHECKS[name](data, markdown)
    if name == "real_logits":
        check_real_logits_cache(out, data)


def test_a_smoke_run_refuses_to_write_into_docs(capsys) -> None:
    """Its numbers measure nothing: --out under docs/ is an error, before any work is done."""
    with pytest.raises(SystemExit) as refused:
        importlib.import_module("threshold_stability").main(["--smoke", "--out", str(REPO / "docs" / "results")])
    assert refused.value.code == 2 and "writes nothing under docs/" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="measures the GPU there")
def test_a_full_gpu_benchmark_without_a_gpu_says_so_and_exits_2(capsys) -> None:
    with pytest.raises(SystemExit) as refused:
        importlib.import_module("gpu_train").main([])
    assert refused.value.code == 2 and "no CUDA device here" in capsys.readouterr().err


def test_the_header_names_the_command_date_and_commit(tmp_path: Path) -> None:
    import argparse

    args = argparse.Namespace(smoke=False)
    path = _common.publish("example", "Example", "| a |\n| --- |\n| 1 |", args, tmp_path, ["--repeats", "2"])
    lines = path.read_text().splitlines()
    assert lines[0] == "# Example"
    assert re.fullmatch(
        r"Written by `python benchmarks/example\.py --repeats 2` on \d{4}-\d{2}-\d{2}, commit [0-9a-f]{7,}"
        r"( with uncommitted changes)?; the next full run of the benchmark overwrites this file\.",
        lines[2],
    ), lines[2]
    assert lines[4:] == ["| a |", "| --- |", "| 1 |"]
    assert not (tmp_path / "example.json").exists()  # a full run's figures live in its table


def test_gate_soundness_reruns_only_the_cells_named_and_quotes_the_rest(tmp_path: Path) -> None:
    """--reuse/--rerun: the named gate's cells and the targets are measured again (here with more
    trials, so a rerun cell is told apart from a quoted one); every other cell is the earlier
    run's record, byte for byte, and the results file says how many cells it quotes."""
    gate_soundness = importlib.import_module("gate_soundness")
    first = gate_soundness.main(["--smoke", "--out", str(tmp_path / "first"), "--json", str(tmp_path / "first.json")])
    again = gate_soundness.main(
        ["--smoke", "--out", str(tmp_path / "again"), "--power-trials", "3", "--target-trials", "3"]
        + ["--reuse", str(tmp_path / "first.json"), "--rerun", "max_ece_increase", "targets"]
    )
    assert [gate_soundness.cell_key(r) for r in again] == [gate_soundness.cell_key(r) for r in first]
    rerun = [(a, b) for a, b in zip(first, again) if b["gate"] == "max_ece_increase" or b["target"] is not None]
    quoted = [(a, b) for a, b in zip(first, again) if (a, b) not in rerun]
    assert rerun and quoted
    assert all(a == b for a, b in quoted)
    assert all(b["trials"] == 3 for a, b in rerun if b["kind"] != "false promotion")
    assert all(a["trials"] == 2 for a, b in quoted if a["kind"] == "false rejection")
    markdown = (tmp_path / "again" / "gate_soundness.md").read_text()
    assert f"{len(quoted)} of {len(again)} cells quoted from the earlier run" in markdown


def test_gate_soundness_refuses_reuse_without_rerun(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as refused:
        importlib.import_module("gate_soundness").main(["--smoke", "--reuse", str(tmp_path / "x.json")])
    assert refused.value.code == 2 and "--reuse and --rerun go together" in capsys.readouterr().err
