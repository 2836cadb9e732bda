"""Tracking tasks: the MLflow run, the registry, the run summary. All of them talk to a store,
so they retry transient failures."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import yaml
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from calibflow.pipeline import data_steps
from calibflow.pipeline import evaluation_steps
from calibflow.pipeline import model_steps
from calibflow.pipeline import report_staging
from calibflow.pipeline import run_summary
from calibflow.pipeline import tagging
from calibflow import leftovers
from calibflow.lifecycle import promotion
from calibflow.tracking import registration
from calibflow.tracking import served_model
from calibflow.tracking import store
from calibflow.config import Config
from calibflow.gates.checks import GateVerdict
from calibflow.lifecycle.promotion import GateReport
from calibflow.data.versioning import DataVersion, code_origin, code_version
from tasks import retry_transient_only
from calibflow import errors


def store_retry_delays(default: tuple[float, ...] = (2, 5, 10)) -> list[float]:
    """Seconds between a store task's attempts, one per retry: CALIBFLOW_STORE_RETRY_DELAYS
    ("2,5,10", read at import) or the default. A tracking server that does not answer is not
    retried here: MLflow's own HTTP retries (calibflow.environment.STORE_PATIENCE_DEFAULTS) have
    done that inside the attempt (see tasks.retry_transient_only)."""
    raw = os.environ.get("CALIBFLOW_STORE_RETRY_DELAYS", "").strip()
    if not raw:
        return list(default)
    try:
        delays = [float(part) for part in raw.split(",")]
    except ValueError:
        raise ValueError(
            f"CALIBFLOW_STORE_RETRY_DELAYS={raw!r}: expected seconds separated by commas, e.g. 2,5,10"
        ) from None
    if any(delay < 0 for delay in delays):
        raise ValueError(f"CALIBFLOW_STORE_RETRY_DELAYS={raw!r}: delays must not be negative")
    return delays


_DELAYS = store_retry_delays()
STORE_RETRIES = dict(
    retries=len(_DELAYS), retry_delay_seconds=_DELAYS, retry_condition_fn=retry_transient_only, cache_policy=NO_CACHE
)


@dataclass(frozen=True)
class RunContext:
    run_id: str
    work_dir: str
    tracking_uri: str
    git_commit: str
    git_dirty: bool
    code_tree: str  # what of the commit runs read (calibflow.data.versioning.code_version)


@dataclass(frozen=True)
class Standing:
    """A version this process's run registered and has not taken back, and the alias it gave it."""

    name: str
    version: str
    alias: str

    def __str__(self) -> str:
        return f"version {self.version} of {self.name} is registered and @{self.alias} points to it"


