"""A long-lived local Prefect server that `make` starts once per checkout and every later command reuses.

Without PREFECT_API_URL, each `calibflow run` starts Prefect's temporary API in a subprocess,
waits for it, and stops it at the end: about 5 s of a run on this kind of machine (issue 16).
Prefect's documented alternative is a server that outlives the command (`prefect server start`,
PREFECT_API_URL pointing at it); its flow runs then stay browsable in the Prefect UI too. `make
run` calls `python -m flows.local_server ensure`, which answers the URL of this checkout's server,
starting it in the background first when it is not running (its own session, so it survives make).

Each checkout has its own server, so two checkouts never share a database or read each other's
runs:
- its Prefect home is `.calibflow/prefect` (the database `prefect.db` in it) unless you set
  PREFECT_HOME;
- its port is chosen at its first start (4200 when free, else any free port) and recorded in
  `.calibflow/prefect-server/port`; a later start picks another free one when something else
  holds it;
- a server answering on that port is reused only when it is the process this checkout started:
  the pid file (`.calibflow/prefect-server/server.pid`) names it by pid, start time (Linux's
  /proc/PID/stat, field 22: a pid alone may have been reused), command line and Prefect home, and
  that process's session must hold the listening socket. `stop` signals nothing that fails the
  same check.
Concurrent `ensure` calls queue on a lock in the pid file's directory, so exactly one starts the
server and the pid file names it.

A corrupted database is found before the server starts (SQLite's `PRAGMA quick_check`) and
reported in one line naming the file; `ensure` then exits 1, so `make run` stops instead of
falling back to a temporary API on the same file. Any other failure to start (the port taken) is
said on stderr and `ensure` answers nothing: the run then uses the temporary API, slower but
correct. A PREFECT_API_URL you set is used as given (started here only when it is a local URL with
an explicit port and nothing answers).

    python -m flows.local_server ensure|status|stop

This module imports no Prefect: a health check is one HTTP GET, and the server is Prefect's own
CLI in a child process. Identity checks read Linux's /proc; where there is none, a running server
is neither reused nor signalled.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from calibflow.leftovers import command_line, process_id, stat_fields

HOST = "127.0.0.1"
PREFERRED_PORT = 4200  # Prefect's own default, taken by the first checkout that finds it free
STATE_DIR = Path(".calibflow") / "prefect-server"
HOME_DIR = Path(".calibflow") / "prefect"
START_TIMEOUT_S = 90.0  # a cold start on a busy 2-core machine takes 10-20 s (database migrations)
STOP_TIMEOUT_S = 15.0
RUNNING_HEALTH_TIMEOUT_S = 10.0  # a recorded server of ours that answers slower is taken as hung
# What SQLite says of a damaged file, in the server's log when the early check missed it.
CORRUPTION_SIGNS = ("file is not a database", "database disk image is malformed")


class CorruptDatabase(Exception):
    """The server's SQLite database cannot be read: a one-line message naming the file and the fix."""


def healthy(api_url: str, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout_s) as answer:
            return answer.status == 200 and answer.read().strip() == b"true"
    except (urllib.error.URLError, OSError, ValueError):
        return False


def check_api_answers(api_url: str, timeout_s: float) -> None:
    """Ask the Prefect API at `api_url` once for its health, waiting at most `timeout_s`: a server
    that refuses the connection, or accepts it and says nothing in that time (hung, or another
    program on the port), raises PrefectApiUnreachable naming the address, where Prefect's client
    would wait and retry every request. Any HTTP answer, even an error, counts as an answer."""
    from calibflow.errors import PrefectApiUnreachable

    health = f"{api_url.rstrip('/')}/health"
    started = time.monotonic()
    try:
        with urllib.request.urlopen(health, timeout=timeout_s):
            return
    except urllib.error.HTTPError:
        return  # an answer (a proxy's 401, a Cloud workspace's 404): Prefect's client says the rest
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        waited = time.monotonic() - started
        if isinstance(reason, (TimeoutError, socket.timeout)):
            what = f"accepted the connection and did not answer in {waited:.1f} s (CALIBFLOW_FIRST_ANSWER_TIMEOUT={timeout_s:g})"
        else:
            what = f"could not be reached ({reason})"
        raise PrefectApiUnreachable(
            f"the Prefect API at {api_url} (PREFECT_API_URL) {what}: start it (`make prefect-ui`, or `prefect "
            f"server start`), point PREFECT_API_URL at one that runs, or unset it to run on a temporary API"
        ) from None


