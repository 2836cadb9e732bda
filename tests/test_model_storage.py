"""How a registered model is stored and loaded: a state dict and JSON, the pyfunc from code (no
pickle), a digest of its files recorded at registration and checked before anything of it is
loaded, so a file swapped into the artifact store never runs."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from calibflow import errors
from calibflow.names import RUN_ARTIFACTS_TAG
from calibflow.tracking import registration
from calibflow.tracking import served_model
from calibflow.tracking import store
from calibflow.training.loop import collect_logits
from calibflow.training.models import in_memory_format, load_checkpoint
from cli.main import main as calibflow
from calibflow.pipeline.evaluation_steps import load_calibrator
from tests.conftest import mlflow_serve_predict, untrained_model

MODEL = "tiny-digits"
CHANGED = "model artifacts changed since registration"


def test_digest_changes_with_any_change_to_the_files_and_only_then(tmp_path):
    root = tmp_path / "model"
    (root / "artifacts").mkdir(parents=True)
    (root / "MLmodel").write_text("flavors: {}\n")
    (root / "artifacts" / "weights.pt").write_bytes(b"\x00\x01\x02")
    digest = served_model.artifacts_digest(root)
    assert served_model.artifacts_digest(root) == digest and len(digest) == 64

    (root / "artifacts" / "weights.pt").write_bytes(b"\x00\x01\x03")  # one byte
    assert served_model.artifacts_digest(root) != digest
    (root / "artifacts" / "weights.pt").write_bytes(b"\x00\x01\x02")
    assert served_model.artifacts_digest(root) == digest

    (root / "python_model.pkl").write_bytes(b"")  # an added file, even an empty one
    assert served_model.artifacts_digest(root) != digest
    (root / "python_model.pkl").unlink()

    (root / "artifacts" / "weights.pt").rename(root / "artifacts" / "weights2.pt")  # same bytes, other name
    assert served_model.artifacts_digest(root) != digest
    (root / "artifacts" / "weights2.pt").rename(root / "artifacts" / "weights.pt")

    os.symlink("/etc/hostname", root / "artifacts" / "link")  # a link is recorded, never followed
    assert served_model.artifacts_digest(root) != digest


def test_served_model_loads_from_a_state_dict_and_json_and_answers_an_empty_batch(tmp_path):
    model = untrained_model(tmp_path, classes=("cat", "dog", "eel"))
    network, checkpoint, state, images, logits = (
        model.network,
        model.checkpoint,
        model.calibration_state,
        model.images,
        model.logits,
    )

    files = served_model.write_model_files(checkpoint, state, tmp_path / "served")
    assert set(files) == {"weights", "network", "classes", "calibration"}
    assert json.loads(Path(files["classes"]).read_text()) == ["cat", "dog", "eel"]
    weights = torch.load(files["weights"], weights_only=True)  # a plain state dict: no code in it
    assert set(weights) == set(network.state_dict())

    served = served_model.CalibratedImageClassifier()
    served.load(files)
    # Prepared once at load as the flow's are (BatchNorm folded, laid out as collect_logits reads
    # them), so no request moves the weights.
    assert all(in_memory_format(member, torch.channels_last) for member in served.members)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for member in served.members for m in member.modules())
    batch = images.permute(0, 2, 3, 1).numpy()  # served as (N, H, W, C)
    # The numbers the flow fits and evaluates on (collect_logits of the checkpoint loaded for
    # inference) to the last bit, and a plain forward pass's to rounding.
    calibrator = load_calibrator(str(state))
    flow_network = load_checkpoint(checkpoint, for_inference=True).model
    expected = calibrator.transform(collect_logits(flow_network, images)).numpy()
    np.testing.assert_allclose(served.predict(None, batch), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(expected, calibrator.transform(logits).numpy(), rtol=0, atol=1e-6)

    empty = served.predict(None, np.zeros((0, 8, 8, 1), dtype=np.uint8))
    assert empty.shape == (0, 3) and empty.dtype == np.float64


def test_loading_a_served_model_never_traces_so_requests_on_other_threads_keep_running(tmp_path, monkeypatch):
    """torch.fx swaps nn.Module.__call__ for the whole process while it traces: a load that traced
    would break a forward pass another thread runs meanwhile (a server loading a new version while
    it answers requests). The folds are recorded in the checkpoint and network.json instead, and
    loading reads them."""
    import threading

    import torch.fx

    from calibflow.training.models import batch_norm_folds

    model = untrained_model(tmp_path)
    files = served_model.write_model_files(model.checkpoint, model.calibration_state, tmp_path / "served")
    folds = json.loads(Path(files["network"]).read_text())["folds"]
    assert folds and folds == batch_norm_folds(model.network)
    serving = served_model.CalibratedImageClassifier()
    serving.load(files)
    batch = model.images.permute(0, 2, 3, 1).numpy()
    expected = serving.predict(None, batch)
    stop, errors, answered = threading.Event(), [], []

    def answer_requests() -> None:
        while not stop.is_set():
            try:
                answered.append(np.array_equal(serving.predict(None, batch), expected))
            except Exception as error:  # noqa: BLE001 - any failure of a request is what this test counts
                errors.append(repr(error))

    traced, trace = [], torch.fx.symbolic_trace

    def counted_trace(*args, **kwargs):
        traced.append(1)
        return trace(*args, **kwargs)

    monkeypatch.setattr(torch.fx, "symbolic_trace", counted_trace)
    requests = threading.Thread(target=answer_requests)
    requests.start()
    try:
        for _ in range(20):  # another version loaded meanwhile, as a server swapping versions does
            served_model.CalibratedImageClassifier().load(files)
    finally:
        stop.set()
        requests.join()
    assert not traced and not errors and answered and all(answered)


def test_a_model_file_whose_recorded_folds_do_not_fit_its_network_is_refused(tmp_path):
    model = untrained_model(tmp_path)
    files = served_model.write_model_files(model.checkpoint, model.calibration_state, tmp_path / "served")
    network = json.loads(Path(files["network"]).read_text())
    conv, norm = network["folds"][0]
    network["folds"][0] = [norm, conv]
    Path(files["network"]).write_text(json.dumps(network))
    with pytest.raises(ValueError, match="is not a Conv2d and a BatchNorm2d of this network"):
        served_model.CalibratedImageClassifier().load(files)


# ---------------------------------------------------------------------------------------------
# On a real registry


@pytest.fixture(scope="module")
def registered(tiny_repo_template, tmp_path_factory) -> Path:
    """One version of the tiny model, registered by the real flow (one epoch: its numbers do not matter)."""
    repo = tmp_path_factory.mktemp("storage") / "repo"
    shutil.copytree(tiny_repo_template, repo, symlinks=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert (
            calibflow(
                [
                    "run",
                    "--repo",
                    str(repo),
                    "--set",
                    "train.epochs=1",
                    "--set",
                    "gates.min_accuracy=0.0",
                    "--set",
                    "gates.max_ece=1.0",
                ]
            )
            == 0
        )
    return repo


@pytest.fixture
def repo(registered, monkeypatch) -> Path:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store.configure_tracking(registered)
    return registered


def stored_files(repo: Path) -> Path:
    """Where the artifact store keeps version 1's files (a folder of the local store)."""
    store.configure_tracking(repo)
    location = store.client().get_model_version_download_uri(MODEL, "1")
    assert location.startswith("file://"), location
    return Path(location.removeprefix("file://"))


