"""The pipeline's steps as plain functions over files.

Each step reads the files the previous ones wrote and returns a small record (paths, hashes,
numbers), never tensors or DataFrames: Prefect tasks wrap these one-to-one, and the records are
what crosses task boundaries. Nothing here knows about Prefect or MLflow.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from calibflow.calibrators.temperature import NLL_SLACK
from calibflow.errors import CalibrationError
from calibflow.config import CalibrationConfig, Config, DataConfig, DecisionConfig, SplitConfig
from calibflow.errors import ConfigError
from calibflow.gates.decisions import (
    DECISION_TAG_PREFIX,
    DecisionPolicy,
    evaluate_policy,
    fit_policy,
    risk_coverage_curve,
)
from calibflow.training.ensembles import (
    fit_model_calibrator,
    member_seeds,
    model_calibrator_from_state,
    predictive_logits,
    uncalibrated_probabilities,
)
from calibflow.gates.checks import GateVerdict, OODScores, ShiftedPredictions
from calibflow.data.images import load_images
from calibflow.leftovers import ProcessId, alive, this_process
from calibflow.data.manifest import (
    build_manifest,
    class_counts,
    list_classes,
    load_manifest,
    manifest_fingerprint,
    save_manifest,
)
from calibflow.metrics import probability_nll, probability_report, reliability_bins, top_label
from calibflow.training.models import ModelSpec, load_checkpoint, save_checkpoint
from calibflow.names import (
    CALIBRATED,
    CALIBRATION_METHOD,
    GATE_ABSOLUTE,
    GATE_AGAINST,
    GATE_VERDICT,
    TEMPERATURE,
    UNCALIBRATED,
    calibration_metric,
    gate_metric,
    gate_tag,
    nested,
    on_test,
    ood_metric,
    shift_metric,
)
from calibflow.evaluation.plots import (
    binary_score_distributions,
    class_confidence_histograms,
    confidence_histogram,
    decision_score_histograms,
    reliability_diagram,
)
from calibflow.evaluation.plots import risk_coverage_curve as plot_risk_coverage
from calibflow.disk_cache import file_sha256
from calibflow.training.resume import EpochCheckpoints
from calibflow.evaluation.shift import Suite, corrupted_images, evaluate_suite, suite_logits
from calibflow.data.splits import Split, stratified_split
from calibflow.training.distributed import resolve_nproc, train_distributed
from calibflow.training.loop import EpochStats, intra_op_threads, resolve_runtime, train_classifier
from calibflow.data.validation import ValidationReport, validate_manifest
from calibflow.errors import ReportError


@dataclass(frozen=True)
class ManifestRecord:
    path: str
    fingerprint: str
    n_images: int
    classes: tuple[str, ...]
    class_counts: dict[str, int] = field(default_factory=dict)


def write_manifest(data_dir: str, out_path: str) -> ManifestRecord:
    """One row per file: path, label, size, mode, content hash, whether it decodes."""
    classes = list_classes(data_dir)
    manifest = build_manifest(data_dir)
    save_manifest(manifest, out_path)
    return ManifestRecord(
        path=str(out_path),
        fingerprint=manifest_fingerprint(manifest),
        n_images=len(manifest),
        classes=tuple(classes),
        class_counts=class_counts(manifest),
    )


@dataclass(frozen=True)
class SplitRecord:
    path: str
    digest: str
    sizes: dict[str, int]


def write_split(manifest_path: str, split: SplitConfig, seed: int, out_path: str) -> SplitRecord:
    manifest = load_manifest(manifest_path)
    result = stratified_split(
        manifest["label_index"].to_numpy(),
        manifest["sha256"].to_numpy(),
        split.fractions(),
        seed,
        manifest_fingerprint(manifest),
    )
    result.save(out_path)
    return SplitRecord(path=str(out_path), digest=result.digest, sizes={k: len(v) for k, v in result.indices.items()})


# The fewest calibration images select_calibrator's cross-validation (calibration.method auto) folds.
AUTO_CALIBRATION_FOLDS = 5


def check_run_settings(config: Config, classes: tuple[str, ...], split_sizes: dict[str, int]) -> None:
    """Before training: what the params and the manifest already say cannot work, as a ConfigError
    (exit 2) instead of a failure after the whole training: a two-class calibrator on more classes,
    splits too small to train or fit on, and gates that no model can pass on the test split (not
    even a perfect one, always right with confidence 1)."""
    from calibflow.calibrators import binary_only, default_methods
    from calibflow.gates.plan import smallest_passable
    from calibflow.errors import GateInputError

    method, n_classes = config.calibration.method, len(classes)
    if config.train.distributed == "ddp":
        resolve_nproc(config.train)  # more processes than this node's cores or GPUs
    if binary_only(method) and n_classes != 2:
        raise ConfigError(
            f"calibration.method = {method} calibrates two-class models and the data has {n_classes} "
            f"classes: choose one of {', '.join(default_methods(n_classes))} or auto"
        )
    fewest = {"train": 2, "calibration": AUTO_CALIBRATION_FOLDS if method == "auto" else 2, "test": 1}
    for name, needed in fewest.items():
        if split_sizes.get(name, 0) < needed:
            raise ConfigError(
                f"the {name} split has {split_sizes.get(name, 0)} images and needs at least {needed}"
                f"{' (calibration.method auto cross-validates)' if name == 'calibration' else ''}: "
                f"raise split.{name} or add images"
            )
    try:
        passable = smallest_passable(config.gates, split_sizes["test"], n_classes, config.evaluation.n_bins)
    except GateInputError:
        passable = False
    if not passable:
        raise ConfigError(
            f"no model can pass the gates on the {split_sizes['test']} images of the test split, not "
            f"even a perfect one (always right, with confidence 1): add test images (more data, or a "
            f"larger split.test) or loosen the gates (`calibflow gate plan --thresholds` says how many "
            f"images they need)"
        )


def split_class_counts(manifest_path: str, split_path: str, split_name: str) -> dict[str, int]:
    """Images per class name in one split."""
    manifest = load_manifest(manifest_path)
    return class_counts(manifest.iloc[Split.load(split_path).indices[split_name]])


def validate_data(
    manifest_path: str,
    split_path: str,
    classes: tuple[str, ...],
    data: DataConfig,
    out_path: str,
    cache_directory: str | Path | None = None,
) -> ValidationReport:
    """Run the Great Expectations suite; the full GX result is written to `out_path` either way.

    With `cache_directory`, a suite that passed on exactly this manifest and split (their bytes:
    the manifest holds every file's SHA-256, size and mode), these data settings, this GX and
    this suite's code is not run again: its stored result is reused and says so
    (statistics["reused_from_cache"]). Importing GX is most of the step's cost (~1.5 s of 1.7 s);
    a failed validation is never stored, so bad data is always checked afresh.
    """
    from importlib.metadata import version

    from calibflow import disk_cache
    from calibflow.data import validation

    key = {
        "manifest_and_split": disk_cache.files_digest([manifest_path, split_path]),
        "classes": list(classes),
        "min_per_class": data.min_per_class,
        "allowed_sizes": list(data.allowed_sizes),
        "allowed_modes": list(data.allowed_modes),
        "great_expectations": version("great-expectations"),
        "code": disk_cache.file_sha256(validation.__file__),
    }
    stored = disk_cache.load(cache_directory, "data_validation", key)
    if stored is not None:
        report = ValidationReport(
            success=True,
            failures=(),
            result=stored["result"],
            statistics={**stored["statistics"], "reused_from_cache": True},
        )
    else:
        manifest = load_manifest(manifest_path)
        manifest["split"] = Split.load(split_path).assignment(len(manifest))
        report = validate_manifest(manifest, list(classes), data.min_per_class, data.allowed_sizes, data.allowed_modes)
        if report.success:
            disk_cache.store(
                cache_directory, "data_validation", key, {"statistics": report.statistics, "result": report.result}
            )
    Path(out_path).write_text(json.dumps(report.result, indent=1, default=str))
    return report


@dataclass(frozen=True)
class ImageFormat:
    mode: str
    width: int
    height: int

    @property
    def channels(self) -> int:
        return len(self.mode)  # "L" -> 1, "RGB" -> 3 (the modes validation lets through)


def image_format(manifest_path: str, data: DataConfig) -> ImageFormat:
    """The mode and size the model is built for: the first allowed one, else the most common
    (validation has already rejected any other)."""
    manifest = load_manifest(manifest_path)
    decodable = manifest[manifest["decodable"]]
    mode = data.allowed_modes[0] if data.allowed_modes else Counter(decodable["mode"]).most_common(1)[0][0]
    size = data.allowed_sizes[0] if data.allowed_sizes else Counter(decodable["size"]).most_common(1)[0][0]
    width, height = (int(v) for v in size.split("x"))
    return ImageFormat(mode=mode, width=width, height=height)


def load_split_images(
    data_dir: str, manifest_path: str, split_path: str, split_name: str, fmt: ImageFormat, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """uint8 images (N, C, H, W), labels and manifest row indices of one split (its first `limit`)."""
    manifest = load_manifest(manifest_path)
    indices = Split.load(split_path).indices[split_name][:limit]
    rows = manifest.iloc[indices]
    images = load_images(data_dir, rows["path"].tolist(), fmt.mode, (fmt.width, fmt.height))
    labels = torch.tensor(rows["label_index"].to_numpy(), dtype=torch.long)  # a copy: pandas' arrays are read-only
    return images, labels, indices


@dataclass(frozen=True)
class TrainedModel:
    checkpoint: str
    device: str
    precision: str
    epochs: int
    final_train_loss: float
    final_val_accuracy: float
    images_per_second: float
    resumed_from_epoch: int = 0  # the last epoch a killed run had completed (0: trained from the start)
    curves: tuple[str, ...] = ()  # train.csv and val.csv: the per-epoch curves, for `dvc plots show`
    processes: int = 1  # training processes, all nodes together (train.distributed: ddp)


def training_checkpoints(
    checkpoint_dir: str,
    manifest: ManifestRecord,
    split_path: str,
    config: Config,
    member_seed: int,
    outliers_path: str | None,
) -> EpochCheckpoints:
    """Where one member's per-epoch checkpoints live, keyed by what its weights depend on."""
    from calibflow.training.resume import training_code_digest, training_key

    outliers = json.loads(Path(outliers_path).read_text())["dvc_hash"] if outliers_path else None
    # val_every changes what is measured, never the weights (tests/test_training.py)
    train = {k: v for k, v in dataclasses.asdict(config.train).items() if k != "val_every"}
    if config.train.distributed == "ddp":  # the processes' random streams are saved per rank
        train["nproc"] = resolve_nproc(config.train)
    key = training_key(
        manifest=manifest.fingerprint,
        split=file_sha256(split_path),
        model=dataclasses.asdict(config.model),
        train=train,
        seed=member_seed,
        outliers=outliers,
        code=training_code_digest(),
        torch=torch.__version__,
    )
    return EpochCheckpoints(Path(checkpoint_dir) / key)


def write_training_curves(history: list[EpochStats], out_dir: str | Path) -> tuple[str, str]:
    """train.csv (epoch, loss, learning_rate, images_per_second: every epoch) and val.csv (epoch,
    accuracy, nll, ece: the epochs that validated), the columns of train/ and val/ metrics."""
    import csv

    out = Path(out_dir)
    rows = {
        "train": [
            {
                "epoch": h.epoch,
                "loss": h.train_loss,
                "learning_rate": h.learning_rate,
                "images_per_second": h.images_per_second,
            }
            for h in history
        ],
        "val": [
            {"epoch": h.epoch, "accuracy": h.val_accuracy, "nll": h.val_nll, "ece": h.val_ece}
            for h in history
            if h.validated
        ],
    }
    paths = []
    for name, table in rows.items():
        path = out / f"{name}.csv"
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(table[0]) if table else ["epoch"])
            writer.writeheader()
            writer.writerows(table)
        paths.append(str(path))
    return paths[0], paths[1]


