"""Every calibflow exception, and one policy for them: whether a Prefect task may retry it, which
exit code the CLI gives it, and whether it is an expected refusal (a message, no traceback) or a
fault (its traceback is shown, because someone has to look at it).

A leaf: it imports nothing of calibflow's, so every layer can raise these and every caller (tasks/ for
the retry condition and quiet logs, the CLI for exit codes) reads the same `policy_of`. An error no
entry names is unexpected: Prefect may retry it, and the CLI prints its traceback and exits 2
(nothing was decided).

Exit codes, for CD: 0 success; 1 the model was rejected (a property of the model or its data: CD
keeps the champion); 2 the command could not decide or run as asked.
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_OK, EXIT_REJECTED, EXIT_USAGE = 0, 1, 2


class ConfigError(ValueError):
    """params.yaml or an override is wrong; the message names the key and the fix."""


class DataVersionError(RuntimeError):
    """The dataset cannot be pinned to a DVC version; the message says how to fix that."""


class ManifestError(ValueError):
    """The dataset directory or a manifest file is unusable; the message names the fix."""


class OODDataError(ManifestError):
    """ood.path cannot be used as out-of-distribution images; the message names the fix."""


class DataValidationError(ValueError):
    """The data failed validation; `.report` holds the full ValidationReport."""

    def __init__(self, report) -> None:  # calibflow.data.validation.ValidationReport
        super().__init__(report.summary())
        self.report = report


class DatasetError(RuntimeError):
    """The dataset cannot be added as asked; the message says why and what to do."""


class CheckpointError(RuntimeError):
    """A training checkpoint exists but cannot be trusted; the message names it and the fix."""


class DistributedTrainingError(RuntimeError):
    """The torchrun workers did not finish; the message holds the end of their log."""


class CalibrationError(RuntimeError):
    """Temperature scaling cannot produce a trustworthy T; the message names the problem and fix."""


class DecisionSettingsError(ValueError):
    """decision: settings that cannot work with this data (a positive class it does not have, a
    calibration split too small for a rule); found before training."""


class DecisionInfeasible(ValueError):
    """No threshold meets the target on this calibration split (too few images, or a model that
    cannot reach it); the message says which and what would."""


class GateInputError(ValueError):
    """The predictions handed to the gates cannot be gated (NaN, not probabilities, no images)."""


class GatesFailed(RuntimeError):
    """The calibrated model did not pass params.yaml's gates; it was not registered."""


# The attribute a refused run's error carries its measurements in (flows.train_calibrate.refused):
# `calibflow run --json` writes them, so a CD job that was refused still has the numbers it was
# refused on without reading MLflow.
RUN_RESULT = "run_result"


def run_result_of(error: BaseException) -> dict | None:
    return getattr(error, RUN_RESULT, None)


class GateUndecided(RuntimeError):
    """The gate could not run (version, data or store missing): neither pass nor fail."""


class NotComparable(GateUndecided, LookupError):
    """The candidate and the champion do not predict the same classes, or the champion's classes
    are unknown: their probabilities cannot be compared. A LookupError too, so Prefect's retry
    condition (calibflow.errors) does not retry it."""


class ReportError(RuntimeError):
    """reports/metrics.json cannot be written where it goes."""


class StoreUnreachable(ConnectionError):
    """The tracking server did not answer within MLflow's HTTP retries (bounded by
    calibflow.environment.STORE_PATIENCE_DEFAULTS). Already retried: retrying again only waits longer."""


class NotFound(LookupError):
    """A registered model, version or alias the command names does not exist, or has nothing of
    what the command needs (no @champion to roll back to); the message says which."""


class UnverifiedModel(LookupError):
    """A registered version calibflow will not load: it has no recorded digest (registered before
    calibflow stored models safely), or its stored files no longer match it."""


class ModelArtifactsChanged(UnverifiedModel):
    """The files of a registered version differ from those hashed when it was registered."""


class RegistrationLeftBehind(RuntimeError):
    """A run failed after registering a version, and taking that version back failed too: the
    message names the version and its aliases, and how to remove it."""


class FailedAfterRegistration(RuntimeError):
    """The run registered a version (and gave it an alias), then failed: a summary that could not be
    published, a Prefect API gone before the flow run was closed. The version stands; the message
    says which version, of which model, which alias points to it, and what failed."""


class PrefectApiUnreachable(ConnectionError):
    """PREFECT_API_URL names a server that refused the connection or accepted it and did not answer
    in time; the message names the address, how long it waited and the fix."""


