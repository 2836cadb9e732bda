"""The tracking store's credentials never reach a log line, an error message, a description or an
artifact: store.display_uri masks a URI, store.redact any text that may quote one."""

from __future__ import annotations

import json
import argparse
import logging
import os
import sqlite3
import subprocess
import sys

import pytest
from mlflow.exceptions import MlflowException

from calibflow.errors import StoreUnreachable
from calibflow.tracking import store
from cli import main as cli
from tasks import QuietRefusals
from tests.conftest import REPO

SECRET = "s3cret-pa55"
UNREACHABLE = f"http://calibflow:{SECRET}@127.0.0.1:9"  # nothing listens on the discard port
SHOWN = "http://calibflow:***@127.0.0.1:9"


@pytest.mark.parametrize(
    "uri, shown",
    [
        ("http://user:s3cret@127.0.0.1:5001", "http://user:***@127.0.0.1:5001"),
        ("https://user:s3cret@mlflow.example.com/base/path?x=1", "https://user:***@mlflow.example.com/base/path?x=1"),
        ("http://user:p@ss:w0rd@host:5000", "http://user:***@host:5000"),  # a raw @ and : in the password
        ("http://user:s3cret@[::1]:5000/", "http://user:***@[::1]:5000/"),
        ("http://[2001:db8::1]:5000", "http://[2001:db8::1]:5000"),
        ("https://mlflow.example.com/?token=abc123&experiment=7", "https://mlflow.example.com/?token=***&experiment=7"),
        ("https://host/api?experiment=7&access_token=abc.def", "https://host/api?experiment=7&access_token=***"),
        (
            "https://host/a?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=ff00",
            "https://host/a?X-Amz-Credential=***&X-Amz-Signature=***",
        ),
        ("postgresql://mlflow:hunter22@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
    ],
)
def test_display_uri_masks_a_password_and_a_token(uri, shown):
    assert store.display_uri(uri) == shown


@pytest.mark.parametrize(
    "uri",
    [
        "http://127.0.0.1:5000",
        "http://user@127.0.0.1:5000",  # a user name alone says who, not how to get in
        "sqlite:////tmp/repo/mlflow.db",
        "file:///tmp/repo/mlruns",
        "databricks",
        "https://host/path?experiment=7&token=",
    ],
)
def test_display_uri_leaves_a_uri_without_credentials_unchanged(uri):
    assert store.display_uri(uri) == uri


def test_display_uri_is_idempotent():
    assert store.display_uri(store.display_uri(UNREACHABLE)) == SHOWN


def test_redact_masks_every_url_in_a_text_and_the_configured_password_wherever_it_appears(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://calibflow:s3cret%40pa55@127.0.0.1:9")
    text = (
        "API request to http://calibflow:s3cret%40pa55@127.0.0.1:9/api/2.0/x failed; "
        "auth for calibflow with s3cret@pa55 refused; see https://other:hunter22@example.com/?token=t0k3n"
    )
    shown = store.redact(text)
    assert "s3cret" not in shown and "hunter22" not in shown and "t0k3n" not in shown
    assert "http://calibflow:***@127.0.0.1:9/api/2.0/x" in shown and "https://other:***@example.com/?token=***" in shown


def test_configure_tracking_returns_the_uri_masked_and_keeps_the_real_one_for_mlflow(monkeypatch, tmp_path):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", UNREACHABLE)
    try:
        assert store.configure_tracking(tmp_path) == SHOWN
        assert mlflow.get_tracking_uri() == UNREACHABLE
        assert store.tracking_uri_for_display() == SHOWN
    finally:
        monkeypatch.delenv("MLFLOW_TRACKING_URI")
        store.configure_tracking(tmp_path)


def test_an_mlflow_error_leaves_store_wait_with_its_url_masked(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", UNREACHABLE)
    with pytest.raises(MlflowException) as raised, store.store_wait():
        raise MlflowException(f"API request to {UNREACHABLE}/api/2.0/mlflow/runs/get failed with error code 401")
    assert SECRET not in str(raised.value) and SECRET not in raised.value.message
    assert SHOWN in str(raised.value)


def test_the_prefect_log_filter_masks_the_message_and_the_traceback(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", UNREACHABLE)
    try:
        raise RuntimeError(f"API request to {UNREACHABLE}/api/2.0/x failed")
    except RuntimeError:
        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "prefect.task_runs", logging.ERROR, __file__, 1, "store at %s failed", (UNREACHABLE,), exc_info
    )
    assert QuietRefusals().filter(record)
    formatted = logging.Formatter().format(record)
    assert SECRET not in formatted
    assert f"store at {SHOWN} failed" in formatted and f"{SHOWN}/api/2.0/x" in formatted


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError(f"API request to {UNREACHABLE}/api failed"),  # unexpected: a traceback and a line
        StoreUnreachable(f"the MLflow tracking server at {UNREACHABLE} did not answer"),
        ValueError(f"{UNREACHABLE} is not a registry URI"),  # a refusal
    ],
    ids=["unexpected", "store-failed", "refused"],
)
def test_the_cli_says_an_error_with_the_url_masked(error, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", UNREACHABLE)

    def fails(args):
        raise error

    command = cli.Command(fails, input_errors=(ValueError,))
    code = cli.dispatch(command, argparse.Namespace(command="status"))
    said = capsys.readouterr()
    assert code == 2
    assert SECRET not in said.out + said.err
    assert SHOWN in said.err


@pytest.mark.e2e
def test_a_run_against_a_store_with_credentials_shows_them_nowhere(tiny_repo, tmp_path):
    """`calibflow run` against a tracking server that does not answer, whose URI holds a password:
    not on stdout or stderr, not in the Prefect server's logs, states or stored results."""
    prefect_home = tmp_path / "prefect-home"  # its own: the logs this run sent, and no others
    prefect_home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_REGISTRY_URI")}
    env.update(
        MLFLOW_TRACKING_URI=UNREACHABLE,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
        MLFLOW_HTTP_REQUEST_TIMEOUT="2",
        PREFECT_HOME=str(prefect_home),
        PREFECT_LOGGING_LEVEL="INFO",
        PYTHONPATH=str(REPO),
    )
    finished = subprocess.run(
        [sys.executable, "-m", "cli", "run", "--repo", str(tiny_repo)],
        capture_output=True,
        text=True,
        cwd=tiny_repo,
        env=env,
        timeout=600,
    )
    shown = finished.stdout + finished.stderr
    assert finished.returncode == 2, shown
    assert SECRET not in shown
    assert "store failed" in shown and SHOWN in shown  # the error is said, with the URI masked

    database = prefect_home / "prefect.db"
    with sqlite3.connect(database) as db:
        logged = [message for (message,) in db.execute("SELECT message FROM log")]
        states = [
            m for (m,) in db.execute("SELECT message FROM flow_run_state UNION SELECT message FROM task_run_state")
        ]
    assert any(SHOWN in message for message in logged), logged  # the flow run's failure was logged
    assert not [m for m in logged + states if m and SECRET in m]
    for path in prefect_home.rglob("*"):  # the database, its write-ahead log, stored results
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_a_refused_runs_json_masks_credentials_in_its_refusal_line_and_tracking_uri():
    """`calibflow run --json` writes a refused run's result, a CI artifact: an MLflow or git error it
    quotes may carry a URL with its password."""
    from cli.training import _without_credentials

    shown = _without_credentials(
        {
            "refused": "RegistrationLeftBehind: API request to https://ci:s3cret-token@mlflow.example/api/2.0 failed",
            "tracking_uri": "https://ci:s3cret-token@mlflow.example",
            "registered": None,
        }
    )
    assert "s3cret-token" not in json.dumps(shown)
    assert (
        shown["refused"].startswith("RegistrationLeftBehind: API request to https://") and shown["registered"] is None
    )