def train_model(
    data_dir: str,
    manifest: ManifestRecord,
    split_path: str,
    config: Config,
    out_dir: str,
    on_epoch_end: Callable[[EpochStats], None] | None = None,
    outliers_path: str | None = None,
    checkpoint_dir: str | None = None,
) -> TrainedModel:
    """`outliers_path`: check_ood_data's record of train.outlier_exposure's folder. With
    `checkpoint_dir`, each member checkpoints every epoch there and a killed run started again with
    the same inputs resumes from its last complete epoch (calibflow.training.resume)."""
    fmt = image_format(manifest.path, config.data)
    train_x, train_y, _ = load_split_images(data_dir, manifest.path, split_path, "train", fmt)
    val_x, val_y, _ = load_split_images(data_dir, manifest.path, split_path, "val", fmt)
    outliers = None
    if outliers_path:
        record = json.loads(Path(outliers_path).read_text())
        outliers = load_images(record["local_dir"], record["files"], fmt.mode, (fmt.width, fmt.height))
    spec = ModelSpec(
        arch=config.model.arch,
        in_channels=fmt.channels,
        num_classes=len(manifest.classes),
        image_height=fmt.height,
        image_width=fmt.width,
        width=config.model.width,
        dropout=config.model.dropout,
    )
    runtime = resolve_runtime(config.train.device, config.train.precision)
    # The same training, in this process or under torchrun (train.distributed: ddp).
    if config.train.distributed == "ddp":
        train_member = functools.partial(train_distributed, work_dir=out_dir)
    else:
        train_member = functools.partial(train_classifier, runtime=runtime)
    members, history, done, resumed_from = [], [], [], 0
    for index, seed in enumerate(member_seeds(config.seed, config.model.ensemble)):
        checkpoints = (
            training_checkpoints(checkpoint_dir, manifest, split_path, config, seed, outliers_path)
            if checkpoint_dir
            else None
        )
        if checkpoints is not None:
            done.append(checkpoints)
            resumed_from = max(resumed_from, index * config.train.epochs + checkpoints.completed_epoch())
        # One member after the other; their epochs are numbered on, so each logged curve is whole.
        offset = index * config.train.epochs
        report = (
            None
            if on_epoch_end is None
            else (lambda stats, offset=offset: on_epoch_end(dataclasses.replace(stats, epoch=stats.epoch + offset)))
        )
        model, member_history = train_member(
            spec,
            train_x,
            train_y,
            val_x,
            val_y,
            config.train,
            seed,
            weights_path=config.model.weights_path,
            on_epoch_end=report,
            outlier_images=outliers,
            checkpoints=checkpoints,
        )
        members.append(model)
        history += member_history
    for checkpoints in done:  # the weights are the run's artifact from here on
        checkpoints.clear()
    checkpoint = save_checkpoint(
        Path(out_dir) / "checkpoint.pt",
        members[0],
        spec,
        list(manifest.classes),
        fmt.mode,
        more_members=tuple(members[1:]),
        mc_samples=config.model.mc_dropout,
        mc_seed=config.seed,
    )
    last = history[-1]
    return TrainedModel(
        checkpoint=str(checkpoint),
        device=str(runtime.device),
        precision=str(runtime.autocast_dtype or torch.float32).removeprefix("torch."),
        epochs=len(history),
        final_train_loss=last.train_loss,
        final_val_accuracy=last.val_accuracy,
        images_per_second=float(np.median([h.images_per_second for h in history])),
        resumed_from_epoch=resumed_from,
        curves=write_training_curves(history, out_dir),
        processes=resolve_nproc(config.train) * config.train.nnodes if config.train.distributed == "ddp" else 1,
    )


