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
from calibflow import names
from calibflow.pipeline import run_summary
from calibflow.pipeline import tagging
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
    describe_version,
    evaluate_calibration,
    evaluate_decisions,
    evaluate_ood,
    evaluate_shift,
    fit_calibration,
    find_same_build,
    fit_decisions,
    hash_initial_weights,
    record_version_lineage,
    regate_version,
    train_model,
)
from tasks.tracking import (
    discard_metrics_report,
    end_leftovers_of_killed_runs,
    finish_run,
    promote_to_champion,
    publish_metrics_report,
    publish_summary,
    register_model,
    stage_metrics_report,
    start_run,
    undo_registration,
)


def refused(error: Exception, result: dict | None = None):
    """The flow's end on an expected refusal: a Failed state with the message (Prefect's log shows
    no traceback), whose result raises `error` for the caller (the CLI's exit code). `result`: what
    the run measured before it was refused (refused_result), carried on the error for --json."""
    if result is not None:
        setattr(error, errors.RUN_RESULT, result)
    return Failed(message=f"{type(error).__name__}: {errors.one_line(error)}", data=error)


def refused_result(run, error: Exception, evaluation, fit, verdict) -> dict:
    """A refused run's result, shaped as a registered one's where it has the same numbers: its
    MLflow and Prefect ids, why, and what it measured before the refusal (None where it got no
    further); `registered` false, or None when a version it registered may be left behind."""
    return {
        "run_id": run.run_id,
        "prefect_flow_run_id": str(flow_run.get_id()),
        "refused": f"{type(error).__name__}: {errors.one_line(error)}",
        # a registration whose undo failed may stand: the refusal's line says which, this cannot
        "registered": None if isinstance(error, errors.RegistrationLeftBehind) else False,
        "calibration_method": fit.method if fit is not None else None,
        "temperature": fit.temperature if fit is not None else None,
        "test_before": evaluation.before if evaluation is not None else None,
        "test_after": evaluation.after if evaluation is not None else None,
        "gates": verdict.to_json() if verdict is not None else None,
        "tracking_uri": run.tracking_uri,
    }


def record_failure(run, error: Exception, evaluation, fit, verdict, final=None) -> None:
    """Tag the MLflow run failed and publish the summary, best effort: when the store itself is
    what failed, these fail too, and the error to report is still the original one."""
    try:
        # whatever the gates' tags said, nothing stays registered (or RegistrationLeftBehind says what does)
        final = final.as_promoted(names.NOT_REGISTERED) if final is not None else None
        finish_run(run, "failed", reason=f"{type(error).__name__}: {error}", tags=final.tags() if final else None)
        reason = f"failed ({type(error).__name__}): {errors.one_line(error)}"
        publish_summary(run, reason, evaluation, fit, verdict, final=final)
    except Exception as secondary:
        print(
            f"could not record the failure in MLflow ({type(secondary).__name__}: {secondary}); "
            f"the MLflow run {run.run_id} may still show as running"
        )


