"""MLflow run names say what ran (data folder, architecture, seed), not MLflow's random words."""

from __future__ import annotations

from calibflow.config import load_config


def test_a_run_is_named_by_its_data_folder_architecture_and_seed(tmp_path):
    from tasks.tracking import run_name

    params = tmp_path / "params.yaml"
    params.write_text("seed: 0\ndata: {path: data/digits}\n")
    assert run_name(load_config(params, [])) == "digits-small_cnn-s0"
    overrides = ["seed=3", "model.arch=resnet18", "data.path=data/cifar10/"]
    assert run_name(load_config(params, overrides)) == "cifar10-resnet18-s3"
