"""Prefect tasks: thin adapters around one calibflow library call each (retries, logging, artifacts)."""

from __future__ import annotations

from calibflow import registry
from calibflow.calibration import CalibrationError
from calibflow.config import ConfigError
from calibflow.decisions import DecisionInfeasible, DecisionSettingsError
from calibflow.manifest import ManifestError
from calibflow.pipeline import ReportError
from calibflow.resume import CheckpointError
from calibflow.validation import DataValidationError
from calibflow.versioning import DataVersionError

# Errors that name a problem in the user's data or settings: retrying cannot fix them.
PERMANENT_ERRORS = (ConfigError, DataVersionError, DataValidationError, CalibrationError, ManifestError, LookupError,
                    ReportError, DecisionInfeasible, DecisionSettingsError, CheckpointError)
# Errors that already waited their turn: a tracking server that did not answer through MLflow's own
# HTTP retries (a task retry would repeat them all, so a dead server took 20 minutes to report), a
# promotion lock not freed within its wait, a registration that could not be taken back (a retry
# would register yet another version).
ALREADY_RETRIED = (registry.StoreUnreachable, registry.PromotionConflict, registry.RegistrationLeftBehind)


def retry_transient_only(task, task_run, state) -> bool:
    """Prefect retry condition: retry store hiccups (a locked database, an error answer), not the
    user's mistakes, nor what has been retried already."""
    try:
        state.result()
    except PERMANENT_ERRORS + ALREADY_RETRIED:
        return False
    except Exception as error:
        return not registry.unreachable(error)
    return True