def _prefect_command() -> list[str]:
    beside = Path(sys.executable).with_name("prefect")  # the venv's own CLI, whatever PATH says
    found = str(beside) if beside.exists() else shutil.which("prefect")
    if not found:
        raise FileNotFoundError("the `prefect` command is not installed in this environment: run `make setup`")
    return [found]


def prefect_home(root: Path, environ: dict[str, str] | None = None) -> Path:
    """The Prefect home of the checkout at `root`: PREFECT_HOME when set, else under the checkout."""
    environ = os.environ if environ is None else environ
    if environ.get("PREFECT_HOME"):
        return Path(environ["PREFECT_HOME"]).expanduser().resolve()
    return (root / HOME_DIR).resolve()


def api_url(port: int) -> str:
    return f"http://{HOST}:{port}/api"


# --- processes and sockets, from /proc ------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """Clock ticks after boot at which `pid` started (field 22); None when it is gone or a zombie."""
    process = process_id(pid)
    return None if process is None else process.started


def _environment(pid: int) -> dict[str, str] | None:
    """The environment `pid` was started with; None when it cannot be read (another user's process)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:
        return None
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def _listening_inodes(port: int) -> set[str]:
    """Inodes of the sockets listening on TCP `port` (any address)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                found.add(fields[9])
    return found


def _port_holders(port: int) -> set[int]:
    """Pids of the processes holding a socket that listens on `port`."""
    inodes = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    holders = set()
    if not inodes:
        return holders
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            links = {os.readlink(fd) for fd in fd_dir.iterdir()}
        except OSError:  # gone, or another user's
            continue
        if links & inodes:
            holders.add(int(fd_dir.parent.name))
    return holders


def _session(pid: int) -> int | None:
    fields = stat_fields(pid)
    return int(fields[3]) if fields is not None else None


# --- the pid file ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """The server a checkout started: what the pid file records."""

    pid: int
    started: str  # /proc/PID/stat field 22
    port: int
    home: str
    argv: list[str]  # the arguments after the `prefect` executable

    @property
    def url(self) -> str:
        return api_url(self.port)


def _pid_file(state_dir: Path) -> Path:
    return state_dir / "server.pid"


def read_record(state_dir: Path) -> tuple[int, Server | None] | None:
    """The pid file: its pid (first line) and, when it has one, the identity recorded with it."""
    try:
        lines = _pid_file(state_dir).read_text().splitlines()
        pid = int(lines[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        fields = json.loads(lines[1])
        return pid, Server(pid=pid, **fields)
    except (IndexError, ValueError, TypeError):
        return pid, None


def _write_record(state_dir: Path, server: Server) -> None:
    fields = asdict(server)
    del fields["pid"]
    partial = _pid_file(state_dir).with_suffix(".tmp")
    partial.write_text(f"{server.pid}\n{json.dumps(fields)}\n")
    partial.replace(_pid_file(state_dir))


def not_ours(pid: int, server: Server | None) -> str | None:
    """Why process `pid` is not the server the pid file recorded (None when it is): it must be
    alive with the recorded start time, command line and Prefect home."""
    if server is None:
        return f"the pid file records no start time for pid {pid}"
    started = _start_time(pid)
    if started is None:
        return f"pid {pid} is not running"
    if started != server.started:
        return f"pid {pid} started at tick {started}, not {server.started}: another process has its pid"
    argv = command_line(pid)
    if argv[-len(server.argv) :] != server.argv or not any(Path(arg).name == "prefect" for arg in argv):
        return f"pid {pid} runs `{' '.join(argv)}`, not `prefect {' '.join(server.argv)}`"
    environment = _environment(pid)
    if environment is None or environment.get("PREFECT_HOME") != server.home:
        return f"pid {pid} does not run with PREFECT_HOME={server.home}"
    return None


def owns_port(server: Server) -> bool:
    """Whether the listening socket on the server's port is held by the server's session."""
    holders = _port_holders(server.port)
    return bool(holders) and all(_session(holder) == server.pid for holder in holders)


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """One `ensure` or `stop` at a time per checkout (the lock is released when the process exits)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(state_dir, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


# --- the database and the port --------------------------------------------------------------------


def check_database(home: Path, environ: dict[str, str] | None = None) -> None:
    """Raise CorruptDatabase when the server's SQLite file exists and cannot be read."""
    environ = os.environ if environ is None else environ
    if environ.get("PREFECT_API_DATABASE_CONNECTION_URL") or environ.get("PREFECT_SERVER_DATABASE_CONNECTION_URL"):
        return  # a database of the user's choosing, checked by its own server
    database = home / "prefect.db"
    if not database.exists():
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5)) as connection:
            answer = connection.execute("PRAGMA quick_check").fetchone()
    except sqlite3.OperationalError as error:
        if "locked" in str(error):
            return  # written by a server that runs; not a sign of damage
        raise CorruptDatabase(_corrupt_message(database, str(error))) from None
    except sqlite3.DatabaseError as error:
        raise CorruptDatabase(_corrupt_message(database, str(error))) from None
    if answer is None or answer[0] != "ok":
        raise CorruptDatabase(_corrupt_message(database, answer[0] if answer else "no answer to quick_check"))


