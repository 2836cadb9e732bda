"""The calibflow pipeline as a Prefect flow, top to bottom:

DVC-pinned images -> manifest -> stratified split -> Great Expectations checks -> train ->
logits (calibration, test) -> calibrator (temperature by default) -> decision rules (thresholds,
abstention, prediction sets) -> evaluate before/after: test split, corruption suite, out-of-distribution
folder -> gates -> MLflow registry.

Absolute gates decide registration; the gates against the champion decide promotion: with
promotion.auto a run that passes them all becomes @champion, otherwise it stays @challenger
and CD decides with `calibflow gate` / `calibflow promote`.

A run that fails anywhere (bad data, a gate, a store) is tagged failed in MLflow, registers
nothing, moves no alias, leaves reports/metrics.json as it was, and ends the flow Failed. An
expected refusal (calibflow.errors: bad data, a failed gate, bad params) ends it by returning a
Failed state that carries the error, so Prefect logs the message and no traceback; calling the
flow still raises that error. Every local file is written before the registry is touched, and the
registration is one transaction (registration.registration_transaction, as in `calibflow
recalibrate`): a failure after it takes the version and its aliases back; when even that fails,
RegistrationLeftBehind says so.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run
from prefect.states import Failed

from calibflow import errors
from calibflow.config import load_config
from calibflow.errors import ConfigError
from calibflow.errors import GatesFailed
from calibflow.training.resume import checkpoint_root
from calibflow.tracking.registration import CHALLENGER, CHAMPION, registration_transaction
from tasks.data import build_manifest, pin_data_version, split_dataset, validate_data
from tasks.modeling import (
    apply_gates,
    check_decision_settings,
    check_gate_power,
    check_ood_data,
    check_outlier_data,
    check_run_settings,
    collect_logits,
    collect_shift_aware_logits,
    collect_shift_logits,
    evaluate_calibration,
    evaluate_decisions,
    evaluate_ood,
    evaluate_shift,
    fit_calibration,
    fit_decisions,
    train_model,
)
from tasks.tracking import (
    discard_metrics_report,
    end_leftovers_of_killed_runs,
    find_unchanged_champion,
    finish_run,
    promote_to_champion,
    publish_metrics_report,
    publish_summary,
    register_model,
    stage_metrics_report,
    start_run,
    undo_registration,
)


def refused(error: Exception):
    """The flow's end on an expected refusal: a Failed state with the message (Prefect's log shows
    no traceback), whose result raises `error` for the caller (the CLI's exit code)."""
    return Failed(message=f"{type(error).__name__}: {errors.one_line(error)}", data=error)


def record_failure(run, error: Exception, evaluation, fit, verdict) -> None:
    """Tag the MLflow run failed and publish the summary, best effort: when the store itself is
    what failed, these fail too, and the error to report is still the original one."""
    try:
        finish_run(run, "failed", reason=f"{type(error).__name__}: {error}")
        publish_summary(run, f"failed ({type(error).__name__})", evaluation, fit, verdict)
    except Exception as secondary:
        print(
            f"could not record the failure in MLflow ({type(secondary).__name__}: {secondary}); "
            f"the MLflow run {run.run_id} may still show as running"
        )


@flow(name="calibflow-train", log_prints=True)
def train_calibrate_register(
    params_path: str = "params.yaml",
    overrides: list[str] | None = None,
    data_rev: str | None = None,
    repo_root: str = ".",
    force: bool = False,
) -> dict:
    overrides = list(overrides or [])
    try:
        config = load_config(Path(repo_root) / params_path, overrides)  # an absolute params_path stays as it is
    except ConfigError as error:
        return refused(error)
    run = start_run(config, repo_root, overrides)
    end_leftovers_of_killed_runs(run, config, repo_root)
    evaluation = fit = verdict = report = None
    try:
        data = pin_data_version(repo_root, config.data.path, data_rev, run.run_id)
        unchanged = None if force else find_unchanged_champion(run, data, config)
        if unchanged:
            reason = (
                f"@champion (version {unchanged}) was built from the same data ({data.dvc_hash}), params "
                f"({config.params_hash}) and code ({run.git_commit[:12]}); nothing to retrain (use --force)"
            )
            finish_run(run, "skipped", reason)
            publish_summary(run, f"skipped: {reason}")
            print(reason)
            return {"run_id": run.run_id, "skipped": True, "reason": reason, "champion_version": unchanged}
        manifest = build_manifest(data, run.work_dir, run.run_id)
        split = split_dataset(manifest, config, run.work_dir, run.run_id)
        validate_data(manifest, split, config, run.work_dir, run.run_id, repo_root)
        check_run_settings(manifest, split, config)
        check_decision_settings(manifest, split, config)
        ood_data = check_ood_data(repo_root, manifest, config, run.work_dir, run.run_id)
        outliers = check_outlier_data(repo_root, manifest, ood_data, config, run.work_dir, run.run_id)

        # A warning, never a refusal: its simulation (~7 s on a first run) runs on the core that
        # training (train.threads) leaves free, and both release the GIL.
        gate_power = check_gate_power.submit(manifest, split, config, run.run_id, repo_root)
        try:
            trained = train_model(
                run,
                config,
                data=data,
                manifest=manifest,
                split=split,
                outliers=outliers,
                checkpoint_dir=str(checkpoint_root(repo_root)),
            )
        finally:
            gate_power.wait()  # its tag lands before a failed run is closed, too
        gate_power.result()
        calibration_logits = collect_logits(trained, data, manifest, split, "calibration", config, run.work_dir)
        test_logits = collect_logits(trained, data, manifest, split, "test", config, run.work_dir)

        fit_logits = collect_shift_aware_logits(
            trained,
            config,
            data=data,
            manifest=manifest,
            split=split,
            calibration_logits=calibration_logits,
            work_dir=run.work_dir,
            repo_root=repo_root,
        )
        fit = fit_calibration(fit_logits, config, run.work_dir, run.run_id)
        decisions = fit_decisions(calibration_logits, fit, manifest, config, run.work_dir, run.run_id)
        evaluation = evaluate_calibration(test_logits, fit, manifest, config, run.work_dir, run.run_id)
        decided = evaluate_decisions(test_logits, fit, decisions, config, run.work_dir, run.run_id)
        shift_logits = collect_shift_logits(trained, data, manifest, split, config, run.work_dir, repo_root)
        shifted = evaluate_shift(shift_logits, test_logits, fit, config, run.work_dir, run.run_id)
        ood = evaluate_ood(trained, ood_data, test_logits, fit, config, run.work_dir, run.run_id)
        gate = apply_gates(
            run,
            config,
            test_logits=test_logits,
            fit=fit,
            data=data,
            manifest=manifest,
            split=split,
            decisions=decisions,
            shift_logits=shift_logits,
            ood=ood,
        )
        verdict = gate.verdict
        if not verdict.absolute_passed:
            raise GatesFailed(verdict.summary())

        # reports/metrics.json and reports/plots, staged beside the old ones
        report = stage_metrics_report(
            repo_root, evaluation, fit, verdict, decisions=decided, shifted=shifted, ood=ood, trained=trained
        )
        registered = partial(
            register_model,
            run,
            config,
            trained=trained,
            fit=fit,
            evaluation=evaluation,
            data=data,
            manifest=manifest,
            split=split,
            decisions=decisions,
            decided=decided,
            shifted=shifted,
            ood=ood,
        )
        # Registered, then promoted, the run closed and the report published; or all taken back.
        with registration_transaction(registered, undo=undo_registration) as version:
            alias = version.alias
            if version.alias == CHALLENGER and config.promotion.auto and gate.may_promote:
                alias = CHAMPION if promote_to_champion(version, gate, run.work_dir) else alias
            finish_run(run, "succeeded", tags={"registered_version": version.version, "registered_alias": alias})
            publish_metrics_report(report)
    except Exception as error:
        if report is not None:
            discard_metrics_report(report)
        record_failure(run, error, evaluation, fit, verdict)
        if errors.is_refusal(error):
            return refused(error)
        raise
    publish_summary(run, "registered", evaluation, fit, verdict, version)
    return {
        "run_id": run.run_id,
        "prefect_flow_run_id": str(flow_run.get_id()),
        "model_name": version.name,
        "version": version.version,
        "alias": alias,
        "calibration_method": fit.method,
        "temperature": fit.temperature,
        "test_before": evaluation.before,
        "test_after": evaluation.after,
        "gates": verdict.to_json(),
        "tracking_uri": run.tracking_uri,
    }
