"""End-to-end: `calibflow monitor` on DVC-pinned folders of new images against the registered
champion of the tiny repo: fine, calibration drifted, accuracy drifted, unlabeled, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from calibflow.tracking import store
from cli.main import main as calibflow
from tests.conftest import dvc, run

pytestmark = pytest.mark.e2e
MODEL = "tiny-digits"
# The tiny model's recorded accuracy comes from 60 test images: wide tolerances, so that what is
# tested is the verdict logic on real predictions, not the tiny split's luck.
TOLERANCES = ["--set", "monitor.max_accuracy_drop=0.3", "--set", "monitor.max_ece_increase=0.03"]


def unseen_digits() -> tuple[np.ndarray, np.ndarray]:
    """Digits of classes 0-4 the tiny repo does not hold (it keeps the first 60 of each)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    seen: dict[int, int] = {}
    keep = []
    for i, label in enumerate(digits.target):
        if label <= 4:
            seen[label] = seen.get(label, 0) + 1
            if seen[label] > 60:
                keep.append(i)
    return pixels[keep], digits.target[keep]


def add_folder(repo: Path, name: str, images: np.ndarray, labels: np.ndarray | None) -> str:
    folder = repo / "data" / name
    for i, image in enumerate(images):
        target = folder / str(labels[i]) if labels is not None else folder
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(target / f"{i:04d}.png")
    dvc("add", "-q", f"data/{name}", cwd=repo)
    run("git", "add", "-A", cwd=repo)
    run("git", "commit", "-qm", f"add data/{name}", cwd=repo)
    return f"data/{name}"


def add_own_images(repo: Path, name: str, seen: set[str], unseen: tuple[np.ndarray, np.ndarray] | None = None):
    """A labeled folder of the tiny repo's own images that `seen` holds (byte for byte: the same
    content hash), beside `unseen` new ones; its path and how many of its images are seen."""
    from calibflow.disk_cache import file_sha256

    folder = repo / "data" / name
    own = [p for p in sorted((repo / "data" / "tiny").glob("*/*.png")) if file_sha256(p) in seen]
    for path in own:
        (folder / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, folder / path.parent.name / f"own_{path.name}")
    if unseen is not None:
        add_folder(repo, name, *unseen)
    else:
        dvc("add", "-q", f"data/{name}", cwd=repo)
        run("git", "add", "-A", cwd=repo)
        run("git", "commit", "-qm", f"add data/{name}", cwd=repo)
    return f"data/{name}", len(own)


def monitor(repo: Path, data: str, out: Path, *extra: str) -> tuple[int, dict]:
    code = calibflow(
        [
            "monitor",
            "--model",
            f"models:/{MODEL}@champion",
            "--data",
            data,
            "--repo",
            str(repo),
            *TOLERANCES,
            *extra,
            "--json",
            str(out),
        ]
    )
    return code, (json.loads(out.read_text()) if out.exists() else {})


def test_monitor_says_fine_recalibrate_retrain_or_cannot_tell(tiny_repo, tmp_path, capsys):
    assert calibflow(["run", "--repo", str(tiny_repo)]) == 0
    images, labels = unseen_digits()
    darker = (images * 0.3).astype(np.uint8)  # an under-exposed camera: the model falls apart
    contrast = (255 * (images / 255.0) ** 2).astype(np.uint8)  # harsher contrast: right less often, too sure
    folders = {
        "fine": add_folder(tiny_repo, "new_fine", images, labels),
        "contrast": add_folder(tiny_repo, "new_contrast", contrast, labels),
        "dark": add_folder(tiny_repo, "new_dark", darker, labels),
        "unlabeled": add_folder(tiny_repo, "new_unlabeled", images, None),
        "unlabeled_dark": add_folder(tiny_repo, "new_unlabeled_dark", darker, None),
    }

    code, fine = monitor(tiny_repo, folders["fine"], tmp_path / "fine.json")
    assert (code, fine["verdict"]) == (0, "fine") and fine["labeled"] and fine["n_images"] == len(images)
    assert fine["measured"]["accuracy_lower"] <= fine["measured"]["accuracy"] <= fine["measured"]["accuracy_upper"]

    code, contrasted = monitor(tiny_repo, folders["contrast"], tmp_path / "contrast.json")
    assert code == 1, contrasted["reasons"]
    assert contrasted["measured"]["ece_lower"] > contrasted["recorded"]["ece"] + 0.03

    code, dark = monitor(tiny_repo, folders["dark"], tmp_path / "dark.json")
    assert code == 3 and dark["measured"]["accuracy_upper"] < dark["recorded"]["accuracy"] - 0.3

    code, unlabeled = monitor(tiny_repo, folders["unlabeled"], tmp_path / "unlabeled.json")
    assert code == 0 and not unlabeled["labeled"]
    assert abs(unlabeled["measured"]["cbpe"] - fine["measured"]["accuracy"]) < 0.05  # the same images, labels known
    code, unlabeled_dark = monitor(tiny_repo, folders["unlabeled_dark"], tmp_path / "unlabeled_dark.json")
    assert code in (2, 3) and "DRIFTED" in unlabeled_dark["reasons"][1]

    # each check is an MLflow run linked to the version, and the version points at the last one
    store.configure_tracking(tiny_repo)
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("calibflow-monitoring").experiment_id])
    assert len(runs) == 5 and {r.data.tags["model_version"] for r in runs} == {"1"}
    version = client.get_model_version_by_alias(MODEL, "champion")
    assert version.tags["last_monitor_run"] == json.loads((tmp_path / "unlabeled_dark.json").read_text())["run_id"]

    # the version's own train/val/calibration images are dropped and counted: its numbers are on new images only
    from calibflow.lifecycle.promotion import seen_by
    from calibflow.tracking import registration

    seen = seen_by(registration.resolve_model_uri(f"models:/{MODEL}@champion"))
    mixed, n_seen = add_own_images(tiny_repo, "mixed", seen, (images, labels))
    assert n_seen > 100
    code, report = monitor(tiny_repo, mixed, tmp_path / "mixed.json")
    assert (code, report["excluded_seen"], report["n_images"]) == (0, n_seen, len(images))
    assert report["measured"] == fine["measured"]  # the same images judged: the seen ones count for nothing
    assert (
        f"{n_seen} of the folder's {n_seen + len(images)} images were images the version was fitted on"
        in (report["reasons"][-1])
    )
    assert client.get_run(report["run_id"]).data.metrics["monitor/excluded_seen"] == n_seen
    # a folder of nothing but those images is refused: it says nothing about new images
    old, _ = add_own_images(tiny_repo, "old", seen)
    capsys.readouterr()
    assert monitor(tiny_repo, old, tmp_path / "old.json")[0] == 2
    err = capsys.readouterr().err
    assert f"all {n_seen} of its images are images the version was fitted on" in err and "Traceback" not in err