def _corrupt_message(database: Path, why: str) -> str:
    return (
        f"the Prefect database {database} is corrupted ({why}): move it aside (mv {database} "
        f"{database}.corrupt) and run again; a new, empty one is created"
    )


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def choose_port(state_dir: Path) -> int:
    """This checkout's port: the recorded one while it is free; at the first start 4200 when free,
    else (and whenever the recorded one is taken) any free port, recorded for the next start."""
    port_file = state_dir / "port"
    try:
        recorded = int(port_file.read_text().strip())
    except (OSError, ValueError):
        recorded = None
    if recorded is not None and _free(recorded):
        return recorded
    if recorded is None and _free(PREFERRED_PORT):
        port = PREFERRED_PORT
    else:
        with socket.socket() as probe:
            probe.bind((HOST, 0))
            port = probe.getsockname()[1]
    state_dir.mkdir(parents=True, exist_ok=True)
    port_file.write_text(f"{port}\n")
    return port


# --- ensure and stop ------------------------------------------------------------------------------


def running(state_dir: Path, home: Path | None = None) -> Server | None:
    """The server this checkout started when it is running and answers on its port, else None."""
    record = read_record(state_dir)
    if record is None:
        return None
    pid, server = record
    if server is None or not_ours(pid, server) is not None:
        return None
    if home is not None and server.home != str(home):
        return None
    # Ours, alive and on its port: a busy machine may keep its answer past the start loop's 1 s, and
    # taking that for a hung server would stop it and start a second one.
    return server if owns_port(server) and healthy(server.url, timeout_s=RUNNING_HEALTH_TIMEOUT_S) else None


def ensure(
    root: Path = Path("."),
    home: Path | None = None,
    timeout_s: float = START_TIMEOUT_S,
    environ: dict[str, str] | None = None,
) -> str:
    """The URL of this checkout's server, started in the background when it does not run."""
    environ = dict(os.environ if environ is None else environ)
    home = prefect_home(root, environ) if home is None else home.resolve()
    state_dir = root / STATE_DIR
    with _locked(state_dir):
        server = running(state_dir, home)
        if server is not None:
            return server.url
        _discard(state_dir)
        check_database(home, environ)
        port = choose_port(state_dir)
        return _start(state_dir, home, port, timeout_s, environ).url


def ensure_at(url: str, root: Path = Path("."), timeout_s: float = START_TIMEOUT_S) -> str:
    """A PREFECT_API_URL the user set: used as it is when it answers; started here when it is local."""
    if healthy(url):
        return url
    parts = urlsplit(url)
    if parts.hostname not in (HOST, "localhost") or not parts.port:
        raise ValueError(
            f"{url} is not a local server with an explicit port: start it yourself, or unset "
            f"PREFECT_API_URL to use this checkout's own server"
        )
    state_dir = root / STATE_DIR
    home = prefect_home(root)
    with _locked(state_dir):
        if healthy(url):
            return url
        _discard(state_dir)
        check_database(home)
        return _start(state_dir, home, parts.port, timeout_s, dict(os.environ)).url


def _discard(state_dir: Path) -> None:
    """Stop this checkout's recorded server when it is ours (hung, half started, on another home or
    port); a pid file naming anything else is dropped without a signal."""
    with contextlib.suppress(NotOurs):
        _stop_locked(state_dir)


