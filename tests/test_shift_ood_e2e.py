"""End-to-end: the corruption suite and the OOD folder in the real flow, reproduced and served from
the registry in a fresh process, and a bad ood.path refused before training."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow import MlflowClient

from calibflow.evaluation.ood import files_digest
from calibflow.tracking import store
from cli.main import main as calibflow
from tests.conftest import dvc, run

pytestmark = pytest.mark.e2e
MODEL = "tiny-digits"
CALIBFLOW = str(Path(sys.executable).parent / "calibflow")


def client_of(repo: Path) -> MlflowClient:
    store.configure_tracking(repo)
    return MlflowClient()


def add_ood_folder(repo: Path, name: str = "ood", flat: bool = True, classes=(5, 6, 7, 8, 9)) -> str:
    """Digits of classes the tiny repo lacks (5-9), flat or as an ImageFolder, tracked by DVC."""
    from calibflow.data.prepare import write_digits

    folder = repo / "data" / name
    write_digits(folder, classes=tuple(classes), per_class=12)
    if flat:
        for image in sorted(folder.glob("*/*.png")):
            image.rename(folder / f"{image.parent.name}_{image.name}")
        for sub in [p for p in folder.iterdir() if p.is_dir()]:
            sub.rmdir()
    track(repo, f"data/{name}")
    return f"data/{name}"


def track(repo: Path, path: str) -> None:
    dvc("add", "-q", path, cwd=repo)
    run("git", "add", "-A", cwd=repo)
    run("git", "commit", "-qm", f"add {path}", cwd=repo)


def test_suite_and_ood_are_logged_reproduced_and_served_in_a_fresh_process(tiny_repo, tmp_path):
    ood_path = add_ood_folder(tiny_repo)
    assert (
        calibflow(
            [
                "run",
                "--repo",
                str(tiny_repo),
                "--set",
                f"ood.path={ood_path}",
                "--set",
                "gates.max_ood_fpr95=1.0",
                "--set",
                "gates.max_shift_ece=1.0",
                "--set",
                "shift.max_images=25",  # of 60 test images: a stratified subset, 5 of each class
            ]
        )
        == 0
    )

    client = client_of(tiny_repo)
    version = client.get_model_version_by_alias(MODEL, "champion")
    mlflow_run = client.get_run(version.run_id)
    metrics = mlflow_run.data.metrics
    for name in (
        "ood/msp/auroc",
        "ood/msp/aupr",
        "ood/msp/fpr95",
        "ood/energy/auroc",
        "ood/energy/fpr95",
        "shift/calibrated/mean_ece",
        "shift/uncalibrated/mean_accuracy",
        "shift/calibrated/contrast_s5_ece",
    ):
        assert name in metrics, name
    assert 0.0 <= metrics["ood/energy/fpr95"] <= 1.0 and 0.0 <= metrics["ood/msp/auroc"] <= 1.0
    plots = {a.path for a in client.list_artifacts(version.run_id, "plots")}
    assert {"plots/shift_curves.png", "plots/ood_score_histograms.png"} <= plots
    gates = json.loads(Path(store.download_run_artifact(version.run_id, "gates/gates.json", tmp_path)).read_text())
    assert {"max_shift_ece", "max_ood_fpr95"} <= {c["name"] for c in gates["checks"]}
    report = json.loads((tiny_repo / "reports" / "metrics.json").read_text())
    assert report["ood"]["energy"]["auroc"] == metrics["ood/energy/auroc"]
    assert report["shift"]["calibrated"]["mean_ece"] == metrics["shift/calibrated/mean_ece"]
    suite = json.loads(version.tags["shift_suite"])
    assert suite["corruptions"] == ["gaussian_noise", "gaussian_blur", "contrast"]
    assert suite["max_images"] == 25 and suite["selection"] == "stratified"
    shifted = json.loads(
        Path(store.download_run_artifact(version.run_id, "shift/shift_metrics.json", tmp_path)).read_text()
    )
    assert shifted["n_images"] == 25

    # `calibflow evaluate` in a fresh process: every cell of the suite from the served pyfunc
    out = tmp_path / "evaluate.json"
    result = subprocess.run(
        [CALIBFLOW, "evaluate", "--model", f"models:/{MODEL}@champion", "--repo", str(tiny_repo), "--json", str(out)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    evaluated = json.loads(out.read_text())
    assert evaluated["mismatches"] == []
    cells = [k for k in evaluated["recomputed"] if k.startswith("shift_")]
    assert len(cells) == 3 * 3 * 3  # 3 corruptions x 3 severities x (accuracy, ece, nll)

    # the served model: probabilities by default, MSP and energy with params={"output": "ood"}
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        from calibflow.tracking import registration
        from calibflow.tracking import store
        from calibflow.data.images import decode_image
        store.configure_tracking({str(tiny_repo)!r})
        model = registration.load_model("models:/{MODEL}@champion")
        files = sorted(__import__("pathlib").Path({str(tiny_repo / ood_path)!r}).glob("*.png"))[:4]
        images = np.stack([decode_image(f, "L", (8, 8)) for f in files])
        probabilities = model.predict(images)
        scores = model.predict(images, params={{"output": "ood"}})
        print(json.dumps({{"probabilities": np.asarray(probabilities).tolist(), "columns": list(scores.columns),
                          "msp": scores["msp"].tolist(), "energy": scores["energy"].tolist()}}))
    """)
    served = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tiny_repo)
    assert served.returncode == 0, served.stderr
    answer = json.loads(served.stdout.strip().splitlines()[-1])
    assert len(answer["probabilities"]) == 4 and answer["columns"][:2] == ["msp", "energy"]
    assert answer["msp"] == pytest.approx([max(row) for row in answer["probabilities"]], abs=1e-12)
    assert all(e < 0 or e == e for e in answer["energy"])  # finite numbers


