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


def apply_quiet_defaults() -> None:
    for key, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(key, value)