@pytest.fixture
def tampered(repo, tmp_path):
    """The stored files of version 1, put back as they were after the test changes them."""
    stored = stored_files(repo)
    backup = tmp_path / "backup"
    shutil.copytree(stored, backup)
    yield stored
    shutil.rmtree(stored)
    shutil.copytree(backup, stored)


@pytest.mark.e2e
def test_registered_version_stores_no_pickle_and_records_its_digest_and_classes(repo, tmp_path):
    version = store.client().get_model_version(MODEL, "1")
    stored = stored_files(repo)
    assert version.tags[served_model.DIGEST_TAG] == served_model.artifacts_digest(stored)
    assert json.loads(version.tags[served_model.CLASSES_TAG]) == ["0", "1", "2", "3", "4"]
    assert json.loads((stored / "artifacts" / "classes.json").read_text()) == ["0", "1", "2", "3", "4"]
    assert not list(stored.rglob("*.pkl"))
    pyfunc = yaml.safe_load((stored / "MLmodel").read_text())["flavors"]["python_function"]
    assert "python_model" not in pyfunc and pyfunc["model_code_path"].endswith("served_model_code.py")

    # A clean load serves exactly what the run's gate read: its test logits through its calibrator.
    run_dir = repo / ".calibflow" / "runs" / version.run_id
    with np.load(run_dir / "logits_test.npz") as saved:
        logits, rows = saved["logits"], saved["indices"]
    from calibflow.data.manifest import load_manifest
    from calibflow.lifecycle.reproduce import predict_rows

    manifest = load_manifest(run_dir / "manifest.csv")
    model = registration.load_model(f"models:/{MODEL}/1")
    served = predict_rows(model, str(repo / "data" / "tiny"), manifest, rows)
    expected = load_calibrator(str(run_dir / "calibration.json")).transform(logits).numpy()
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-6)
    # Through MLflow's pyfunc (its signature check included), an empty batch is an empty answer.
    empty = model.predict(np.zeros((0, 8, 8, 1), dtype=np.uint8))
    assert empty.shape == (0, 5) and empty.dtype == np.float64


