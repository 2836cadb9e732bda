"""A hung server: a tracking URI or PREFECT_API_URL pointing at a socket that accepts connections
and never answers. `calibflow status` and `calibflow run` end with exit 2 in under 30 s, with one
line naming the address they waited on (they took 90 s and 107 s under MLflow's and Prefect's own
retry defaults). The checks themselves (calibflow.tracking.store.check_answers,
flows.local_server.check_api_answers) are tested in-process first, against the same kind of
socket and a refused port.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from calibflow.environment import STORE_PATIENCE_DEFAULTS
from calibflow.errors import PrefectApiUnreachable, StoreUnreachable
from tests.test_servers import free_port

BIN = Path(sys.executable).parent


class SilentServer:
    """A loopback socket that accepts every connection and never writes a byte."""

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(64)
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:  # closed
                return
            self.accepted.append(connection)  # held open, never answered

    def close(self) -> None:
        self.socket.close()
        for connection in self.accepted:
            connection.close()


@pytest.fixture
def silent():
    server = SilentServer()
    try:
        yield server
    finally:
        server.close()


def test_a_tracking_server_that_never_answers_is_named_after_one_request_timeout(silent, monkeypatch):
    import mlflow

    from calibflow.tracking import store

    monkeypatch.setenv("CALIBFLOW_FIRST_ANSWER_TIMEOUT", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")  # what each request may wait, not the first answer
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # retries the probe must not make
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(silent.url)
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnreachable) as raised:
            store.client()
        waited = time.monotonic() - started
    finally:
        mlflow.set_tracking_uri(previous)
    assert waited < 2.5, waited  # one timeout, not three
    message = str(raised.value)
    assert silent.url in message and "did not answer" in message and "CALIBFLOW_FIRST_ANSWER_TIMEOUT=1" in message
    assert len(silent.accepted) == 1  # asked once


def test_a_refused_tracking_server_is_left_to_the_request_that_retries_and_reports_it(monkeypatch):
    import mlflow

    from calibflow.tracking import store

    monkeypatch.setenv("CALIBFLOW_FIRST_ANSWER_TIMEOUT", "1")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"http://127.0.0.1:{free_port()}")  # nothing listens
    try:
        store.check_answers()  # not silence: no verdict here
    finally:
        mlflow.set_tracking_uri(previous)


def test_a_prefect_api_that_never_answers_or_refuses_is_named_with_its_address(silent):
    from flows.local_server import check_api_answers

    api = f"{silent.url}/api"
    started = time.monotonic()
    with pytest.raises(PrefectApiUnreachable) as raised:
        check_api_answers(api, timeout_s=1)
    assert time.monotonic() - started < 2.5
    assert api in str(raised.value) and "did not answer in" in str(raised.value)

    refused = f"http://127.0.0.1:{free_port()}/api"
    with pytest.raises(PrefectApiUnreachable) as raised:
        check_api_answers(refused, timeout_s=1)
    assert refused in str(raised.value) and "could not be reached" in str(raised.value)


def hung_env(**extra: str) -> dict[str, str]:
    """The environment a user has: calibflow's own patience defaults, no servers configured but `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    for name in STORE_PATIENCE_DEFAULTS:
        env.pop(name, None)
    return {**env, **extra}


@pytest.mark.e2e
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "command, server",
    [
        (["status", "--model", "tiny-digits"], "MLFLOW_TRACKING_URI"),
        (["run", "--force"], "MLFLOW_TRACKING_URI"),
        (["run", "--force"], "PREFECT_API_URL"),
    ],
    ids=["status-hung-mlflow", "run-hung-mlflow", "run-hung-prefect"],
)
def test_a_hung_server_ends_the_command_with_exit_2_in_under_30_s_naming_its_address(
    tiny_repo, silent, tmp_path, command, server
):
    address = silent.url + ("/api" if server == "PREFECT_API_URL" else "")
    started = time.monotonic()
    result = subprocess.run(
        [str(BIN / "calibflow"), *command, "--repo", str(tiny_repo)],
        env=hung_env(**{server: address}),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    took = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-3000:]
    assert took < 30, (took, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    [said] = [line for line in result.stderr.splitlines() if line.startswith(f"calibflow {command[0]}:")]
    assert address in said and "did not answer" in said, said
    assert not (tiny_repo / ".calibflow" / "runs").exists() or not any((tiny_repo / ".calibflow" / "runs").iterdir())
    print(f"\n{' '.join(command)} with {server} hung: exit 2 after {took:.1f} s; {said}")
