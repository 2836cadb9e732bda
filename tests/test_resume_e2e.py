"""End-to-end: `calibflow run` killed with SIGKILL mid-training and started again resumes from the
last complete epoch and registers the weights a run never interrupted registers, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from calibflow.tracking import store
from calibflow.training.models import load_checkpoint
from calibflow.training.resume import checkpoint_root

pytestmark = pytest.mark.e2e
MODEL = "tiny-digits"
CALIBFLOW = str(Path(sys.executable).parent / "calibflow")
# Wide enough that an epoch takes a noticeable fraction of a second, so the kill lands mid-training.
# A model this wide makes no mistake on the calibration split, which leaves a temperature with no
# optimum: histogram binning does not need one (what is tested here is training).
SLOW = [
    "--set",
    "model.width=64",
    "--set",
    "train.epochs=12",
    "--set",
    "train.threads=1",
    "--set",
    "calibration.method=histogram",
]


def completed_epoch(repo: Path) -> int:
    records = list(checkpoint_root(repo).glob("*/latest.json"))
    return max((json.loads(r.read_text())["epoch"] for r in records), default=0)


def weights_of(repo: Path, run_id: str, out: Path) -> dict[str, torch.Tensor]:
    store.configure_tracking(repo)
    return load_checkpoint(store.download_run_artifact(run_id, "checkpoint/checkpoint.pt", out)).members[0].state_dict()


def test_a_run_killed_mid_training_resumes_and_registers_the_uninterrupted_weights(tiny_repo, tmp_path):
    # this checkout's code in the child processes, whatever the environment installed
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [CALIBFLOW, "run", "--repo", str(tiny_repo), *SLOW]
    log = tmp_path / "killed.log"
    killed = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"), start_new_session=True
    )  # its own process group: the kill takes its children too
    deadline = time.monotonic() + 600
    while completed_epoch(tiny_repo) < 3:
        assert killed.poll() is None, f"the run ended before it could be killed: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    at_kill = completed_epoch(tiny_repo)
    assert 3 <= at_kill < 12

    # a corrupted checkpoint (a disk fault): exit 2, the file and the fix named, nothing registered
    [latest] = checkpoint_root(tiny_repo).glob("*/latest.json")
    saved = latest.parent / json.loads(latest.read_text())["file"]  # the kill may have left the previous one too
    good = saved.read_bytes()
    saved.write_bytes(good[:-64] + bytes(64))
    refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr.split("calibflow:")[-1]
    assert (
        f"{saved.name} is corrupted" in refused.stderr and "to train this model from its first epoch" in refused.stderr
    )
    client = (store.configure_tracking(tiny_repo), MlflowClient())[1]
    assert client.search_registered_models(f"name='{MODEL}'") == []
    saved.write_bytes(good)

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not any(checkpoint_root(tiny_repo).glob("*/latest.json"))  # consumed
    first = client.get_model_version_by_alias(MODEL, "champion")
    run = client.get_run(first.run_id)
    assert int(run.data.tags["resumed_from_epoch"]) >= at_kill
    assert len(client.get_metric_history(first.run_id, "train/loss")) == 12  # the curve is whole

    # the same run never interrupted (--force: the champion was built from these very inputs)
    fresh = subprocess.run([*command, "--force"], env=env, capture_output=True, text=True, timeout=900)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    second = client.get_model_version_by_alias(MODEL, "challenger")
    assert client.get_run(second.run_id).data.tags["resumed_from_epoch"] == "0"
    a, b = weights_of(tiny_repo, first.run_id, tmp_path / "a"), weights_of(tiny_repo, second.run_id, tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
