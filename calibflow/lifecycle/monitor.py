"""`calibflow monitor`: is a registered model still fine on the images that arrived since?

With labels (an ImageFolder, the delayed feedback most teams get), accuracy and the calibration
error are bounded at `gates.confidence` and compared with what the version recorded at
registration, within `monitor.max_accuracy_drop` and `monitor.max_ece_increase`:

- exit 3, **accuracy drifted** (retrain): the upper bound of accuracy is below the recorded
  accuracy minus the tolerance;
- exit 1, **calibration drifted** (recalibrate): the lower bound of the calibration error is above
  the recorded error plus the tolerance (calibflow.gates.statistics.calibration_error_lower_bound);
- exit 0, **fine**: the lower bound of accuracy and the upper bound of the error are both within
  their tolerances;
- exit 2, **undecided**: neither is shown (too few images to tell), or the data cannot be read.

Without labels (a flat folder of images), accuracy is estimated from calibrated confidence
(calibflow.evaluation.accuracy_estimation: CBPE and ATC, its threshold fitted on the version's own test
split) and the confidence distribution is compared with the test split's (Kolmogorov-Smirnov).
Estimates certify nothing, so: exit 3 when both estimates' intervals lie below the recorded
accuracy minus the tolerance, exit 0 when both reach it and the confidence has not drifted, exit 2
otherwise (label a sample). Images the version was fitted on (its train, val or calibration split,
by content hash) are dropped first and counted in the report; a folder holding nothing else is
refused (exit 2). Every check is logged as an MLflow run in `MONITOR_EXPERIMENT`, tagged
with the model version, and the version gets the run's id and verdict as tags.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from calibflow.tracking import registration
from calibflow.tracking import store
from calibflow.evaluation.accuracy_estimation import atc_accuracy, atc_threshold, cbpe_accuracy, confidence_drift
from calibflow.config import Config
from calibflow.gates.statistics import (
    EqualWidthBins,
    calibration_error_lower_bound,
    calibration_error_upper_bound,
    clopper_pearson_lower,
    clopper_pearson_upper,
)
from calibflow.data.manifest import is_image_file
from calibflow.names import CALIBRATED, on_test, version_tag
from calibflow.lifecycle.reproduce import (
    predict_files_of,
    predict_rows,
    rebuild_test_split,
    served_classes,
)
from calibflow.data.versioning import resolve_data
from calibflow.disk_cache import file_sha256
from calibflow.lifecycle.promotion import seen_by
from calibflow.errors import MonitorDataError, NotFound

MONITOR_EXPERIMENT = "calibflow-monitoring"
EXIT_FINE, EXIT_RECALIBRATE, EXIT_UNDECIDED, EXIT_RETRAIN = 0, 1, 2, 3
VERDICTS = {
    EXIT_FINE: "fine",
    EXIT_RECALIBRATE: "calibration drifted: recalibrate",
    EXIT_UNDECIDED: "undecided",
    EXIT_RETRAIN: "accuracy drifted: retrain",
}


@dataclass
class MonitorReport:
    model: str
    version: str
    data_path: str
    data_hash: str
    n_images: int
    labeled: bool
    confidence: float
    recorded: dict[str, float]
    measured: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    exit_code: int = EXIT_UNDECIDED
    excluded_seen: int = 0  # images of the folder the version was fitted on, left out of every number

    @property
    def verdict(self) -> str:
        return VERDICTS[self.exit_code]

    def to_json(self) -> dict:
        return {**asdict(self), "verdict": self.verdict}

    def summary(self) -> str:
        kind = "labeled" if self.labeled else "unlabeled"
        lines = [
            f"{self.model} version {self.version} on {self.n_images} {kind} images of {self.data_path}: "
            f"{self.verdict.upper()} (exit {self.exit_code})"
        ]
        lines += [f" - {reason}" for reason in self.reasons]
        return "\n".join(lines)


def read_monitoring_folder(
    local_dir: str | Path, classes: list[str], data_path: str
) -> tuple[list[str], np.ndarray | None]:
    """(relative image paths, label indices in the model's class order or None when unlabeled)."""
    root = Path(local_dir)
    entries = [p for p in sorted(root.iterdir()) if not p.name.startswith(".")]
    folders = [p for p in entries if p.is_dir()]
    files = [p for p in entries if p.is_file()]
    if folders and files:
        raise MonitorDataError(
            f"{data_path} holds both class folders and loose files ({files[0].name}): use an "
            f"ImageFolder (<class>/<image>, labeled) or a flat folder of images (unlabeled)"
        )
    if not folders:
        images = [p.name for p in files if is_image_file(p)]
        if not images:
            raise MonitorDataError(
                f"{data_path} holds no images: put the new images there (flat for unlabeled, "
                f"<class>/<image> for labeled) and `dvc add {data_path}`"
            )
        return images, None
    unknown = [p.name for p in folders if p.name not in classes]
    if unknown:
        raise MonitorDataError(
            f"{data_path}: class folder(s) {', '.join(unknown)} are not classes of the model "
            f"({', '.join(classes)}): rename them to the model's class names, or monitor a "
            f"model trained on those classes"
        )
    paths, labels = [], []
    for folder in folders:
        for image in sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p)):
            paths.append(f"{folder.name}/{image.name}")
            labels.append(classes.index(folder.name))
    if not paths:
        raise MonitorDataError(f"{data_path}: its class folders hold no images")
    return paths, np.array(labels)


