"""Environment defaults applied before Prefect, MLflow, DVC or GX are imported.

The machines that run calibflow (CI, air-gapped GPU nodes) often have no way out to the internet:
every library's telemetry is turned off, so nothing waits on a connection that cannot succeed.
Values already set by the user win.
"""

from __future__ import annotations

import os

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

# How long one MLflow request may keep trying a tracking server that does not answer. MLflow's own
# defaults (7 retries, back-off factor 2, 120 s timeout) are sized for a rate-limiting SaaS and
# make a dead server cost about 4 minutes per request, several requests per command. These give
# up on a refused connection after about 6-8 s (back-off 0, 2 and 4 s, plus up to 1 s of jitter on the last two),
# and on a server that accepts but never answers after 4 x 20 s: a command fails within 2
# minutes either way, and still rides out a server restart of a few seconds. Raise the timeout
# for large model artifacts behind a slow artifact store.
STORE_PATIENCE_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


def apply_quiet_defaults() -> None:
    for key, value in {**QUIET_DEFAULTS, **STORE_PATIENCE_DEFAULTS}.items():
        os.environ.setdefault(key, value)
