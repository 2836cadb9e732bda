"""Environment defaults applied before Prefect, MLflow, DVC or GX are imported.

The machines that run calibflow (CI, air-gapped GPU nodes) often have no way out to the internet:
every library's telemetry is turned off, so nothing waits on a connection that cannot succeed.
Values already set by the user win.
"""

from __future__ import annotations

import os
from pathlib import Path

QUIET_DEFAULTS = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
    "PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS": "false",
    # The temporary local API starts in ~10 s on a cold cache; give a loaded CI machine room.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "GIT_PYTHON_REFRESH": "quiet",
}

# How long one request may keep trying a server that does not answer. MLflow's own defaults (7
# retries, back-off factor 2, 120 s timeout) and Prefect's (5 retries 2-32 s apart, 60 s timeout)
# are sized for a rate-limiting SaaS and made a hung server (port open, no answer) cost 90 s for
# `calibflow status` and 107 s for `calibflow run`. With these, MLflow gives up on a refused
# connection after about 2-3 s (back-off 0 and 2 s), and on a server that accepts but never answers
# after 3 x 20 s; Prefect after 3 tries 2 and 4 s apart. Before that, commands ask each server once
# for any answer within CALIBFLOW_FIRST_ANSWER_TIMEOUT seconds (calibflow.tracking.store.check_answers,
# flows.local_server.check_api_answers), so a hung server is named within ~10 s of asking; the
# per-request timeouts stay long enough for a loaded server's slow answers. Raise
# MLFLOW_HTTP_REQUEST_TIMEOUT for large model artifacts behind a slow artifact store.
STORE_PATIENCE_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "PREFECT_API_REQUEST_TIMEOUT": "30",
    "PREFECT_CLIENT_MAX_RETRIES": "2",
    "CALIBFLOW_FIRST_ANSWER_TIMEOUT": "10",
}


def first_answer_timeout_s() -> float:
    """Seconds a command waits for a server's first answer before saying it does not answer:
    CALIBFLOW_FIRST_ANSWER_TIMEOUT, else its default above."""
    name = "CALIBFLOW_FIRST_ANSWER_TIMEOUT"
    raw = os.environ.get(name) or STORE_PATIENCE_DEFAULTS[name]
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected seconds, e.g. 10") from None
    if not seconds > 0:
        raise ValueError(f"{name}={raw!r}: must be more than 0 seconds")
    return seconds


def apply_quiet_defaults() -> None:
    for key, value in {**QUIET_DEFAULTS, **STORE_PATIENCE_DEFAULTS}.items():
        os.environ.setdefault(key, value)


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cpu_cores() -> int:
    """The CPU cores this process may run on: its affinity (a container's CPU set), and no more
    than a cgroup v2 CPU quota allows (a Kubernetes CPU limit, which leaves the affinity at every
    core of the host)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota to read: the affinity is all there is
    return cores
