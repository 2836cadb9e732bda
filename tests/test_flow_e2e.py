"""End-to-end runs of the real flow on a tiny digits ImageFolder in a temporary git + DVC repo."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from calibflow import names
from calibflow.pipeline import evaluation_steps
from calibflow.pipeline import report_staging
from calibflow.tracking import registration
from calibflow.tracking import served_model
from calibflow.tracking import store
from cli.main import main as calibflow
from calibflow.config import load_config
from calibflow.gates.checks import GateVerdict
from tests.conftest import REPO, dvc, run, untrained_model
from calibflow import errors

pytestmark = pytest.mark.e2e
MODEL = "tiny-digits"
CALIBFLOW = str(Path(sys.executable).parent / "calibflow")
REQUIRED_TAGS = (
    "test/uncalibrated/ece",
    "test/calibrated/ece",
    "test/calibrated/accuracy",
    "calibration/temperature",
    "data_hash",
    "git_commit",
    "params_hash",
    "seed",
)


def mlflow_client(repo: Path) -> MlflowClient:
    store.configure_tracking(repo)
    return MlflowClient()


def dvc_hash(repo: Path, name: str = "tiny") -> str:
    return yaml.safe_load((repo / "data" / f"{name}.dvc").read_text())["outs"][0]["md5"]


def head(repo: Path, rev: str = "HEAD") -> str:
    return run("git", "rev-parse", rev, cwd=repo).stdout.strip()


def commit_data_change(repo: Path, message: str) -> None:
    dvc("add", "-q", "data/tiny", cwd=repo)
    run("git", "add", "-A", cwd=repo)
    run("git", "commit", "-qm", message, cwd=repo)


def test_passing_run_registers_a_champion_that_reproduces_in_a_fresh_process(tiny_repo, tmp_path):
    from flows.train_calibrate import train_calibrate_register

    result = train_calibrate_register(repo_root=str(tiny_repo))
    assert (tiny_repo / "mlflow.db").is_file()  # MLflow 3's default store, at the repository root

    client = mlflow_client(tiny_repo)
    assert [str(v.version) for v in client.search_model_versions(f"name='{MODEL}'")] == ["1"]
    version = client.get_model_version_by_alias(MODEL, "champion")
    tags = version.tags
    assert set(REQUIRED_TAGS) <= set(tags)
    assert tags["data_hash"] == dvc_hash(tiny_repo)
    assert tags["git_commit"] == head(tiny_repo) and tags["data_rev"] == head(tiny_repo)
    assert tags["params_hash"] == load_config(tiny_repo / "params.yaml").params_hash
    assert tags["seed"] == "0"
    assert float(tags["calibration/temperature"]) == pytest.approx(result["temperature"])
    assert float(tags["test/calibrated/ece"]) == result["test_after"]["ece"]

    mlflow_run = client.get_run(version.run_id)
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.data.tags["calibflow.status"] == "succeeded"
    assert mlflow_run.data.params["train.epochs"] == "5"  # the resolved config is logged

    def steps(metric: str) -> list[int]:
        return sorted(m.step for m in client.get_metric_history(version.run_id, metric))

    assert steps("train/loss") == steps("train/images_per_second") == [1, 2, 3, 4, 5]  # once per epoch
    # train.val_every = 2, and always the last epoch
    assert steps("val/accuracy") == steps("val/nll") == steps("val/ece") == [2, 4, 5]
    artifacts = {
        a.path
        for folder in ("", "plots", "data", "validation", "checkpoint", "gates")
        for a in client.list_artifacts(version.run_id, folder or None)
    }
    assert {
        "config.yaml",
        "plots/reliability_diagram.png",
        "plots/confidence_histogram.png",
        "data/splits.json",
        "data/manifest.csv",
        "validation/data_validation.json",
        "checkpoint/checkpoint.pt",
        "gates/gates.json",
    } <= artifacts
    split_record = json.loads(
        Path(store.download_run_artifact(version.run_id, "data/splits.json", tmp_path)).read_text()
    )
    assert split_record["digest"] == tags["split_digest"] == mlflow_run.data.tags["split_digest"]

    metrics = json.loads((tiny_repo / "reports" / "metrics.json").read_text())
    assert metrics["test"]["calibrated"]["ece"] == float(tags["test/calibrated/ece"])  # one name, / or nested
    assert stat.S_IMODE((tiny_repo / "reports" / "metrics.json").stat().st_mode) == 0o666 & ~current_umask()
    assert sorted(p.name for p in (tiny_repo / "reports").iterdir()) == ["metrics.json", "plots"]  # nothing staged
    assert sorted(p.name for p in (tiny_repo / "reports" / "plots").iterdir()) == [
        "reliability_diagram.png",
        "train.csv",
        "val.csv",
    ]
    shown = dvc("metrics", "show", cwd=tiny_repo).stdout
    assert "reports/metrics.json" in shown and "test.calibrated.ece" in shown

    # The run page (issue 15): verdict line first, in the run's and the version's description
    description = mlflow_run.data.tags["mlflow.note.content"]
    verdict = description.splitlines()[0]
    assert verdict.startswith("PROMOTED · absolute gates passed · no champion · promoted yes: @champion · ECE ")
    assert " · acc " in verdict and " · T " in verdict, verdict
    assert f"-> {result['test_after']['ece']:.4f}" in verdict and "95% upper" in verdict
    assert description in client.get_model_version(MODEL, "1").description  # below the lineage
    run_tags = mlflow_run.data.tags
    assert run_tags["verdict/absolute"] == "passed" and run_tags["gate/max_ece"].startswith("passed: ")
    assert run_tags["gate/against"].startswith("none")
    assert run_tags["mlflow.source.git.commit"] == head(tiny_repo) and run_tags["mlflow.user"]
    assert run_tags["mlflow.source.name"] == "flows/train_calibrate.py"
    logged = set(mlflow_run.data.metrics)
    assert {
        "test/uncalibrated/ece",
        "test/calibrated/ece",
        "test/calibrated/nll",
        "gate/max_ece_bound",
        "gate/max_ece_threshold",
        "gate/min_accuracy_bound",
        "calibration/temperature",
        "val/ece",
    } <= logged
    assert all("/" in name for name in logged), sorted(n for n in logged if "/" not in n)  # every chart grouped
    assert not [k for k in mlflow_run.data.params if k.startswith(("schedule.", "registry."))]
    (dataset,) = mlflow_run.inputs.dataset_inputs
    assert dataset.dataset.digest == dvc_hash(tiny_repo) and dataset.dataset.name == "data/tiny"
    assert client.get_logged_model(version.source.removeprefix("models:/")).name == MODEL

    # The Prefect side: named tasks and the markdown summary, on the temporary local API.
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    # this flow run's artifact: the temporary API's database outlives the test, and a read without
    # the flow run's id stops at its first 200 artifacts
    with get_client(sync_client=True) as prefect:
        summaries = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["calibflow-run-summary"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(result["prefect_flow_run_id"])]),
            )
        )
    assert any(result["run_id"] in (a.data or "") for a in summaries)

    # A fresh process loads models:/tiny-digits@champion and recomputes the logged numbers.
    out = tmp_path / "evaluate.json"
    evaluated = subprocess.run(
        [CALIBFLOW, "evaluate", "--model", f"models:/{MODEL}@champion", "--repo", str(tiny_repo), "--json", str(out)],
        capture_output=True,
        text=True,
        cwd=tiny_repo,
    )
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(out.read_text())
    assert abs(report["recomputed"]["ece"] - float(tags["test/calibrated/ece"])) <= 1e-6
    assert report["recomputed"]["accuracy"] == float(tags["test/calibrated/accuracy"])

    images = sorted(str(p) for p in (tiny_repo / "data" / "tiny" / "3").glob("*.png"))[:2]
    predicted = subprocess.run(
        [CALIBFLOW, "predict", "--model", f"models:/{MODEL}@champion", "--repo", str(tiny_repo), *images],
        capture_output=True,
        text=True,
        cwd=tiny_repo,
    )
    assert predicted.returncode == 0, predicted.stderr
    lines = [line.split("\t") for line in predicted.stdout.strip().splitlines()]
    assert [line[0] for line in lines] == images
    assert all(line[1] in {"0", "1", "2", "3", "4"} and 0.2 <= float(line[2]) <= 1.0 for line in lines)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_metrics_report_is_staged_beside_its_target_with_the_umask_and_published_by_one_rename(tmp_path):
    evaluation = evaluation_steps.Evaluation(before={"ece": 0.2}, after={"ece": 0.1}, plots=())
    fit = evaluation_steps.CalibrationRecord("temperature", "", 1.5, 0.9, 0.8)
    verdict = GateVerdict(passed=True, checks=())
    target = tmp_path / "reports" / "metrics.json"
    target.parent.mkdir()
    target.write_text("the previous report")
    previous = os.umask(0o027)
    try:
        staged = report_staging.stage_metrics_report(str(target), evaluation, fit, verdict)
    finally:
        os.umask(previous)
    assert target.read_text() == "the previous report"  # staged beside it, not over it
    assert Path(staged.staged).parent == target.parent
    assert stat.S_IMODE(Path(staged.staged).stat().st_mode) == 0o640  # the umask's, not tempfile's 0600
    report_staging.publish_report(staged)
    assert json.loads(target.read_text())["calibration"]["temperature"] == 1.5
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]

    discarded = report_staging.stage_metrics_report(str(target), evaluation, fit, verdict)
    report_staging.discard_report(discarded)
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]

    target.unlink()
    target.mkdir()
    with pytest.raises(errors.ReportError, match="is a directory"):
        report_staging.stage_metrics_report(str(target), evaluation, fit, verdict)
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]


def test_report_path_that_is_a_directory_fails_the_run_before_anything_is_registered(tiny_repo, capsys):
    (tiny_repo / "reports" / "metrics.json").mkdir(parents=True)
    assert calibflow(["run", "--repo", str(tiny_repo)]) == 2
    message = capsys.readouterr().err
    assert "reports/metrics.json is a directory" in message and "remove it" in message

    client = mlflow_client(tiny_repo)
    assert client.search_model_versions(f"name='{MODEL}'") == []  # no version, so no alias either
    assert [p.name for p in (tiny_repo / "reports").iterdir()] == ["metrics.json"]  # no tmp*.tmp left
    [failed] = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert failed.info.status == "FAILED" and "ReportError" in failed.data.tags["calibflow.reason"]


def test_failure_after_registration_takes_the_version_and_its_alias_back(tiny_repo, monkeypatch, capsys):
    end_run = store.end_run

    def fail_to_finish(run_id, outcome, reason=""):
        if outcome == "succeeded":
            raise errors.StoreUnreachable("the store went away after registration (injected)")
        return end_run(run_id, outcome, reason)

    monkeypatch.setattr(store, "end_run", fail_to_finish)
    assert calibflow(["run", "--repo", str(tiny_repo)]) == 2
    message = capsys.readouterr().err
    assert "injected" in message and "nothing was registered and no alias moved" in message  # now true

    client = mlflow_client(tiny_repo)
    assert client.search_model_versions(f"name='{MODEL}'") == []
    assert client.get_registered_model(MODEL).aliases == {}
    assert not (tiny_repo / "reports").exists() or list((tiny_repo / "reports").iterdir()) == []
    [failed] = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert failed.info.status == "FAILED"


# ---------------------------------------------------------------------------------------------
# Registration and its undo, on models logged without training (a registry needs a model, not a good one)


def log_untrained_model(repo: Path, work: Path) -> str:
    model = untrained_model(work)
    store.configure_tracking(repo)
    run_id = store.start_run("registration-tests", repo_root=repo)
    return served_model.log_calibrated_model(
        run_id, model.checkpoint, model.calibration_state, model.images[:2].permute(0, 2, 3, 1).numpy()
    )


RACER = textwrap.dedent("""\
    # Registers the same logged model as the first version of models race-0, race-1, ... in step
    # with another process: each trial starts when the test creates its go file.
    import json, sys, time
    from pathlib import Path
    from calibflow.tracking import registration
    from calibflow.tracking import served_model
    from calibflow.tracking import store

    repo, model_uri, sync, trials, me = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    store.configure_tracking(repo)
    reported = []
    for trial in range(trials):
        (sync / f"ready-{trial}-{me}").touch()
        while not (sync / f"go-{trial}").exists():
            time.sleep(0.002)
        version = registration.register_version(model_uri, f"race-{trial}", {})
        reported.append([version.name, version.version, version.alias])
    print(json.dumps(reported))
