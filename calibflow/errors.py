"""One policy for the errors a run can end on: whether a Prefect task may retry it, which exit code
the CLI gives it, and whether it is an expected refusal (a message, no traceback) or a fault
(its traceback is shown, because someone has to look at it).

tasks/__init__.py (retry condition, quiet task logs) and calibflow/cli.py (exit codes) both read
`policy_of`: the two lists they used to keep drifted apart. An error no entry names is unexpected:
Prefect may retry it, and the CLI prints its traceback and exits 2 (nothing was decided).

Exit codes, for CD: 0 success; 1 the model was rejected (a property of the model or its data: CD
keeps the champion); 2 the command could not decide or run as asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

EXIT_OK, EXIT_REJECTED, EXIT_USAGE = 0, 1, 2


@dataclass(frozen=True)
class ErrorPolicy:
    exit_code: int
    retry: bool  # may a Prefect task with retries run again on it
    refusal: bool  # expected: one message, no traceback (in Prefect's log and on the CLI)


REJECTED = ErrorPolicy(EXIT_REJECTED, retry=False, refusal=True)
REFUSED = ErrorPolicy(EXIT_USAGE, retry=False, refusal=True)
# A tracking server that did not answer through MLflow's own HTTP retries: a task retry would repeat
# them all (a dead server took 20 minutes to report). Store failures are faults, not refusals: their
# traceback says where.
ALREADY_RETRIED = ErrorPolicy(EXIT_USAGE, retry=False, refusal=False)
STORE_FAILED = ErrorPolicy(EXIT_USAGE, retry=True, refusal=False)


@cache
def policies() -> tuple[tuple[tuple[type[BaseException], ...], ErrorPolicy], ...]:
    """(error classes, policy), first match wins: subclasses come before the classes they refine.
    Imported here, on first use, so that the CLI reads its exit codes without importing MLflow."""
    from calibflow import registry
    from calibflow.temperature import CalibrationError
    from calibflow.config import ConfigError
    from calibflow.decisions import DecisionInfeasible, DecisionSettingsError
    from calibflow.gates import GatesFailed
    from calibflow.manifest import ManifestError
    from calibflow.pipeline import ReportError
    from calibflow.monitor import MonitorDataError
    from calibflow.promotion import GateUndecided
    from calibflow.recalibrate import RecalibrationError
    from calibflow.resume import CheckpointError
    from calibflow.validation import DataValidationError
    from calibflow.versioning import DataVersionError

    return (
        # The model or its data fails a requirement: CD keeps the champion. DecisionInfeasible: the
        # trained model cannot meet a certified decision target on the calibration split, like a gate.
        ((DataValidationError, GatesFailed, DecisionInfeasible), REJECTED),
        ((registry.StoreUnreachable,), ALREADY_RETRIED),
        # RegistrationLeftBehind names what is left and how to remove it; PromotionConflict: the
        # registry lock was not freed in time. Both already waited: no retry, and said in one message.
        ((registry.RegistrationLeftBehind, registry.PromotionConflict), REFUSED),
        # The user's settings, data or registry do not allow the run: retrying cannot fix them.
        # GateUndecided: e.g. the champion's classes differ; LookupError: a version or alias missing,
        # or registered artifacts that changed; ReportError: reports/ cannot be written; CheckpointError:
        # a killed run's checkpoint is corrupted (the message names it and how to start afresh).
        (
            (
                ConfigError,
                DataVersionError,
                ManifestError,
                CalibrationError,
                GateUndecided,
                LookupError,
                ReportError,
                DecisionSettingsError,
                CheckpointError,
                MonitorDataError,
                RecalibrationError,
            ),
            REFUSED,
        ),
        # OSError: also a refused connection to a tracking server
        ((registry.MlflowException, OSError), STORE_FAILED),
    )


def policy_of(error: BaseException) -> ErrorPolicy | None:
    """The policy of `error`; None for an error nobody anticipated (a bug to report)."""
    from calibflow import registry

    for classes, policy in policies():
        if isinstance(error, classes):
            if policy is STORE_FAILED and registry.unreachable(error):
                return ALREADY_RETRIED  # MLflow's HTTP retries already waited for it
            return policy
    return None


def is_refusal(error: BaseException) -> bool:
    """An expected refusal: said in one message, never with a traceback."""
    policy = policy_of(error)
    return policy is not None and policy.refusal


def may_retry(error: BaseException) -> bool:
    """Prefect's retry condition: store hiccups and the unexpected, not the user's mistakes, nor
    what has been retried already."""
    from calibflow import registry

    policy = policy_of(error)
    return policy.retry if policy is not None else not registry.unreachable(error)


def one_line(error: BaseException) -> str:
    """An exception's message on one line (MLflow's and DVC's can span several)."""
    message = getattr(error, "message", None) or str(error) or type(error).__name__
    return " ".join(str(message).split())