def make_bad_ood(repo: Path, problem: str) -> str:
    folder = repo / "data" / "ood"
    if problem == "missing":
        return "data/nowhere"
    folder.mkdir(parents=True)
    if problem == "empty":
        return "data/ood"
    if problem == "not images":
        (folder / "notes.txt").write_text("not an image")
        (folder / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    if problem == "overlapping":
        for source in sorted((repo / "data" / "tiny" / "2").glob("*.png"))[:3]:
            shutil.copy(source, folder / f"copy_{source.name}")
    if problem == "not tracked":
        from calibflow.data.prepare import write_digits

        write_digits(folder, classes=(7,), per_class=5)
        return "data/ood"
    track(repo, "data/ood")
    return "data/ood"


@pytest.mark.parametrize(
    "problem, message",
    [
        ("missing", "does not exist"),
        ("empty", "is empty"),
        ("not images", "are not images"),
        ("overlapping", "same bytes as images of data.path"),
        ("not tracked", "ood.path 'data/ood' is not tracked by DVC"),
    ],
)
def test_bad_ood_path_is_refused_before_training_and_nothing_is_registered(tiny_repo, capsys, problem, message):
    path = make_bad_ood(tiny_repo, problem)
    assert calibflow(["run", "--repo", str(tiny_repo), "--set", f"ood.path={path}"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err

    client = client_of(tiny_repo)
    assert client.search_registered_models(f"name='{MODEL}'") == []
    failed = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])[0]
    assert failed.info.status == "FAILED"
    assert client.list_artifacts(failed.info.run_id, "checkpoint") == []  # nothing was trained


def test_a_failing_shift_gate_exits_1_with_the_check_in_its_json(tiny_repo, capsys, tmp_path):
    assert calibflow(["run", "--repo", str(tiny_repo), "--set", "gates.max_shift_ece=0.0"]) == 1
    err = capsys.readouterr().err
    assert "nothing registered" in err and "max_shift_ece" in err and "FAIL" in err
    client = client_of(tiny_repo)
    assert client.search_registered_models(f"name='{MODEL}'") == []

    # passing run, then `calibflow gate` reads the suite from the registry: exit 1 and JSON
    assert calibflow(["run", "--repo", str(tiny_repo)]) == 0
    out = tmp_path / "gate.json"
    assert (
        calibflow(
            [
                "gate",
                "--model",
                MODEL,
                "--candidate",
                "@champion",
                "--repo",
                str(tiny_repo),
                "--set",
                "gates.max_shift_ece=0.0",
                "--json",
                str(out),
            ]
        )
        == 1
    )
    check = next(c for c in json.loads(out.read_text())["checks"] if c["name"] == "max_shift_ece")
    assert not check["passed"] and check["bound"] >= check["value"] > 0
    assert (
        calibflow(
            [
                "gate",
                "--model",
                MODEL,
                "--candidate",
                "@champion",
                "--repo",
                str(tiny_repo),
                "--set",
                "gates.max_shift_ece=1.0",
            ]
        )
        == 0
    )

    # against the champion: the flow and `calibflow gate` corrupt the shared images for both models
    assert (
        calibflow(["run", "--repo", str(tiny_repo), "--set", "seed=1", "--set", "gates.max_shift_ece_increase=1.0"])
        == 0
    )
    challenger = client.get_model_version_by_alias(MODEL, "challenger")
    gates = json.loads(Path(store.download_run_artifact(challenger.run_id, "gates/gates.json", tmp_path)).read_text())
    increase = next(c for c in gates["checks"] if c["name"] == "max_shift_ece_increase")
    # a bound, not a point value: on the few test images the two splits share it is wide
    assert gates["n_shared"] > 0 and increase["bound"] >= increase["value"]
    assert (
        calibflow(
            [
                "gate",
                "--model",
                MODEL,
                "--candidate",
                "@challenger",
                "--repo",
                str(tiny_repo),
                "--set",
                "gates.max_shift_ece_increase=0.0",
                "--json",
                str(out),
            ]
        )
        == 1
    )
    check = next(c for c in json.loads(out.read_text())["checks"] if c["name"] == "max_shift_ece_increase")
    assert not check["passed"] and check["bound"] == pytest.approx(increase["bound"])  # the same numbers


def test_shift_aware_calibration_fits_on_corrupted_copies_and_is_served(tiny_repo, tmp_path):
    assert calibflow(["run", "--repo", str(tiny_repo)]) == 0
    assert calibflow(["run", "--repo", str(tiny_repo), "--set", "calibration.shift_aware=true"]) == 0
    client = client_of(tiny_repo)
    plain = client.get_model_version_by_alias(MODEL, "champion")
    aware = client.get_model_version_by_alias(MODEL, "challenger")
    # the same network (same seed and data), a temperature fitted on more, harder images
    assert float(aware.tags["calibration/temperature"]) != float(plain.tags["calibration/temperature"])
    runs = tiny_repo / ".calibflow" / "runs"
    import numpy as np

    with (
        np.load(runs / aware.run_id / "logits_calibration_shift_aware.npz") as fitted,
        np.load(runs / aware.run_id / "logits_calibration.npz") as clean,
    ):
        assert len(fitted["labels"]) == 6 * len(clean["labels"])  # clean + speckle noise at severities 1-5
        np.testing.assert_array_equal(fitted["logits"][: len(clean["labels"])], clean["logits"])
    out = tmp_path / "evaluate.json"
    assert (
        calibflow(
            ["evaluate", "--model", f"models:/{MODEL}/{aware.version}", "--repo", str(tiny_repo), "--json", str(out)]
        )
        == 0
    )
    assert json.loads(out.read_text())["mismatches"] == []


def test_outlier_exposure_trains_on_its_folder_and_never_on_the_ood_one(tiny_repo, capsys):
    """Every folder read from its files (data.in_memory_max_mb 0): the splits, the OOD folder and
    the outlier-exposure folder, whose draws its own DataLoader worker decodes."""
    ood = add_ood_folder(tiny_repo, "ood", classes=(8, 9))
    exposure = add_ood_folder(tiny_repo, "oe", flat=False, classes=(5, 6, 7))
    streamed = ["--set", "data.in_memory_max_mb=0", "--set", "data.workers=1"]
    assert (
        calibflow(
            ["run", "--repo", str(tiny_repo), "--set", f"ood.path={ood}", "--set", f"train.outlier_exposure={exposure}"]
            + streamed
        )
        == 0
    )
    client = client_of(tiny_repo)
    version = client.get_model_version_by_alias(MODEL, "champion")
    assert {"ood/outlier_exposure_data.json", "ood/ood_data.json"} <= {
        a.path for a in client.list_artifacts(version.run_id, "ood")
    }
    assert client.get_run(version.run_id).data.params["train.outlier_exposure"] == exposure

    # the same images in both folders: refused before training
    leak = tiny_repo / "data" / "oe" / "8"
    leak.mkdir()
    for image in sorted((tiny_repo / "data" / "ood").glob("*.png"))[:2]:
        (leak / image.name).write_bytes(image.read_bytes())
    track(tiny_repo, "data/oe")
    assert (
        calibflow(
            [
                "run",
                "--repo",
                str(tiny_repo),
                "--set",
                f"ood.path={ood}",
                "--set",
                f"train.outlier_exposure={exposure}",
                "--force",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "train.outlier_exposure 'data/oe'" in err and "same bytes as images of ood.path" in err


def add_lookalike_folder(repo: Path) -> str:
    """Digits of the classes the model was trained on (0-4) that are not images of data/tiny:
    in-distribution images filed as OOD, which no score can separate (FPR95 near 0.95)."""
    from calibflow.data.prepare import write_digits

    folder = repo / "data" / "lookalike"
    write_digits(folder, classes=(0, 1, 2, 3, 4))
    trained = {p.read_bytes() for p in (repo / "data" / "tiny").glob("*/*.png")}
    for image in sorted(folder.glob("*/*.png")):
        if image.read_bytes() in trained:  # an image of data/tiny (under its own digit or not)
            image.unlink()
    track(repo, "data/lookalike")
    return "data/lookalike"


def add_noise_frames(repo: Path, n: int = 300) -> str:
    """Uniform noise frames (a sensor fault): far from every digit."""
    import numpy as np
    from PIL import Image

    folder = repo / "data" / "noise"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    track(repo, "data/noise")
    return "data/noise"


def ood_check(path: Path) -> dict:
    return next(c for c in json.loads(Path(path).read_text())["checks"] if c["name"] == "max_ood_fpr95")


def last_run_gate(client: MlflowClient, out: Path) -> dict:
    """The max_ood_fpr95 check of the experiment's latest run (gates/gates.json, logged pass or fail)."""
    latest = client.search_runs(
        [client.get_experiment_by_name("tiny").experiment_id], order_by=["attributes.start_time DESC"], max_results=1
    )[0]
    return ood_check(store.download_run_artifact(latest.info.run_id, "gates/gates.json", out))


def test_ood_gate_on_a_trained_model_and_calibflow_gate_reads_it_from_the_registry(tmp_path, monkeypatch, capsys):
    """A real model (750 digits, 15 epochs): the gate refuses it against an OOD folder it cannot
    tell from its own classes and passes it against noise frames; `calibflow gate` re-reads the
    recorded folder from the registry and finds the same bound, also when an OOD image of the
    working tree changed since (same size, same mtime), and refuses to decide on a file whose bytes
    change between being hashed and being decoded."""
    from tests.conftest import make_repo

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    repo = make_repo(tmp_path / "repo", per_class=150)
    # Every 50th image of each digit filed under the next digit: on clean digits alone a network this
    # good can classify every calibration image right by a wide margin, and then no temperature is
    # identifiable (the run exits 2 before any gate); mislabelled images are mistakes it must make.
    for digit in range(5):
        for image in sorted((repo / "data" / "tiny" / str(digit)).glob("*.png"))[::50]:
            image.rename(repo / "data" / "tiny" / str((digit + 1) % 5) / f"moved-{image.name}")
    track(repo, "data/tiny")
    lookalike, noise = add_lookalike_folder(repo), add_noise_frames(repo)
    # 225 test images: the FPR95 bound needs >= 72 in-distribution images to be below 1, and with
    # 225 its threshold sits near the 98th percentile, so a loose 0.7 is what this size can certify
    settings = [
        "--repo",
        str(repo),
        "--set",
        "split.train=0.4",
        "--set",
        "split.test=0.3",
        "--set",
        "train.epochs=15",
        "--set",
        "ood.max_images=300",
        "--set",
        "gates.max_ood_fpr95=0.7",
    ]
    assert calibflow(["run", *settings, "--set", f"ood.path={lookalike}"]) == 1
    client = client_of(repo)
    refused = last_run_gate(client, tmp_path / "refused")
    assert not refused["passed"] and refused["value"] > 0.8 and refused["bound"] >= refused["value"]
    assert client.search_registered_models(f"name='{MODEL}'") == []

    assert calibflow(["run", *settings, "--set", f"ood.path={noise}"]) == 0
    passed = last_run_gate(client, tmp_path / "passed")
    assert passed["passed"] and passed["value"] <= passed["bound"] <= 0.7
    version = client.get_model_version_by_alias(MODEL, "champion")
    recorded = json.loads(version.tags["ood_data"])
    assert recorded["path"] == noise
    scored = sorted((repo / noise).glob("*.png"))  # all 300 (ood.max_images = 300)
    assert recorded["files_digest"] == files_digest([hashlib.sha256(p.read_bytes()).hexdigest() for p in scored])

    # `calibflow gate` scores the recorded folder again with the served pyfunc: the same bound
    gate_json = tmp_path / "gate.json"
    gate = ["gate", "--model", MODEL, "--candidate", "@champion", "--repo", str(repo), "--set", f"ood.path={noise}"]
    assert calibflow([*gate, "--set", "gates.max_ood_fpr95=0.7", "--json", str(gate_json)]) == 0
    regated = ood_check(gate_json)
    assert regated["bound"] == pytest.approx(passed["bound"], abs=1e-9) and regated["passed"]
    assert calibflow([*gate, "--set", "gates.max_ood_fpr95=0.0", "--json", str(gate_json)]) == 1
    assert not ood_check(gate_json)["passed"]

    # one frame's bytes replaced in the working tree, its size and mtime kept: the gate reads the
    # version's own bytes at its revision, and finds the same bound
    by_size: dict[int, list[Path]] = {}
    for path in sorted((repo / noise).glob("*.png")):
        by_size.setdefault(path.stat().st_size, []).append(path)
    frame, twin = next(paths for paths in by_size.values() if len(paths) > 1)[:2]
    stat = frame.stat()
    frame.write_bytes(twin.read_bytes())
    os.utime(frame, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert calibflow([*gate, "--set", "gates.max_ood_fpr95=0.7", "--json", str(gate_json)]) == 0
    assert ood_check(gate_json)["bound"] == pytest.approx(passed["bound"], abs=1e-9)

    # a file that changes after the gate hashed it, before it is decoded, is refused by name: the
    # folder handed to the scoring read is a copy with one file replaced
    from calibflow.evaluation import ood

    hashed_then_changed = tmp_path / "hashed-then-changed"

    def read_from_a_changed_copy(repo_root, recorded):
        folder = real_recorded_ood_files(repo_root, recorded)
        shutil.copytree(folder.local_dir, hashed_then_changed)
        (hashed_then_changed / folder.files[0]).write_bytes((hashed_then_changed / folder.files[1]).read_bytes())
        return dataclasses.replace(folder, local_dir=str(hashed_then_changed))

    real_recorded_ood_files = ood.recorded_ood_files
    capsys.readouterr()
    with monkeypatch.context() as patched:
        patched.setattr(ood, "recorded_ood_files", read_from_a_changed_copy)
        assert calibflow([*gate, "--set", "gates.max_ood_fpr95=0.7"]) == 2
    err = capsys.readouterr().err
    assert "could not decide" in err and "000.png: its bytes changed since the data version was pinned" in err

    # a version measured on no OOD folder cannot be gated on one: undecided, exit 2
    assert (
        calibflow(
            [
                "run",
                "--repo",
                str(repo),
                "--set",
                "split.train=0.4",
                "--set",
                "split.test=0.3",
                "--set",
                "train.epochs=1",
                "--set",
                "gates.max_ece=1",
                "--set",
                "gates.min_accuracy=0",
                "--set",
                "gates.max_ece_increase=null",
                "--set",
                "gates.max_accuracy_drop=null",
            ]
        )
        == 0
    )
    assert calibflow([*gate[:4], "@challenger", *gate[5:], "--set", "gates.max_ood_fpr95=0.7"]) == 2