class RunsACommand:
    """Pickled, it runs `touch MARKER` when unpickled: what a crafted python_model.pkl does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def swap_in_a_pickle(stored: Path, marker: Path) -> None:
    """The attack of issue 17: a python_model.pkl that runs a command, and an MLmodel that tells
    MLflow to unpickle it instead of running the model's code."""
    (stored / "python_model.pkl").write_bytes(pickle.dumps(RunsACommand(marker)))
    mlmodel = yaml.safe_load((stored / "MLmodel").read_text())
    pyfunc = mlmodel["flavors"]["python_function"]
    pyfunc.pop("model_code_path")
    pyfunc.update(loader_module="mlflow.pyfunc.model", python_model="python_model.pkl")
    (stored / "MLmodel").write_text(yaml.safe_dump(mlmodel))


def swap_in_code(stored: Path, marker: Path) -> None:
    code = stored / "served_model_code.py"
    code.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n" + code.read_text())


def change_a_weight(stored: Path, marker: Path) -> None:
    weights = stored / "artifacts" / "weights.pt"
    state = torch.load(weights, weights_only=True)
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name] + 1.0
    torch.save(state, weights)


@pytest.mark.e2e
@pytest.mark.parametrize("tamper", [swap_in_a_pickle, swap_in_code, change_a_weight])
def test_changed_artifacts_are_refused_before_any_code_from_them_runs(tamper, tampered, repo, tmp_path, capsys):
    marker = tmp_path / "marker"
    tamper(tampered, marker)
    if tamper is not change_a_weight:  # the attack is live: MLflow itself would run it
        import mlflow

        try:
            mlflow.pyfunc.load_model(str(tampered))
        except Exception:
            pass
        assert marker.exists()
        marker.unlink()

    image = str(next((repo / "data" / "tiny" / "3").glob("*.png")))
    for command in (
        ["evaluate", "--model", f"models:/{MODEL}@champion"],
        ["gate", "--model", MODEL, "--candidate", "1"],
        ["predict", "--model", f"models:/{MODEL}/1", image],
    ):
        assert calibflow([*command, "--repo", str(repo)]) == 2, command
        assert CHANGED in capsys.readouterr().err, command
        assert not marker.exists(), command


@pytest.mark.e2e
def test_a_version_without_a_digest_is_not_loaded(repo, tampered, tmp_path, capsys):
    # What a version registered before calibflow recorded digests looks like (its files pickled).
    marker = tmp_path / "marker"
    swap_in_a_pickle(tampered, marker)
    digest = store.client().get_model_version(MODEL, "1").tags[served_model.DIGEST_TAG]
    store.client().delete_model_version_tag(MODEL, "1", served_model.DIGEST_TAG)
    try:
        assert calibflow(["evaluate", "--model", f"models:/{MODEL}/1", "--repo", str(repo)]) == 2
        assert f"no {served_model.DIGEST_TAG} tag" in capsys.readouterr().err
        assert not marker.exists()
    finally:
        store.client().set_model_version_tag(MODEL, "1", served_model.DIGEST_TAG, digest)


