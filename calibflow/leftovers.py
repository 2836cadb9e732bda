"""What a killed run leaves behind, and how the next run ends it.

A `calibflow run` killed with SIGKILL (by hand, or by the out-of-memory killer) runs no cleanup:
Prefect's temporary API server, a child process, keeps running without its parent, and the run's
MLflow run stays RUNNING for ever. So each run records its temporary server under
`.calibflow/servers/` and tags its MLflow run with its process (host, pid, start time); the next
run in the same repository stops the servers whose run is gone and marks those MLflow runs KILLED.

A process is named by its pid and its start time, as a pid alone may have been reused by an
unrelated process since. Both come from Linux's /proc; elsewhere nothing is recorded and nothing
is ended.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# In the command line of Prefect's temporary API server (prefect.server.api.server.SubprocessASGIServer).
PREFECT_SERVER_MARKER = "prefect.server.api.server:create_app"
HOST_TAG, PID_TAG, STARTED_TAG = "calibflow.host", "calibflow.pid", "calibflow.pid_started"


@dataclass(frozen=True)
class ProcessId:
    pid: int
    started: str  # clock ticks after boot at which it started (/proc/PID/stat, field 22)


def stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields from the third on (state, ppid, ...); None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # the command name, in parentheses, may hold spaces


def process_id(pid: int) -> ProcessId | None:
    """The running process `pid` (a zombie has finished: None)."""
    fields = stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return ProcessId(pid, fields[19])


def alive(process: ProcessId) -> bool:
    return process_id(process.pid) == process


def this_process() -> ProcessId | None:
    return process_id(os.getpid())


def run_tags() -> dict[str, str]:
    """Tags naming the process that runs an MLflow run, so a later run can tell it died."""
    me = this_process()
    if me is None:  # no /proc
        return {}
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(me.pid), STARTED_TAG: me.started}


def orphaned_run_reason(tags: dict[str, str]) -> str | None:
    """Why a RUNNING MLflow run with these tags is dead (its process, on this host, is gone), or
    None when it may still be running (its process lives, it ran elsewhere, or it is untagged)."""
    if tags.get(HOST_TAG) != socket.gethostname() or not tags.get(PID_TAG) or not tags.get(STARTED_TAG):
        return None
    if this_process() is None or alive(ProcessId(int(tags[PID_TAG]), tags[STARTED_TAG])):
        return None
    return (
        f"its process (pid {tags[PID_TAG]} on {tags[HOST_TAG]}) ended without closing the run: it was killed "
        f"(SIGKILL, out of memory), or the tracking server was down when it ended"
    )


def command_line(pid: int) -> list[str]:
    """`pid`'s arguments (/proc/PID/cmdline); empty when it is gone or unreadable."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def _children(parent: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = stat_fields(int(stat.parent.name))
        if fields is not None and int(fields[1]) == parent:
            found.append(int(stat.parent.name))
    return found


@dataclass(frozen=True)
class ServerRecord:
    server: ProcessId
    owner: ProcessId  # the process whose flow started it
    command: str


def record_temporary_servers(state_dir: str | Path) -> list[ServerRecord]:
    """Record each Prefect temporary API server this process started (one file per server)."""
    me = this_process()
    if me is None:
        return []
    records = []
    for pid in _children(me.pid):
        server, command = process_id(pid), " ".join(command_line(pid))
        if server is not None and PREFECT_SERVER_MARKER in command:
            records.append(ServerRecord(server, me, command))
    if records:
        Path(state_dir).mkdir(parents=True, exist_ok=True)
    for record in records:
        path = Path(state_dir) / f"{record.server.pid}-{record.server.started}.json"
        path.write_text(json.dumps(asdict(record)))
    return records


def end_orphaned_servers(state_dir: str | Path, grace_s: float = 5.0) -> list[str]:
    """Stop the recorded servers whose owner is gone (SIGTERM, then SIGKILL after `grace_s`) and
    forget every record whose server is gone; return what was stopped. A server whose owner still
    runs (a run going on beside this one) is left alone, and so is a process that merely reuses a
    recorded pid."""
    stopped = []
    for path in sorted(Path(state_dir).glob("*.json")):
        try:
            saved = json.loads(path.read_text())
            record = ServerRecord(ProcessId(**saved["server"]), ProcessId(**saved["owner"]), saved["command"])
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)  # unreadable: nothing can be matched against it
            continue
        if alive(record.owner):
            continue
        if alive(record.server) and PREFECT_SERVER_MARKER in " ".join(command_line(record.server.pid)):
            _stop(record.server, grace_s)
            stopped.append(
                f"Prefect temporary API server pid {record.server.pid} (its run, pid {record.owner.pid}, was killed)"
            )
        path.unlink(missing_ok=True)
    return stopped


def _stop(process: ProcessId, grace_s: float) -> None:
    for sent in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(process.pid, sent)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if not alive(process):
                return
            time.sleep(0.1)
