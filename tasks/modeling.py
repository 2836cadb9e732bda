"""Model tasks: train, collect logits once, fit the temperature, evaluate, check the gates."""

from __future__ import annotations

import json

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from calibflow.pipeline import data_steps
from calibflow.pipeline import evaluation_steps
from calibflow.pipeline import model_steps
from calibflow.pipeline import run_summary
from calibflow.pipeline import tagging
from calibflow.tracking import store
from calibflow.gates import decisions as decision_rules
from calibflow.config import Config
from calibflow.disk_cache import cache_dir
from calibflow import names
from calibflow.names import CALIBRATION_METHOD, CALIBRATION_WARNING, GATE_AGAINST, ood_metric
from calibflow.lifecycle import promotion
from calibflow.errors import GateInputError, GateUndecided
from calibflow.gates.checks import evaluate_gates
from calibflow.lifecycle.promotion import GateReport
from calibflow.training.loop import EpochStats
from calibflow.data.versioning import DataVersion
from calibflow.tracking import registration
from tasks import retry_transient_only
from tasks.tracking import STORE_RETRIES, RunContext


@task(name="check-gate-power", cache_policy=NO_CACHE)
def check_gate_power(
    manifest: data_steps.ManifestRecord, split: data_steps.SplitRecord, config: Config, run_id: str, repo_root: str
) -> str | None:
    """Before training: warn when the test split is too small for the gates to pass a good model."""
    from calibflow.gates.plan import small_test_split_warning

    warning = small_test_split_warning(
        split.sizes["test"],
        len(manifest.classes),
        config.gates,
        config.evaluation.n_bins,
        cache_directory=cache_dir(repo_root),
    )
    if warning:
        get_run_logger().warning(warning)
        store.set_tags(run_id, {"gate_power_warning": warning[:5000]})
    return warning


@task(name="hash-initial-weights", cache_policy=NO_CACHE)
def hash_initial_weights(run: RunContext, config: Config, repo_root: str) -> model_steps.InitialWeights | None:
    """Before anything else: the file the network starts from (model.weights_path or
    model.pretrained), found and hashed once; its digest is part of the build and tags the run."""
    initial = model_steps.initial_weights(config, repo_root)
    if initial is not None:
        store.set_tags(run.run_id, initial.tags())
        get_run_logger().info("initial weights %s (sha256 %s)", initial.path, initial.sha256)
    return initial


@task(name="check-run-settings", cache_policy=NO_CACHE)
def check_run_settings(
    manifest: data_steps.ManifestRecord,
    split: data_steps.SplitRecord,
    config: Config,
    data_dir: str,
    initial: model_steps.InitialWeights | None = None,
) -> None:
    """Before training: a calibrator, split sizes or gates that cannot work on this data, a network
    that cannot read images of this size, and initial weights that do not fit it."""
    data_steps.check_run_settings(config, manifest.classes, split.sizes)
    data_steps.check_soft_gates(config, data_dir, manifest, split.path)
    model_steps.check_network(initial, manifest, config)


@task(name="check-decision-settings", cache_policy=NO_CACHE)
def check_decision_settings(manifest: data_steps.ManifestRecord, split: data_steps.SplitRecord, config: Config) -> None:
    """Before training: a positive class the data lacks, or a calibration split too small for a
    decision rule, is a settings error now rather than after the whole training."""
    decision_rules.check_decision_settings(
        config.decision, manifest.classes, data_steps.split_class_counts(manifest.path, split.path, "calibration")
    )


def _min_side(config: Config) -> int:
    """The smallest shorter side an image of any folder may have: data.min_side with data.image_size."""
    return config.data.min_side if config.data.image_size is not None else 1


@task(name="check-ood-data", cache_policy=NO_CACHE)
def check_ood_data(
    repo_root: str, manifest: data_steps.ManifestRecord, config: Config, work_dir: str, run_id: str
) -> str | None:
    """Before training: ood.path pinned by DVC, and images of no trained class (None: not set)."""
    if not config.ood.path:
        return None
    path = evaluation_steps.check_ood_data(
        repo_root,
        manifest.path,
        config.ood.path,
        config.ood.max_images,
        f"{work_dir}/ood_data.json",
        min_side=_min_side(config),
    )
    store.log_artifact(run_id, path, "ood")
    return path


