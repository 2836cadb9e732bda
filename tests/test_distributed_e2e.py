"""End-to-end: `calibflow run` with train.distributed: ddp trains under torchrun (2 gloo processes
on this machine's CPU), and the flow logs and registers once, from rank 0's results; more
processes than the machine has cores is refused before anything trains or moves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from calibflow.tracking import store

pytestmark = pytest.mark.e2e
MODEL = "tiny-digits"
CALIBFLOW = str(Path(sys.executable).parent / "calibflow")


def calibflow_run(repo: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("MLFLOW_TRACKING_URI", None)
    sets = [arg for override in overrides for arg in ("--set", override)]
    return subprocess.run(
        [CALIBFLOW, "run", "--repo", str(repo), *sets], env=env, capture_output=True, text=True, timeout=900
    )


def test_a_two_process_ddp_run_is_logged_and_registered_once_from_rank_0(tiny_repo):
    done = calibflow_run(tiny_repo, "train.distributed=ddp", "train.nproc=2")
    assert done.returncode == 0, done.stderr[-3000:]
    client = (store.configure_tracking(tiny_repo), MlflowClient())[1]
    [version] = client.search_model_versions(f"name='{MODEL}'")
    assert client.get_model_version_by_alias(MODEL, "champion").version == version.version
    run = client.get_run(version.run_id)
    assert run.data.params["train.distributed"] == "ddp"
    assert run.data.tags["training_processes"] == "2"
    # one run in the experiment, and each epoch logged once (rank 0's statistics, through the flow)
    experiment = client.get_experiment_by_name("tiny")
    assert len(client.search_runs([experiment.experiment_id])) == 1
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4, 5]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/accuracy")] == [2, 4, 5]
    assert run.data.metrics["test/calibrated/accuracy"] > 0.5

    # more processes than cores: exit 2 and the fix named, before training; nothing registered or moved
    cores = len(os.sched_getaffinity(0))
    refused = calibflow_run(tiny_repo, "train.distributed=ddp", f"train.nproc={cores + 1}", "train.epochs=6")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert f"has {cores}" in refused.stderr and "lower train.nproc" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert len(client.search_model_versions(f"name='{MODEL}'")) == 1
    assert client.get_model_version_by_alias(MODEL, "champion").version == version.version