def unchanged_inputs(run, config, same, data, initial, repo_root: str) -> dict:
    """The run's end when a registered version was built from this data, params, initial weights
    and code: nothing is trained or registered. When only gates.* differ from what that version was
    gated under, it is gated again under the new thresholds (the verdict recorded on this run, no
    alias moved): a refusal carrying GatesFailed (exit 1) when it fails them; otherwise the run is
    skipped, saying which version."""
    weights = f"initial weights ({initial.sha256[:12]}) " if initial else ""
    built = (
        f"{same.describe()} of {same.name} was built from the same data ({data.dvc_hash}), params "
        f"({config.params_hash}), {weights}and code ({run.git_commit[:12]})"
    )
    if not same.changed_gates:
        return _skipped(run, same, f"{built}; nothing to retrain (use --force)")
    report = regate_version(run, config, same, repo_root)
    verdict = report.verdict
    gated = (
        f"{built}, and only its gates changed ({same.describe_changes()}): gated again under them without "
        f"retraining, on {verdict.n_samples} test images"
        + (
            f" against @champion version {report.champion}"
            if report.champion
            else " (the gates against a champion have no other version to compare @champion with)"
            if same.is_champion
            else ""
        )
    )
    if not verdict.passed:
        failed = "; ".join(tagging.failed_checks(verdict))
        if same.is_champion:
            outcome = (
                f"@champion version {same.version} FAILS the new gates: {failed}. It is still @champion (no alias "
                f"moves automatically): retrain (calibflow run --force), promote another version, or keep the old "
                f"thresholds"
            )
        else:
            outcome = f"version {same.version} fails them: {failed}; no alias moved"
        error = GatesFailed(f"{gated}. {outcome}")
        finish_run(run, "failed", reason=f"GatesFailed: {error}")
        # The reason as the summary's first line: a gate table under the three-part headline would
        # call the run's subject a fresh registration; the checks are in its tags and gates.json.
        publish_summary(run, f"failed (GatesFailed): {error}")
        return refused(error, refused_result(run, error, None, None, verdict))
    if same.is_champion:
        outcome = f"@champion version {same.version} passes every new gate; nothing to retrain (use --force)"
    else:
        outcome = (
            f"version {same.version} passes every gate; no alias moved: promote it with calibflow promote --model "
            f"{same.name} --candidate {same.version}"
        )
    return _skipped(run, same, f"{gated}. {outcome}", regated=True, gates=verdict.to_json())


def _skipped(run, same, reason: str, **extra) -> dict:
    """Close a run that trained and registered nothing, saying why and which version stands."""
    finish_run(run, "skipped", reason)
    publish_summary(run, f"skipped: {reason}")
    print(reason)
    return {
        "run_id": run.run_id,
        "skipped": True,
        "reason": reason,
        "version": same.version,
        "aliases": list(same.aliases),
        "champion_version": same.version if same.is_champion else None,
        **extra,
    }


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
    evaluation = fit = verdict = final = report = None
    try:
        data = pin_data_version(repo_root, config.data.path, data_rev, run.run_id)
        initial = hash_initial_weights(run, config, repo_root)  # part of the build: its bytes, not its name
        same = None if force else find_same_build(run, data, config, initial)
        if same is not None:
            return unchanged_inputs(run, config, same, data, initial, repo_root)
        manifest = build_manifest(data, run.work_dir, run.run_id)
        split = split_dataset(manifest, config, run.work_dir, run.run_id)
        validate_data(manifest, split, config, run.work_dir, run.run_id, repo_root, data_dir=data.local_dir)
        check_run_settings(manifest, split, config, data.local_dir, initial)
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
                initial=initial,
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
        fit = fit_calibration(fit_logits, config, run.work_dir, run.run_id, data_dir=data.local_dir, manifest=manifest)
        decisions = fit_decisions(calibration_logits, fit, manifest, config, run.work_dir, run.run_id)
        evaluation = evaluate_calibration(
            test_logits, fit, manifest, config, run.work_dir, run.run_id, data_dir=data.local_dir
        )
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
        final = tagging.run_verdict(verdict, gate.champion)  # nothing registered yet
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
            initial=initial,
        )
        # Registered, then promoted, the run closed and the report published; or all taken back.
        with registration_transaction(registered, undo=undo_registration) as version:
            alias = version.alias
            if version.alias == CHALLENGER and config.promotion.auto and gate.may_promote:
                alias = CHAMPION if promote_to_champion(version, gate, run.work_dir) else alias
            final = tagging.run_verdict(verdict, gate.champion, alias)  # verdict/promoted now known
            record_version_lineage(version, alias, config, split, gate)
            finish_run(
                run,
                "succeeded",
                tags={"registered_version": version.version, "registered_alias": alias, **final.tags()},
            )
            publish_metrics_report(report, final)
    except Exception as error:
        if report is not None:
            discard_metrics_report(report)
        record_failure(run, error, evaluation, fit, verdict, final)
        if errors.is_refusal(error):
            return refused(error, refused_result(run, error, evaluation, fit, verdict))
        raise
    publish_summary(run, "registered", evaluation, fit, verdict, version, final=final)
    # The version's page leads with its verdict and lineage, above the run's summary.
    summary = run_summary.summary_markdown(
        run.run_id, run.tracking_uri, "registered", evaluation, fit, verdict, version, final=final
    )
    describe_version(version, alias, run, summary)
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
