"""A long-lived local Prefect server that `make` starts once and every later command reuses.

Without PREFECT_API_URL, each `calibflow run` starts Prefect's temporary API in a subprocess,
waits for it, and stops it at the end: about 5 s of a run on this kind of machine (issue 16).
Prefect's documented alternative is a server that outlives the command (`prefect server start`,
PREFECT_API_URL pointing at it); its flow runs then stay browsable in the Prefect UI too. `make
run` calls `python -m flows.local_server ensure`: it answers the URL of the server running on
127.0.0.1:4200 when one is healthy, or starts one in the background (its own session, so it
survives make; log and pid under .calibflow/), waits for it to be healthy, and answers its URL.
When none can be started (the port taken by something else), it says so on stderr and answers
nothing: the run then uses the temporary API as before, slower but correct.

    python -m flows.local_server ensure|status|stop

This module imports no Prefect: a health check is one HTTP GET, and the server is Prefect's own
CLI in a child process.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_API_URL = "http://127.0.0.1:4200/api"
STATE_DIR = Path(".calibflow") / "prefect-server"
START_TIMEOUT_S = 90.0  # a cold start on a busy 2-core machine takes 10-20 s (database migrations)


def healthy(api_url: str, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout_s) as answer:
            return answer.status == 200 and answer.read().strip() == b"true"
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _prefect_command() -> list[str]:
    beside = Path(sys.executable).with_name("prefect")  # the venv's own CLI, whatever PATH says
    found = str(beside) if beside.exists() else shutil.which("prefect")
    if not found:
        raise FileNotFoundError("the `prefect` command is not installed in this environment: run `make setup`")
    return [found]


def ensure(api_url: str = DEFAULT_API_URL, state_dir: Path = STATE_DIR, timeout_s: float = START_TIMEOUT_S) -> str:
    """The URL of a healthy local server at api_url, started in the background when none answers."""
    if healthy(api_url):
        return api_url
    parts = urlsplit(api_url)
    if parts.hostname not in ("127.0.0.1", "localhost") or not parts.port:
        raise ValueError(
            f"{api_url} is not a local server with an explicit port: start it yourself, or unset "
            f"PREFECT_API_URL to use the local default {DEFAULT_API_URL}"
        )
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir / "server.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [*_prefect_command(), "server", "start", "--host", parts.hostname, "--port", str(parts.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # its own session: Ctrl-C in make's terminal does not stop it
    (state_dir / "server.pid").write_text(f"{process.pid}\n")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if healthy(api_url):
            return api_url
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(
                f"the Prefect server on port {parts.port} exited with code {process.returncode} (is "
                f"the port taken?): {' | '.join(tail)}; see {log_path}"
            )
        time.sleep(0.25)
    process.terminate()
    raise TimeoutError(
        f"the Prefect server on port {parts.port} was not healthy after {timeout_s:.0f} s; see {log_path}"
    )


def stop(state_dir: Path = STATE_DIR) -> bool:
    """Stop the server this module started (its pid file); False when there is none."""
    pid_file = state_dir / "server.pid"
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text().strip())
    pid_file.unlink()
    try:
        os.killpg(pid, signal.SIGTERM)  # the server and the workers it spawned
    except ProcessLookupError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else "status"
    api_url = os.environ.get("PREFECT_API_URL") or DEFAULT_API_URL
    if command == "ensure":
        try:
            print(ensure(api_url))
        except (OSError, RuntimeError, TimeoutError, ValueError) as error:
            # Not fatal: without a server, calibflow runs on Prefect's temporary API.
            print(f"local Prefect server: {error}; runs use Prefect's temporary API instead", file=sys.stderr)
        return 0
    if command == "status":
        up = healthy(api_url)
        print(f"{api_url}: {'healthy' if up else 'not answering'}")
        return 0 if up else 1
    if command == "stop":
        print("stopped" if stop() else "no server started by calibflow is running")
        return 0
    print("usage: python -m flows.local_server ensure|status|stop", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