@pytest.mark.e2e
def test_a_stored_model_pinned_to_other_versions_is_named_in_a_warning_when_loaded(repo, tmp_path, caplog):
    """MLflow's own requirement check is skipped for its cost (2.5 s a load); ours reads the pins."""
    local = tmp_path / "copy"
    shutil.copytree(stored_files(repo), local)
    assert registration.requirement_mismatches(local) == []  # registered here: every pin matches
    pins = (local / "requirements.txt").read_text()
    assert "torch==" in pins and "numpy==" in pins and "pillow==" in pins  # pillow frames the photos
    (local / "requirements.txt").write_text(pins.replace("numpy==", "numpy==0.0.1+").replace("mlflow==", "mlflow==0."))
    mismatches = registration.requirement_mismatches(local)
    assert len(mismatches) == 2 and any(m.startswith("numpy==0.0.1") and "(here " in m for m in mismatches)
    with caplog.at_level("WARNING", logger="calibflow.tracking.registration"):
        registration.warn_requirement_mismatches(local)
    assert "numpy==0.0.1" in caplog.text and "predictions may differ" in caplog.text


@pytest.fixture
def run_files(repo, tmp_path):
    """The artifact folder of version 1's run, put back as it was after the test changes it."""
    record = registration.resolve_model_uri(f"models:/{MODEL}/1")
    location = store.client().get_run(record.run_id).info.artifact_uri
    assert location.startswith("file://"), location
    stored = Path(location.removeprefix("file://"))
    backup = tmp_path / "run-backup"
    shutil.copytree(stored, backup)
    yield record, stored
    shutil.rmtree(stored)
    shutil.copytree(backup, stored)


@pytest.mark.e2e
@pytest.mark.parametrize("artifact", ["data/splits.json", "data/manifest.csv", "checkpoint/checkpoint.pt"])
def test_a_run_file_changed_after_registration_is_refused_before_it_is_read(
    repo, run_files, artifact, tmp_path, capsys
):
    """What gate, evaluate, promote and recalibrate read from the version's run (its split, its
    manifest, the network recalibrate reuses) must hash to what registration recorded."""
    from calibflow.lifecycle.reproduce import verified_run_artifact

    record, stored = run_files
    assert verified_run_artifact(record, artifact, tmp_path / "before").is_file()  # untouched: read
    with open(stored / artifact, "ab") as file:
        file.write(b"\n")
    with pytest.raises(errors.ModelArtifactsChanged, match=f"run artifact {artifact} of version 1"):
        verified_run_artifact(record, artifact, tmp_path / "after")
    if artifact == "data/splits.json":  # what evaluate and gate read of a version without a champion
        for command in (["evaluate", "--model", f"models:/{MODEL}/1"], ["gate", "--model", MODEL, "--candidate", "1"]):
            assert calibflow([*command, "--repo", str(repo)]) == 2, command
            assert "changed since registration" in capsys.readouterr().err, command


@pytest.mark.e2e
def test_a_version_without_digests_of_its_run_files_is_not_read(run_files, tmp_path):
    record, _ = run_files
    from calibflow.lifecycle.reproduce import verified_run_artifact

    unrecorded = dataclasses.replace(record, tags={k: v for k, v in record.tags.items() if k != RUN_ARTIFACTS_TAG})
    with pytest.raises(errors.UnverifiedModel, match=RUN_ARTIFACTS_TAG):
        verified_run_artifact(unrecorded, "data/splits.json", tmp_path)