@task(name="check-outlier-data", cache_policy=NO_CACHE)
def check_outlier_data(
    repo_root: str,
    manifest: data_steps.ManifestRecord,
    ood_data: str | None,
    config: Config,
    work_dir: str,
    run_id: str,
) -> str | None:
    """Before training: train.outlier_exposure's folder pinned by DVC, images of no trained class,
    none shared with ood.path's (None: not set)."""
    if not config.train.outlier_exposure:
        return None
    path = evaluation_steps.check_ood_data(
        repo_root,
        manifest.path,
        config.train.outlier_exposure,
        10**9,
        f"{work_dir}/outlier_exposure_data.json",
        "train.outlier_exposure",
        ood_data,
        min_side=_min_side(config),
    )
    store.log_artifact(run_id, path, "ood")
    return path


@task(name="train-model", cache_policy=NO_CACHE)
def train_model(
    run: RunContext,
    config: Config,
    *,
    data: DataVersion,
    manifest: data_steps.ManifestRecord,
    split: data_steps.SplitRecord,
    outliers: str | None = None,
    checkpoint_dir: str | None = None,
    initial: model_steps.InitialWeights | None = None,
) -> model_steps.TrainedModel:
    history: list[EpochStats] = []

    def log_epoch(stats: EpochStats) -> None:
        history.append(stats)  # one MLflow call per epoch, never per step
        metrics = {
            "train/loss": stats.train_loss,
            "train/learning_rate": stats.learning_rate,
            "train/images_per_second": stats.images_per_second,
        }  # training steps alone, validation excluded
        if stats.validated:  # train.val_every: the val curves have a point only where one was measured
            metrics.update({"val/accuracy": stats.val_accuracy, "val/nll": stats.val_nll, "val/ece": stats.val_ece})
        store.log_metrics(run.run_id, metrics, step=stats.epoch)

    trained = model_steps.train_model(
        data.local_dir,
        manifest,
        split.path,
        config,
        run.work_dir,
        on_epoch_end=log_epoch,
        outliers_path=outliers,
        checkpoint_dir=checkpoint_dir,
        initial=initial,
    )
    store.log_artifact(run.run_id, trained.checkpoint, "checkpoint")
    store.set_tags(
        run.run_id,
        {
            "device": trained.device,
            "precision": trained.precision,
            "resumed_from_epoch": str(trained.resumed_from_epoch),
            "training_processes": str(trained.processes),
        },
    )
    if trained.resumed_from_epoch:
        get_run_logger().info(
            "resumed training after epoch %d, the last one a killed run completed", trained.resumed_from_epoch
        )
    get_run_logger().info(
        "trained %d epochs on %s (%s, %d process(es)): val accuracy %.4f, %.0f images/s",
        trained.epochs,
        trained.device,
        trained.precision,
        trained.processes,
        trained.final_val_accuracy,
        trained.images_per_second,
    )
    return trained


@task(name="collect-logits", cache_policy=NO_CACHE)
def collect_logits(
    trained: model_steps.TrainedModel,
    data: DataVersion,
    manifest: data_steps.ManifestRecord,
    split: data_steps.SplitRecord,
    split_name: str,
    config: Config,
    work_dir: str,
) -> str:
    return model_steps.write_split_logits(
        trained.checkpoint,
        data.local_dir,
        manifest.path,
        split.path,
        split_name,
        f"{work_dir}/logits_{split_name}.npz",
        batch_size=config.evaluation.batch_size,
        device=config.train.device,
        threads=config.train.threads,
        loading=data_steps.image_loading(config.data),
    )


@task(name="collect-shift-aware-logits", cache_policy=NO_CACHE)
def collect_shift_aware_logits(
    trained: model_steps.TrainedModel,
    config: Config,
    *,
    data: DataVersion,
    manifest: data_steps.ManifestRecord,
    split: data_steps.SplitRecord,
    calibration_logits: str,
    work_dir: str,
    repo_root: str,
) -> str:
    """The logits the calibrator is fitted on: the calibration split's, plus (calibration.shift_aware)
    those of its corrupted copies."""
    if not config.calibration.shift_aware:
        return calibration_logits
    path = model_steps.write_shift_aware_logits(
        trained.checkpoint,
        data.local_dir,
        manifest.path,
        split.path,
        calibration_logits,
        corruptions=config.calibration.shift_corruptions,
        seed=config.seed,
        out_path=f"{work_dir}/logits_calibration_shift_aware.npz",
        batch_size=config.evaluation.batch_size,
        device=config.train.device,
        cache_dir=str(cache_dir(repo_root) / "shift"),
        threads=config.train.threads,
    )
    get_run_logger().info(
        "shift-aware calibration: fitting on the calibration split and its copies corrupted by %s at severities 1-5",
        ", ".join(config.calibration.shift_corruptions),
    )
    return path