@pytest.mark.parametrize("problem", ["other classes", "empty", "mixed", "not tracked"])
def test_monitor_refuses_data_it_cannot_read_with_exit_2(tiny_repo, capsys, problem):
    assert calibflow(["run", "--repo", str(tiny_repo)]) == 0
    images, labels = unseen_digits()
    folder = tiny_repo / "data" / "new"
    if problem == "other classes":
        add_folder(tiny_repo, "new", images[:20], np.where(labels[:20] == 0, 7, labels[:20]))
        message = "class folder(s) 7 are not classes of the model"
    elif problem == "empty":
        (folder / "0").mkdir(parents=True)
        (folder / "0" / "notes.txt").write_text("no images")
        dvc("add", "-q", "data/new", cwd=tiny_repo)
        message = "class folders hold no images"
    elif problem == "mixed":
        add_folder(tiny_repo, "new", images[:10], labels[:10])
        Image.fromarray(images[11]).save(folder / "loose.png")
        dvc("add", "-q", "data/new", cwd=tiny_repo)
        message = "both class folders and loose files"
    else:
        folder.mkdir(parents=True)
        Image.fromarray(images[0]).save(folder / "a.png")
        message = "not tracked by DVC"
    capsys.readouterr()
    assert (
        calibflow(["monitor", "--model", f"models:/{MODEL}@champion", "--data", "data/new", "--repo", str(tiny_repo)])
        == 2
    )
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_monitor_runs_as_a_prefect_flow_and_deploys_on_its_own_cron(tiny_repo):
    from calibflow.config import load_config
    from calibflow.errors import ConfigError
    from flows.deployment import build_monitor_deployment
    from flows.monitor import monitor_model

    assert build_monitor_deployment(load_config(tiny_repo / "params.yaml")) is None  # off by default
    with pytest.raises(ConfigError, match="schedule.monitor_cron needs schedule.monitor_data"):
        load_config(tiny_repo / "params.yaml", ["schedule.monitor_cron=0 6 * * *"])
    config = load_config(
        tiny_repo / "params.yaml", ["schedule.monitor_cron=0 6 * * *", "schedule.monitor_data=data/new_fine"]
    )
    deployment = build_monitor_deployment(
        config, tiny_repo, overrides=["schedule.monitor_cron=0 6 * * *", "monitor.max_accuracy_drop=0.3"]
    )
    assert deployment.name == "nightly-retrain-monitor" and deployment.schedules[0].schedule.cron == "0 6 * * *"
    assert deployment.parameters["data"] == "data/new_fine" and deployment.parameters["model"] == "@champion"
    assert deployment.parameters["overrides"] == ["monitor.max_accuracy_drop=0.3"]  # schedule.* shapes the deployment

    assert calibflow(["run", "--repo", str(tiny_repo)]) == 0
    images, labels = unseen_digits()
    data = add_folder(tiny_repo, "new_fine", images, labels)
    result = monitor_model(repo_root=str(tiny_repo), overrides=[t for t in TOLERANCES if t != "--set"], data=data)
    assert result["exit_code"] == 0 and result["verdict"] == "fine" and result["run_id"]
