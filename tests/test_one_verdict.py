"""One verdict everywhere (issue 23): the real flow on tiny data, in the three outcomes a CD job
meets, and a refused run. For each, the run's tags, its description, reports/metrics.json and the
registered version's tags and description state the same three parts: the absolute gates, the
gates against the champion, and whether the version is @champion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from calibflow import names
from calibflow.tracking import store
from cli.main import main as calibflow
from tests.conftest import dvc

pytestmark = pytest.mark.e2e
MODEL = "tiny-digits"
VERDICT = ("verdict/absolute", "verdict/champion", "verdict/promoted", "verdict/failed")
# Relative gates that two different seeds never pass (both bounds exceed 0) or always pass.
STRICT = ["--set", "promotion.auto=true", "--set", "gates.max_ece_increase=0", "--set", "gates.max_accuracy_drop=0"]
LOOSE = ["--set", "promotion.auto=true", "--set", "gates.max_ece_increase=0.9", "--set", "gates.max_accuracy_drop=0.9"]


def latest_run(client: MlflowClient):
    experiment = client.get_experiment_by_name("tiny").experiment_id
    return client.search_runs([experiment], order_by=["start_time DESC"], max_results=1)[0]


def verdict_of(tags: dict[str, str]) -> dict[str, str]:
    return {tag: tags[tag] for tag in VERDICT}


def metrics_report(repo: Path) -> dict:
    return json.loads((repo / "reports" / "metrics.json").read_text())


def assert_one_verdict(client: MlflowClient, repo: Path, expected: dict[str, str], version: str | None):
    """The run's tags hold `expected`; its description's first line, the report and (when it
    registered one) the version's tags and description say the same."""
    run = latest_run(client)
    tags = run.data.tags
    assert {tag: tags[tag] for tag in expected} == expected
    text = names.verdict_text(tags)
    first = tags["mlflow.note.content"].splitlines()[0]
    assert text in first, (text, first)
    if version is None:
        return run
    assert metrics_report(repo)["verdict"] == {tag.split("/")[1]: tags[tag] for tag in VERDICT}
    registered = client.get_model_version(MODEL, version)
    assert verdict_of(registered.tags) == verdict_of(tags)
    assert text in registered.description and "NOT PROMOTABLE" not in registered.description
    return run


def test_run_tags_description_report_and_version_state_one_verdict(tiny_repo, capsys):
    repo = str(tiny_repo)
    # 1. The first version: no champion to compare with, registered as @champion.
    assert calibflow(["run", "--repo", repo]) == 0
    store.configure_tracking(tiny_repo)
    client = MlflowClient()
    first = {
        "verdict/absolute": "passed",
        "verdict/champion": "no champion",
        "verdict/promoted": "yes: @champion",
        "verdict/failed": "none",
    }
    run = assert_one_verdict(client, tiny_repo, first, "1")
    assert run.data.tags["mlflow.note.content"].startswith("PROMOTED · ")

    # 2. The absolute gates pass, those against the champion fail: @challenger, and every record says so.
    assert calibflow(["run", "--repo", repo, "--set", "seed=1", *STRICT]) == 0
    run = assert_one_verdict(
        client,
        tiny_repo,
        {"verdict/absolute": "passed", "verdict/champion": "failed", "verdict/promoted": "no: @challenger"},
        "2",
    )
    failed = run.data.tags["verdict/failed"]
    assert "max_ece_increase " in failed and " > 0" in failed and "<=" not in failed  # "0.0143 > 0", never "<="
    assert run.data.tags["mlflow.note.content"].startswith("NOT PROMOTED · absolute gates passed · ")
    assert run.data.tags["gate/against"] == "version 1" and "gate/verdict" not in run.data.tags
    assert metrics_report(tiny_repo)["verdict"]["promoted"] == "no: @challenger"

    # 3. Every gate passes with promotion.auto: @champion; the version it replaced says so too.
    assert calibflow(["run", "--repo", repo, "--set", "seed=2", *LOOSE]) == 0
    expected = {"verdict/absolute": "passed", "verdict/champion": "passed", "verdict/promoted": "yes: @champion"}
    assert_one_verdict(client, tiny_repo, expected, "3")
    replaced = client.get_model_version(MODEL, "1")
    assert replaced.tags["verdict/promoted"] == "no: replaced as @champion by version 3"
    assert replaced.description.startswith("REPLACED · ")
    good_report = (tiny_repo / "reports" / "metrics.json").read_text()

    # 4. The absolute gates fail: nothing registered, the run says why, the good report stays.
    assert calibflow(["run", "--repo", repo, "--set", "seed=3", "--set", "gates.min_accuracy=0.95"]) == 1
    run = assert_one_verdict(
        client,
        tiny_repo,
        {"verdict/absolute": "failed", "verdict/promoted": "no: not registered"},
        None,
    )
    assert run.data.tags["mlflow.note.content"].startswith("REJECTED · absolute gates failed · ")
    assert "min_accuracy " in run.data.tags["verdict/failed"] and " < 0.95" in run.data.tags["verdict/failed"]
    assert sorted(str(v.version) for v in client.search_model_versions(f"name='{MODEL}'")) == ["1", "2", "3"]
    assert (tiny_repo / "reports" / "metrics.json").read_text() == good_report

    # The report is small: `dvc metrics show` prints a row a reader can follow, no giant string.
    report = metrics_report(tiny_repo)
    leaves = [value for section in report.values() for value in _leaves(section)]
    assert len(leaves) <= 30 and all(len(str(value)) <= 80 for value in leaves)
    shown = dvc("metrics", "show", cwd=tiny_repo).stdout
    assert "verdict.promoted" in shown and "yes: @champion" in shown
    assert max(len(line) for line in shown.splitlines()) < 1000


def _leaves(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _leaves(value)
    else:
        yield node


def test_a_refused_run_says_why_in_its_description(tiny_repo, capsys):
    # Refused after the run started (the data has 5 classes), before training.
    assert calibflow(["run", "--repo", str(tiny_repo), "--set", "calibration.method=platt"]) == 2
    store.configure_tracking(tiny_repo)
    client = MlflowClient()
    run = latest_run(client)
    first = run.data.tags["mlflow.note.content"].splitlines()[0]
    assert first.startswith("NOT REGISTERED · failed (ConfigError): calibration.method = platt calibrates two-class")
    assert "choose one of" in first  # the fix, as the command line said it
