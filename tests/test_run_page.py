"""What a run shows in the MLflow UI (issue 15): the verdict line and warning of its description,
one vocabulary for metrics, version tags and metrics.json, tags per gate, and the reliability
diagram. The flow's own run is checked in tests/test_flow_e2e.py; the page in a real browser in
test_run_page_in_a_browser (skipped without chromium)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from calibflow.pipeline import evaluation_steps
from calibflow.pipeline import report_staging
from calibflow.pipeline import run_summary
from calibflow.pipeline import tagging
from calibflow import names
from calibflow.gates.checks import GateCheck, GateVerdict

BEFORE = {"accuracy": 0.9888, "nll": 0.0410, "brier": 0.0170, "ece": 0.0120, "mce": 0.31}
AFTER = {"accuracy": 0.9888, "nll": 0.0432, "brier": 0.0171, "ece": 0.0123, "mce": 0.30}


def evaluation(before=BEFORE, after=AFTER) -> evaluation_steps.Evaluation:
    return evaluation_steps.Evaluation(before=dict(before), after=dict(after), plots=())


FIT = evaluation_steps.CalibrationRecord(
    method="temperature", state_path="", temperature=0.9561, nll_before=0.05, nll_after=0.049
)


def verdict(ece_bound: float = 0.0235) -> GateVerdict:
    checks = (
        GateCheck("max_ece", "smooth ECE", 0.0110, ece_bound, 0.05, "<=", ece_bound <= 0.05),
        GateCheck("min_accuracy", "accuracy", 0.9888, 0.9781, 0.9, ">=", True),
    )
    return GateVerdict(passed=all(c.passed for c in checks), checks=checks, confidence=0.95, n_samples=267)


def champion_verdict(increase_bound: float = 0.0143) -> GateVerdict:
    """The default absolute gates passed, and max_ece_increase against a champion."""
    checks = (
        *verdict().checks,
        GateCheck("max_ece_increase", "ECE increase", 0.0, increase_bound, 0.01, "<=", increase_bound <= 0.01),
    )
    return GateVerdict(
        passed=all(c.passed for c in checks), checks=checks, confidence=0.95, n_samples=267, n_shared=267
    )


def test_the_verdict_line_states_the_three_part_verdict_each_bound_and_t():
    first = tagging.run_verdict(verdict(), None, "champion")
    assert run_summary.verdict_line(evaluation(), FIT, verdict(), first) == (
        "PROMOTED · absolute gates passed · no champion · promoted yes: @champion · ECE 0.0120 -> 0.0123 "
        "(smooth ECE 95% upper 0.0235 <= 0.05) · acc 0.989 (lower 0.978 >= 0.9) · T 0.956"
    )
    failed = run_summary.verdict_line(evaluation(), FIT, verdict(ece_bound=0.07))
    assert failed.startswith("REJECTED · absolute gates failed · no champion · promoted no: not registered · ")
    assert "failed: max_ece 0.0700 > 0.05" in failed and "smooth ECE 95% upper 0.0700 > 0.05" in failed
    assert "<= 0.05" not in failed  # a failed check never reads as if it held

    challenger = tagging.run_verdict(champion_verdict(), "1", "challenger")
    line = run_summary.verdict_line(evaluation(), FIT, champion_verdict(), challenger)
    assert line.startswith(
        "NOT PROMOTED · absolute gates passed · against champion version 1: failed · promoted no: @challenger · "
        "failed: max_ece_increase 0.0143 > 0.01 · "
    )


def test_the_three_parts_of_the_verdict():
    assert tagging.run_verdict(verdict(), None, "champion").tags() == {
        "verdict/absolute": "passed",
        "verdict/champion": "no champion",
        "verdict/promoted": "yes: @champion",
        "verdict/failed": "none",
        "gate/against": "none: no @champion to compare with",
    }
    challenger = tagging.run_verdict(champion_verdict(), "1", "challenger")
    assert (challenger.absolute, challenger.champion, challenger.promoted) == ("passed", "failed", "no: @challenger")
    assert challenger.failed == ("max_ece_increase 0.0143 > 0.01",)
    promoted = tagging.run_verdict(champion_verdict(increase_bound=0.008), "1", "champion")
    assert (promoted.champion, promoted.promoted, promoted.failed) == ("passed", "yes: @champion", ())
    rejected = tagging.run_verdict(verdict(ece_bound=0.07), None)
    assert (rejected.absolute, rejected.promoted) == ("failed", "no: not registered")
    # a champion, but nothing compared with it (no relative gate, or no image it was not fitted on)
    assert tagging.run_verdict(verdict(), "1", "challenger").champion == "not compared"
    # the text is read back from the tags alone (what a version page or `calibflow status` has)
    assert (
        names.verdict_text(challenger.tags())
        == challenger.text()
        == (
            "absolute gates passed · against champion version 1: failed · promoted no: @challenger · "
            "failed: max_ece_increase 0.0143 > 0.01"
        )
    )
    assert challenger.to_json() == {
        "absolute": "passed",
        "champion": "failed",
        "promoted": "no: @challenger",
        "failed": "max_ece_increase 0.0143 > 0.01",
    }


def test_the_description_starts_with_the_verdict_then_warns_when_calibration_made_things_worse():
    text = run_summary.summary_markdown("run-1", "sqlite:///mlflow.db", "registered", evaluation(), FIT, verdict())
    lines = text.splitlines()
    assert lines[0] == run_summary.verdict_line(evaluation(), FIT, verdict())
    assert "WARNING" in lines[2] and "ECE 0.0120 -> 0.0123" in lines[2] and "NLL 0.0410 -> 0.0432" in lines[2]
    better = evaluation(after={**AFTER, "ece": 0.0100, "nll": 0.0400})
    assert run_summary.calibration_warning(better, FIT) is None
    assert "WARNING" not in run_summary.summary_markdown("run-1", "uri", "registered", better, FIT, verdict())


def test_a_refused_run_says_why_on_the_first_line_of_its_description():
    reason = "failed (ConfigError): train.batch_size 4096 is more than the 60 training images: lower it"
    text = run_summary.summary_markdown("run-1", "uri", reason, None, None, None)
    assert text.splitlines()[0] == f"NOT REGISTERED · {reason}"
    assert f"## calibflow run: {reason}" in text


def test_a_promotion_rewrites_the_verdict_line_and_keeps_the_rest_under_a_heading():
    before = tagging.run_verdict(champion_verdict(), "1", "challenger")
    old = run_summary.summary_markdown(
        "run-1", "uri", "registered", evaluation(), FIT, champion_verdict(), None, final=before
    )
    after = before.as_promoted("yes: @champion")
    new = run_summary.with_new_verdict(old, f"PROMOTED · {after.text()}", ["Promoted by ci."])
    lines = new.splitlines()
    assert lines[0] == f"PROMOTED · {after.text()}" and lines[2] == "Promoted by ci."
    assert "NOT PROMOTED" not in new and "### Before" in new and "| gate | value |" in new
    assert "| max_ece_increase | 0.0000 | 0.0143 > 0.01 | FAIL |" in old  # the relation that holds
    # promoting twice keeps one verdict line, not a pile of them
    again = run_summary.with_new_verdict(new, "PROMOTED · x", ["y"])
    assert again.count("PROMOTED ·") == 1


def test_gate_metrics_and_tags_name_each_check_its_bound_and_the_champion():
    assert tagging.gate_metrics(verdict()) == {
        "gate/max_ece_value": 0.0110,
        "gate/max_ece_bound": 0.0235,
        "gate/max_ece_threshold": 0.05,
        "gate/min_accuracy_value": 0.9888,
        "gate/min_accuracy_bound": 0.9781,
        "gate/min_accuracy_threshold": 0.9,
    }
    tags = tagging.gate_tags(verdict(), champion=None)
    assert tags["gate/max_ece"] == "passed: smooth ECE 0.0110, 95% upper 0.0235 <= 0.05"
    assert tags["verdict/absolute"] == "passed" and tags["verdict/promoted"] == "no: not registered"
    assert "gate/verdict" not in tags  # one verdict: its three parts, nothing that can contradict them
    assert tags["gate/against"].startswith("none") and tagging.gate_tags(verdict(), "3")["gate/against"] == "version 3"
    failed = tagging.gate_tags(champion_verdict(), "3")
    assert failed["gate/max_ece_increase"] == "FAILED: ECE increase 0.0000, 95% upper 0.0143 > 0.01"


def test_metrics_version_tags_and_metrics_json_share_one_vocabulary(tmp_path):
    metrics = tagging.test_metrics(evaluation())
    assert metrics["test/uncalibrated/ece"] == 0.0120 and metrics["test/calibrated/ece"] == 0.0123
    assert tagging.fit_metrics(FIT) == {
        "calibration/uncalibrated_nll": 0.05,
        "calibration/calibrated_nll": 0.049,
        "calibration/temperature": 0.9561,
    }
    staged = report_staging.stage_metrics_report(
        str(tmp_path / "reports" / "metrics.json"), evaluation(), FIT, champion_verdict(), champion="1"
    )
    final = tagging.run_verdict(champion_verdict(), "1", "challenger")
    report = json.loads(Path(report_staging.publish_report(staged, final)).read_text())
    assert report["test"]["calibrated"]["ece"] == metrics["test/calibrated/ece"]
    assert report["calibration"] == {
        "method": "temperature",
        "temperature": 0.9561,
        "uncalibrated_nll": 0.05,
        "calibrated_nll": 0.049,
    }
    assert report["gate"] == {"max_ece_bound": 0.0235, "min_accuracy_bound": 0.9781, "max_ece_increase_bound": 0.0143}
    assert report["verdict"] == final.to_json() and report["verdict"]["promoted"] == "no: @challenger"


def test_versions_registered_under_the_old_tag_names_still_read():
    old = {"ece_post": "0.01", "accuracy": "0.99", "temperature": "1.1", "shift_mean_ece": "0.2"}
    assert names.version_tag(old, "test/calibrated/ece") == "0.01"
    assert names.version_tag(old, "test/calibrated/accuracy") == "0.99"
    assert names.version_tag(old, names.TEMPERATURE) == "1.1"
    assert names.version_tag(old, "shift/calibrated/mean_ece") == "0.2"
    assert names.version_tag({**old, "test/calibrated/ece": "0.02"}, "test/calibrated/ece") == "0.02"  # new wins
    assert names.version_tag(old, "test/calibrated/nll", "") == ""


def test_shift_and_ood_metrics_are_grouped_under_their_prefix():
    from calibflow.evaluation.shift import Suite, SuiteResult

    suite = Suite(corruptions=("contrast",), severities=(5,), max_images=4, seed=0)
    cell = {"before": {"accuracy": 0.5, "ece": 0.2, "nll": 1.0}, "after": {"accuracy": 0.5, "ece": 0.1, "nll": 0.9}}
    flat = SuiteResult(suite, 4, {"contrast_s5": cell}, cell).flat_metrics()
    assert flat["shift/calibrated/contrast_s5_ece"] == 0.1 and flat["shift/uncalibrated/mean_ece"] == 0.2
    assert names.ood_metric("energy", "fpr95") == "ood/energy/fpr95"


def test_the_reliability_diagram_marks_sparse_bins(tmp_path, monkeypatch):
    """259 of 267 images in the top bin (the default run): the other bins are named sparse."""
    import matplotlib.pyplot as plt

    from calibflow.evaluation import plots
    from calibflow.metrics import reliability_bins

    rng = np.random.default_rng(0)
    confidence = np.concatenate([rng.uniform(0.97, 1.0, 259), rng.uniform(0.3, 0.9, 8)])
    probabilities = np.stack([confidence, 1 - confidence], axis=1)
    labels = np.zeros(267, dtype=np.int64)
    labels[-3:] = 1
    bins = reliability_bins(probabilities, labels, 15)
    drawn = []
    original = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or original(fig, path))
    path = plots.reliability_diagram(bins, bins, tmp_path / "reliability.png")
    assert path.stat().st_size > 0
    figure = drawn[0]
    legend = [text.get_text() for text in figure.legends[0].get_texts()]
    assert legend == [
        "accuracy",
        f"accuracy of a bin of < {plots.SPARSE_BIN_COUNT} images (noise)",
        "gap to mean confidence",
        "perfect calibration",
        f"{plots.SPARSE_BIN_COUNT} images (counts)",
    ]
    filled = bins.counts[bins.counts > 0]
    sparse = int((filled < plots.SPARSE_BIN_COUNT).sum())
    assert sparse >= 3 and f"{sparse} of {len(filled)} filled bins sparse" in figure.axes[0].get_title()
    plt.close("all")


def browser() -> str | None:
    return next(
        (found for name in ("chromium", "chromium-browser", "google-chrome") if (found := shutil.which(name))), None
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rendered(url: str, chromium: str) -> str:
    """The page's DOM after its scripts ran (MLflow's UI is a single-page app)."""
    result = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=25000", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.e2e
@pytest.mark.skipif(browser() is None, reason="no chromium: `apt-get install chromium` to check the run page")
def test_run_page_in_a_browser(tmp_path, monkeypatch):
    """A run recorded the way the flow records it, served by `mlflow server` and rendered by headless
    Chromium: the Overview shows the verdict line, the source and the dataset; Model metrics groups
    the charts by prefix."""
    import html

    from calibflow.tracking import store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = store.configure_tracking(tmp_path)
    run_id = store.start_run(
        "run-page",
        run_name="browser-check",
        repo_root=tmp_path,
        source=store.RunSource("flows/train_calibrate.py", git_commit="0" * 40),
    )
    description = run_summary.summary_markdown(run_id, uri, "registered", evaluation(), FIT, verdict())
    store.set_run_description(run_id, description)
    store.log_dataset(
        run_id, "data/digits", str(tmp_path / "data" / "digits"), "c3361a1dd7b1f82c5e42dcea69cd4949.dir", "training"
    )
    store.log_metrics(
        run_id, {**tagging.test_metrics(evaluation()), **tagging.fit_metrics(FIT), **tagging.gate_metrics(verdict())}
    )
    for epoch in (1, 2, 3):
        store.log_metrics(run_id, {"train/loss": 1.0 / epoch, "val/nll": 0.5 / epoch}, step=epoch)
    store.set_tags(run_id, tagging.gate_tags(verdict(), None))
    store.end_run(run_id, "succeeded")
    experiment = store.client().get_run(run_id).info.experiment_id

    port = free_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    try:
        import urllib.request

        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(1)
        page = f"http://127.0.0.1:{port}/#/experiments/{experiment}/runs/{run_id}"
        overview = html.unescape(rendered(page, browser()))
        assert run_summary.verdict_line(evaluation(), FIT, verdict()) in overview
        assert "WARNING: calibration (T = 0.956) made the test split worse" in overview
        assert "train_calibrate.py" in overview and "data/digits (c3361a1dd7b1f82c5e42dcea69cd4949.dir)" in overview
        charts = html.unescape(rendered(page + "/model-metrics", browser()))
        for section in ("test/uncalibrated", "test/calibrated", "gate", "calibration", "train", "val"):
            assert f">{section}<" in charts, section
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
