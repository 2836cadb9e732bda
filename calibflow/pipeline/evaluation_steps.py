"""The pipeline's evaluation steps over collected logits: fit the calibrator and the decision rules
on the calibration split, evaluate before and after on the test split, under the corruption suite and
on out-of-distribution images, and hand the gates ready predictions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibflow.calibrators.temperature import NLL_SLACK
from calibflow.errors import CalibrationError
from calibflow.config import CalibrationConfig, DataConfig, DecisionConfig
from calibflow.gates.decisions import (
    DecisionPolicy,
    evaluate_policy,
    fit_policy,
    risk_coverage_curve,
)
from calibflow.training.ensembles import (
    fit_model_calibrator,
    model_calibrator_from_state,
    uncalibrated_probabilities,
)
from calibflow.gates.checks import OODScores, Predictions, ShiftedPredictions
from calibflow.data.image_files import ImageLoading, closing
from calibflow.data.manifest import (
    load_manifest,
)
from calibflow.metrics import probability_nll, probability_report, reliability_bins, soft_report, top_label
from calibflow.training.models import load_checkpoint
from calibflow.names import (
    ood_metric,
)
from calibflow.evaluation.plots import (
    binary_score_distributions,
    class_confidence_histograms,
    confidence_histogram,
    decision_score_histograms,
    reliability_diagram,
)
from calibflow.evaluation.plots import risk_coverage_curve as plot_risk_coverage
from calibflow.evaluation.shift import evaluate_suite
from calibflow.training.loop import intra_op_threads
from calibflow.pipeline.data_steps import ImageFormat, ManifestRecord, image_loading, image_source, soft_targets_of_rows
from calibflow.pipeline.model_steps import checkpoint_logits, load_logits, load_shift_logits


@dataclass(frozen=True)
class ShiftEvaluation:
    result_path: str  # SuiteResult.to_json(), a run artifact that `calibflow evaluate` checks against
    metrics: dict[str, float]  # SuiteResult.flat_metrics(): what MLflow logs
    mean: dict[str, dict[str, float]]  # before / after -> accuracy, ece, nll, over the suite
    suite_json: str
    plots: tuple[str, ...]


def evaluate_shift(
    shift_logits_path: str, test_logits_path: str, calibration: CalibrationRecord, n_bins: int, out_dir: str
) -> ShiftEvaluation:
    """Accuracy, ECE and NLL of every cell before and after calibration, their means, the same test
    images uncorrupted for reference, and the severity plot."""
    suite, cells, labels, rows = load_shift_logits(shift_logits_path)
    with np.load(test_logits_path) as saved:
        clean_logits, test_rows = saved["logits"], saved["indices"]
    # the suite's images are test images (Suite.images), in the test split's order
    position = {row: i for i, row in enumerate(test_rows.tolist())}
    if not all(row in position for row in rows.tolist()):
        raise ValueError("the corruption suite's images are not test images")  # a bug, not a user error
    calibrator = load_calibrator(calibration.state_path)
    clean = clean_logits[[position[row] for row in rows.tolist()]]
    result = evaluate_suite(
        suite,
        {k: uncalibrated_probabilities(z) for k, z in cells.items()},
        {k: calibrator.transform(z) for k, z in cells.items()},
        uncalibrated_probabilities(clean),
        calibrator.transform(clean),
        labels,
        n_bins,
    )
    out = Path(out_dir)
    result_path = out / "shift_metrics.json"
    result_path.write_text(json.dumps(result.to_json(), indent=1))
    from calibflow.evaluation.plots import shift_curves

    described = f"T = {calibration.temperature:.3f}" if calibration.temperature else calibration.method
    plot = shift_curves(
        result.to_json(),
        out / "shift_curves.png",
        title=f"corruption suite on {result.n_images} test images ({described})",
    )
    return ShiftEvaluation(
        result_path=str(result_path),
        metrics=result.flat_metrics(),
        mean=result.mean,
        suite_json=suite.to_json(),
        plots=(str(plot),),
    )


@dataclass(frozen=True)
class OODEvaluation:
    scores_path: str  # npz: in-distribution ("inside_<score>") and OOD ("outside_<score>") scores
    metrics: dict[str, float]  # ood/<score>/<auroc|aupr|fpr95> (calibflow.names)
    score: str  # what gates.max_ood_fpr95 reads
    dvc_hash: str
    n_images: int
    plots: tuple[str, ...]
    path: str = ""  # ood.path
    rev: str = "workspace"  # where DVC read it (versioning.DataVersion.rev)
    # ood.files_digest of the scored files' SHA-256s, so `calibflow gate` scores the same bytes
    files_digest: str = ""


def check_ood_data(
    repo_root: str,
    manifest_path: str,
    path: str,
    max_images: int,
    out_path: str,
    key: str = "ood.path",
    not_in: str | None = None,
    *,
    min_side: int = 1,
) -> str:
    """Before training: pin `path` (params.yaml's `key`: ood.path or train.outlier_exposure) with
    DVC and refuse it when missing, empty, not images (or transparent, or below `min_side` on the
    shorter side), or holding images of the dataset (or of the folder checked into `not_in`); the
    checked list of files is written to `out_path`."""
    from calibflow.evaluation.ood import check_ood_folder, folder_hashes, load_ood_data, save_ood_data

    hashes = set(load_manifest(manifest_path)["sha256"])
    other = load_ood_data(not_in) if not_in else None
    return save_ood_data(
        check_ood_folder(
            repo_root,
            path,
            hashes,
            max_images,
            key,
            folder_hashes(other) if other else frozenset(),
            f"ood.path ({other.path})" if other else "",
            min_side=min_side,
        ),
        out_path,
    )


def evaluate_ood(
    checkpoint: str,
    ood_data_path: str,
    test_logits_path: str,
    calibration: CalibrationRecord,
    score: str,
    out_dir: str,
    *,
    batch_size: int = 512,
    device: str = "auto",
    threads: int | str | None = None,
    loading: ImageLoading | None = None,
) -> OODEvaluation:
    """MSP and energy on the test split and on the OOD images (decoded in the model's mode and
    size), AUROC, AUPR and FPR95 of each, and their histograms. `loading` (data.in_memory_max_mb,
    data.workers): a large folder is read from its files, a batch at a time."""
    from calibflow.evaluation.ood import detection_metrics, files_digest, in_distribution_score, ood_scores
    from calibflow.evaluation.plots import ood_score_histograms

    ood = json.loads(Path(ood_data_path).read_text())
    loaded = load_checkpoint(checkpoint, for_inference=True)
    loading = loading or image_loading(DataConfig())
    images = image_source(
        ood["local_dir"],
        list(ood["files"]),
        ImageFormat.of_checkpoint(loaded),
        loading=loading,
        digests=ood.get("sha256") or None,  # each file's bytes as check_ood_data read them
    )
    calibrator = load_calibrator(calibration.state_path)
    with intra_op_threads(threads), closing(images):
        outside_logits = checkpoint_logits(
            loaded, images, batch_size=batch_size, device=device, workers=loading.workers
        ).numpy()
    outside = ood_scores(outside_logits, calibrator)
    test_logits, _ = load_logits(test_logits_path)
    inside = ood_scores(test_logits, calibrator)
    metrics = {}
    for name in ("msp", "energy"):
        for key, value in detection_metrics(
            in_distribution_score(name, inside), in_distribution_score(name, outside)
        ).items():
            metrics[ood_metric(name, key)] = value
    out = Path(out_dir)
    scores_path = out / "ood_scores.npz"
    np.savez(
        scores_path, **{f"inside_{k}": v for k, v in inside.items()}, **{f"outside_{k}": v for k, v in outside.items()}
    )
    plot = ood_score_histograms(
        {
            "max softmax probability (calibrated)": (inside["msp"], outside["msp"]),
            "energy (-T logsumexp(z/T))": (inside["energy"], outside["energy"]),
        },
        out / "ood_score_histograms.png",
        title=f"test split vs {ood['path']} ({len(ood['files'])} images)",
    )
    return OODEvaluation(
        scores_path=str(scores_path),
        metrics=metrics,
        score=score,
        dvc_hash=ood["dvc_hash"],
        n_images=len(ood["files"]),
        plots=(str(plot),),
        path=ood["path"],
        rev=ood.get("rev", "workspace"),
        files_digest=files_digest(ood["sha256"]) if ood.get("sha256") else "",
    )


def ood_gate_scores(ood: OODEvaluation) -> OODScores:
    from calibflow.evaluation.ood import in_distribution_score

    with np.load(ood.scores_path) as saved:
        inside = {k: saved[f"inside_{k}"] for k in ("msp", "energy")}
        outside = {k: saved[f"outside_{k}"] for k in ("msp", "energy")}
    name = "MSP" if ood.score == "msp" else "minus energy"
    return OODScores(in_distribution_score(ood.score, inside), in_distribution_score(ood.score, outside), name)


@dataclass(frozen=True)
class CandidatePredictions:
    """What the gates read of this run's model, ready: calibrated test probabilities with their
    labels and manifest rows, its decision rules, its corruption suite's probabilities and its OOD
    scores. The champion's side comes from the registry, in the task layer
    (promotion.champion_predictions)."""

    predictions: Predictions
    rows: np.ndarray
    decisions: DecisionPolicy | None = None
    shifted: ShiftedPredictions | None = None
    shift: dict[str, Predictions] | None = None  # `shifted` with its labels, as the shift gates read it
    ood: OODScores | None = None


def candidate_predictions(
    test_logits_path: str,
    calibration: CalibrationRecord,
    *,
    decisions_path: str | None = None,
    shift_logits_path: str | None = None,
    ood: OODEvaluation | None = None,
    soft_targets: np.ndarray | None = None,
) -> CandidatePredictions:
    """The run's candidate as the gates see it, from its cached test logits (and the suite's cached
    logits, for the shift gates) through its fitted calibrator: the numbers its pyfunc serves;
    `soft_targets` (soft_targets_of) for the soft gates."""
    with np.load(test_logits_path) as saved:
        logits, labels, rows = saved["logits"], saved["labels"], saved["indices"]
    calibrator = load_calibrator(calibration.state_path)
    predictions = Predictions(calibrator.transform(logits).numpy(), labels, soft_targets)
    policy = DecisionPolicy.load(decisions_path) if decisions_path else None
    shifted = shift = None
    if shift_logits_path is not None:
        suite, cells, shift_labels, shift_rows = load_shift_logits(shift_logits_path)
        shifted = ShiftedPredictions(suite, shift_rows, {k: calibrator.transform(z).numpy() for k, z in cells.items()})
        shift = {key: Predictions(p, shift_labels) for key, p in shifted.probabilities.items()}
    scores = ood_gate_scores(ood) if ood is not None else None
    return CandidatePredictions(predictions, rows, policy, shifted, shift, scores)


@dataclass(frozen=True)
class CalibrationRecord:
    method: str
    state_path: str  # the fitted calibrator (calibrator_from_state), saved with the model
    temperature: float | None  # temperature scaling's T, None for other methods
    nll_before: float  # calibration split, uncalibrated softmax
    nll_after: float  # calibration split, calibrated
    selection: tuple[dict, ...] = ()  # method auto: the cross-validation comparison
    objective: str = "nll"  # what the fit minimised and nll_* measure: "nll", or "soft_nll" (calibration.targets soft)


def fit_calibration(
    logits_path: str, calibration: CalibrationConfig, out_path: str, *, soft_targets: np.ndarray | None = None
) -> CalibrationRecord:
    """Fit `calibration.method` on the calibration logits. Whatever the method, a fit that does not
    lower the calibration NLL is an error, not a model. With calibration.targets soft,
    `soft_targets` (soft_targets_of) are what temperature scaling is fitted against, and the NLL
    it must lower is theirs."""
    logits, labels = load_logits(logits_path)
    if calibration.targets == "soft":
        return _fit_temperature_on_soft_labels(logits, labels, soft_targets, calibration, out_path)
    # the temperature range holds wherever temperature scaling is fitted: auto's candidates too
    options = (
        {"min_temperature": calibration.min_temperature, "max_temperature": calibration.max_temperature}
        if calibration.method in ("temperature", "auto")
        else {}
    )
    calibrator = fit_model_calibrator(calibration.method, logits, labels, **options)
    nll_before = probability_nll(uncalibrated_probabilities(logits), labels)
    nll_after = probability_nll(calibrator.transform(logits), labels)
    if not nll_after <= nll_before + NLL_SLACK:
        raise CalibrationError(
            f"{calibrator.method} calibration raised the calibration NLL ({nll_before:.6f} -> "
            f"{nll_after:.6f}); use calibration.method=temperature or enlarge the calibration split"
        )
    Path(out_path).write_text(json.dumps(calibrator.to_state()))
    return CalibrationRecord(
        method=calibrator.method,
        state_path=str(out_path),
        temperature=getattr(calibrator, "temperature", None),
        nll_before=nll_before,
        nll_after=nll_after,
        selection=tuple(calibrator.selection or ()),
    )


def _fit_temperature_on_soft_labels(
    logits: np.ndarray, labels: np.ndarray, targets: np.ndarray | None, calibration: CalibrationConfig, out_path: str
) -> CalibrationRecord:
    from calibflow.calibrators.scaling import TemperatureCalibrator
    from calibflow.metrics import soft_nll_values

    if targets is None:
        raise ValueError("calibration.targets soft: fit_calibration needs the calibration split's soft labels")
    calibrator = TemperatureCalibrator(calibration.min_temperature, calibration.max_temperature)
    calibrator.fit(logits, labels, targets=targets)
    nll_before = float(soft_nll_values(uncalibrated_probabilities(logits), targets).mean())
    nll_after = float(soft_nll_values(calibrator.transform(logits), targets).mean())
    Path(out_path).write_text(json.dumps(calibrator.to_state()))
    return CalibrationRecord(
        method=calibrator.method,
        state_path=str(out_path),
        temperature=calibrator.temperature,
        nll_before=nll_before,
        nll_after=nll_after,
        objective="soft_nll",
    )


def load_calibrator(state_path: str):
    return model_calibrator_from_state(json.loads(Path(state_path).read_text()))


@dataclass(frozen=True)
class Evaluation:
    before: dict[str, float]
    after: dict[str, float]
    plots: tuple[str, ...]


def soft_targets_of(logits_path: str, data_dir: str, manifest: ManifestRecord, data: DataConfig) -> np.ndarray | None:
    """The soft labels (N, K) float64 of the images whose logits `logits_path` holds, in its order;
    None without data.soft_labels."""
    if data.soft_labels is None:
        return None
    with np.load(logits_path) as saved:
        rows = saved["indices"]
    return soft_targets_of_rows(data_dir, manifest, rows, data)


def evaluate_calibration(
    logits_path: str,
    calibration: CalibrationRecord,
    n_bins: int,
    out_dir: str,
    class_names: tuple[str, ...] = (),
    *,
    soft_targets: np.ndarray | None = None,
) -> Evaluation:
    """Test-split metrics before (plain softmax) and after calibration, and the diagnostic plots;
    with `soft_targets` (soft_targets_of), the metrics against them too (calibflow.metrics.soft)."""
    logits, labels = load_logits(logits_path)
    probabilities = {
        "before": uncalibrated_probabilities(logits),
        "after": load_calibrator(calibration.state_path).transform(logits),
    }
    before, after = (probability_report(probabilities[k], labels, n_bins) for k in ("before", "after"))
    if soft_targets is not None:
        before.update(soft_report(probabilities["before"], soft_targets, n_bins))
        after.update(soft_report(probabilities["after"], soft_targets, n_bins))
    bins = {k: reliability_bins(p, labels, n_bins) for k, p in probabilities.items()}
    out = Path(out_dir)
    described = f"T = {calibration.temperature:.3f}" if calibration.temperature else calibration.method
    plots = [
        reliability_diagram(
            bins["before"],
            bins["after"],
            out / "reliability_diagram.png",
            title=f"test split, {described}",
            panel_titles=("before calibration", f"after {calibration.method} calibration"),
        )
    ]
    panels = {}
    for name, p in probabilities.items():
        confidence, prediction = top_label(p)
        panels[name] = (confidence.numpy(), (prediction.numpy() == labels))
    plots.append(
        confidence_histogram(panels, out / "confidence_histogram.png", title="top-label confidence, test split")
    )
    plots.append(
        class_confidence_histograms(
            probabilities["after"],
            labels,
            out / "class_confidence_histograms.png",
            class_names=list(class_names) or None,
            title="calibrated confidence by true class, test split",
        )
    )
    if logits.shape[-1] == 2:
        plots.append(
            binary_score_distributions(
                probabilities["after"],
                labels,
                out / "binary_score_distributions.png",
                title="calibrated positive-class score, test split",
            )
        )
    return Evaluation(before=before, after=after, plots=tuple(str(p) for p in plots))


def fit_decisions(
    logits_path: str, calibration: CalibrationRecord, classes: tuple[str, ...], decision: DecisionConfig, out_path: str
) -> str:
    """Fit the decision rules of params.yaml on the calibrated probabilities of the calibration
    split and save the policy the served model applies (an empty one when no rule is set, so every
    model serves the same output schema). DecisionInfeasible when a certified rule cannot be met."""
    if not decision.any_rule:  # the default: nothing to fit, so no logits to read
        return DecisionPolicy(tuple(classes)).save(out_path)
    logits, labels = load_logits(logits_path)
    probabilities = load_calibrator(calibration.state_path).transform(logits).numpy()
    return fit_policy(probabilities, labels, classes, decision).save(out_path)


@dataclass(frozen=True)
class DecisionEvaluation:
    metrics: dict[str, float]  # evaluate_policy's, on the test split
    plots: tuple[str, ...]


def evaluate_decisions(
    logits_path: str, calibration: CalibrationRecord, decisions_path: str, confidence: float, out_dir: str
) -> DecisionEvaluation:
    """The served decisions on the test split, each rate with its one-sided bound, and their plots:
    the class-conditional score histograms before and after calibration (binary rules) and the
    risk-coverage curve (abstention)."""
    policy = DecisionPolicy.load(decisions_path)
    if policy.is_empty:  # the default: nothing decided, nothing to measure
        return DecisionEvaluation(metrics={}, plots=())
    logits, labels = load_logits(logits_path)
    probabilities = load_calibrator(calibration.state_path).transform(logits).numpy()
    metrics = evaluate_policy(policy, probabilities, labels, confidence)
    out, plots = Path(out_dir), []
    if policy.positive is not None:
        k = policy.positive_index
        raw = uncalibrated_probabilities(logits).numpy()[:, k]
        plots.append(
            decision_score_histograms(
                {"before calibration (softmax)": raw, f"after {calibration.method} calibration": probabilities[:, k]},
                labels == k,
                out / "decision_score_histograms.png",
                policy.positive.threshold,
                policy.positive_class,
                title=f"P({policy.positive_class}) by true class, test split ({policy.positive.rule} threshold)",
            )
        )
    if policy.abstain is not None:
        top = probabilities.argmax(axis=1)
        confidence_scores = probabilities[np.arange(len(top)), top]
        coverage, risk = risk_coverage_curve(confidence_scores, top == labels)
        served = (metrics["selective_coverage"], metrics["selective_risk"])
        plots.append(
            plot_risk_coverage(
                coverage,
                risk,
                out / "risk_coverage.png",
                served=None if np.isnan(served[1]) else served,
                max_risk=policy.abstain.target,
                title="risk-coverage, test split",
            )
        )
    return DecisionEvaluation(metrics=metrics, plots=tuple(str(p) for p in plots))