def write_split_logits(
    checkpoint: str,
    data_dir: str,
    manifest_path: str,
    split_path: str,
    split_name: str,
    out_path: str,
    batch_size: int = 512,
    device: str = "auto",
    threads: int | str | None = None,
) -> str:
    """Collect a split's logits once (eval mode, no_grad, fp32) and save them with labels and row
    indices, with `threads` intra-op threads (train.threads: the same machine-sharing reasoning as
    training's; a forward pass gives the same logits on any count, so this changes speed only)."""
    loaded = load_checkpoint(checkpoint)
    fmt = ImageFormat(mode=loaded.image_mode, width=loaded.spec.image_width, height=loaded.spec.image_height)
    images, labels, indices = load_split_images(data_dir, manifest_path, split_path, split_name, fmt)
    # (N, K), or (N, members, K) for an ensemble; MC dropout's are log mean probabilities.
    with intra_op_threads(threads):
        logits = predictive_logits(
            loaded.members,
            images,
            loaded.mc_samples,
            loaded.mc_seed,
            batch_size,
            resolve_runtime(device).device,
            progress=f"logits {split_name}",
        )
    np.savez(out_path, logits=logits.numpy(), labels=labels.numpy(), indices=indices)
    return str(out_path)


def _suite_logits_of_split(
    checkpoint: str,
    data_dir: str,
    manifest_path: str,
    split_path: str,
    split_name: str,
    suite: Suite,
    batch_size: int,
    device: str,
    threads: int | str | None,
    cache_dir: str | None,
    limit: int | None = None,
):
    """The network's logits on every cell of `suite` applied to a split's images (the first
    `limit`), with the images' labels and manifest rows; corrupted images and logits cached by
    content in `cache_dir`, the network run on `threads` as write_split_logits does."""
    loaded = load_checkpoint(checkpoint)
    fmt = ImageFormat(mode=loaded.image_mode, width=loaded.spec.image_width, height=loaded.spec.image_height)
    images, labels, indices = load_split_images(data_dir, manifest_path, split_path, split_name, fmt, limit=limit)
    corrupted = corrupted_images(
        images.permute(0, 2, 3, 1).contiguous().numpy(), suite, cache_dir, progress=f"corrupt {split_name}"
    )
    run_on = resolve_runtime(device).device

    def logits_of(batch: np.ndarray) -> np.ndarray:
        return predictive_logits(
            loaded.members,
            torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous(),
            loaded.mc_samples,
            loaded.mc_seed,
            batch_size,
            run_on,
        ).numpy()

    with intra_op_threads(threads):
        logits = suite_logits(
            corrupted,
            logits_of,
            file_sha256(checkpoint),
            cache_dir,
            progress=f"logits {split_name}, {len(suite.cells)} corrupted copies",
        )
    return logits, labels, indices


