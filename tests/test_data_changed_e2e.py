"""A data file changed after a run pinned the data version is refused where it is read, not trained
on under the pinned hash: the real `calibflow run`, with the train split streamed from its files by
a DataLoader worker, ends with exit 2 and one line naming the file, and registers nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from calibflow.tracking import store
from cli.main import main as calibflow

pytestmark = pytest.mark.e2e
MODEL = "tiny-digits"


def test_a_training_image_replaced_after_the_pin_ends_the_run_with_one_line_and_nothing_registered(
    tiny_repo, monkeypatch, capsys
):
    from calibflow.data.manifest import load_manifest
    from calibflow.data.splits import Split
    from calibflow.pipeline import model_steps

    real = model_steps.load_split_images
    replaced: list[Path] = []

    def swap_then_load(data_dir, manifest_path, split_path, split_name, *args, **kwargs):
        """Between the pin (and the manifest, split and validation it was checked by) and the
        training: the first training image becomes a whole, valid image of another class, as an
        edit, or a `git checkout` + `dvc checkout` in the same working tree, would make it."""
        if split_name == "train" and not replaced:
            manifest = load_manifest(manifest_path)
            first = manifest.iloc[Split.load(split_path).indices["train"][0]]
            other = manifest.loc[manifest["label"] != first["label"], "path"].iloc[0]
            victim = Path(data_dir) / first["path"]
            victim.write_bytes((Path(data_dir) / other).read_bytes())
            replaced.append(victim)
        return real(data_dir, manifest_path, split_path, split_name, *args, **kwargs)

    monkeypatch.setattr(model_steps, "load_split_images", swap_then_load)
    code = calibflow(["run", "--repo", str(tiny_repo), "--set", "data.in_memory_max_mb=0", "--set", "data.workers=1"])
    err = capsys.readouterr().err
    assert code == 2, err
    [victim] = replaced
    # the CLI's own last word: one line (Prefect's task log above it says the same)
    [line] = [line for line in err.splitlines() if line.startswith("calibflow run:")]
    assert "changed since the data version was pinned" in line, err
    assert victim.relative_to(tiny_repo).as_posix() in line and "dvc checkout" in line, err
    assert "Traceback" not in err, err

    store.configure_tracking(tiny_repo)
    client = MlflowClient()
    assert client.search_registered_models(f"name='{MODEL}'") == []  # no version, so no alias either
    failed = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])[0]
    assert failed.info.status == "FAILED"