""")


def test_first_registrations_racing_in_two_processes_give_one_champion_and_each_says_which(tiny_repo, tmp_path):
    model_uri = log_untrained_model(tiny_repo, tmp_path / "model")
    racer, sync, trials = tmp_path / "racer.py", tmp_path / "sync", 2
    racer.write_text(RACER)
    sync.mkdir()
    processes = [
        subprocess.Popen(
            [sys.executable, str(racer), str(tiny_repo), model_uri, str(sync), str(trials), me],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for me in ("a", "b")
    ]
    try:
        for trial in range(trials):
            deadline = time.monotonic() + 120
            while not all((sync / f"ready-{trial}-{me}").exists() for me in ("a", "b")):
                assert all(p.poll() is None for p in processes), [p.communicate() for p in processes]
                assert time.monotonic() < deadline
                time.sleep(0.01)
            (sync / f"go-{trial}").touch()
        outputs = [p.communicate(timeout=120) for p in processes]
    finally:
        for p in processes:
            p.kill()
    # Each failed racer's whole stderr: pytest cuts a long repr in the middle, where the traceback is.
    failed = [
        f"racer {me} exited {p.returncode}:\n{err}" for me, p, (_, err) in zip("ab", processes, outputs) if p.returncode
    ]
    assert not failed, "\n\n".join(failed)
    reported = [row for out, _ in outputs for row in json.loads(out)]
    client = mlflow_client(tiny_repo)
    for trial in range(trials):
        name = f"race-{trial}"
        said = {alias: version for model, version, alias in reported if model == name}
        assert sorted(said) == ["challenger", "champion"], reported  # one of each, not two champions
        assert {k: str(v) for k, v in client.get_registered_model(name).aliases.items()} == said


def test_undo_of_a_registration_puts_back_every_alias_it_moved_even_after_a_promotion(tiny_repo, tmp_path):
    from calibflow.lifecycle import promotion

    model_uri = log_untrained_model(tiny_repo, tmp_path / "model")
    first = registration.register_version(model_uri, "undo", {})
    registration.undo_registration(first)  # the first version of a model: no version, no alias is left
    assert registration.list_versions("undo") == [] and registration.aliases("undo") == {}

    v2, v3 = (registration.register_version(model_uri, "undo", {}) for _ in range(2))
    assert (v2.alias, v3.alias, v3.replaced) == ("champion", "challenger", None)
    v4 = registration.register_version(model_uri, "undo", {})
    assert (v4.alias, v4.replaced) == ("challenger", v3.version)
    promotion.promote("undo", v4.version, v2.version, report_path=None)
    assert registration.aliases("undo") == {"champion": v4.version, "previous-champion": v2.version}
    replaced = registration.resolve_model_uri(f"models:/undo/{v2.version}").tags[names.VERDICT_PROMOTED]
    assert replaced == names.replaced_by(v4.version)

    registration.undo_registration(v4)
    assert registration.aliases("undo") == {"champion": v2.version, "challenger": v3.version}
    assert [r.version for r in registration.list_versions("undo")] == [v2.version, v3.version]
    # the champion again says so: not "replaced by" a version that no longer exists
    assert registration.resolve_model_uri(f"models:/undo/{v2.version}").tags[names.VERDICT_PROMOTED] == names.PROMOTED
    description = store.version_description("undo", v2.version)
    assert description.splitlines()[0].startswith("PROMOTED · "), description  # its verdict line first
    assert f"version {v4.version}, which had replaced it, was taken back" in description

    # A later registration's @challenger is not taken from it by the undo of an earlier one.
    v5, v6 = (registration.register_version(model_uri, "undo", {}) for _ in range(2))
    registration.undo_registration(v5)
    assert registration.aliases("undo") == {"champion": v2.version, "challenger": v6.version}


def test_undo_that_cannot_finish_says_the_version_may_still_be_registered(tiny_repo, tmp_path, monkeypatch):
    model_uri = log_untrained_model(tiny_repo, tmp_path / "model")
    version = registration.register_version(model_uri, "stuck", {})

    def store_gone(self, name, number):
        raise ConnectionError("the store went away (injected)")

    monkeypatch.setattr(MlflowClient, "delete_model_version", store_gone)
    with pytest.raises(errors.RegistrationLeftBehind) as raised:
        registration.undo_registration(version)
    message = str(raised.value)
    assert f"version {version.version} of stuck" in message and "may still be registered" in message
    assert "injected" in message


def test_run_at_an_older_data_revision_records_it_and_becomes_challenger(tiny_repo):
    first_hash, first_commit = dvc_hash(tiny_repo), head(tiny_repo)
    for path in sorted((tiny_repo / "data" / "tiny" / "0").glob("*.png"))[:5]:
        path.unlink()
    commit_data_change(tiny_repo, "drop five zeros")
    assert dvc_hash(tiny_repo) != first_hash

    assert calibflow(["run", "--repo", str(tiny_repo)]) == 0
    assert calibflow(["run", "--repo", str(tiny_repo), "--data-rev", "HEAD~1", "--set", "seed=1"]) == 0

    client = mlflow_client(tiny_repo)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    challenger = client.get_model_version_by_alias(MODEL, "challenger")
    assert (str(champion.version), str(challenger.version)) == ("1", "2")
    assert champion.tags["data_hash"] == dvc_hash(tiny_repo)
    assert challenger.tags["data_hash"] == first_hash and challenger.tags["data_rev"] == first_commit
    assert challenger.tags["seed"] == "1"
    assert client.get_run(challenger.run_id).data.params["seed"] == "1"  # the override is in the logged config


def test_failing_gate_registers_nothing_and_moves_no_alias(tiny_repo, capsys, tmp_path):
    assert calibflow(["run", "--repo", str(tiny_repo)]) == 0
    report_before = (tiny_repo / "reports" / "metrics.json").read_text()

    # min_accuracy 0.95 on 60 test images: passable only by a model right on all of them (a
    # threshold no model could pass, such as max_ece 0, is refused before training with exit 2)
    result = tmp_path / "refused.json"
    strict = ["--set", "gates.min_accuracy=0.95", "--set", "seed=3", "--json", str(result)]
    assert calibflow(["run", "--repo", str(tiny_repo), *strict]) == 1
    message = capsys.readouterr().err
    assert "nothing registered" in message and "min_accuracy" in message and "FAIL" in message
    # the CD job's artifact says why, with the numbers it was refused on
    refused = json.loads(result.read_text())
    assert refused["registered"] is False and refused["refused"].startswith("GatesFailed: ")
    check = next(c for c in refused["gates"]["checks"] if c["name"] == "min_accuracy")
    assert not check["passed"] and check["threshold"] == 0.95
    assert check["value"] == refused["test_after"]["accuracy"] and refused["temperature"] > 0

    client = mlflow_client(tiny_repo)
    assert [str(v.version) for v in client.search_model_versions(f"name='{MODEL}'")] == ["1"]
    assert {k: str(v) for k, v in client.get_registered_model(MODEL).aliases.items()} == {"champion": "1"}
    failed = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], order_by=["start_time DESC"])[0]
    assert failed.info.status == "FAILED"
    assert failed.data.tags["calibflow.status"] == "failed" and failed.data.tags["verdict/absolute"] == "failed"
    assert (tiny_repo / "reports" / "metrics.json").read_text() == report_before  # the good report stays


def test_corrupt_image_fails_validation_before_training_and_registers_nothing(tiny_repo, capsys):
    (tiny_repo / "data" / "tiny" / "3" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    commit_data_change(tiny_repo, "a corrupt file")

    assert calibflow(["run", "--repo", str(tiny_repo)]) == 1
    message = capsys.readouterr().err
    assert "nothing registered" in message and "decodes" in message and "corrupt.png" in message

    client = mlflow_client(tiny_repo)
    assert client.search_registered_models(f"name='{MODEL}'") == []
    failed = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])[0]
    assert failed.info.status == "FAILED" and failed.data.tags["data_validation"] == "failed"
    saved = {
        a.path for folder in ("validation", "checkpoint") for a in client.list_artifacts(failed.info.run_id, folder)
    }
    assert "validation/data_validation.json" in saved  # the GX result is kept
    assert not any(p.startswith("checkpoint") for p in saved)  # nothing was trained
    assert not (tiny_repo / "reports" / "metrics.json").exists()


def test_data_changed_but_not_recorded_by_dvc_is_refused(tiny_repo, capsys):
    next((tiny_repo / "data" / "tiny" / "1").glob("*.png")).unlink()
    assert calibflow(["run", "--repo", str(tiny_repo)]) == 2
    assert "dvc add data/tiny" in capsys.readouterr().err


def test_unknown_override_key_is_refused_before_anything_runs(tiny_repo, capsys):
    assert calibflow(["run", "--repo", str(tiny_repo), "--set", "train.epoch=3"]) == 2
    assert "unknown key 'train.epoch'" in capsys.readouterr().err
    assert not (tiny_repo / "mlflow.db").exists()


def test_unchanged_retrain_is_skipped_unless_forced(tiny_repo, capsys):
    assert calibflow(["run", "--repo", str(tiny_repo)]) == 0
    assert calibflow(["run", "--repo", str(tiny_repo)]) == 0
    assert "nothing to retrain" in capsys.readouterr().out

    client = mlflow_client(tiny_repo)
    assert [str(v.version) for v in client.search_model_versions(f"name='{MODEL}'")] == ["1"]
    skipped = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], order_by=["start_time DESC"])[0]
    assert skipped.data.tags["calibflow.status"] == "skipped" and skipped.info.status == "FINISHED"
    assert client.list_artifacts(skipped.info.run_id, "checkpoint") == []  # nothing was trained

    assert calibflow(["run", "--repo", str(tiny_repo), "--force"]) == 0
    assert sorted(str(v.version) for v in client.search_model_versions(f"name='{MODEL}'")) == ["1", "2"]


def test_other_calibrators_are_registered_and_served_and_auto_logs_its_comparison(tiny_repo, tmp_path):
    assert calibflow(["run", "--repo", str(tiny_repo), "--set", "calibration.method=vector"]) == 0
    client = mlflow_client(tiny_repo)
    vector = client.get_model_version_by_alias(MODEL, "champion")
    assert vector.tags["calibration/method"] == "vector" and vector.tags["calibration/temperature"] == ""
    # The served pyfunc applies the saved vector-scaling calibrator: a fresh process reproduces the metrics.
    out = tmp_path / "evaluate.json"
    evaluated = subprocess.run(
        [CALIBFLOW, "evaluate", "--model", f"models:/{MODEL}@champion", "--repo", str(tiny_repo), "--json", str(out)],
        capture_output=True,
        text=True,
        cwd=tiny_repo,
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(out.read_text())["mismatches"] == []

    assert calibflow(["run", "--repo", str(tiny_repo), "--set", "calibration.method=auto", "--set", "seed=1"]) == 0
    auto = client.get_model_version_by_alias(MODEL, "challenger")
    table = json.loads(
        Path(store.download_run_artifact(auto.run_id, "calibration/calibration_selection.json", tmp_path)).read_text()
    )
    methods = {row["method"] for row in table}
    assert {"temperature", "vector", "matrix", "histogram", "isotonic"} <= methods
    assert auto.tags["calibration/method"] in methods
    assert sum(bool(row["selected"]) for row in table) == 1


def test_promotion_auto_moves_the_champion_only_when_every_gate_passes(tiny_repo):
    assert calibflow(["run", "--repo", str(tiny_repo)]) == 0
    # Provably no worse than v1 in accuracy and in ECE: two models this alike never are (both bounds exceed 0).
    strict = ["--set", "promotion.auto=true", "--set", "gates.max_accuracy_drop=0", "--set", "gates.max_ece_increase=0"]
    assert calibflow(["run", "--repo", str(tiny_repo), "--set", "seed=1", *strict]) == 0
    client = mlflow_client(tiny_repo)
    assert {k: str(v) for k, v in client.get_registered_model(MODEL).aliases.items()} == {
        "champion": "1",
        "challenger": "2",
    }  # registered (absolute gates pass), not promoted

    loose = [
        "--set",
        "promotion.auto=true",
        "--set",
        "gates.max_accuracy_drop=0.9",
        "--set",
        "gates.max_ece_increase=0.9",
    ]
    assert calibflow(["run", "--repo", str(tiny_repo), "--set", "seed=2", *loose]) == 0
    # v3 was registered as @challenger (the alias moved from v2), then took @champion.
    assert {k: str(v) for k, v in client.get_registered_model(MODEL).aliases.items()} == {
        "champion": "3",
        "previous-champion": "1",
    }
    assert client.get_model_version(MODEL, "3").tags["promoted_from"] == "1"


@pytest.mark.parametrize(
    "options",
    [
        ["train.loss=focal", "train.focal_gamma=2", "train.mix=mixup", "train.mix_alpha=0.4"],
        ["train.loss=flsd53", "train.mix=cutmix", "train.label_smoothing=0.1"],
        ["train.loss=confidence_penalty", "calibration.method=vector"],
        ["train.loss=mmce"],
        ["model.ensemble=2"],
        ["model.dropout=0.3", "model.mc_dropout=4"],
    ],
    ids=["focal+mixup", "flsd53+cutmix+smoothing", "confidence_penalty+vector", "mmce", "ensemble", "mc_dropout"],
)
def test_train_time_calibration_options_register_a_model_served_calibrated_in_a_fresh_process(
    options, tiny_repo, tmp_path
):
    argv = ["run", "--repo", str(tiny_repo)]
    for option in options:
        argv += ["--set", option]
    assert calibflow(argv) == 0
    version = mlflow_client(tiny_repo).get_model_version_by_alias(MODEL, "champion")
    # A fresh process loads the registered pyfunc (mlflow.pyfunc.load_model after the digest check)
    # and recomputes the logged test metrics from its calibrated probabilities.
    out = tmp_path / "evaluate.json"
    evaluated = subprocess.run(
        [CALIBFLOW, "evaluate", "--model", f"models:/{MODEL}@champion", "--repo", str(tiny_repo), "--json", str(out)],
        capture_output=True,
        text=True,
        cwd=tiny_repo,
    )
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(out.read_text())
    assert report["mismatches"] == []
    assert abs(report["recomputed"]["ece"] - float(version.tags["test/calibrated/ece"])) <= 1e-6
    if "model.ensemble=2" in options:
        assert version.tags["calibration/method"] == "ensemble"
