"""Prefect tasks: thin adapters around one calibflow library call each (retries, logging, artifacts)."""

from __future__ import annotations

from calibflow.calibration import CalibrationError
from calibflow.config import ConfigError
from calibflow.manifest import ManifestError
from calibflow.validation import DataValidationError
from calibflow.versioning import DataVersionError

# Errors that name a problem in the user's data or settings: retrying cannot fix them.
PERMANENT_ERRORS = (ConfigError, DataVersionError, DataValidationError, CalibrationError, ManifestError, LookupError)


def retry_transient_only(task, task_run, state) -> bool:
    """Prefect retry condition: retry store hiccups (network, locks), not the user's mistakes."""
    try:
        state.result()
    except PERMANENT_ERRORS:
        return False
    except Exception:
        return True
    return True