@pytest.mark.e2e
def test_a_version_registered_by_the_flat_layout_is_refused_by_name_not_as_a_store_error(repo, tampered, capsys):
    """A version calibflow registered before the library moved into sub-packages: its stored code
    file is served_model.py, importing calibflow.registry. Its digest matches (it was registered
    so), yet MLflow would fail inside that import with an MlflowException (a retried store fault)."""
    (tampered / "served_model_code.py").rename(tampered / "served_model.py")
    (tampered / "served_model.py").write_text(
        "from calibflow.registry import declare_served_model\n\ndeclare_served_model()\n"
    )
    mlmodel = yaml.safe_load((tampered / "MLmodel").read_text())
    mlmodel["flavors"]["python_function"]["model_code_path"] = "served_model.py"
    (tampered / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    digest = store.client().get_model_version(MODEL, "1").tags[served_model.DIGEST_TAG]
    store.client().set_model_version_tag(MODEL, "1", served_model.DIGEST_TAG, served_model.artifacts_digest(tampered))
    try:
        with pytest.raises(errors.UnverifiedModel, match="registered by an earlier calibflow"):
            registration.load_model(f"models:/{MODEL}/1")
        image = str(next((repo / "data" / "tiny" / "3").glob("*.png")))
        assert calibflow(["predict", "--model", f"models:/{MODEL}/1", image, "--repo", str(repo)]) == 2
        assert "registered by an earlier calibflow" in capsys.readouterr().err
    finally:
        store.client().set_model_version_tag(MODEL, "1", served_model.DIGEST_TAG, digest)


# ---------------------------------------------------------------------------------------------
# Served with MLflow's own tools


META = "registered_model_meta"  # mlflow.store.artifact.models_artifact_repo.REGISTERED_MODEL_META_FILE_NAME


def mlflow_meta(name: str = MODEL, version: object = "1", **extra) -> str:
    """registered_model_meta as MLflow writes it (mlflow.utils.yaml_utils.write_yaml), with `extra` keys."""
    return yaml.safe_dump({"model_name": name, "model_version": version, **extra}, default_flow_style=False)


@pytest.mark.parametrize(
    ("content", "left_out"),
    [
        (mlflow_meta(), True),
        (mlflow_meta(version=1), True),  # the version as the registry answers an alias
        (mlflow_meta(name="other-model"), False),
        (mlflow_meta(version="2"), False),
        (mlflow_meta(version=True), False),
        (mlflow_meta(loader_module="mlflow.pyfunc.model"), False),
        ("model_name: tiny-digits\n", False),
        ("[tiny-digits, '1']\n", False),
        ("model_name: [unclosed\n", False),
    ],
)
def test_mlflows_registered_model_meta_is_left_out_of_the_digest_only_as_its_exact_record(tmp_path, content, left_out):
    root = tmp_path / "model"
    (root / "artifacts").mkdir(parents=True)
    (root / "MLmodel").write_text("flavors: {}\n")
    (root / "artifacts" / "weights.pt").write_bytes(b"\x00\x01\x02")
    digest = served_model.artifacts_digest(root)
    (root / META).write_text(content)
    assert (served_model.artifacts_digest(root, registered_as=(MODEL, "1")) == digest) is left_out
    assert served_model.artifacts_digest(root) != digest  # checked against no version: a file like any
    (root / META).unlink()
    (root / "artifacts" / META).write_text(mlflow_meta())  # only at the top
    assert served_model.artifacts_digest(root, registered_as=(MODEL, "1")) != digest


def test_a_registered_model_meta_that_is_a_link_is_not_left_out(tmp_path):
    root = tmp_path / "model"
    root.mkdir()
    (root / "MLmodel").write_text("flavors: {}\n")
    digest = served_model.artifacts_digest(root)
    (tmp_path / "meta").write_text(mlflow_meta())
    os.symlink(tmp_path / "meta", root / META)
    assert served_model.artifacts_digest(root, registered_as=(MODEL, "1")) != digest


@pytest.mark.e2e
def test_serving_a_version_with_mlflows_own_server_does_not_count_as_tampering(repo, tampered, tmp_path, capsys):
    """`mlflow models serve -m models:/NAME/VERSION` (like mlflow.pyfunc.load_model on that URI)
    downloads the model through MLflow's ModelsArtifactRepository, which writes
    registered_model_meta (the model's name and version) into the downloaded folder; on the local
    store that folder is the stored one, among the files whose digest registration recorded."""
    meta = tampered / META
    assert not meta.exists()
    images = np.random.default_rng(0).integers(0, 256, size=(3, 8, 8, 1), dtype=np.uint8)
    predictions = mlflow_serve_predict(repo, f"models:/{MODEL}/1", images, tmp_path)
    assert predictions.shape == (3, 5)
    np.testing.assert_allclose(predictions.sum(axis=1), 1.0, atol=1e-6)

    # What serving left in the stored files: MLflow's record of the version it served.
    assert yaml.safe_load(meta.read_text()) == {"model_name": MODEL, "model_version": "1"}
    loose = ["--set", "gates.min_accuracy=0.0", "--set", "gates.max_ece=1.0"]  # the gates it was registered by
    for command in (
        ["evaluate", "--model", f"models:/{MODEL}/1"],
        ["gate", "--model", MODEL, "--candidate", "1", *loose],
    ):
        assert calibflow([*command, "--repo", str(repo)]) == 0, (command, capsys.readouterr().err)
    capsys.readouterr()
    np.testing.assert_allclose(
        registration.load_model(f"models:/{MODEL}/1").predict(images), predictions, rtol=0, atol=1e-6
    )

    # The same file with anything but that record sits in the folder MLflow loads from: refused.
    for content in (mlflow_meta(name="other-model"), mlflow_meta(loader_module="mlflow.pyfunc.model")):
        meta.write_text(content)
        assert calibflow(["evaluate", "--model", f"models:/{MODEL}/1", "--repo", str(repo)]) == 2, content
        assert CHANGED in capsys.readouterr().err, content


def test_a_request_the_served_model_refuses_is_a_refusal_here_and_a_400_in_mlflow():
    """RequestError is an MlflowException for MLflow's scoring server (a 400 with its message);
    calibflow's own error policy must not read that as the tracking store failing (retried, and
    reported as 'the MLflow store failed')."""
    import pickle

    from calibflow import errors

    refusal = served_model.RequestError("image 0 of the request: 5x40 pixels, smaller than ...")
    assert refusal.get_http_status_code() == 400 and isinstance(refusal, ValueError)
    assert errors.policy_of(refusal) is errors.REFUSED and errors.policy_of(refusal).exit_code == 2
    assert str(pickle.loads(pickle.dumps(refusal))) == str(refusal)


@pytest.mark.e2e
def test_a_model_reading_fewer_pixels_than_min_side_registers_and_serves_photos(tmp_path, monkeypatch, caplog):
    """data.image_size 8 with data.min_side 16: photos of 16 px and more, framed to 8 x 8. Logging
    (and MLflow's check of the input example) reads the framed 8 x 8 example as framed, not as a
    photo below min_side."""
    import mlflow

    from calibflow.data.images import Framing, reference_resize
    from calibflow.training.models import ModelSpec, save_checkpoint
    from tests.conftest import untrained_model

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    model = untrained_model(tmp_path / "untrained")
    spec = ModelSpec(arch="small_cnn", in_channels=1, num_classes=3, image_height=8, image_width=8, width=4)
    framing = Framing(8, 8, reference_resize(8), min_side=16)
    checkpoint = save_checkpoint(tmp_path / "framed.pt", model.network, spec, ["a", "b", "c"], "L", framing=framing)
    store.configure_tracking(tmp_path)
    run_id = store.start_run("min-side", repo_root=tmp_path)
    with caplog.at_level("WARNING"):
        uri = served_model.log_calibrated_model(
            run_id, checkpoint, model.calibration_state, model.images[:2].permute(0, 2, 3, 1).numpy()
        )
    assert "smaller than" not in caplog.text  # MLflow's own check of the example passed
    loaded = mlflow.pyfunc.load_model(uri)
    assert loaded.predict(np.full((1, 20, 30, 1), 128, dtype=np.uint8)).shape == (1, 3)
    with pytest.raises(ValueError, match="smaller than the 16 pixels"):
        loaded.predict(np.full((1, 12, 30, 1), 128, dtype=np.uint8))