class PromotionConflict(RuntimeError):
    """Another promotion holds the lock, or the champion moved since the gate ran."""


class AlreadyChampion(PromotionConflict):
    """The candidate of a promotion already is @champion: there is nothing to move."""


class MonitorDataError(ValueError):
    """The monitoring folder cannot be read as new images for this model; the message says why."""


class ServedModelRefusal(ValueError):
    """A request the served model cannot answer (tracking.served_model.RequestError, which is also
    an MlflowException so that MLflow's scoring server answers 400 with it): a refusal, never a
    tracking-store failure."""


class RecalibrationError(ValueError):
    """The version or the data cannot be recalibrated as asked; the message says why and the fix."""


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

# (error classes, policy), first match wins: subclasses come before the classes they refine.
POLICIES: tuple[tuple[tuple[type[BaseException], ...], ErrorPolicy], ...] = (
    # The model or its data fails a requirement: CD keeps the champion. DecisionInfeasible: the
    # trained model cannot meet a certified decision target on the calibration split, like a gate.
    ((DataValidationError, GatesFailed, DecisionInfeasible), REJECTED),
    ((StoreUnreachable,), ALREADY_RETRIED),
    # RegistrationLeftBehind and FailedAfterRegistration name what is left; PromotionConflict: the
    # registry lock was not freed in time. All already waited: no retry, and said in one message.
    ((RegistrationLeftBehind, FailedAfterRegistration, PromotionConflict), REFUSED),
    # Before the store's OSError entry: a Prefect API that does not answer is a setting to fix.
    ((PrefectApiUnreachable,), REFUSED),
    # The user's settings, data or registry do not allow the run: retrying cannot fix them.
    # GateInputError: predictions the gates cannot read (NaN, not probabilities, no images);
    # GateUndecided: e.g. the champion's classes differ; NotFound: a version or alias missing;
    # UnverifiedModel: registered artifacts without a digest or that changed (a KeyError or
    # IndexError is a bug, not a refusal: it keeps its traceback); ReportError: reports/ cannot be written; CheckpointError:
    # a killed run's checkpoint is corrupted (the message names it and how to start afresh).
    (
        (
            ConfigError,
            DataVersionError,
            DatasetError,
            ManifestError,
            CalibrationError,
            GateInputError,
            GateUndecided,
            NotFound,
            UnverifiedModel,
            ReportError,
            DecisionSettingsError,
            CheckpointError,
            MonitorDataError,
            RecalibrationError,
            ServedModelRefusal,
        ),
        REFUSED,
    ),
    # OSError: also a refused connection to a tracking server
    ((OSError,), STORE_FAILED),
)


def is_store_error(error: BaseException) -> bool:
    """An error the tracking store answered with (MLflow's MlflowException and its subclasses),
    recognised by class name so that this module needs no MLflow import."""
    return any(c.__name__ == "MlflowException" and c.__module__.startswith("mlflow") for c in type(error).__mro__)


def unreachable(error: BaseException) -> bool:
    """True when `error` (or what it was raised from) is a connection failure, a timeout or a
    server that kept failing through MLflow's HTTP retries, not an answer."""
    import requests

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(
            seen, (StoreUnreachable, requests.ConnectionError, requests.Timeout, requests.exceptions.RetryError)
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _matching_policy(error: BaseException) -> ErrorPolicy | None:
    for classes, policy in POLICIES:
        if isinstance(error, classes):
            return policy
    return STORE_FAILED if is_store_error(error) else None


def policy_of(error: BaseException) -> ErrorPolicy | None:
    """The policy of `error`; None for an error nobody anticipated (a bug to report)."""
    policy = _matching_policy(error)
    if policy is STORE_FAILED and unreachable(error):
        return ALREADY_RETRIED  # MLflow's HTTP retries already waited for it
    return policy


def is_refusal(error: BaseException) -> bool:
    """An expected refusal: said in one message, never with a traceback."""
    policy = policy_of(error)
    return policy is not None and policy.refusal


def may_retry(error: BaseException) -> bool:
    """Prefect's retry condition: store hiccups and the unexpected, not the user's mistakes, nor
    what has been retried already."""
    policy = policy_of(error)
    return policy.retry if policy is not None else not unreachable(error)


def one_line(error: BaseException) -> str:
    """An exception's message on one line (MLflow's and DVC's can span several)."""
    message = getattr(error, "message", None) or str(error) or type(error).__name__
    return " ".join(str(message).split())