class RegistryChanges:
    """What the flow run in this process has done to the registry, recorded by the tasks below as
    each change succeeds (registered, promoted, taken back). A failure after the registration (a
    summary that cannot be published, a Prefect API gone before the flow run is closed, a store
    failing while the run is published) is then said from what the run did, not read back from a
    store that may be the thing that failed. One flow run at a time: `calibflow run` forgets it
    before its run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._standing: Standing | None = None

    def forget(self) -> None:
        with self._lock:
            self._standing = None

    def registered(self, version: registration.RegisteredVersion) -> None:
        with self._lock:
            self._standing = Standing(version.name, version.version, version.alias)

    def promoted(self, version: registration.RegisteredVersion) -> None:
        with self._lock:
            self._standing = Standing(version.name, version.version, registration.CHAMPION)

    def taken_back(self, version: registration.RegisteredVersion) -> None:
        with self._lock:
            if self._standing is not None and self._standing.version == version.version:
                self._standing = None

    def standing(self) -> Standing | None:
        with self._lock:
            return self._standing


registry_changes = RegistryChanges()


def run_name(config: Config) -> str:
    """What ran, as MLflow's run list shows it: data folder, architecture and seed, e.g.
    "digits-small_cnn-s0" (rather than MLflow's random words or Prefect's flow run name)."""
    return f"{Path(config.data.path).name}-{config.model.arch}-s{config.seed}"


@task(name="start-mlflow-run", **STORE_RETRIES)
def start_run(config: Config, repo_root: str, overrides: list[str]) -> RunContext:
    tracking_uri = store.configure_tracking(repo_root)
    code = code_version(repo_root)
    commit, dirty = code.commit, code.dirty
    branch, remote = code_origin(repo_root)
    source = store.RunSource("flows/train_calibrate.py", git_commit=commit, git_branch=branch, git_repo_url=remote)
    run_id = store.start_run(
        config.registry.experiment,
        run_name=run_name(config),
        tags={
            "git_commit": commit,
            "git_dirty": str(dirty).lower(),
            "code_tree": code.tree,
            "params_hash": config.params_hash,
            "seed": str(config.seed),
            "prefect.flow_run_id": str(flow_run.get_id()),
            "prefect.flow_run_name": str(flow_run.get_name()),
            "overrides": " ".join(overrides),
            **leftovers.run_tags(),
        },
        repo_root=repo_root,
        source=source,
    )
    work_dir = Path(repo_root).resolve() / ".calibflow" / "runs" / run_id
    work_dir.mkdir(parents=True, exist_ok=True)
    store.log_params(run_id, config.hyperparameters())
    resolved = work_dir / "config.yaml"
    resolved.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    store.log_artifact(run_id, resolved)
    get_run_logger().info("MLflow run %s at %s (params %s)", run_id, tracking_uri, config.params_hash)
    return RunContext(
        run_id=run_id,
        work_dir=str(work_dir),
        tracking_uri=tracking_uri,
        git_commit=commit,
        git_dirty=dirty,
        code_tree=code.tree,
    )


@task(name="end-leftovers-of-killed-runs", cache_policy=NO_CACHE)
def end_leftovers_of_killed_runs(run: RunContext, config: Config, repo_root: str) -> None:
    """Stop the Prefect temporary API servers that killed runs left running, record this run's,
    and mark the experiment's RUNNING MLflow runs whose process is gone KILLED (calibflow.leftovers).
    Housekeeping: when it fails, the run goes on and says so."""
    logger = get_run_logger()
    servers = Path(repo_root).resolve() / ".calibflow" / "servers"
    try:
        for stopped in leftovers.end_orphaned_servers(servers):
            logger.warning("stopped %s", stopped)
        leftovers.record_temporary_servers(servers)
        for run_id, tags in store.running_runs(config.registry.experiment):
            reason = leftovers.orphaned_run_reason(tags)
            if reason and run_id != run.run_id:
                store.end_run(run_id, "killed", f"{reason}; marked killed by run {run.run_id}")
                logger.warning("MLflow run %s marked KILLED: %s", run_id, reason)
    except Exception as error:  # noqa: BLE001  a leftover is no reason to stop this run
        logger.warning("could not clean up after killed runs (%s: %s)", type(error).__name__, error)


@task(name="register-model", **STORE_RETRIES)
def register_model(
    run: RunContext,
    config: Config,
    *,
    trained: model_steps.TrainedModel,
    fit: evaluation_steps.CalibrationRecord,
    evaluation: evaluation_steps.Evaluation,
    data: DataVersion,
    manifest: data_steps.ManifestRecord,
    split: data_steps.SplitRecord,
    decisions: str,
    decided: evaluation_steps.DecisionEvaluation | None = None,
    shifted: evaluation_steps.ShiftEvaluation | None = None,
    ood: evaluation_steps.OODEvaluation | None = None,
    initial: model_steps.InitialWeights | None = None,
) -> registration.RegisteredVersion:
    """Retried safely: a failure within register_version deletes the version it created first."""
    example = model_steps.input_example(data.local_dir, manifest.path, split.path, trained.checkpoint)
    tags = tagging.version_tags(
        data,
        manifest,
        split,
        config,
        run.git_commit,
        code_tree=run.code_tree,
        fit=fit,
        evaluation=evaluation,
        decided=decided,
        shifted=shifted,
        ood=ood,
        initial=initial,
        run_artifacts={
            f"data/{Path(manifest.path).name}": manifest.path,
            f"data/{Path(split.path).name}": split.path,
            f"checkpoint/{Path(trained.checkpoint).name}": trained.checkpoint,
            **({f"shift/{Path(shifted.result_path).name}": shifted.result_path} if shifted else {}),
        },
    )
    with store.store_wait():  # logging and registering the model use MLflow beyond store.client()
        model_uri = served_model.log_calibrated_model(
            run.run_id, trained.checkpoint, fit.state_path, example, decisions, name=config.registry.model_name
        )
        version = registration.register_version(model_uri, config.registry.model_name, tags)
    registry_changes.registered(version)
    get_run_logger().info("registered %s version %s as @%s", version.name, version.version, version.alias)
    return version


@task(name="undo-registration", cache_policy=NO_CACHE)
def undo_registration(version: registration.RegisteredVersion) -> None:
    registration.undo_registration(version)
    registry_changes.taken_back(version)
    get_run_logger().warning(
        "took back %s version %s: the run failed after registering it", version.name, version.version
    )


@task(name="promote-to-champion", **STORE_RETRIES)
def promote_to_champion(
    version: registration.RegisteredVersion, gate: GateReport, work_dir: str
) -> promotion.Promotion | None:
    """promotion.auto: the gate passed against the champion, so move @champion (compare-and-swap).
    If another promotion moved it meanwhile, this version stays @challenger for CD to gate again:
    the run itself succeeded, and its registered version is valid."""
    try:
        moved = promotion.promote(version.name, version.version, gate.champion, gate.save(f"{work_dir}/gates.json"))
    except errors.PromotionConflict as conflict:
        get_run_logger().warning("not promoted, stays @challenger: %s", conflict)
        return None
    registry_changes.promoted(version)
    get_run_logger().info(
        "promoted %s version %s to @champion (was %s)", moved.model, moved.champion, moved.previous_champion
    )
    return moved


@task(name="stage-metrics-report", cache_policy=NO_CACHE)
def stage_metrics_report(
    repo_root: str,
    evaluation: evaluation_steps.Evaluation,
    fit: evaluation_steps.CalibrationRecord,
    verdict: GateVerdict,
    *,
    decisions: evaluation_steps.DecisionEvaluation | None = None,
    shifted: evaluation_steps.ShiftEvaluation | None = None,
    ood: evaluation_steps.OODEvaluation | None = None,
    trained: model_steps.TrainedModel | None = None,
) -> report_staging.StagedReport:
    """reports/metrics.json, and dvc.yaml's plots under reports/plots: the per-epoch curves and the
    reliability diagram."""
    plots = {f"{repo_root}/reports/plots/{Path(curve).name}": curve for curve in (trained.curves if trained else ())}
    plots[f"{repo_root}/reports/plots/reliability_diagram.png"] = evaluation.plots[0]
    return report_staging.stage_metrics_report(
        f"{repo_root}/reports/metrics.json",
        evaluation,
        fit,
        verdict,
        decisions=decisions,
        shifted=shifted,
        ood=ood,
        plots=plots,
    )


@task(name="publish-metrics-report", cache_policy=NO_CACHE)
def publish_metrics_report(report: report_staging.StagedReport, final: tagging.RunVerdict | None = None) -> str:
    return report_staging.publish_report(report, final)


@task(name="discard-metrics-report", cache_policy=NO_CACHE)
def discard_metrics_report(report: report_staging.StagedReport) -> None:
    report_staging.discard_report(report)


@task(name="finish-mlflow-run", **STORE_RETRIES)
def finish_run(run: RunContext, outcome: str, reason: str = "", tags: dict[str, str] | None = None) -> None:
    if tags:
        store.set_tags(run.run_id, tags)
    store.end_run(run.run_id, outcome, reason)


@task(name="publish-run-summary", cache_policy=NO_CACHE)
def publish_summary(
    run: RunContext,
    outcome: str,
    evaluation: evaluation_steps.Evaluation | None = None,
    fit: evaluation_steps.CalibrationRecord | None = None,
    verdict: GateVerdict | None = None,
    version: registration.RegisteredVersion | None = None,
    final: tagging.RunVerdict | None = None,
) -> None:
    summary = run_summary.summary_markdown(
        run.run_id, run.tracking_uri, outcome, evaluation, fit, verdict, version, final=final
    )
    create_markdown_artifact(key="calibflow-run-summary", description="calibflow run summary", markdown=summary)
    # The same text, verdict line first, as the MLflow run's and version's description. Best effort:
    # the run's outcome is decided and recorded already, a description is no reason to undo it.
    try:
        store.set_run_description(run.run_id, summary)
        if version is not None:
            store.set_version_description(version.name, version.version, summary)
    except Exception as error:  # noqa: BLE001
        get_run_logger().warning("could not write the MLflow description (%s: %s)", type(error).__name__, error)