@task(name="fit-calibration", cache_policy=NO_CACHE)
def fit_calibration(
    calibration_logits: str,
    config: Config,
    work_dir: str,
    run_id: str,
    *,
    data_dir: str,
    manifest: data_steps.ManifestRecord,
) -> evaluation_steps.CalibrationRecord:
    soft = config.calibration.targets == "soft"
    fit = evaluation_steps.fit_calibration(
        calibration_logits,
        config.calibration,
        f"{work_dir}/calibration.json",
        soft_targets=evaluation_steps.soft_targets_of(calibration_logits, data_dir, manifest, config.data)
        if soft
        else None,
    )
    metrics = tagging.fit_metrics(fit)
    metrics.update(
        {
            f"calibration/cv_nll/{row['method']}": row["cv_nll_mean"]
            for row in fit.selection
            if row.get("cv_nll_mean") is not None
        }
    )
    store.log_metrics(run_id, metrics)
    store.set_tags(run_id, {CALIBRATION_METHOD: fit.method})
    if fit.selection:  # method auto: keep the comparison table with the run
        selection = f"{work_dir}/calibration_selection.json"
        with open(selection, "w") as handle:
            json.dump(list(fit.selection), handle, indent=2, default=str)
        store.log_artifact(run_id, selection, "calibration")
    get_run_logger().info(
        "%s calibration%s: calibration %s %.4f -> %.4f",
        fit.method,
        f" (T = {fit.temperature:.4f})" if fit.temperature else "",
        "NLL against the soft labels" if soft else "NLL",
        fit.nll_before,
        fit.nll_after,
    )
    return fit


@task(name="evaluate-calibration", cache_policy=NO_CACHE)
def evaluate_calibration(
    test_logits: str,
    fit: evaluation_steps.CalibrationRecord,
    manifest: data_steps.ManifestRecord,
    config: Config,
    work_dir: str,
    run_id: str,
    *,
    data_dir: str,
) -> evaluation_steps.Evaluation:
    evaluation = evaluation_steps.evaluate_calibration(
        test_logits,
        fit,
        config.evaluation.n_bins,
        work_dir,
        manifest.classes,
        soft_targets=evaluation_steps.soft_targets_of(test_logits, data_dir, manifest, config.data),
    )
    store.log_metrics(run_id, tagging.test_metrics(evaluation))
    for plot in evaluation.plots:
        store.log_artifact(run_id, plot, "plots")
    get_run_logger().info(
        "test ECE %.4f -> %.4f, accuracy %.4f",
        evaluation.before["ece"],
        evaluation.after["ece"],
        evaluation.after["accuracy"],
    )
    warning = run_summary.calibration_warning(evaluation, fit)
    if warning:  # also the description's second line (publish_summary)
        get_run_logger().warning(warning)
        store.set_tags(run_id, {CALIBRATION_WARNING: warning})
    return evaluation


@task(name="collect-shift-logits", cache_policy=NO_CACHE)
def collect_shift_logits(
    trained: model_steps.TrainedModel,
    data: DataVersion,
    manifest: data_steps.ManifestRecord,
    split: data_steps.SplitRecord,
    config: Config,
    work_dir: str,
    repo_root: str,
) -> str | None:
    """The network's logits on the corruption suite (None when `shift:` is empty), cached by content
    under .calibflow/cache/shift."""
    from calibflow.evaluation.shift import suite_of

    suite = suite_of(config.shift, config.seed)
    if suite is None:
        return None
    return model_steps.write_shift_logits(
        trained.checkpoint,
        data.local_dir,
        manifest.path,
        split.path,
        suite,
        f"{work_dir}/logits_shift.npz",
        batch_size=config.evaluation.batch_size,
        device=config.train.device,
        cache_dir=str(cache_dir(repo_root) / "shift"),
        threads=config.train.threads,
    )


@task(name="evaluate-shift", cache_policy=NO_CACHE)
def evaluate_shift(
    shift_logits: str | None,
    test_logits: str,
    fit: evaluation_steps.CalibrationRecord,
    config: Config,
    work_dir: str,
    run_id: str,
) -> evaluation_steps.ShiftEvaluation | None:
    if shift_logits is None:
        return None
    shifted = evaluation_steps.evaluate_shift(shift_logits, test_logits, fit, config.evaluation.n_bins, work_dir)
    store.log_metrics(run_id, shifted.metrics)
    store.log_artifact(run_id, shifted.result_path, "shift")
    for plot in shifted.plots:
        store.log_artifact(run_id, plot, "plots")
    get_run_logger().info(
        "corruption suite: mean ECE %.4f -> %.4f, mean accuracy %.4f",
        shifted.mean["before"]["ece"],
        shifted.mean["after"]["ece"],
        shifted.mean["after"]["accuracy"],
    )
    return shifted


