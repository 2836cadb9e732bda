"""Soft labels through the real flow: a CSV at the root of the DVC-tracked folder, checked by Great
Expectations with the images, a training on a class drawn from each image's row, the metrics
against the soft labels logged, gated, and reproduced by `calibflow evaluate` from the pinned CSV
after the workspace's CSV has changed."""

from __future__ import annotations

import json
import math

import pytest

from calibflow.data.manifest import list_classes
from calibflow.tracking import store
from cli.main import main as calibflow
from tests.conftest import dvc, run

pytestmark = pytest.mark.e2e
MODEL = "tiny-digits"


def write_soft_labels(repo, broken: str | None = None, top: float = 0.8, commit: bool = True) -> None:
    """`top` on the image's folder, the rest shared by the other classes; `broken`: one image whose
    row sums to 0.9 instead; `commit`: dvc add and git commit it."""
    root = repo / "data" / "tiny"
    classes = list_classes(root)
    lines = ["path," + ",".join(classes)]
    for k, name in enumerate(classes):
        for image in sorted((root / name).iterdir()):
            rest = (1 - top) / (len(classes) - 1)
            row = [top if j == k else rest for j in range(len(classes))]
            if broken == f"{name}/{image.name}":
                row[k] = 0.7
            lines.append(f"{name}/{image.name}," + ",".join(f"{v:.6f}" for v in row))
    (root / "soft_labels.csv").write_text("\n".join(lines) + "\n")
    if not commit:
        return
    dvc("add", "-q", "data/tiny", cwd=repo)
    run("git", "commit", "-qam", "soft labels", cwd=repo)


def test_a_run_trains_on_sampled_soft_labels_is_gated_and_reproduced_on_them_and_a_bad_row_stops_the_next(
    tiny_repo, capsys, tmp_path
):
    soft = ["--set", "data.soft_labels=soft_labels.csv", "--set", "train.targets=sampled"]
    write_soft_labels(tiny_repo)
    # T fitted against rows of 0.8 leaves the model about 0.8 sure where the folder's label is right
    # nearly always: calibrated to the annotators, not to the labels, so max_ece is the soft one here
    calibrated_on_soft = [
        *("--set", "calibration.targets=soft", "--set", "gates.max_soft_ece=0.9", "--set", "gates.max_ece=1"),
    ]
    assert calibflow(["run", "--repo", str(tiny_repo), *soft, *calibrated_on_soft]) == 0, capsys.readouterr().err
    store.configure_tracking(tiny_repo)
    version = store.client().get_model_version(MODEL, "1")
    run = store.client().get_run(version.run_id).data
    assert run.params["train.targets"] == "sampled" and run.params["data.soft_labels"] == "soft_labels.csv"
    for stage in ("uncalibrated", "calibrated"):
        for name in ("soft_nll", "soft_accuracy", "soft_ece"):
            assert float(version.tags[f"test/{stage}/{name}"]) == run.metrics[f"test/{stage}/{name}"]
    # every row puts 0.8 on the image's folder: agreeing with an annotator is 0.8 x accuracy + the rest
    logged = {name: run.metrics[f"test/calibrated/{name}"] for name in ("accuracy", "soft_accuracy", "soft_nll")}
    accuracy = logged["accuracy"]
    assert logged["soft_accuracy"] == pytest.approx(0.8 * accuracy + 0.05 * (1 - accuracy), abs=1e-9)
    assert logged["soft_nll"] > 0.8 * -math.log(0.8) + 0.2 * -math.log(0.05)  # the annotators' entropy
    assert run.metrics["gate/max_soft_ece_bound"] <= 0.9 and run.metrics["gate/max_soft_ece_threshold"] == 0.9
    # T was fitted against the soft labels: their NLL on the calibration split is what it lowered
    fitted = {k: v for k, v in run.metrics.items() if k.startswith("calibration/")}
    assert fitted["calibration/calibrated_soft_nll"] <= fitted["calibration/uncalibrated_soft_nll"]
    assert "calibration/calibrated_nll" not in fitted
    capsys.readouterr()

    # calibflow gate reads the soft labels at the version's pinned revision: a bound too tight fails it
    gated = tmp_path / "gate.json"
    tight = ["--set", "data.soft_labels=soft_labels.csv", "--set", "gates.max_soft_nll=0.01"]
    assert (
        calibflow(
            ["gate", "--model", MODEL, "--candidate", "1", "--repo", str(tiny_repo), *tight, "--json", str(gated)]
        )
        == 1
    )
    check = next(c for c in json.loads(gated.read_text())["checks"] if c["name"] == "max_soft_nll")
    assert not check["passed"] and check["value"] == pytest.approx(logged["soft_nll"], abs=1e-6)

    # a max_soft_nll below the annotators' own entropy: no model can pass, refused before training
    capsys.readouterr()
    assert calibflow(["run", "--repo", str(tiny_repo), "--force", *soft, "--set", "gates.max_soft_nll=0.5"]) == 2
    err = capsys.readouterr().err
    floor = 0.8 * -math.log(0.8) + 0.2 * -math.log(0.05)
    assert f"gates.max_soft_nll = 0.5 is at or below {floor:.4f}" in err and "(soft_labels.csv)" in err
    assert [str(v.version) for v in store.client().search_model_versions(f"name='{MODEL}'")] == ["1"]

    write_soft_labels(tiny_repo, broken="3/0013.png")
    assert calibflow(["run", "--repo", str(tiny_repo), *soft]) == 1
    err = capsys.readouterr().err
    assert "every row sums to 1 (within 0.001) or holds counts: 1 of 300 rows" in err and "3/0013.png" in err
    assert [str(v.version) for v in store.client().search_model_versions(f"name='{MODEL}'")] == ["1"]

    # the workspace's CSV has changed since version 1 trained; evaluate reads the one its data hash pins
    write_soft_labels(tiny_repo, top=0.6, commit=False)
    reproduced = tmp_path / "evaluate.json"
    assert (
        calibflow(["evaluate", "--model", f"models:/{MODEL}/1", "--repo", str(tiny_repo), "--json", str(reproduced)])
        == 0
    )
    report = json.loads(reproduced.read_text())
    assert report["mismatches"] == []
    for name in ("soft_nll", "soft_accuracy", "soft_ece"):
        assert report["recomputed"][name] == pytest.approx(report["logged"][name], abs=1e-6)
