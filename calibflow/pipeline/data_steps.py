"""The pipeline's data steps as plain functions over files: the manifest, the split, the Great
Expectations validation, the checks of settings against the data, and the split's images.

Each step reads the files the previous ones wrote and returns a small record (paths, hashes, numbers),
never tensors or DataFrames: Prefect tasks wrap these one-to-one, and the records are what crosses task
boundaries. Nothing in calibflow.pipeline knows about Prefect or MLflow.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple

import numpy as np
import torch

from calibflow.config import Config, DataConfig, SplitConfig, TrainConfig
from calibflow.errors import ConfigError, ManifestError
from calibflow.data.image_files import ImageFiles, ImageLoading, ImageSource, auto_workers
from calibflow.data.images import COLOUR_MODES, GRAY_MODES, Framing, load_images, model_mode, reference_resize
from calibflow.data.manifest import (
    build_manifest,
    class_counts,
    list_classes,
    load_manifest,
    manifest_fingerprint,
    save_manifest,
)
from calibflow.data.splits import Split, stratified_split
from calibflow.training.distributed import resolve_nproc
from calibflow.training.models import Checkpoint
from calibflow.data.validation import ValidationReport, validate_manifest

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class ManifestRecord:
    path: str
    fingerprint: str
    n_images: int
    classes: tuple[str, ...]
    class_counts: dict[str, int] = field(default_factory=dict)


def write_manifest(data_dir: str, out_path: str) -> ManifestRecord:
    """One row per file: path, label, size, mode, content hash, whether it decodes. A dataset of
    one class folder is refused here, before anything is hashed or trained: a classifier of one
    class is always right with confidence 1, and every later step (the split, the calibrators, the
    gates) would fail on it far from the cause."""
    classes = list_classes(data_dir)
    if len(classes) < 2:
        raise ManifestError(
            f"{str(data_dir)!r} has one class folder ({classes[0]!r}) and a classifier needs at least two: "
            f"put each class's images in its own subdirectory <root>/<class>/<image>, at least two classes"
        )
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
    splits too small to train or fit on, pretrained weights missing from torch hub's cache, and
    gates that no model can pass on the test split (not even a perfect one, always right with
    confidence 1)."""
    from calibflow.calibrators import binary_only, default_methods
    from calibflow.gates.plan import smallest_passable
    from calibflow.errors import GateInputError

    method, n_classes = config.calibration.method, len(classes)
    if config.train.distributed == "ddp":
        resolve_nproc(config.train)  # more processes than this node's cores or GPUs
    if config.model.pretrained:
        from calibflow.training.models import pretrained_weights_file

        pretrained_weights_file(config.model.arch, config.model.pretrained)  # absent from the hub cache: a ConfigError
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


def check_test_split_classes(manifest_path: str, split_path: str, *, dataset: str, split: SplitConfig) -> None:
    """Refuse a test split whose images all belong to one class (ConfigError, exit 2): every gate
    passes on it by construction (a model that always answers that class is right with any
    confidence it likes), so it certifies nothing. Found here, where the real split is known;
    the gates themselves accept one label, which their simulations feed them."""
    counts = {name: n for name, n in split_class_counts(manifest_path, split_path, "test").items() if n}
    if len(counts) != 1:
        return  # an empty test split is check_run_settings' to refuse, with its size
    [(only, n)] = counts.items()
    classes = class_counts(load_manifest(manifest_path))
    fewest = min(classes, key=classes.get)
    raise ConfigError(
        f"the test split of {dataset} holds images of one class only ({n} of {only!r}, none of the other "
        f"{len(classes) - 1}), so no gate can tell a calibrated model from one that always answers {only!r}: "
        f"add images to the smaller classes (class {fewest!r} has {classes[fewest]} in all) or raise "
        f"split.test (now {split.test:g}) so that every class has test images"
    )


def check_soft_gates(config: Config, data_dir: str, manifest: ManifestRecord, split_path: str) -> None:
    """Before training: a soft-label gate no model can pass on this test split (check_soft_gate_floor)."""
    if config.gates.max_soft_nll is None or config.data.soft_labels is None:
        return
    test_rows = Split.load(split_path).indices["test"]
    check_soft_gate_floor(
        config.gates.max_soft_nll,
        soft_targets_of_rows(data_dir, manifest, test_rows, config.data),
        config.data.soft_labels,
    )


def check_soft_gate_floor(max_soft_nll: float | None, test_targets: np.ndarray | None, soft_labels_file: str) -> None:
    """Refuse gates.max_soft_nll at or below the mean entropy of the test split's soft labels
    (ConfigError, exit 2): a model's soft NLL on a row is its cross-entropy to the row, never below
    the row's entropy, so no model can pass; found before training rather than after it."""
    if max_soft_nll is None or test_targets is None or not len(test_targets):
        return
    from calibflow.metrics.soft import mean_entropy

    floor = mean_entropy(test_targets)
    if max_soft_nll <= floor:
        raise ConfigError(
            f"gates.max_soft_nll = {max_soft_nll:g} is at or below {floor:.4f}, the mean entropy of the soft labels "
            f"of the test split's {len(test_targets)} images ({soft_labels_file}): no model's soft NLL is lower, so "
            f"no model can pass. Raise it above {floor:.4f} (the gate reads an upper confidence bound: leave "
            f"room), or set it to null"
        )