def _recorded(tags: dict[str, str]) -> dict[str, float]:
    accuracy = version_tag(tags, on_test(CALIBRATED, "accuracy"))
    ece = version_tag(tags, on_test(CALIBRATED, "ece"))
    if accuracy is None or ece is None:
        raise NotFound(
            f"the version has no recorded test accuracy and ECE (tags {on_test(CALIBRATED, 'accuracy')}, "
            f"{on_test(CALIBRATED, 'ece')}) to compare with"
        )
    return {"accuracy": float(accuracy), "ece": float(ece)}


def drop_seen(
    local_dir: str | Path, paths: list[str], labels: np.ndarray | None, seen: set[str], data_path: str
) -> tuple[list[str], np.ndarray | None, int]:
    """The folder's images less those whose content the version was fitted on, and how many left.

    Dropped and counted, not refused: every bound and estimate here assumes images the network has
    not seen, and on its own train/val/calibration images it is more often right and more sure, so
    kept they would pull a drifted model toward FINE. Without them the verdict is a true statement
    about the new images, only on fewer of them (its bounds widen, toward undecided, never toward
    a false fine), which is what `calibflow gate` does with a test split the champion saw. The count
    is in the report, its summary and the MLflow run, so a folder that was mostly old images is
    visible; one that holds nothing else is refused."""
    keep = np.array([file_sha256(Path(local_dir) / path) not in seen for path in paths], dtype=bool)
    dropped = int((~keep).sum())
    if not keep.any():
        raise MonitorDataError(
            f"{data_path}: all {len(paths)} of its images are images the version was fitted on (its "
            f"train, val or calibration split), which say nothing about new images: monitor images "
            f"that arrived since"
        )
    kept = [path for path, k in zip(paths, keep, strict=True) if k]
    return kept, (labels[keep] if labels is not None else None), dropped


def monitor_version(model_uri: str, data_path: str, config: Config, repo_root: str | Path = ".") -> MonitorReport:
    record = registration.resolve_model_uri(model_uri)
    model = registration.load_model(f"models:/{record.name}/{record.version}")
    classes = served_classes(model)
    data = resolve_data(repo_root, data_path, None)
    paths, labels = read_monitoring_folder(data.local_dir, classes, data_path)
    paths, labels, dropped = drop_seen(data.local_dir, paths, labels, seen_by(record), data_path)
    probabilities = predict_files_of(model, data.local_dir, paths)
    settings, confidence = config.monitor, config.gates.confidence
    report = MonitorReport(
        record.name,
        record.version,
        data.path,
        data.dvc_hash,
        len(paths),
        labels is not None,
        confidence,
        _recorded(record.tags),
        excluded_seen=dropped,
    )
    floor = report.recorded["accuracy"] - settings.max_accuracy_drop
    if labels is not None:
        _judge_labeled(
            report,
            probabilities,
            labels,
            int(record.tags.get("n_bins", 15)),
            floor,
            report.recorded["ece"] + settings.max_ece_increase,
        )
    else:
        rebuilt = rebuild_test_split(record, repo_root)
        rows = rebuilt.split.indices["test"]
        reference = predict_rows(model, rebuilt.data.local_dir, rebuilt.manifest, rows)
        _judge_unlabeled(
            report,
            probabilities,
            reference,
            rebuilt.manifest["label_index"].to_numpy()[rows],
            floor,
            settings.drift_alpha,
        )
    if dropped:
        report.reasons.append(
            f"{dropped} of the folder's {dropped + len(paths)} images were images the version was fitted on "
            f"(train, val or calibration split): left out, every number above is on the other {len(paths)}"
        )
    return report