def write_shift_logits(
    checkpoint: str,
    data_dir: str,
    manifest_path: str,
    split_path: str,
    suite: Suite,
    out_path: str,
    batch_size: int = 512,
    device: str = "auto",
    cache_dir: str | None = None,
    threads: int | str | None = None,
) -> str:
    """The network's logits on every cell of the corruption suite (the first suite.max_images test
    images, corrupted), saved with their labels and manifest rows."""
    logits, labels, indices = _suite_logits_of_split(
        checkpoint,
        data_dir,
        manifest_path,
        split_path,
        "test",
        suite,
        batch_size,
        device,
        threads,
        cache_dir,
        limit=suite.max_images,
    )
    np.savez(
        out_path,
        labels=labels.numpy(),
        indices=indices,
        suite=np.array(suite.to_json()),
        **{f"cell__{key}": value for key, value in logits.items()},
    )
    return str(out_path)


def write_shift_aware_logits(
    checkpoint: str,
    data_dir: str,
    manifest_path: str,
    split_path: str,
    calibration_logits_path: str,
    corruptions: tuple[str, ...],
    seed: int,
    out_path: str,
    batch_size: int = 512,
    device: str = "auto",
    cache_dir: str | None = None,
    threads: int | str | None = None,
) -> str:
    """What a shift-aware calibrator is fitted on (Tomani et al. 2021): the calibration split's
    logits and those of its copies corrupted by `corruptions` at severities 1-5, one file in the
    format of write_split_logits (labels and rows repeated per copy). The decision rules are still
    fitted on the clean calibration logits."""
    suite = Suite(tuple(corruptions), (1, 2, 3, 4, 5), 10**9, seed)
    logits, _, _ = _suite_logits_of_split(
        checkpoint, data_dir, manifest_path, split_path, "calibration", suite, batch_size, device, threads, cache_dir
    )
    with np.load(calibration_logits_path) as saved:
        clean, labels, rows = saved["logits"], saved["labels"], saved["indices"]
    copies = 1 + len(suite.keys)
    np.savez(
        out_path,
        logits=np.concatenate([clean, *(logits[k] for k in suite.keys)]),
        labels=np.tile(labels, copies),
        indices=np.tile(rows, copies),
    )
    return str(out_path)


