"""A folder of photos of mixed sizes, as a team has them, through the real flow with data.image_size:
validated by size floor (not one size), trained on random crops, reproduced by `calibflow evaluate`,
and served by `mlflow models serve`, which frames a photo of any size itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from calibflow.tracking import registration, store
from cli.main import main as calibflow
from tests.conftest import TINY_PARAMS, dvc, mlflow_server, run

pytestmark = pytest.mark.e2e
MODEL = "tiny-digits"
SIDE = 32
LOOSE = ["--set", "gates.min_accuracy=0.0", "--set", "gates.max_ece=1.0"]


def write_photos(folder: Path, per_class: int = 40) -> None:
    """Digits drawn as RGB photos of random sizes and aspects (36-120 px a side), PNG and JPEG."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    for k in range(4):
        (folder / str(k)).mkdir(parents=True)
        for i, image in enumerate(digits.images[digits.target == k][:per_class]):
            width, height = (int(v) for v in rng.integers(36, 121, 2))
            gray = Image.fromarray((image * 255 / 16).astype(np.uint8)).resize((width, height), Image.BILINEAR)
            tint = rng.integers(0, 40, 3)
            pixels = np.clip(np.asarray(gray)[:, :, None] + tint, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / str(k) / f"{i}.{'png' if i % 2 else 'jpg'}")


@pytest.fixture(scope="module")
def photo_repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos") / "repo"
    root.mkdir()
    run("git", "init", "-q", "-b", "main", cwd=root)
    dvc("init", "-q", cwd=root)
    dvc("config", "core.analytics", "false", cwd=root)
    write_photos(root / "data" / "tiny")
    (root / "params.yaml").write_text(TINY_PARAMS)
    (root / ".gitignore").write_text("mlflow.db\nmlruns/\nmlartifacts/\n.calibflow/\nreports/\n")
    dvc("add", "-q", "data/tiny", cwd=root)
    run("git", "add", "-A", cwd=root)
    run("git", "commit", "-qm", "photos", cwd=root)
    return root


def test_photos_of_mixed_sizes_train_register_reproduce_and_serve_at_any_size(
    photo_repo, tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    repo = ["--repo", str(photo_repo)]
    sizes = ["--set", f"data.image_size={SIDE}", "--set", "train.epochs=3", "--set", "data.workers=1"]

    # Without image_size the photos are refused (exit 1, the data failed validation): they do not
    # share one size, and the message says what to set.
    assert calibflow(["run", *repo, *LOOSE]) == 1
    err = capsys.readouterr().err
    assert "every image has one size" in err and "set data.image_size" in err

    assert calibflow(["run", *repo, *sizes, *LOOSE]) == 0, capsys.readouterr().err
    store.configure_tracking(photo_repo)
    tags = store.client().get_model_version(MODEL, "1").tags
    out = tmp_path / "evaluate.json"
    assert calibflow(["evaluate", "--model", f"models:/{MODEL}/1", *repo, "--json", str(out)]) == 0
    recomputed = json.loads(out.read_text())["recomputed"]
    assert recomputed["accuracy"] == float(tags["test/calibrated/accuracy"])
    assert abs(recomputed["ece"] - float(tags["test/calibrated/ece"])) <= 1e-6

    model = registration.load_model(f"models:/{MODEL}/1")
    schema = model.metadata.get_input_schema().inputs[0]
    assert tuple(schema.shape) == (-1, -1, -1, 3)  # any height and width, RGB
    assert model.metadata.metadata["framing"]["resize"] == round(SIDE * 256 / 224)

    # One photo at its own size: served over HTTP, through the pyfunc, and by `calibflow predict`
    # (which frames the file itself and sends it framed) alike.
    photo_path = photo_repo / "data" / "tiny" / "3" / "1.png"
    with Image.open(photo_path) as image:
        photo = np.asarray(image.convert("RGB"))[None]
    assert photo.shape[1:3] != (SIDE, SIDE)
    server = mlflow_server(photo_repo, f"models:/{MODEL}/1", tmp_path)
    try:
        served = server.predict(photo)
        # an image the model cannot read: a 400 that says why, not MLflow's "unexpected error"
        status, refused = server.answer(np.zeros((1, 5, 40, 3), dtype=np.uint8))
    finally:
        server.stop()
    assert status == 400 and refused["error_code"] == "INVALID_PARAMETER_VALUE", refused
    assert "image 0 of the request: 40x5 pixels" in refused["message"] and "send a larger image" in refused["message"]
    in_process = model.predict(photo)
    np.testing.assert_allclose(served, in_process, rtol=0, atol=1e-6)
    capsys.readouterr()
    assert calibflow(["predict", "--model", f"models:/{MODEL}/1", *repo, str(photo_path)]) == 0
    line = capsys.readouterr().out.strip().split("\t")
    assert line[1] == str(int(np.argmax(in_process[0]))) and abs(float(line[2]) - in_process[0].max()) < 1e-4

    # A thumbnail added to the data is refused by validation, by name, and nothing is registered.
    Image.new("RGB", (12, 9)).save(photo_repo / "data" / "tiny" / "0" / "thumb.png")
    dvc("add", "-q", "data/tiny", cwd=photo_repo)
    run("git", "commit", "-qam", "a thumbnail", cwd=photo_repo)
    assert calibflow(["run", *repo, *sizes, *LOOSE]) == 1
    err = capsys.readouterr().err
    assert "at least 32 px on its shorter side" in err and "0/thumb.png (12x9)" in err
    assert [str(v.version) for v in store.client().search_model_versions(f"name='{MODEL}'")] == ["1"]
