"""Soft labels through the real flow: a CSV at the root of the DVC-tracked folder, checked by Great
Expectations with the images, and a training on a class drawn from each image's row."""

from __future__ import annotations

import pytest

from calibflow.data.manifest import list_classes
from calibflow.tracking import store
from cli.main import main as calibflow
from tests.conftest import dvc, run

pytestmark = pytest.mark.e2e
MODEL = "tiny-digits"


def write_soft_labels(repo, broken: str | None = None) -> None:
    """0.8 on the image's folder, the rest shared by the other classes; `broken`: one image whose
    row sums to 0.9 instead."""
    root = repo / "data" / "tiny"
    classes = list_classes(root)
    lines = ["path," + ",".join(classes)]
    for k, name in enumerate(classes):
        for image in sorted((root / name).iterdir()):
            rest = 0.2 / (len(classes) - 1)
            row = [0.8 if j == k else rest for j in range(len(classes))]
            if broken == f"{name}/{image.name}":
                row[k] = 0.7
            lines.append(f"{name}/{image.name}," + ",".join(f"{v:.6f}" for v in row))
    (root / "soft_labels.csv").write_text("\n".join(lines) + "\n")
    dvc("add", "-q", "data/tiny", cwd=repo)
    run("git", "commit", "-qam", "soft labels", cwd=repo)


def test_a_run_trains_on_sampled_soft_labels_and_a_bad_row_stops_it_by_name(tiny_repo, capsys):
    soft = ["--set", "data.soft_labels=soft_labels.csv", "--set", "train.targets=sampled"]
    write_soft_labels(tiny_repo)
    assert calibflow(["run", "--repo", str(tiny_repo), *soft]) == 0, capsys.readouterr().err
    store.configure_tracking(tiny_repo)
    run_id = store.client().get_model_version(MODEL, "1").run_id
    params = store.client().get_run(run_id).data.params
    assert params["train.targets"] == "sampled" and params["data.soft_labels"] == "soft_labels.csv"
    capsys.readouterr()

    write_soft_labels(tiny_repo, broken="3/0013.png")
    assert calibflow(["run", "--repo", str(tiny_repo), *soft]) == 1
    err = capsys.readouterr().err
    assert "every row sums to 1 (within 0.001) or holds counts: 1 of 300 rows" in err and "3/0013.png" in err
    assert [str(v.version) for v in store.client().search_model_versions(f"name='{MODEL}'")] == ["1"]