def load_shift_logits(path: str) -> tuple[Suite, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(suite, cell key -> logits, labels, manifest rows) of write_shift_logits' file."""
    with np.load(path) as saved:
        suite = Suite.from_json(str(saved["suite"]))
        return suite, {key: saved[f"cell__{key}"] for key in suite.keys}, saved["labels"], saved["indices"]


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
    if not np.array_equal(test_rows[: len(rows)], rows):
        raise ValueError("the corruption suite's images are not the first test images")  # a bug, not a user error
    calibrator = load_calibrator(calibration.state_path)
    clean = clean_logits[: len(rows)]
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


def check_ood_data(
    repo_root: str,
    manifest_path: str,
    path: str,
    max_images: int,
    out_path: str,
    key: str = "ood.path",
    not_in: str | None = None,
) -> str:
    """Before training: pin `path` (params.yaml's `key`: ood.path or train.outlier_exposure) with
    DVC and refuse it when missing, empty, not images, or holding images of the dataset (or of the
    folder checked into `not_in`); the checked list of files is written to `out_path`."""
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
    batch_size: int = 512,
    device: str = "auto",
    threads: int | str | None = None,
) -> OODEvaluation:
    """MSP and energy on the test split and on the OOD images (decoded in the model's mode and
    size), AUROC, AUPR and FPR95 of each, and their histograms."""
    from calibflow.evaluation.ood import detection_metrics, in_distribution_score, ood_scores
    from calibflow.evaluation.plots import ood_score_histograms

    ood = json.loads(Path(ood_data_path).read_text())
    loaded = load_checkpoint(checkpoint)
    images = load_images(
        ood["local_dir"], ood["files"], loaded.image_mode, (loaded.spec.image_width, loaded.spec.image_height)
    )
    calibrator = load_calibrator(calibration.state_path)
    with intra_op_threads(threads):
        outside_logits = predictive_logits(
            loaded.members, images, loaded.mc_samples, loaded.mc_seed, batch_size, resolve_runtime(device).device
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
    manifest rows, its decision rules, its corruption suite's probabilities and its OOD scores.
    The champion's side comes from the registry, in the task layer (promotion.gate_logits)."""

    probabilities: np.ndarray
    rows: np.ndarray
    decisions: DecisionPolicy | None = None
    shifted: ShiftedPredictions | None = None
    ood: OODScores | None = None


def candidate_predictions(
    test_logits_path: str,
    calibration: CalibrationRecord,
    decisions_path: str | None = None,
    shift_logits_path: str | None = None,
    ood: OODEvaluation | None = None,
) -> CandidatePredictions:
    """The run's candidate as the gates see it, from its cached test logits (and the suite's cached
    logits, for the shift gates) through its fitted calibrator: the numbers its pyfunc serves."""
    with np.load(test_logits_path) as saved:
        logits, rows = saved["logits"], saved["indices"]
    calibrator = load_calibrator(calibration.state_path)
    probabilities = calibrator.transform(logits).numpy()
    policy = DecisionPolicy.load(decisions_path) if decisions_path else None
    shift = None
    if shift_logits_path is not None:
        suite, cells, _, shift_rows = load_shift_logits(shift_logits_path)
        shift = ShiftedPredictions(suite, shift_rows, {k: calibrator.transform(z).numpy() for k, z in cells.items()})
    return CandidatePredictions(probabilities, rows, policy, shift, ood_gate_scores(ood) if ood is not None else None)


def load_logits(path: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as saved:
        return saved["logits"], saved["labels"]


@dataclass(frozen=True)
class CalibrationRecord:
    method: str
    state_path: str  # the fitted calibrator (calibrator_from_state), saved with the model
    temperature: float | None  # temperature scaling's T, None for other methods
    nll_before: float  # calibration split, uncalibrated softmax
    nll_after: float  # calibration split, calibrated
    selection: tuple[dict, ...] = ()  # method auto: the cross-validation comparison


def fit_calibration(logits_path: str, calibration: CalibrationConfig, out_path: str) -> CalibrationRecord:
    """Fit `calibration.method` on the calibration logits. Whatever the method, a fit that does not
    lower the calibration NLL is an error, not a model."""
    logits, labels = load_logits(logits_path)
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


def load_calibrator(state_path: str):
    return model_calibrator_from_state(json.loads(Path(state_path).read_text()))


@dataclass(frozen=True)
class Evaluation:
    before: dict[str, float]
    after: dict[str, float]
    plots: tuple[str, ...]


def evaluate_calibration(
    logits_path: str, calibration: CalibrationRecord, n_bins: int, out_dir: str, class_names: tuple[str, ...] = ()
) -> Evaluation:
    """Test-split metrics before (plain softmax) and after calibration, and the diagnostic plots."""
    logits, labels = load_logits(logits_path)
    probabilities = {
        "before": uncalibrated_probabilities(logits),
        "after": load_calibrator(calibration.state_path).transform(logits),
    }
    before, after = (probability_report(probabilities[k], labels, n_bins) for k in ("before", "after"))
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


@dataclass(frozen=True)
class StagedReport:
    path: str  # where it goes: reports/metrics.json
    staged: str  # its new content, written beside it, not in place yet
    plots: tuple[tuple[str, str], ...] = ()  # (staged, where it goes): dvc.yaml's plots, published with it


def stage_metrics_report(
    path: str,
    evaluation: Evaluation,
    fit: CalibrationRecord,
    verdict: GateVerdict,
    decisions: DecisionEvaluation | None = None,
    shifted: ShiftEvaluation | None = None,
    ood: OODEvaluation | None = None,
    plots: dict[str, str] | None = None,
) -> StagedReport:
    """Write the new reports/metrics.json (a DVC metric) beside the old one, before anything is
    registered: a report that cannot be written fails the run while the registry is untouched,
    and the previous report stays in place until publish_report renames this one over it."""
    report = nested({**test_metrics(evaluation), **fit_metrics(fit), **gate_metrics(verdict)})
    report["calibration"]["method"] = fit.method
    report.setdefault("gate", {})["passed"] = verdict.passed
    if decisions is not None and decisions.metrics:
        report["test"]["decision"] = decisions.metrics
    if shifted is not None:
        result = json.loads(Path(shifted.result_path).read_text())
        # the means before and after, each cell after calibration (the run's metrics hold every number)
        kept = {k: v for k, v in shifted.metrics.items() if k.startswith(f"shift/{CALIBRATED}/") or "/mean_" in k}
        report["shift"] = {**nested(kept)["shift"], "n_images": result["n_images"]}
    if ood is not None:
        report["ood"] = {"n_images": ood.n_images, **nested(ood.metrics)["ood"]}
    target = Path(path)
    if target.exists() and not target.is_file():
        raise ReportError(
            f"{target} is a {'directory' if target.is_dir() else 'special file'}, not a file: remove "
            f"it, as the run writes its metrics report (the DVC metric) there"
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_stages(target)
        staged = _write_beside(target, json.dumps(report, indent=2))
    except OSError as error:
        raise ReportError(f"cannot write {target}: {error}") from error
    staged_plots = []
    try:  # dvc.yaml's plots (`plots`: where it goes -> this run's file), staged the same way
        for destination, source in (plots or {}).items():
            plot = Path(destination)
            plot.parent.mkdir(parents=True, exist_ok=True)
            _remove_abandoned_stages(plot)
            staged_plots.append((_write_beside(plot, Path(source).read_bytes()), str(plot)))
    except OSError as error:
        discard_report(StagedReport(str(target), staged, tuple(staged_plots)))
        raise ReportError(f"cannot write {destination}: {error}") from error
    return StagedReport(path=str(target), staged=staged, plots=tuple(staged_plots))


def publish_report(report: StagedReport) -> str:
    """Put the staged report in place: one rename, so readers see the old report or the new one,
    never a mix or a truncated file."""
    try:
        for staged, destination in report.plots:
            os.replace(staged, destination)
        os.replace(report.staged, report.path)
    except OSError as error:
        discard_report(report)
        raise ReportError(f"cannot replace {report.path}: {error}") from error
    return report.path


def discard_report(report: StagedReport) -> None:
    for staged in (report.staged, *(staged for staged, _ in report.plots)):
        Path(staged).unlink(missing_ok=True)
    for folder in {Path(staged).parent for staged, _ in report.plots}:
        try:  # the plots folder staging created, when nothing else is in it: a failed run leaves no trace
            folder.rmdir()
        except OSError:
            pass


def _stage_prefix(target: Path) -> str:
    return f".{target.name}."


def _write_beside(target: Path, text: str | bytes) -> str:
    """A new file beside `target` holding `text`, named after this process (pid and start time:
    see _remove_abandoned_stages). os.open with mode 0o666 lets the umask decide its permissions,
    as for any file the user's tools create (tempfile's are 0600: only the owner could read the
    report)."""
    me = this_process()
    owner = f"{me.pid}-{me.started}" if me else str(os.getpid())
    for attempt in range(1000):
        candidate = target.with_name(f"{_stage_prefix(target)}{owner}.{attempt}.tmp")
        try:
            descriptor = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            with os.fdopen(descriptor, "wb" if isinstance(text, bytes) else "w") as handle:
                handle.write(text)
        except BaseException:
            candidate.unlink(missing_ok=True)
            raise
        return str(candidate)
    raise ReportError(f"cannot stage {target}: 1000 staged copies of it already exist beside it")


def _remove_abandoned_stages(target: Path) -> None:
    """Staged reports of runs whose process is gone (killed between staging and publishing);
    those of a run still going on beside this one stay."""
    for staged in target.parent.glob(f"{_stage_prefix(target)}*.tmp"):
        owner = staged.name.removeprefix(_stage_prefix(target)).split(".")[0]
        pid, _, started = owner.partition("-")
        if pid.isdigit() and started and not alive(ProcessId(int(pid), started)):
            staged.unlink(missing_ok=True)


def input_example(data_dir: str, manifest_path: str, split_path: str, checkpoint: str, n: int = 2) -> np.ndarray:
    """A few test images as the served model takes them: uint8 (N, H, W, C)."""
    loaded = load_checkpoint(checkpoint)
    fmt = ImageFormat(mode=loaded.image_mode, width=loaded.spec.image_width, height=loaded.spec.image_height)
    images, _, _ = load_split_images(data_dir, manifest_path, split_path, "test", fmt, limit=n)
    return images.permute(0, 2, 3, 1).contiguous().numpy()


def unchanged_build(
    champion_tags: dict[str, str], data_hash: str, params_hash: str, git_commit: str, git_dirty: bool
) -> bool:
    """True when the champion was built from exactly this data, these params and this code, so
    retraining would spend compute to reproduce it (a dirty working tree never counts as the same
    code)."""
    return (
        not git_dirty
        and champion_tags.get("data_hash") == data_hash
        and champion_tags.get("params_hash") == params_hash
        and champion_tags.get("git_commit") == git_commit
    )


def decision_tags(decided: DecisionEvaluation | None, confidence: float) -> dict[str, str]:
    """The served decisions' test-split numbers as version tags, for `calibflow evaluate` to
    recompute: the rates and bounds, not the per-class coverages (evaluate_policy's keys)."""
    if decided is None or not decided.metrics:
        return {}
    tags = {
        f"{DECISION_TAG_PREFIX}{name}": repr(float(value))
        for name, value in decided.metrics.items()
        if "_class_" not in name
    }
    tags[f"{DECISION_TAG_PREFIX}confidence"] = repr(confidence)
    return tags


def shift_tags(shifted: ShiftEvaluation | None) -> dict[str, str]:
    """The suite a version was measured on (for `calibflow evaluate` and `calibflow gate` to rebuild
    it) and its means after calibration."""
    from calibflow.evaluation.shift import SUITE_TAG

    if shifted is None:
        return {}
    return {
        SUITE_TAG: shifted.suite_json,
        **{shift_metric("mean", CALIBRATED, name): repr(value) for name, value in shifted.mean["after"].items()},
    }


def ood_tags(ood: OODEvaluation | None) -> dict[str, str]:
    """The OOD folder a version was measured on, for `calibflow gate` to score again."""
    from calibflow.evaluation.ood import OOD_TAG

    if ood is None:
        return {}
    return {
        OOD_TAG: json.dumps(
            {"path": ood.path, "rev": ood.rev, "dvc_hash": ood.dvc_hash, "n_images": ood.n_images, "score": ood.score}
        )
    }


def version_tags(
    data,
    manifest: ManifestRecord,
    split: SplitRecord,
    config: Config,
    git_commit: str,
    fit: CalibrationRecord,
    evaluation: Evaluation,
    decided: DecisionEvaluation | None = None,
    shifted: ShiftEvaluation | None = None,
    ood: OODEvaluation | None = None,
) -> dict[str, str]:
    """What a registered version carries: its lineage and the numbers its gate read (floats as
    repr, so they survive the round trip through a string tag exactly)."""
    return {
        **decision_tags(decided, config.gates.confidence),
        **shift_tags(shifted),
        **ood_tags(ood),
        "data_hash": data.dvc_hash,
        "data_path": data.path,
        "data_rev": data.rev,
        "git_commit": git_commit,
        "params_hash": config.params_hash,
        "seed": str(config.seed),
        "split_digest": split.digest,
        "manifest_fingerprint": manifest.fingerprint,
        "n_bins": str(config.evaluation.n_bins),
        CALIBRATION_METHOD: fit.method,
        TEMPERATURE: repr(fit.temperature) if fit.temperature else "",
        **{name: repr(value) for name, value in test_metrics(evaluation).items()},
    }


STAGE_OF = {"before": UNCALIBRATED, "after": CALIBRATED}  # Evaluation's fields -> calibflow.names' stages


def test_metrics(evaluation: Evaluation) -> dict[str, float]:
    """The test split's metrics before and after calibration under their calibflow.names paths
    (test/uncalibrated/ece, test/calibrated/ece, ...): metric, version tag and metrics.json key."""
    return {
        on_test(STAGE_OF[when], name): float(value)
        for when, values in (("before", evaluation.before), ("after", evaluation.after))
        for name, value in values.items()
    }


def fit_metrics(fit: CalibrationRecord) -> dict[str, float]:
    """The calibration split's NLL before and after the fit, and T for temperature scaling."""
    metrics = {
        calibration_metric(UNCALIBRATED, "nll"): fit.nll_before,
        calibration_metric(CALIBRATED, "nll"): fit.nll_after,
    }
    if fit.temperature:
        metrics[TEMPERATURE] = fit.temperature
    return metrics


def gate_metrics(verdict: GateVerdict) -> dict[str, float]:
    """gate/<check>/value, bound and threshold of every check, so that the run's charts show how far
    each bound is from its threshold (a bound that could not be computed is left out)."""
    metrics = {}
    for check in verdict.checks:
        for part, value in (("value", check.value), ("bound", check.bound), ("threshold", check.threshold)):
            if np.isfinite(value):
                metrics[gate_metric(check.name, part)] = float(value)
    return metrics


def _bound_text(check, confidence: float) -> str:
    side = "upper" if check.comparison == "<=" else "lower"
    return f"{confidence:.0%} {side} {check.bound:.4f} {check.comparison} {check.threshold:g}"


def gate_tags(verdict: GateVerdict, champion: str | None) -> dict[str, str]:
    """A run tag per check, e.g. gate/max_ece = "passed: smooth ECE 0.0110, 95% upper 0.0235 <= 0.05",
    the overall verdicts, and the champion the relative gates compared with (or why none)."""
    tags = {
        GATE_VERDICT: "passed" if verdict.passed else "failed",
        GATE_ABSOLUTE: "passed" if verdict.absolute_passed else "failed",
        GATE_AGAINST: f"version {champion}" if champion else "none: no @champion to compare with",
    }
    for check in verdict.checks:
        tags[gate_tag(check.name)] = (
            f"{'passed' if check.passed else 'FAILED'}: {check.metric} {check.value:.4f}, "
            f"{_bound_text(check, verdict.confidence)}"
        )
    return tags


def calibration_warning(evaluation: Evaluation, fit: CalibrationRecord | None = None) -> str | None:
    """What calibration made worse on the test split (ECE or NLL), or None: a fit that lowers the
    calibration split's NLL can still raise the test split's, which nobody should learn from a chart."""
    worse = [
        f"{label} {evaluation.before[key]:.4f} -> {evaluation.after[key]:.4f}"
        for key, label in (("ece", "ECE"), ("nll", "NLL"))
        if evaluation.after[key] > evaluation.before[key]
    ]
    if not worse:
        return None
    fitted = (
        f" (T = {fit.temperature:.3f})"
        if fit is not None and fit.temperature
        else f" ({fit.method})"
        if fit is not None
        else ""
    )
    return (
        f"WARNING: calibration{fitted} made the test split worse: {', '.join(worse)}. The uncalibrated model "
        f"was already well calibrated, or the calibration split is too small to fit on."
    )


def verdict_line(evaluation: Evaluation, fit: CalibrationRecord | None, verdict: GateVerdict) -> str:
    """One line: the verdict, test ECE before -> after with the gate's bound, accuracy with its bound,
    T, and each other check that failed, e.g.
    "PASSED · ECE 0.0120 -> 0.0123 (95% upper 0.0235 <= 0.05) · acc 0.989 (lower 0.978 >= 0.9) · T 0.956"."""
    head = (
        "PASSED"
        if verdict.passed
        else "FAILED"
        if not verdict.absolute_passed
        else "PASSED, NOT PROMOTABLE (fails against @champion)"
    )
    parts = [head]
    by_name = {c.name: c for c in verdict.checks}
    ece = by_name.get("max_ece")
    text = f"ECE {evaluation.before['ece']:.4f} -> {evaluation.after['ece']:.4f}"
    if ece is not None:
        measure = ece.metric.split(" (")[0]  # "smooth ECE (sigma 0.0146)": the bandwidth is in the gate's tag
        text += f" ({'' if ece.passed else 'FAIL '}{measure} {_bound_text(ece, verdict.confidence)})"
    parts.append(text)
    accuracy = by_name.get("min_accuracy")
    text = f"acc {evaluation.after['accuracy']:.3f}"
    if accuracy is not None:
        text += (
            f" ({'' if accuracy.passed else 'FAIL '}lower {accuracy.bound:.3f} {accuracy.comparison} "
            f"{accuracy.threshold:g})"
        )
    parts.append(text)
    if fit is not None:
        parts.append(f"T {fit.temperature:.3f}" if fit.temperature else fit.method)
    parts += [
        f"FAIL {c.name} ({_bound_text(c, verdict.confidence)})"
        for c in verdict.checks
        if not c.passed and c.name not in ("max_ece", "min_accuracy")
    ]
    return " · ".join(parts)


def summary_markdown(
    run_id: str,
    tracking_uri: str,
    outcome: str,
    evaluation: Evaluation | None,
    fit: CalibrationRecord | None,
    verdict: GateVerdict | None,
    version=None,
) -> str:
    """The run's description in MLflow (and the Prefect run summary): the verdict line first, then a
    warning when calibration made the test split worse, then the numbers."""
    lines = []
    if verdict is not None and evaluation is not None:
        lines += [verdict_line(evaluation, fit, verdict), ""]
    else:
        lines += [outcome.upper() if outcome in ("registered", "failed") else outcome, ""]
    warning = calibration_warning(evaluation, fit) if evaluation is not None else None
    if warning:
        lines += [f"> **{warning}**", ""]
    lines += [f"## calibflow run: {outcome}", "", f"MLflow run `{run_id}` at `{tracking_uri}`", ""]
    if fit is not None:
        what = f"temperature **{fit.temperature:.4f}**" if fit.temperature else f"**{fit.method}** calibration"
        lines += [f"Calibrated with {what} (calibration NLL {fit.nll_before:.4f} -> {fit.nll_after:.4f})", ""]
    if evaluation is not None:
        lines += [f"| test split | {UNCALIBRATED} | {CALIBRATED} |", "| --- | --- | --- |"]
        lines += [
            f"| {name} | {evaluation.before[name]:.4f} | {evaluation.after[name]:.4f} |" for name in evaluation.after
        ]
        lines.append("")
    if verdict is not None:
        lines += [
            f"Gates at one-sided {verdict.confidence:.0%} confidence on {verdict.n_samples} test images:",
            "",
            "| gate | value | bound | threshold | verdict |",
            "| --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {c.name} | {c.value:.4f} | {c.bound:.4f} | {c.comparison} {c.threshold:.4f} | "
            f"{'pass' if c.passed else 'FAIL'} |"
            for c in verdict.checks
        ]
        lines.append("")
    if version is not None:
        lines.append(f"Registered **{version.name}** version {version.version} as `@{version.alias}`.")
    return "\n".join(lines)