@task(name="evaluate-ood", cache_policy=NO_CACHE)
def evaluate_ood(
    trained: model_steps.TrainedModel,
    ood_data: str | None,
    test_logits: str,
    fit: evaluation_steps.CalibrationRecord,
    config: Config,
    work_dir: str,
    run_id: str,
) -> evaluation_steps.OODEvaluation | None:
    if ood_data is None:
        return None
    ood = evaluation_steps.evaluate_ood(
        trained.checkpoint,
        ood_data,
        test_logits,
        fit,
        config.ood.score,
        work_dir,
        batch_size=config.evaluation.batch_size,
        device=config.train.device,
        threads=config.train.threads,
        loading=data_steps.image_loading(config.data),
    )
    store.log_metrics(run_id, ood.metrics)
    store.set_tags(run_id, {"ood_data_hash": ood.dvc_hash, "ood_path": config.ood.path})
    store.log_artifact(run_id, ood.scores_path, "ood")
    for plot in ood.plots:
        store.log_artifact(run_id, plot, "plots")
    get_run_logger().info(
        "OOD (%d images): MSP AUROC %.4f FPR95 %.4f, energy AUROC %.4f FPR95 %.4f",
        ood.n_images,
        ood.metrics[ood_metric("msp", "auroc")],
        ood.metrics[ood_metric("msp", "fpr95")],
        ood.metrics[ood_metric("energy", "auroc")],
        ood.metrics[ood_metric("energy", "fpr95")],
    )
    return ood


@task(name="fit-decisions", cache_policy=NO_CACHE)
def fit_decisions(
    calibration_logits: str,
    fit: evaluation_steps.CalibrationRecord,
    manifest: data_steps.ManifestRecord,
    config: Config,
    work_dir: str,
    run_id: str,
) -> str:
    path = evaluation_steps.fit_decisions(
        calibration_logits, fit, manifest.classes, config.decision, f"{work_dir}/decisions.json"
    )
    if config.decision.any_rule:  # the empty default travels with the model's files only
        store.log_artifact(run_id, path, "decisions")
    return path


@task(name="evaluate-decisions", cache_policy=NO_CACHE)
def evaluate_decisions(
    test_logits: str,
    fit: evaluation_steps.CalibrationRecord,
    decisions: str,
    config: Config,
    work_dir: str,
    run_id: str,
) -> evaluation_steps.DecisionEvaluation:
    evaluation = evaluation_steps.evaluate_decisions(test_logits, fit, decisions, config.gates.confidence, work_dir)
    store.log_metrics(
        run_id, {f"test/decision/{name}": value for name, value in evaluation.metrics.items() if value == value}
    )  # NaN (nothing kept, no positive) is not a metric
    for plot in evaluation.plots:
        store.log_artifact(run_id, plot, "plots")
    if evaluation.metrics:
        get_run_logger().info(
            "decisions on the test split: %s",
            ", ".join(f"{name} {value:.4f}" for name, value in evaluation.metrics.items() if "class_" not in name),
        )
    return evaluation


@task(
    name="check-gates", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient_only, cache_policy=NO_CACHE
)
def apply_gates(
    run: RunContext,
    config: Config,
    *,
    test_logits: str,
    fit: evaluation_steps.CalibrationRecord,
    data: DataVersion,
    manifest: data_steps.ManifestRecord,
    split: data_steps.SplitRecord,
    decisions: str | None = None,
    shift_logits: str | None = None,
    ood: evaluation_steps.OODEvaluation | None = None,
) -> GateReport:
    """The candidate's predictions, then the champion's from the registry, then one verdict on both."""
    candidate = evaluation_steps.candidate_predictions(
        test_logits,
        fit,
        decisions_path=decisions,
        shift_logits_path=shift_logits,
        ood=ood,
        soft_targets=evaluation_steps.soft_targets_of(test_logits, data.local_dir, manifest, config.data),
    )
    champion = promotion.champion_predictions(
        config.registry.model_name,
        candidate.predictions,
        test_rows=candidate.rows,
        shifted=candidate.shifted,
        data_dir=data.local_dir,
        manifest_path=manifest.path,
        split_path=split.path,
        gates=config.gates,
    )
    try:
        verdict = evaluate_gates(
            candidate.predictions,
            config.gates,
            champion.comparison,
            n_bins=config.evaluation.n_bins,
            decisions=candidate.decisions,
            shift=candidate.shift,
            shift_comparison=champion.shift_comparison,
            ood=candidate.ood,
        )
    except GateInputError as error:
        raise GateUndecided(f"this run's model cannot be gated: {error}") from error
    report = GateReport(
        config.registry.model_name, f"run {run.run_id}", champion.version, champion.excluded_seen_by_champion, verdict
    )
    store.log_artifact(run.run_id, report.save(f"{run.work_dir}/gates.json"), "gates")
    store.log_metrics(run.run_id, tagging.gate_metrics(verdict))
    store.set_tags(run.run_id, tagging.gate_tags(verdict, report.champion))
    get_run_logger().info(verdict.summary())
    return report


