"""flows/local_server.py: the long-lived local Prefect server `make run` starts once and reuses."""

from __future__ import annotations

import socket
import time

import pytest

from flows import local_server
from tests.test_servers import free_port


@pytest.mark.e2e
def test_ensure_starts_one_server_reuses_it_and_stop_ends_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))  # its own database
    url = f"http://127.0.0.1:{free_port()}/api"
    state = tmp_path / "state"
    assert not local_server.healthy(url)
    try:
        assert local_server.ensure(url, state) == url and local_server.healthy(url)
        pid = (state / "server.pid").read_text()
        assert local_server.ensure(url, state) == url  # answered by the running one: nothing started
        assert (state / "server.pid").read_text() == pid
    finally:
        assert local_server.stop(state)
    deadline = time.monotonic() + 30
    while local_server.healthy(url) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not local_server.healthy(url) and not local_server.stop(state)


def test_a_port_taken_by_something_else_is_reported_with_the_log(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        url = f"http://127.0.0.1:{taken.getsockname()[1]}/api"
        with pytest.raises((RuntimeError, TimeoutError), match="server.log"):
            local_server.ensure(url, tmp_path / "state", timeout_s=60)


def test_a_remote_url_is_not_started_here(tmp_path):
    with pytest.raises(ValueError, match="not a local server"):
        local_server.ensure("http://prefect.example.invalid:4200/api", tmp_path, timeout_s=1)
