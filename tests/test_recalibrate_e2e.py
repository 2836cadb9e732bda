"""End-to-end: `calibflow recalibrate` fits a new calibrator for the champion's network on newly
labeled images, gates it and registers it with the same weights byte for byte; bad input is exit 2
with nothing registered."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from calibflow import names
from calibflow.tracking import store
from cli.main import main as calibflow
from tests.test_monitor_e2e import add_folder, add_own_images, unseen_digits

pytestmark = pytest.mark.e2e
MODEL = "tiny-digits"
CALIBFLOW = str(Path(sys.executable).parent / "calibflow")
# this checkout's code in the child processes, whatever the environment installed
CHILD_ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
# The new folder's test half holds about 300 images: too few to show that a recalibration loses at
# most the default 0.01 of ECE or accuracy to the champion (an identical retrain's bounds are about
# 0.022 and 0.012 there), so recalibrate would refuse it as too small before the check a test is about.
LOOSE_COMPARISON = ["--set", "gates.max_ece_increase=0.05", "--set", "gates.max_accuracy_drop=0.05"]


def served_files(version: str, out: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/{version}", dst_path=str(out))) / "artifacts"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def recalibrate_refused_on_seen(repo: Path, version: str, data: str, n_seen: int, n_images: int, capsys) -> str:
    """`calibflow recalibrate` of `version` on `data`, which holds `n_seen` images its network was
    fitted on: exit 2 naming the count and the fix, nothing registered; its stderr."""
    capsys.readouterr()
    code = calibflow(["recalibrate", "--model", f"models:/{MODEL}/{version}", "--data", data, "--repo", str(repo)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{n_seen} of its {n_images} images are images the network was fitted on" in err
    assert "newly labeled images the network has not seen" in err and "nothing registered" in err
    assert "Traceback" not in err
    return err


def test_recalibrate_registers_the_same_network_with_a_new_calibrator(tiny_repo, tmp_path, capsys):
    from calibflow.disk_cache import file_sha256
    from calibflow.lifecycle.promotion import seen_by
    from calibflow.tracking import registration

    assert calibflow(["run", "--repo", str(tiny_repo)]) == 0
    images, labels = unseen_digits()
    # a folder holding the network's own train/val/calibration images is refused, naming a few
    store.configure_tracking(tiny_repo)
    own, n_seen = add_own_images(tiny_repo, "own", seen_by(registration.resolve_model_uri(f"models:/{MODEL}/1")))
    err = recalibrate_refused_on_seen(tiny_repo, "1", own, n_seen, n_seen, capsys)
    assert n_seen > 100 and "e.g. 0/own_" in err
    harsher = (255 * (images / 255.0) ** 2).astype(np.uint8)  # the new camera: calibration drifted (monitor exit 1)
    data = add_folder(tiny_repo, "relabeled", harsher, labels)
    # the gates read the new test half (and its corrupted copies): a bar it cannot clear is exit 1, nothing registered
    assert (
        calibflow(
            [
                "recalibrate",
                "--model",
                f"models:/{MODEL}@champion",
                "--data",
                data,
                "--repo",
                str(tiny_repo),
                "--set",
                "gates.max_shift_ece=0.05",
                *LOOSE_COMPARISON,
            ]
        )
        == 1
    )
    assert "rejected, nothing registered" in capsys.readouterr().err
    store.configure_tracking(tiny_repo)
    assert [str(v.version) for v in MlflowClient().search_model_versions(f"name='{MODEL}'")] == ["1"]
    assert (
        calibflow(
            [
                "recalibrate",
                "--model",
                f"models:/{MODEL}@champion",
                "--data",
                data,
                "--repo",
                str(tiny_repo),
                "--set",
                "gates.max_shift_ece=1.0",
                *LOOSE_COMPARISON,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "version 2 (@challenger): version 1's network recalibrated" in out

    store.configure_tracking(tiny_repo)
    client = MlflowClient()
    new = client.get_model_version_by_alias(MODEL, "challenger")
    assert new.tags["recalibrated_from"] == "1" and new.tags["recalibration_data_path"] == data
    # the three-part verdict, on the version and its run, as a flow run's version carries it
    assert new.tags[names.VERDICT_ABSOLUTE] == names.PASSED and new.tags[names.VERDICT_PROMOTED] == names.AT_CHALLENGER
    assert new.tags[names.VERDICT_CHAMPION] in (names.PASSED, names.FAILED)  # compared with version 1
    run_tags = client.get_run(new.run_id).data.tags
    assert {tag: run_tags[tag] for tag in names.VERDICT_TAGS} == {tag: new.tags[tag] for tag in names.VERDICT_TAGS}
    assert run_tags["gate/against"] == "version 1" and "gate/max_shift_ece" in run_tags
    assert json.loads(new.tags["shift_suite"])["corruptions"]  # the suite ran on the new test half, recorded
    gates = json.loads(store.download_run_artifact(new.run_id, "gates/gates.json", tmp_path).read_text())
    assert "max_shift_ece" in {c["name"] for c in gates["checks"]}
    old = client.get_model_version(MODEL, "1")
    for lineage in ("data_hash", "params_hash", "git_commit", "seed"):
        assert new.tags[lineage] == old.tags[lineage]
    metrics = client.get_run(new.run_id).data.metrics  # fitted to the new images: a better NLL there
    assert metrics["test/recalibrated/nll"] < metrics["test/source/nll"]
    assert float(new.tags["test/calibrated/nll"]) == pytest.approx(metrics["test/recalibrated/nll"])
    a, b = served_files("1", tmp_path / "v1"), served_files("2", tmp_path / "v2")
    assert sha256(a / "weights.pt") == sha256(b / "weights.pt")  # the network, byte for byte
    assert json.loads((a / "calibration.json").read_text()) != json.loads((b / "calibration.json").read_text())
    assert client.get_run(new.run_id).data.tags["recalibrated_from"] == "1"
    # recalibrating version 2 on the same folder is refused: its calibrator was fitted on half of it
    folder = tiny_repo / data
    fitted = seen_by(registration.resolve_model_uri(f"models:/{MODEL}/2"))
    n_fitted = sum(file_sha256(p) in fitted for p in folder.glob("*/*.png"))
    assert 0 < n_fitted < len(images)
    recalibrate_refused_on_seen(tiny_repo, "2", data, n_fitted, len(images), capsys)
    assert sorted(str(v.version) for v in client.search_model_versions(f"name='{MODEL}'")) == ["1", "2"]

    # the registry can gate and reproduce it like any version: on the new test half
    gate = subprocess.run(
        [CALIBFLOW, "gate", "--model", MODEL, "--candidate", "@challenger", "--repo", str(tiny_repo)],
        capture_output=True,
        text=True,
        timeout=600,
        env=CHILD_ENV,
    )
    assert gate.returncode in (0, 1), gate.stderr
    evaluated = subprocess.run(
        [CALIBFLOW, "evaluate", "--model", f"models:/{MODEL}@challenger", "--repo", str(tiny_repo)],
        capture_output=True,
        text=True,
        timeout=600,
        env=CHILD_ENV,
    )
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr


@pytest.mark.parametrize("problem", ["too small", "classes differ", "ood gate"])
def test_recalibrate_refuses_what_it_cannot_use_and_registers_nothing(tiny_repo, capsys, problem):
    assert calibflow(["run", "--repo", str(tiny_repo)]) == 0
    images, labels = unseen_digits()
    if problem == "too small":
        keep = np.concatenate([np.flatnonzero(labels == k)[:4] for k in range(5)])
        data, message = add_folder(tiny_repo, "few", images[keep], labels[keep]), "too small to recalibrate on"
    elif problem == "classes differ":
        keep = labels < 4
        data, message = add_folder(tiny_repo, "fewer_classes", images[keep], labels[keep]), "has the classes 0, 1, 2, 3"
    else:
        data, message = add_folder(tiny_repo, "relabeled", images, labels), "a recalibration has none"
    extra = ["--set", "ood.path=data/relabeled", "--set", "gates.max_ood_fpr95=0.5", *LOOSE_COMPARISON]
    extra = extra if problem == "ood gate" else []
    capsys.readouterr()
    assert (
        calibflow(
            ["recalibrate", "--model", f"models:/{MODEL}@champion", "--data", data, "--repo", str(tiny_repo), *extra]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert message in err and "nothing registered" in err and "Traceback" not in err
    store.configure_tracking(tiny_repo)
    assert [str(v.version) for v in MlflowClient().search_model_versions(f"name='{MODEL}'")] == ["1"]