@task(name="find-same-build", **STORE_RETRIES)
def find_same_build(
    run: RunContext, data: DataVersion, config: Config, initial: model_steps.InitialWeights | None = None
) -> registration.SameBuild | None:
    """The registered version this run would rebuild (same data, params, initial weights and code),
    and whether only gates.* differ from what it was gated under; None when there is none."""
    return registration.same_build(
        config.registry.model_name,
        data_hash=data.dvc_hash,
        params_hash=config.params_hash,
        git_commit=run.git_commit,
        git_dirty=run.git_dirty,
        code_tree=run.code_tree,
        init_weights_sha256=initial.sha256 if initial else None,
        gate_params={key: value for key, value in config.hyperparameters().items() if key.startswith("gates.")},
    )


@task(
    name="regate-version",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_transient_only,
    cache_policy=NO_CACHE,
)
def regate_version(run: RunContext, config: Config, same: registration.SameBuild, repo_root: str) -> GateReport:
    """A threshold-only change: gate the registered version again under this run's gates, from the
    registry (as `calibflow gate`), without retraining. @champion is gated alone (the gates against
    a champion have nothing to compare it with); another version against @champion. The verdict is
    recorded on this run (gate tags, metrics, gates.json); no alias moves."""
    against = None if same.is_champion else "@champion"
    report = promotion.gate_version(same.name, same.version, config.gates, against, repo_root, config.evaluation.n_bins)
    store.log_artifact(run.run_id, report.save(f"{run.work_dir}/gates.json"), "gates")
    store.log_metrics(run.run_id, tagging.gate_metrics(report.verdict))
    held = registration.CHAMPION if same.is_champion else registration.CHALLENGER if same.aliases else None
    verdict = tagging.run_verdict(report.verdict, report.champion, held).tags()
    if same.is_champion:  # a champion, but no other version to compare it with
        verdict.update(
            {
                names.VERDICT_CHAMPION: names.NOT_COMPARED,
                GATE_AGAINST: f"none: version {same.version} is @champion itself",
            }
        )
    store.set_tags(
        run.run_id,
        {
            **tagging.gate_tags(report.verdict, report.champion),
            **verdict,
            "regated_version": same.version,
            "regated_gates": same.describe_changes()[:5000],
        },
    )
    get_run_logger().info(report.verdict.summary())
    return report


@task(name="record-version-lineage", **STORE_RETRIES)
def record_version_lineage(
    version: registration.RegisteredVersion,
    alias: str,
    config: Config,
    split: data_steps.SplitRecord,
    gate: GateReport,
) -> None:
    """The registered version's tags that complete its lineage (split sizes, key params) and its
    run's verdict as it stands with `alias` (the three parts, calibflow.pipeline.tagging.run_verdict),
    so that its page says where it came from and what its gates said."""
    registration.set_version_tags(
        version.name,
        version.version,
        registration.lineage_tags(
            split_sizes=split.sizes,
            params=config.flat(),
            verdict_tags=tagging.run_verdict(gate.verdict, gate.champion, alias).tags(),
        ),
    )


@task(name="describe-version", cache_policy=NO_CACHE)
def describe_version(version: registration.RegisteredVersion, alias: str, run: RunContext, summary: str) -> None:
    """The version's MLflow description: its verdict and lineage (read back from its tags), then the
    run's summary. Best effort, as the run's own description: the outcome is recorded already."""
    try:
        record = registration.resolve_model_uri(f"models:/{version.name}/{version.version}")
        text = registration.version_description(
            version.name, version.version, record.tags, alias=alias, run_id=run.run_id, summary=summary
        )
        store.set_version_description(version.name, version.version, text)
    except Exception as error:  # noqa: BLE001
        get_run_logger().warning("could not write the version's description (%s: %s)", type(error).__name__, error)