def _start(state_dir: Path, home: Path, port: int, timeout_s: float, environ: dict[str, str]) -> Server:
    home.mkdir(parents=True, exist_ok=True)
    log_path = state_dir / "server.log"
    argv = ["server", "start", "--host", HOST, "--port", str(port)]
    with open(log_path, "ab") as log:
        log_start = log.tell()
        process = subprocess.Popen(
            [*_prefect_command(), *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in make's terminal does not stop it; stop() signals its group
            env={**environ, "PREFECT_HOME": str(home)},
        )
    started = _start_time(process.pid)
    server = Server(process.pid, started or "", port, str(home), argv)
    if started is not None:
        _write_record(state_dir, server)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            _pid_file(state_dir).unlink(missing_ok=True)
            _raise_from_log(log_path, log_start, home)
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(
                f"the Prefect server on port {port} exited with code {process.returncode} (is "
                f"the port taken?): {' | '.join(tail)}; see {log_path}"
            )
        try:
            _raise_from_log(log_path, log_start, home)  # Prefect retries a broken database for minutes
        except CorruptDatabase:
            _end(process)
            _pid_file(state_dir).unlink(missing_ok=True)
            raise
        if healthy(server.url) and owns_port(server):  # healthy alone may be another process on the port
            return server
        time.sleep(0.25)
    _end(process)
    _pid_file(state_dir).unlink(missing_ok=True)
    raise TimeoutError(f"the Prefect server on port {port} was not healthy after {timeout_s:.0f} s; see {log_path}")


def _raise_from_log(log_path: Path, log_start: int, home: Path) -> None:
    """Raise CorruptDatabase when the server's log, since it started, shows SQLite failing to read."""
    with open(log_path, "rb") as log:
        log.seek(log_start)
        text = log.read().decode(errors="replace")
    for sign in CORRUPTION_SIGNS:
        if sign in text:
            raise CorruptDatabase(_corrupt_message(home / "prefect.db", sign))


def _end(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class NotOurs(Exception):
    """The pid file names a process this checkout did not start: nothing was signalled."""


def stop(root: Path = Path(".")) -> bool:
    """Stop the server this checkout started; False when none runs. Raises NotOurs, signalling
    nothing, when the pid file names a live process that is not it."""
    state_dir = root / STATE_DIR
    with _locked(state_dir):
        return _stop_locked(state_dir)


def _stop_locked(state_dir: Path) -> bool:
    record = read_record(state_dir)
    if record is None:
        return False
    pid, server = record
    why = not_ours(pid, server)
    _pid_file(state_dir).unlink(missing_ok=True)  # stale either way: nothing may act on it again
    if why is not None:
        if _start_time(pid) is None:
            return False  # gone: nothing to stop
        raise NotOurs(f"not signalled: {why}; the pid file ({_pid_file(state_dir)}) was removed")
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)  # the server and the workers it spawned
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _start_time(pid) == server.started and time.monotonic() < deadline:
        time.sleep(0.1)
    if _start_time(pid) == server.started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    return True


def local_api_url() -> str:
    """What `make` runs against: PREFECT_API_URL when set (started here when local and silent),
    else this checkout's own server (the current directory's)."""
    user_url = os.environ.get("PREFECT_API_URL")
    return ensure_at(user_url) if user_url else ensure()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else "status"
    user_url = os.environ.get("PREFECT_API_URL")
    if command == "ensure":
        try:
            print(local_api_url())
        except CorruptDatabase as error:
            print(f"local Prefect server: {error}", file=sys.stderr)
            return 1
        except (OSError, RuntimeError, TimeoutError, ValueError, NotOurs) as error:
            # Not fatal: without a server, calibflow runs on Prefect's temporary API.
            print(f"local Prefect server: {error}; runs use Prefect's temporary API instead", file=sys.stderr)
        return 0
    if command == "status":
        if user_url:
            up = healthy(user_url)
            print(f"{user_url}: {'healthy' if up else 'not answering'}")
            return 0 if up else 1
        server = running(Path(".") / STATE_DIR)
        print(f"{server.url}: healthy (pid {server.pid}, PREFECT_HOME={server.home})" if server else "not running")
        return 0 if server else 1
    if command == "stop":
        try:
            print("stopped" if stop() else "no server started by this checkout is running")
        except NotOurs as error:
            print(f"local Prefect server: {error}", file=sys.stderr)
            return 1
        return 0
    print("usage: python -m flows.local_server ensure|status|stop", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
