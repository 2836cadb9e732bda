"""Expected refusals end a real `calibflow run` with a message and an exit code, never a Python
traceback (Prefect's log included: the flow ends Failed by returning the state, and the task log
keeps the message); settings that cannot work are refused before anything trains. An unexpected
error still shows its traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import main as calibflow

pytestmark = pytest.mark.e2e

CALIBFLOW = str(Path(sys.executable).parent / "calibflow")


def run_cli(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    return subprocess.run(
        [CALIBFLOW, "run", "--repo", str(repo), *args], capture_output=True, text=True, cwd=repo, env=env
    )


def trained_anything(repo: Path) -> bool:
    return any((repo / ".calibflow" / "runs").glob("*/checkpoint.pt"))


def test_a_failed_gate_prints_its_checks_and_no_traceback(tiny_repo):
    # min_accuracy 0.95: passable on the 60 test images only by a model right on every one of them
    result = run_cli(tiny_repo, "--set", "gates.min_accuracy=0.95", "--set", "seed=3")
    shown = result.stdout + result.stderr
    assert result.returncode == 1, shown
    assert "Traceback" not in shown
    assert "model rejected, nothing registered" in result.stderr and "min_accuracy" in result.stderr
    assert "FAIL" in result.stderr  # the verdict, check by check


def test_a_binary_calibrator_on_five_classes_is_refused_before_training_with_exit_2(tiny_repo):
    result = run_cli(tiny_repo, "--set", "calibration.method=platt")
    shown = result.stdout + result.stderr
    assert result.returncode == 2, shown
    assert "Traceback" not in shown, shown
    assert "calibration.method = platt calibrates two-class models and the data has 5 classes" in result.stderr
    assert not trained_anything(tiny_repo)


def test_gates_no_model_can_pass_on_the_test_split_are_refused_before_training(tiny_repo, capsys):
    assert calibflow(["run", "--repo", str(tiny_repo), "--set", "gates.max_ece=0.0"]) == 2
    err = capsys.readouterr().err
    assert "no model can pass the gates on the 60 images of the test split" in err
    assert not trained_anything(tiny_repo)


def test_an_absolute_params_path_is_read_as_it_is(tiny_repo, tmp_path, capsys):
    params = tmp_path / "elsewhere.yaml"
    params.write_text((tiny_repo / "params.yaml").read_text().replace("calibration: {", "calibration: {method: beta, "))
    # reaching the pre-training check means the flow read this file, not repo/abs-path
    assert calibflow(["run", "--repo", str(tiny_repo), "--params", str(params)]) == 2
    assert "calibration.method = beta" in capsys.readouterr().err


def test_a_passing_run_prints_a_summary_and_json_on_request(tiny_repo, capsys):
    assert calibflow(["run", "--repo", str(tiny_repo)]) == 0
    out = capsys.readouterr().out
    assert "calibflow run: registered tiny-digits version 1 as @champion; every gate passed" in out
    assert "test ECE" in out and "T = " in out and "MLflow run" in out
    assert "gate max_ece:" in out and "95% upper bound" in out
    assert calibflow(["run", "--repo", str(tiny_repo), "--json"]) == 0  # unchanged: skipped, said as JSON
    result = json.loads(capsys.readouterr().out)
    assert result["skipped"] is True and result["champion_version"] == "1"


def test_an_unexpected_error_in_a_task_still_shows_its_traceback(tiny_repo, monkeypatch, capsys):
    from calibflow.pipeline import data_steps

    def broken(*args, **kwargs):
        raise RuntimeError("a bug nobody anticipated")

    monkeypatch.setattr(data_steps, "check_run_settings", broken)
    assert calibflow(["run", "--repo", str(tiny_repo)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "a bug nobody anticipated" in err


def test_initial_weights_that_cannot_start_the_network_are_refused_before_training(tiny_repo):
    """model.weights_path is read from the repository root (as data.path is): a missing file is exit
    2 naming it, before the data steps; one of another architecture is exit 2 before training."""
    result = run_cli(tiny_repo, "--set", "model.weights_path=weights/missing.pt")
    shown = result.stdout + result.stderr
    assert result.returncode == 2, shown
    assert "Traceback" not in shown and "store failed" not in shown, shown
    [said] = [line for line in result.stderr.splitlines() if line.startswith("calibflow run:")]
    assert f"{tiny_repo / 'weights' / 'missing.pt'} does not exist" in said and "set model.weights_path to null" in said
    assert not trained_anything(tiny_repo)

    import torch
    import torchvision.models

    (tiny_repo / "weights").mkdir()
    torch.save(torchvision.models.get_model("resnet18", weights=None).state_dict(), tiny_repo / "weights" / "r18.pt")
    result = run_cli(tiny_repo, "--set", "model.weights_path=weights/r18.pt")
    shown = result.stdout + result.stderr
    assert result.returncode == 2, shown
    assert "Traceback" not in shown, shown
    assert "r18.pt: unexpected keys" in result.stderr and "model.arch small_cnn" in result.stderr
    assert not trained_anything(tiny_repo)
