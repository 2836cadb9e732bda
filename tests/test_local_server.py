"""flows/local_server.py: the long-lived local Prefect server `make run` starts once per checkout.

Every test runs in a temporary checkout with HOME and PREFECT_HOME of its own (never the user's
~/.prefect) and 127.0.0.1 ports; the commands run as `make` runs them, `python -m
flows.local_server` in the checkout.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flows import local_server
from tests.test_servers import free_port

REPO = Path(__file__).resolve().parents[1]
STATE = Path(".calibflow") / "prefect-server"


def checkout(tmp_path: Path, name: str = "checkout") -> Path:
    """A temporary checkout whose recorded port is a free one (so no test starts a server on 4200)."""
    root = tmp_path / name
    (root / STATE).mkdir(parents=True)
    (root / STATE / "port").write_text(f"{free_port()}\n")
    return root


def environment(root: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(HOME=str(root), PYTHONPATH=str(REPO), **extra)
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false")  # a faster start
    return env


def command(root: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.local_server", *args],
        cwd=root,
        env=env or environment(root),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen, timeout_s: float = 120) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout_s)
    return process.returncode, out, err


def wait_gone(url: str, pid: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while (local_server.healthy(url) or local_server._start_time(pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not local_server.healthy(url) and local_server._start_time(pid) is None


class _Healthy(http.server.BaseHTTPRequestHandler):
    """A healthy Prefect API, as far as a health check can tell: another checkout's server."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"true")

    def log_message(self, *args):
        pass


@pytest.mark.e2e
def test_concurrent_ensures_start_one_server_of_this_checkout_the_pid_file_names_and_stop_ends_it(tmp_path):
    foreign = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Healthy)
    threading.Thread(target=foreign.serve_forever, daemon=True).start()
    foreign_url = f"http://127.0.0.1:{foreign.server_address[1]}/api"
    root = checkout(tmp_path)
    (root / STATE / "port").write_text(f"{foreign.server_address[1]}\n")  # recorded while it was free
    try:
        assert local_server.healthy(foreign_url)
        first, second = command(root, "ensure"), command(root, "ensure")
        (code_1, url_1, err_1), (code_2, url_2, err_2) = finish(first), finish(second)
    finally:
        foreign.shutdown()
    url = url_1.strip()
    try:
        assert (code_1, code_2) == (0, 0), (err_1, err_2)
        log = (root / STATE / "server.log").read_text(errors="replace")
        assert log.count("Configure Prefect to communicate with the server") == 1  # one server started
        assert url == url_2.strip() and url.startswith("http://127.0.0.1:"), (url_1, url_2, err_1, err_2)
        assert url != foreign_url  # healthy, but not the server this checkout started
        assert url == local_server.api_url(int((root / STATE / "port").read_text()))
        server = local_server.running(root / STATE)  # the pid file's process: alive, ours, on the port
        assert server is not None and server.url == url
        assert server.home == str((root / ".calibflow" / "prefect").resolve())  # the checkout's own home
        assert finish(command(root, "ensure"))[1].strip() == url  # reused: nothing started
        assert local_server.read_record(root / STATE)[0] == server.pid
    finally:
        code, out, err = finish(command(root, "stop"))
    assert code == 0 and out.strip() == "stopped", err
    wait_gone(url, server.pid)
    assert finish(command(root, "stop"))[1].strip() == "no server started by this checkout is running"


@pytest.mark.parametrize(
    "identity",
    [
        None,  # a bare pid, as a pid file written by hand or by another tool
        {"started": "1", "port": 1, "home": "/nowhere", "argv": ["server", "start"]},  # a pid reused since
        "started-right-but-not-prefect",  # the right process start time, but not a Prefect server
    ],
)
def test_stop_does_not_signal_a_process_the_pid_file_names_that_this_checkout_did_not_start(tmp_path, identity):
    root = checkout(tmp_path)
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)  # its own group, as a server's
    try:
        if identity == "started-right-but-not-prefect":
            identity = {
                "started": local_server._start_time(sleeper.pid),
                "port": 1,
                "home": str(root / ".calibflow" / "prefect"),
                "argv": ["server", "start"],
            }
        pid_file = root / STATE / "server.pid"
        pid_file.write_text(f"{sleeper.pid}\n" + (f"{json.dumps(identity)}\n" if identity else ""))
        code, out, err = finish(command(root, "stop"), timeout_s=30)
        time.sleep(0.2)
        assert sleeper.poll() is None, "stop signalled a process this checkout did not start"
        assert code != 0 and "not signalled" in err, (out, err)
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("home_set_by_user", [False, True])
def test_a_corrupted_database_is_named_in_one_line_at_once(tmp_path, home_set_by_user):
    root = checkout(tmp_path)
    home = tmp_path / "user-home" if home_set_by_user else root / ".calibflow" / "prefect"
    home.mkdir(parents=True)
    database = home / "prefect.db"
    database.write_bytes(os.urandom(64 * 1024))
    env = environment(root, **({"PREFECT_HOME": str(home)} if home_set_by_user else {}))
    began = time.monotonic()
    process = command(root, "ensure", env=env)
    try:
        code, out, err = finish(process, timeout_s=60)
    finally:
        if process.poll() is None:
            process.kill()
    elapsed = time.monotonic() - began
    assert code != 0 and out == "", (out, err)
    assert len(err.strip().splitlines()) == 1 and str(database.resolve()) in err and "mv " in err, err
    assert elapsed < 20, f"{elapsed:.0f} s"
    assert not (root / STATE / "server.pid").exists()


def test_two_checkouts_have_their_own_prefect_home_and_port(tmp_path):
    first, second = checkout(tmp_path, "first"), checkout(tmp_path, "second")
    assert local_server.prefect_home(first, {}) == (first / ".calibflow" / "prefect").resolve()
    assert local_server.prefect_home(first, {}) != local_server.prefect_home(second, {})
    assert local_server.prefect_home(first, {"PREFECT_HOME": str(tmp_path / "mine")}) == tmp_path / "mine"
    with socket.socket() as held:  # the first checkout's server, listening on its recorded port
        held.bind(("127.0.0.1", local_server.choose_port(first / STATE)))
        held.listen()
        taken = held.getsockname()[1]
        (second / STATE / "port").write_text(f"{taken}\n")  # recorded when that port was free
        port = local_server.choose_port(second / STATE)
        assert port != taken and int((second / STATE / "port").read_text()) == port
        assert local_server.choose_port(second / STATE) == port  # recorded: the same one next time


def test_a_port_taken_by_something_else_is_reported_with_the_log(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        url = f"http://127.0.0.1:{taken.getsockname()[1]}/api"
        with pytest.raises((RuntimeError, TimeoutError), match="server.log"):
            local_server.ensure_at(url, checkout(tmp_path), timeout_s=60)


def test_a_remote_url_is_not_started_here(tmp_path):
    with pytest.raises(ValueError, match="not a local server"):
        local_server.ensure_at("http://prefect.example.invalid:4200/api", tmp_path, timeout_s=1)