def _judge_labeled(
    report: MonitorReport,
    probabilities: np.ndarray,
    labels: np.ndarray,
    n_bins: int,
    accuracy_floor: float,
    ece_ceiling: float,
) -> None:
    conf, correct = probabilities.max(axis=1), probabilities.argmax(axis=1) == labels
    n, k, c = len(correct), int(correct.sum()), report.confidence
    accuracy_lower, accuracy_upper = clopper_pearson_lower(k, n, c), clopper_pearson_upper(k, n, c)
    profile = EqualWidthBins(n_bins)
    ece_low = calibration_error_lower_bound(conf, correct, profile, c)
    ece_high = calibration_error_upper_bound(conf, correct, profile, c)
    report.measured = {
        "accuracy": k / n,
        "accuracy_lower": accuracy_lower,
        "accuracy_upper": accuracy_upper,
        "ece": ece_low.estimate,
        "ece_lower": ece_low.bound,
        "ece_upper": ece_high.bound,
        "nll": float(-np.mean(np.log(np.clip(probabilities[np.arange(n), labels], 1e-12, None)))),
    }
    m, side = report.measured, f"{c:.0%}"
    accuracy_text = (
        f"accuracy {m['accuracy']:.4f} ({side} bounds {m['accuracy_lower']:.4f}-{m['accuracy_upper']:.4f}; "
        f"recorded {report.recorded['accuracy']:.4f}, floor {accuracy_floor:.4f})"
    )
    ece_text = (
        f"ECE {m['ece']:.4f} ({side} bounds {m['ece_lower']:.4f}-{m['ece_upper']:.4f}; recorded "
        f"{report.recorded['ece']:.4f}, ceiling {ece_ceiling:.4f})"
    )
    report.reasons = [accuracy_text, ece_text]
    if m["accuracy_upper"] < accuracy_floor:
        report.exit_code = EXIT_RETRAIN
    elif m["ece_lower"] > ece_ceiling:
        report.exit_code = EXIT_RECALIBRATE
    elif m["accuracy_lower"] >= accuracy_floor and m["ece_upper"] <= ece_ceiling:
        report.exit_code = EXIT_FINE
    else:
        report.exit_code = EXIT_UNDECIDED
        report.reasons.append(f"{n} images cannot show either drift or its absence at {side}: monitor more images")


def _judge_unlabeled(
    report: MonitorReport,
    probabilities: np.ndarray,
    reference: np.ndarray,
    reference_labels: np.ndarray,
    accuracy_floor: float,
    drift_alpha: float,
) -> None:
    c = 2 * report.confidence - 1  # two-sided intervals whose ends are one-sided at gates.confidence
    cbpe = cbpe_accuracy(probabilities, c)
    atc = atc_accuracy(probabilities, atc_threshold(reference, reference_labels), level=c)
    drift = confidence_drift(reference, probabilities, drift_alpha)
    report.measured = {
        "cbpe": cbpe.estimate,
        "cbpe_lower": cbpe.lower,
        "cbpe_upper": cbpe.upper,
        "atc_ne": atc.estimate,
        "atc_ne_lower": atc.lower,
        "atc_ne_upper": atc.upper,
        "confidence_ks": drift.statistic,
        "confidence_ks_p": drift.p_value,
        "mean_confidence": drift.current_mean,
        "mean_confidence_test_split": drift.reference_mean,
    }
    report.reasons = [
        f"estimated accuracy: CBPE {cbpe.estimate:.4f} ({cbpe.lower:.4f}-{cbpe.upper:.4f}), ATC-NE {atc.estimate:.4f} "
        f"({atc.lower:.4f}-{atc.upper:.4f}); recorded {report.recorded['accuracy']:.4f}, floor {accuracy_floor:.4f}",
        f"confidence distribution {'DRIFTED' if drift.drifted else 'unchanged'}: mean {drift.current_mean:.4f} vs "
        f"{drift.reference_mean:.4f} on the test split (KS {drift.statistic:.3f}, p {drift.p_value:.3g})",
    ]
    if cbpe.upper < accuracy_floor and atc.upper < accuracy_floor:
        report.exit_code = EXIT_RETRAIN
    elif cbpe.lower >= accuracy_floor and atc.lower >= accuracy_floor and not drift.drifted:
        report.exit_code = EXIT_FINE
    else:
        report.exit_code = EXIT_UNDECIDED
        report.reasons.append(
            "without labels the estimates cannot settle it: label a sample of these images and "
            "monitor it as an ImageFolder"
        )


def log_monitor_run(report: MonitorReport, repo_root: str | Path = ".") -> str:
    """The check as an MLflow run, linked both ways to the model version."""
    run_id = store.start_run(
        MONITOR_EXPERIMENT,
        f"monitor {report.model} v{report.version}",
        {
            "model_name": report.model,
            "model_version": report.version,
            "data_path": report.data_path,
            "data_hash": report.data_hash,
            "labeled": str(report.labeled),
            "verdict": report.verdict,
        },
        repo_root,
    )
    measured = {**report.measured, "excluded_seen": report.excluded_seen}
    store.log_metrics(run_id, {f"monitor/{k}": v for k, v in measured.items()})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "monitor.json"
        path.write_text(json.dumps(report.to_json(), indent=1))
        store.log_artifact(run_id, path)
    store.end_run(run_id, "succeeded", report.verdict)
    registration.set_version_tags(
        report.model, report.version, {"last_monitor_run": run_id, "last_monitor_verdict": report.verdict}
    )
    return run_id
