"""calibflow gate / promote / rollback / status on a real MLflow registry with real models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from calibflow.tracking import registration
from calibflow.tracking import served_model
from calibflow.tracking import store
from cli.main import main as calibflow
from calibflow.lifecycle.promotion import AUDIT_EXPERIMENT
from tests.conftest import dvc, run

pytestmark = pytest.mark.e2e
MODEL = "tiny-digits"
CALIBFLOW = str(Path(sys.executable).parent / "calibflow")
LOOSE = [
    "--set",
    "gates.max_ece=0.9",
    "--set",
    "gates.min_accuracy=0.1",
    "--set",
    "gates.max_ece_increase=0.9",
    "--set",
    "gates.max_accuracy_drop=0.9",
]
QUICK = ["--set", "train.epochs=2", "--set", "gates.min_accuracy=0.0"]  # a run whose model's quality does not matter


@pytest.fixture(scope="module")
def registry_template(tiny_repo_template, tmp_path_factory) -> Path:
    """Three registered versions of the same model (seeds 0, 1, 2): v1 @champion, v3 @challenger."""
    repo = tmp_path_factory.mktemp("promotion") / "repo"
    shutil.copytree(tiny_repo_template, repo, symlinks=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        for seed in (0, 1, 2):
            assert calibflow(["run", "--repo", str(repo), "--set", f"seed={seed}"]) == 0
    return repo


@pytest.fixture
def repo(registry_template, tmp_path, monkeypatch) -> Path:
    """A private copy of the registry (aliases are per test); artifacts stay in the template."""
    copy = tmp_path / "repo"
    shutil.copytree(registry_template, copy, symlinks=True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store.configure_tracking(copy)
    return copy


def aliases(repo: Path) -> dict[str, str]:
    store.configure_tracking(repo)
    return registration.aliases(MODEL)


def gate(repo: Path, *args: str) -> int:
    return calibflow(["gate", "--model", MODEL, "--repo", str(repo), *args])


def test_registered_versions_start_as_champion_and_challengers(repo):
    assert aliases(repo) == {"champion": "1", "challenger": "3"}


def test_gate_passes_with_exit_0_and_reports_each_check_against_the_champion(repo, tmp_path):
    out = tmp_path / "report.json"
    assert gate(repo, "--candidate", "@challenger", "--json", str(out), *LOOSE) == 0
    report = json.loads(out.read_text())
    assert report["candidate"] == "3" and report["champion"] == "1" and report["passed"]
    names = [c["name"] for c in report["checks"]]
    assert names == ["max_ece", "min_accuracy", "max_ece_increase", "max_accuracy_drop"]
    for check in report["checks"]:
        assert (check["value"] <= check["bound"]) if check["comparison"] == "<=" else (check["bound"] <= check["value"])
        assert (
            check["passed"]
            == (
                check["bound"] <= check["threshold"]
                if check["comparison"] == "<="
                else check["bound"] >= check["threshold"]
            )
            and check["method"]
        )
    # Different seeds split differently: test images the champion trained on are left out.
    assert report["excluded_seen_by_champion"] > 0
    assert {"ece_plugin", "ece_debiased_l2"} <= set(report["estimates"])


def test_candidate_passing_on_its_point_estimate_but_not_its_upper_bound_fails_with_exit_1(repo, tmp_path):
    out = tmp_path / "report.json"
    assert gate(repo, "--candidate", "2", "--json", str(out), *LOOSE) == 0
    ece = next(c for c in json.loads(out.read_text())["checks"] if c["name"] == "max_ece")
    assert ece["value"] < ece["bound"]
    between = (ece["value"] + ece["bound"]) / 2
    assert gate(repo, "--candidate", "2", "--json", str(out), *LOOSE, "--set", f"gates.max_ece={between}") == 1
    failed = next(c for c in json.loads(out.read_text())["checks"] if c["name"] == "max_ece")
    assert failed["value"] < between < failed["bound"] and not failed["passed"]


def test_gate_plan_answers_for_a_registered_version(repo, tmp_path, capsys):
    out = tmp_path / "plan.json"
    code = calibflow(
        [
            "gate",
            "plan",
            "--model",
            MODEL,
            "--candidate",
            "@challenger",
            "--repo",
            str(repo),
            "--set",
            "gates.n_resamples=100",
            # comparisons a model of 60 test images can pass: the grid stops at the planned size
            # instead of simulating every size up to 100,000 (two minutes of CI)
            "--set",
            "gates.max_ece_increase=0.5",
            "--set",
            "gates.max_accuracy_drop=0.5",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    plan = json.loads(out.read_text())
    assert plan["rows"] and {"max_ece", "min_accuracy", "max_ece_increase", "max_accuracy_drop"} <= set(plan["rows"][0])
    assert "against the champion on" in plan["comparison"]
    assert ("test images give the configured gates (" in capsys.readouterr().out) == (plan["needed"] is not None)
    assert calibflow(["gate", "plan", "--model", MODEL, "--candidate", "99", "--repo", str(repo)]) == 2
    assert calibflow(["gate", "plan", "--model", MODEL, "--repo", str(repo)]) == 2  # a model needs its candidate


def test_relative_gate_fails_when_no_worsening_is_allowed(repo):
    # Provably no worse than the champion in accuracy and in ECE: two models this alike never are.
    strict = LOOSE + ["--set", "gates.max_accuracy_drop=0", "--set", "gates.max_ece_increase=0"]
    assert gate(repo, "--candidate", "@challenger", *strict) == 1


def test_gate_cannot_decide_exit_2(repo, capsys, monkeypatch, tmp_path):
    assert gate(repo, "--candidate", "99") == 2
    assert "could not decide" in capsys.readouterr().err

    # Data at the recorded revision is gone (no working copy, no DVC cache, no remote).
    shutil.rmtree(repo / "data" / "tiny")
    shutil.rmtree(repo / ".dvc" / "cache")
    assert gate(repo, "--candidate", "2") == 2
    assert "test data cannot be rebuilt" in capsys.readouterr().err


def test_gate_with_the_registry_unreachable_exits_2(repo, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    assert gate(repo, "--candidate", "2") == 2
    assert "could not decide" in capsys.readouterr().err


def test_promote_moves_champion_records_who_and_keeps_the_report_then_rollback_moves_it_back(repo, monkeypatch, capsys):
    monkeypatch.setenv("GITHUB_RUN_ID", "4242")
    assert calibflow(["promote", "--model", MODEL, "--candidate", "@challenger", "--repo", str(repo), *LOOSE]) == 0
    assert aliases(repo) == {"champion": "3", "previous-champion": "1"}  # challenger alias moved on
    tags = MlflowClient().get_model_version(MODEL, "3").tags
    assert tags["promoted_from"] == "1" and tags["promoted_ci_job"] == "GITHUB_RUN_ID=4242" and tags["promoted_by"]
    client = MlflowClient()
    audit = client.search_runs([client.get_experiment_by_name(AUDIT_EXPERIMENT).experiment_id])
    assert audit[0].data.tags["decision"] == "promoted" and audit[0].data.tags["candidate"] == "3"
    assert [a.path for a in client.list_artifacts(audit[0].info.run_id)] == ["gate_report.json"]

    assert calibflow(["status", "--model", MODEL, "--repo", str(repo)]) == 0
    table = capsys.readouterr().out
    assert "@champion" in table and "@previous-champion" in table and "temperature" in table

    # The promoted version's page says so, with the gates this promotion loosened; the old one's too.
    three, one = client.get_model_version(MODEL, "3"), client.get_model_version(MODEL, "1")
    assert three.tags["verdict/promoted"] == "yes: @champion" and three.tags["verdict/absolute"] == "passed"
    assert three.tags["verdict/champion"] == "passed" and three.tags["gate/against"] == "version 1"
    assert "max_ece_increase 0.01 -> 0.9 (loosened)" in three.tags["promotion/gates_set"]
    assert "min_accuracy 0.5 -> 0.1 (loosened)" in three.tags["promotion/gates_set"]
    first = three.description.splitlines()[0]
    assert first.startswith("PROMOTED · absolute gates passed · against champion version 1: passed · promoted yes")
    assert "NOT PROMOTED" not in three.description and "max_ece_increase 0.01 -> 0.9 (loosened)" in three.description
    assert "GITHUB_RUN_ID=4242" in three.description
    assert one.tags["verdict/promoted"] == "no: replaced as @champion by version 3"
    assert one.description.startswith("REPLACED · ") and "PROMOTED ·" not in one.description
    assert audit[0].data.tags["gates_set"] == three.tags["promotion/gates_set"]

    assert calibflow(["rollback", "--model", MODEL, "--repo", str(repo)]) == 0
    assert aliases(repo) == {"champion": "1"}
    three, one = client.get_model_version(MODEL, "3"), client.get_model_version(MODEL, "1")
    assert one.tags["verdict/promoted"] == "yes: @champion" and one.description.startswith("PROMOTED · ")
    assert three.tags["verdict/promoted"] == "no: replaced as @champion by version 1"
    assert three.description.startswith("REPLACED · ")
    assert calibflow(["rollback", "--model", MODEL, "--repo", str(repo)]) == 2  # v1 replaced nobody


def test_failed_gate_does_not_promote_unless_forced_with_a_reason(repo, capsys):
    strict = ["--set", "gates.max_ece=0.0"]
    assert calibflow(["promote", "--model", MODEL, "--candidate", "2", "--repo", str(repo), *strict]) == 1
    assert aliases(repo)["champion"] == "1"
    assert calibflow(["promote", "--model", MODEL, "--candidate", "2", "--repo", str(repo), *strict, "--force"]) == 2
    assert "--reason" in capsys.readouterr().err
    assert (
        calibflow(
            [
                "promote",
                "--model",
                MODEL,
                "--candidate",
                "2",
                "--repo",
                str(repo),
                *strict,
                "--force",
                "--reason",
                "hotfix for a mislabelled class",
            ]
        )
        == 0
    )
    assert aliases(repo)["champion"] == "2"
    assert (
        MlflowClient().get_model_version(MODEL, "2").tags["promotion_forced_reason"] == "hotfix for a mislabelled class"
    )


def test_two_racing_promotions_leave_one_champion_and_a_clear_failure(repo):
    commands = [
        [
            CALIBFLOW,
            "promote",
            "--model",
            MODEL,
            "--candidate",
            candidate,
            "--against",
            "1",
            "--repo",
            str(repo),
            *LOOSE,
        ]
        for candidate in ("2", "3")
    ]
    processes = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in processes]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "another promotion" in loser
    final = aliases(repo)
    assert final["champion"] in {"2", "3"} and final["previous-champion"] == "1"
    assert MlflowClient().search_registered_models(f"name='{MODEL}{registration.LOCK_SUFFIX}'") == []  # lock released


def test_registry_error_midway_leaves_the_aliases_as_they_were(repo, monkeypatch):
    from calibflow.lifecycle import promotion

    before = aliases(repo)
    calls = []
    real = MlflowClient.set_registered_model_alias

    def fail_on_second_write(self, name, alias, version):
        calls.append(alias)
        if len(calls) == 2:
            raise ConnectionError("registry went away")
        return real(self, name, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", fail_on_second_write)
    with pytest.raises(ConnectionError):
        promotion.promote(MODEL, "3", "1", report_path=None)
    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", real)
    assert len(calls) >= 2
    assert aliases(repo) == before
    assert MlflowClient().search_registered_models(f"name='{MODEL}{registration.LOCK_SUFFIX}'") == []


def test_served_model_class_satisfies_mlflow_type_hint_check() -> None:
    # MLflow 3 warns at class definition when PythonModel.predict has no input type hint; the hint
    # (np.ndarray) must not make it infer a signature either: the logged one is built from a real
    # prediction. A fresh interpreter, because the warning fires once, at import.
    result = subprocess.run(
        [sys.executable, "-W", "always", "-c", "import calibflow.tracking.registration"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "Add type hints to the `predict` method" not in result.stderr, result.stderr


def versions(repo: Path) -> list[str]:
    store.configure_tracking(repo)
    return [r.version for r in registration.list_versions(MODEL)]


def commit_data(repo: Path, message: str) -> None:
    dvc("add", "-q", "data/tiny", cwd=repo)
    run("git", "add", "-A", cwd=repo)
    run("git", "commit", "-qm", message, cwd=repo)


@pytest.mark.parametrize(
    "change, named",
    [
        ("rename", ["only the candidate: ['zero']", "only the champion: ['0']"]),  # mv data/tiny/0 data/tiny/zero
        ("drop", ["only the champion: ['4']"]),  # 4 classes, not 5
    ],
)
def test_run_on_data_of_other_classes_is_refused_before_any_comparison(repo, capsys, change, named):
    tiny = repo / "data" / "tiny"
    if change == "rename":
        (tiny / "0").rename(tiny / "zero")
    else:
        shutil.rmtree(tiny / "4")
    commit_data(repo, f"{change} a class")
    before, registered = aliases(repo), versions(repo)

    # Compared by position, the renamed data passed both relative gates and replaced @champion;
    # with a class fewer the run crashed on labels out of range.
    assert calibflow(["run", "--repo", str(repo), *QUICK, *LOOSE, "--set", "promotion.auto=true"]) == 2
    err = capsys.readouterr().err
    assert "not comparable: classes differ" in err and all(name in err for name in named), err[-3000:]
    assert aliases(repo) == before and versions(repo) == registered


def test_gate_and_promote_refuse_a_registered_candidate_of_other_classes(repo, capsys):
    tiny = repo / "data" / "tiny"
    (tiny / "0").rename(tiny / "zero")
    commit_data(repo, "rename class 0")
    client = MlflowClient()
    client.delete_registered_model_alias(MODEL, "champion")  # no champion: nothing to compare, it registers
    assert calibflow(["run", "--repo", str(repo), *QUICK, *LOOSE]) == 0
    client.set_registered_model_alias(MODEL, "champion", "1")
    assert json.loads(client.get_model_version(MODEL, "4").tags[served_model.CLASSES_TAG]) == [
        "1",
        "2",
        "3",
        "4",
        "zero",
    ]
    before = aliases(repo)
    capsys.readouterr()

    assert gate(repo, "--candidate", "4", *LOOSE) == 2
    assert "not comparable: classes differ" in capsys.readouterr().err
    assert calibflow(["promote", "--model", MODEL, "--candidate", "4", "--repo", str(repo), *LOOSE]) == 2
    assert "not comparable: classes differ" in capsys.readouterr().err
    assert aliases(repo) == before


def test_champion_registered_without_a_class_list_is_not_compared(repo, capsys):
    # What a version registered before calibflow recorded classes and digests looks like.
    MlflowClient().delete_model_version_tag(MODEL, "1", served_model.CLASSES_TAG)
    assert gate(repo, "--candidate", "@challenger", *LOOSE) == 2
    err = capsys.readouterr().err
    assert "not comparable" in err and "classes are unknown" in err and "--against" in err
    assert aliases(repo) == {"champion": "1", "challenger": "3"}


def test_promoting_the_champion_says_it_already_is_the_champion(repo, capsys):
    assert calibflow(["promote", "--model", MODEL, "--candidate", "@champion", "--repo", str(repo), *LOOSE]) == 2
    err = capsys.readouterr().err
    assert "version 1 already is @champion" in err and "another promotion" not in err
    assert aliases(repo) == {"champion": "1", "challenger": "3"}


def test_evaluate_exits_1_when_the_recomputed_metrics_differ_from_the_logged(repo, capsys):
    MlflowClient().set_model_version_tag(MODEL, "1", "test/calibrated/ece", "0.5")  # not what version 1 measures
    assert calibflow(["evaluate", "--model", f"models:/{MODEL}/1", "--repo", str(repo)]) == 1
    assert "differ from the logged ones" in capsys.readouterr().err