def validate_data(
    manifest_path: str,
    split_path: str,
    classes: tuple[str, ...],
    data: DataConfig,
    out_path: str,
    cache_directory: str | Path | None = None,
    *,
    data_dir: str | Path | None = None,
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
        "min_side": data.min_side if data.image_size is not None else None,
        "great_expectations": version("great-expectations"),
        "code": disk_cache.file_sha256(validation.__file__),
    }
    if data.soft_labels is not None:
        from calibflow.data import soft_labels

        if data_dir is None:
            raise ValueError("data.soft_labels: validate_data needs data_dir, where the CSV is")
        csv_path = Path(data_dir) / data.soft_labels
        key["soft_labels"] = {
            "bytes": disk_cache.files_digest([csv_path]) if csv_path.is_file() else None,
            "tolerance": data.soft_label_tolerance,
            "agreement": data.soft_label_agreement,
            "code": disk_cache.file_sha256(soft_labels.__file__),
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
        report = validate_manifest(
            manifest,
            list(classes),
            data.min_per_class,
            data.allowed_sizes,
            data.allowed_modes,
            min_side=data.min_side if data.image_size is not None else None,
        )
        if report.success and data.soft_labels is not None:
            report = _validate_soft_labels(report, manifest, list(classes), data, Path(data_dir))
        if report.success:
            disk_cache.store(
                cache_directory, "data_validation", key, {"statistics": report.statistics, "result": report.result}
            )
    Path(out_path).write_text(json.dumps(report.result, indent=1, default=str))
    return report


def _validate_soft_labels(
    report: ValidationReport, manifest, classes: list[str], data: DataConfig, data_dir: Path
) -> ValidationReport:
    """The images' report, with the soft labels' checks (calibflow.data.soft_labels) added."""
    from calibflow.data import soft_labels

    table = soft_labels.read_soft_labels(data_dir / data.soft_labels, classes)
    soft = soft_labels.validate_soft_labels(
        table,
        manifest,
        classes,
        tolerance=data.soft_label_tolerance,
        agreement=data.soft_label_agreement,
        source=f"{data.path}/{data.soft_labels}",
    )
    evaluated = report.statistics.get("evaluated_expectations", 0) + soft.statistics["evaluated_expectations"]
    return ValidationReport(
        success=report.success and soft.success,
        failures=report.failures + soft.failures,
        statistics={**report.statistics, **soft.statistics, "evaluated_expectations": evaluated},
        result={**report.result, **soft.result},
    )


def split_soft_targets(data_dir: str, manifest: ManifestRecord, split_path: str, split_name: str, data: DataConfig):
    """(N, K) float32 distributions of one split's images over manifest.classes, in the split's
    order, from data.soft_labels (validated): what training reads."""
    rows = Split.load(split_path).indices[split_name]
    return torch.from_numpy(soft_targets_of_rows(data_dir, manifest, rows, data, dtype=np.float32))


def soft_targets_of_rows(
    data_dir: str, manifest: ManifestRecord, rows: np.ndarray, data: DataConfig, dtype=np.float64
) -> np.ndarray:
    """(len(rows), K) distributions of the manifest's `rows` over manifest.classes, from
    data.soft_labels (validated); float64 for the metrics and gates."""
    from calibflow.data import soft_labels

    return soft_labels.targets_from_file(
        Path(data_dir) / data.soft_labels,
        load_manifest(manifest.path).iloc[rows],
        list(manifest.classes),
        data.soft_label_tolerance,
        dtype,
    )


@dataclass(frozen=True)
class ImageFormat:
    """What the model reads (`mode`, width x height) and how a file becomes it: with `resize`,
    torchvision's reference Resize + CenterCrop of any size (data.image_size), refusing a shorter
    side below `min_side`; without, stretched to the one size every file shares."""

    mode: str
    width: int
    height: int
    resize: int | None = None
    min_side: int = 1

    @property
    def channels(self) -> int:
        return len(self.mode)  # "L" -> 1, "RGB" -> 3: images.MODEL_MODES

    @property
    def framing(self) -> Framing:
        """How evaluation, the served model and every later command frame an image."""
        return Framing(self.width, self.height, self.resize, min_side=self.min_side)

    def training_framing(self, train: TrainConfig) -> Framing:
        """How the train split is read: with data.image_size and train.augment, torchvision's
        RandomResizedCrop (train.crop_min_scale of the area up to all of it; flipped with
        train.hflip), a new crop of each image every epoch; else as evaluation reads it, and the
        training loop's batched translation augments it."""
        if self.resize is None or not train.augment:
            return self.framing
        return dataclasses.replace(self.framing, crop_scale=(train.crop_min_scale, 1.0), hflip=train.hflip)

    @classmethod
    def of_checkpoint(cls, checkpoint: Checkpoint) -> ImageFormat:
        framing = checkpoint.framing
        return cls(
            mode=checkpoint.image_mode,
            width=checkpoint.spec.image_width,
            height=checkpoint.spec.image_height,
            resize=framing.resize if framing else None,
            min_side=framing.min_side if framing else 1,
        )


def image_format(manifest_path: str, data: DataConfig) -> ImageFormat:
    """The mode and size the model is built for. The mode: what a model of the allowed file modes
    (else of those the files have; validation has rejected any other) reads, "L" or "RGB"
    (images.model_mode; every file is converted to it as it is read). The size: data.image_size
    (any file, framed), else the first allowed one, else the most common."""
    manifest = load_manifest(manifest_path)
    decodable = manifest[manifest["decodable"]]
    file_modes = data.allowed_modes or tuple(decodable["mode"].unique())
    try:
        mode = model_mode(file_modes)
    except ValueError as error:
        unread = decodable.loc[~decodable["mode"].isin(GRAY_MODES | COLOUR_MODES), "path"]
        shown = f" ({len(unread)} images, for example {', '.join(unread.head(3))})" if len(unread) else ""
        raise ManifestError(f"{data.path}: {error}{shown}") from error
    if data.image_size is not None:
        resize = data.resize_size if data.resize_size is not None else reference_resize(data.image_size)
        return ImageFormat(mode, data.image_size, data.image_size, resize=resize, min_side=data.min_side)
    size = data.allowed_sizes[0] if data.allowed_sizes else Counter(decodable["size"]).most_common(1)[0][0]
    width, height = (int(v) for v in size.split("x"))
    return ImageFormat(mode=mode, width=width, height=height)


def image_loading(data: DataConfig) -> ImageLoading:
    """data.in_memory_max_mb and data.workers as the loaders take them."""
    workers = auto_workers() if data.workers == "auto" else int(data.workers)
    return ImageLoading(in_memory_max_bytes=data.in_memory_max_mb * 2**20, workers=workers)


class SplitFiles(NamedTuple):
    """One split's files, in the split's order: paths (relative to the data folder), labels,
    manifest row indices, and each file's SHA-256 as the manifest recorded it (what every read of
    the file is checked against: images.checked_bytes)."""

    paths: list[str]
    labels: torch.Tensor
    indices: np.ndarray
    digests: list[str]


def split_files(
    manifest_path: str,
    split_path: str,
    split_name: str,
    limit: int | None = None,
    *,
    choose: Callable[[np.ndarray, pd.DataFrame], np.ndarray] | None = None,
) -> SplitFiles:
    """The files of one split (its first `limit`, or the rows `choose` picks from the split's and
    the manifest), in the split's order."""
    manifest = load_manifest(manifest_path)
    indices = Split.load(split_path).indices[split_name][:limit]
    if choose is not None:
        indices = choose(indices, manifest)
    rows = manifest.iloc[indices]
    labels = torch.tensor(rows["label_index"].to_numpy(), dtype=torch.long)  # a copy: pandas' arrays are read-only
    return SplitFiles(rows["path"].tolist(), labels, indices, rows["sha256"].tolist())


def load_split_images(
    data_dir: str,
    manifest_path: str,
    split_path: str,
    split_name: str,
    fmt: ImageFormat,
    limit: int | None = None,
    *,
    loading: ImageLoading | None = None,
    framing: Framing | None = None,
) -> tuple[ImageSource, torch.Tensor, np.ndarray]:
    """Images, labels and manifest row indices of one split (its first `limit`), framed by
    `framing` (fmt.framing without). The images: a uint8 tensor (N, C, H, W) when `loading` keeps
    them in memory (without `loading`, always), else an ImageFiles that decodes them a batch at a
    time; always one for a training framing, whose crops change every epoch. Every file's bytes
    are checked against the manifest's SHA-256 of them as they are read: a file changed since the
    run pinned its data is a ManifestError naming it."""
    files = split_files(manifest_path, split_path, split_name, limit)
    source = image_source(data_dir, files.paths, fmt, loading=loading, framing=framing, digests=files.digests)
    return source, files.labels, files.indices


def image_source(
    data_dir: str,
    paths: list[str],
    fmt: ImageFormat,
    *,
    loading: ImageLoading | None = None,
    framing: Framing | None = None,
    digests: list[str] | None = None,
) -> ImageSource:
    """Files under `data_dir`, framed by `framing` (fmt.framing without): a uint8 tensor (N, C, H,
    W) when `loading` keeps them in memory (without `loading`, always), else an ImageFiles that
    decodes them a batch at a time; always one for a training framing, whose crops change every
    epoch. `digests`: each file's recorded SHA-256, which its bytes must still have when read."""
    framing = framing or fmt.framing
    in_memory = loading is None or loading.keeps_in_memory(len(paths), fmt.channels, fmt.width, fmt.height)
    if in_memory and not framing.random:
        return load_images(data_dir, paths, fmt.mode, framing, digests=digests)
    return ImageFiles(data_dir, paths, fmt.mode, framing, digests)
