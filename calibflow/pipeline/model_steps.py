"""The pipeline's model steps: train (in this process or under torchrun), write the training curves,
and collect the logits of a split (and of its corrupted copies) once, to files the later steps read.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from calibflow.config import HOW_DATA_IS_READ, Config, DataConfig
from calibflow.training.ensembles import (
    member_seeds,
    predictive_logits,
)
from calibflow.data.images import DECODED_AT_A_TIME, load_images_nhwc
from calibflow.errors import ConfigError
from calibflow.environment import cpu_cores
from calibflow.training.models import (
    Checkpoint,
    ModelSpec,
    build_model,
    check_image_size,
    load_checkpoint,
    load_pretrained_weights,
    pretrained_weights_file,
    save_checkpoint,
)
from calibflow.disk_cache import file_sha256
from calibflow.training.resume import EpochCheckpoints
from calibflow.evaluation.shift import Suite, cell_logits
from calibflow.training.distributed import resolve_nproc, train_distributed
from calibflow.training.loop import (
    LOGITS_VERSION,
    EpochStats,
    TrainingInputs,
    intra_op_threads,
    resolve_runtime,
    train_classifier,
)
from calibflow.data.image_files import ImageLoading, ImageSource, closing
from calibflow.pipeline.data_steps import (
    ImageFormat,
    ManifestRecord,
    image_format,
    image_loading,
    image_source,
    load_split_images,
    split_files,
    split_soft_targets,
)


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


# The version and run tag of the initial weights' digest. A version without it started from the
# seeded initialisation, or was registered before the digest was recorded.
INIT_WEIGHTS_TAG = "init_weights_sha256"


@dataclass(frozen=True)
class InitialWeights:
    """The file a run's network starts from (model.weights_path, or model.pretrained's file in
    torch hub's cache) and its SHA-256, read once before training: the file's bytes, not its name,
    are part of the build (the same-build skip), of the resume key and of the version's tags."""

    path: str
    sha256: str

    def tags(self) -> dict[str, str]:
        return {INIT_WEIGHTS_TAG: self.sha256}


def initial_weights(config: Config, repo_root: str | Path) -> InitialWeights | None:
    """model.weights_path (a relative one in the repository, as data.path is) or model.pretrained's
    hub file, hashed; None when the network starts from the seeded initialisation. A file that is
    missing or unreadable is a ConfigError (exit 2) naming it, before anything trains."""
    if config.model.weights_path:
        path = Path(repo_root) / config.model.weights_path  # an absolute path stays as it is
        if not path.is_file():
            raise ConfigError(
                f"model.weights_path {config.model.weights_path}: {path} does not exist (a relative path is "
                f"read from the repository root): put the state_dict there or set model.weights_path to null"
            )
    else:
        # model.pretrained: its file in torch hub's cache, which must be there (a ConfigError names the path)
        path = pretrained_weights_file(config.model.arch, config.model.pretrained)
        if path is None:
            return None
    try:
        return InitialWeights(str(path.resolve()), file_sha256(path))
    except OSError as error:
        raise ConfigError(
            f"the initial weights {path} cannot be read ({error.strerror or error}): make the file readable "
            f"or set model.weights_path and model.pretrained to null"
        ) from None


def model_spec(config: Config, fmt: ImageFormat, n_classes: int) -> ModelSpec:
    """The network model.* and the images' format describe."""
    return ModelSpec(
        arch=config.model.arch,
        in_channels=fmt.channels,
        num_classes=n_classes,
        image_height=fmt.height,
        image_width=fmt.width,
        width=config.model.width,
        dropout=config.model.dropout,
    )


def check_network(initial: InitialWeights | None, manifest: ManifestRecord, config: Config) -> None:
    """Before training: model.arch takes images of this run's size (check_image_size), and the
    initial weights load onto the network it builds, so that an architecture that cannot read them,
    or keys and shapes of another one, are a ConfigError now rather than after the data steps."""
    spec = model_spec(config, image_format(manifest.path, config.data), len(manifest.classes))
    check_image_size(spec)
    if initial is not None:
        # what the training prints about the file, it prints once, there
        load_pretrained_weights(build_model(spec), initial.path, config.model.arch, sha256=initial.sha256, report=False)


def training_checkpoints(
    checkpoint_dir: str,
    data_dir: str,
    manifest: ManifestRecord,
    split_path: str,
    config: Config,
    member_seed: int,
    outliers_path: str | None,
    initial: InitialWeights | None = None,
) -> EpochCheckpoints:
    """Where one member's per-epoch checkpoints live, keyed by what its weights depend on:
    `initial`'s bytes among them, so a run started again with another file trains from its first epoch."""
    from calibflow.training.resume import training_code_digest, training_key

    outliers = json.loads(Path(outliers_path).read_text())["dvc_hash"] if outliers_path else None
    # val_every changes what is measured, never the weights (tests/test_training.py)
    train = {k: v for k, v in dataclasses.asdict(config.train).items() if k != "val_every"}
    if config.train.distributed == "ddp":  # the processes' random streams are saved per rank
        train["nproc"] = resolve_nproc(config.train)
    # what the data section decides about the pixels and the targets: the framing (data.image_size
    # and its bounds), and the soft labels' bytes; not how a split is read (HOW_DATA_IS_READ)
    data = {k: v for k, v in dataclasses.asdict(config.data).items() if k not in HOW_DATA_IS_READ}
    if config.data.soft_labels is not None:
        data["soft_labels_sha256"] = file_sha256(Path(data_dir) / config.data.soft_labels)
    key = training_key(
        manifest=manifest.fingerprint,
        split=file_sha256(split_path),
        data=data,
        model=dataclasses.asdict(config.model),
        initial_weights=initial.sha256 if initial else None,
        train=train,
        seed=member_seed,
        outliers=outliers,
        code=training_code_digest(),
        torch=torch.__version__,
    )
    return EpochCheckpoints(Path(checkpoint_dir) / key)


def write_training_curves(history: list[EpochStats], out_dir: str | Path) -> tuple[str, str]:
    """train.csv (epoch, loss, learning_rate: every epoch) and val.csv (epoch, accuracy, nll, ece:
    the epochs that validated), the columns of train/ and val/ metrics. A commit tracks them in
    reports/plots/, so they hold results only, which a rerun on the same CPU writes again byte for
    byte: the epoch's speed is a timing, logged as the train/images_per_second metric alone."""
    import csv

    out = Path(out_dir)
    rows = {
        "train": [
            {
                "epoch": h.epoch,
                "loss": h.train_loss,
                "learning_rate": h.learning_rate,
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
    *,
    on_epoch_end: Callable[[EpochStats], None] | None = None,
    outliers_path: str | None = None,
    checkpoint_dir: str | None = None,
    initial: InitialWeights | None = None,
) -> TrainedModel:
    """`initial`: initial_weights' record of the file the network starts from, which a config that
    names one needs. `outliers_path`: check_ood_data's record of train.outlier_exposure's folder. With
    `checkpoint_dir`, each member checkpoints every epoch there and a killed run started again with
    the same inputs resumes from its last complete epoch (calibflow.training.resume)."""
    if (config.model.weights_path or config.model.pretrained) and initial is None:
        raise ValueError("model.weights_path or model.pretrained is set: pass initial=initial_weights(config, repo)")
    fmt = image_format(manifest.path, config.data)
    loading = image_loading(config.data)
    train_x, train_y, _ = load_split_images(
        data_dir, manifest.path, split_path, "train", fmt, loading=loading, framing=fmt.training_framing(config.train)
    )
    val_x, val_y, _ = load_split_images(data_dir, manifest.path, split_path, "val", fmt, loading=loading)
    train_targets = (
        split_soft_targets(data_dir, manifest, split_path, "train", config.data)
        if config.train.targets != "hard"
        else None
    )
    outliers = None
    if outliers_path:
        record = json.loads(Path(outliers_path).read_text())
        # in memory below data.in_memory_max_mb, as a split is; else its workers decode each step's draw ahead
        outliers = image_source(
            record["local_dir"], record["files"], fmt, loading=loading, digests=record.get("sha256") or None
        )
    spec = model_spec(config, fmt, len(manifest.classes))
    runtime = resolve_runtime(config.train.device, config.train.precision)
    # The same training, in this process or under torchrun (train.distributed: ddp).
    if config.train.distributed == "ddp":
        train_member = functools.partial(train_distributed, work_dir=out_dir)
    else:
        train_member = functools.partial(train_classifier, runtime=runtime)
    members, history, done, resumed_from = [], [], [], 0
    for index, seed in enumerate(member_seeds(config.seed, config.model.ensemble)):
        checkpoints = (
            training_checkpoints(checkpoint_dir, data_dir, manifest, split_path, config, seed, outliers_path, initial)
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
        inputs = TrainingInputs(
            spec=spec,
            train_images=train_x,
            train_labels=train_y,
            val_images=val_x,
            val_labels=val_y,
            config=config.train,
            seed=seed,
            weights_path=initial.path if initial else None,
            weights_sha256=initial.sha256 if initial else None,
            outlier_images=outliers,
            workers=loading.workers,
            train_targets=train_targets,
        )
        model, member_history = train_member(inputs, on_epoch_end=report, checkpoints=checkpoints)
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
        framing=fmt.framing if fmt.resize is not None else None,
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


def checkpoint_logits(
    loaded: Checkpoint,
    images: ImageSource,
    *,
    batch_size: int,
    device: str,
    progress: str | None = None,
    workers: int = 0,
) -> torch.Tensor:
    """A checkpoint's logits on `images` (loaded for inference): (N, K), or (N, members, K) for an
    ensemble; MC dropout's are log mean probabilities."""
    return predictive_logits(
        loaded.members,
        images,
        loaded.mc_samples,
        loaded.mc_seed,
        batch_size,
        resolve_runtime(device).device,
        progress=progress,
        workers=workers,
    )


def write_split_logits(
    checkpoint: str,
    data_dir: str,
    manifest_path: str,
    split_path: str,
    split_name: str,
    out_path: str,
    *,
    batch_size: int = 512,
    device: str = "auto",
    threads: int | str | None = None,
    loading: ImageLoading | None = None,
) -> str:
    """Collect a split's logits once (eval mode, no_grad, fp32) and save them with labels and row
    indices, with `threads` intra-op threads (train.threads: the same machine-sharing reasoning as
    training's; a forward pass gives the same logits on any count, so this changes speed only).
    `loading` (data.in_memory_max_mb, data.workers): a large split is read from its files."""
    loaded = load_checkpoint(checkpoint, for_inference=True)
    fmt = ImageFormat.of_checkpoint(loaded)
    loading = loading or image_loading(DataConfig())
    images, labels, indices = load_split_images(data_dir, manifest_path, split_path, split_name, fmt, loading=loading)
    with intra_op_threads(threads), closing(images):
        logits = checkpoint_logits(
            loaded,
            images,
            batch_size=batch_size,
            device=device,
            progress=f"logits {split_name}",
            workers=loading.workers,
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
    *,
    batch_size: int,
    device: str,
    threads: int | str | None,
    cache_dir: str | None,
    whole_split: bool = False,
):
    """The network's logits on every cell of `suite` applied to a split's images (those the suite
    picks, Suite.images; every one with `whole_split`), with the images' labels and manifest rows.
    The images are decoded DECODED_AT_A_TIME at a time and each such chunk's cells made and read
    before the next is decoded (shift.cell_logits), so memory is bounded whatever the split's size
    (the shift-aware fit reads the whole calibration split); the logits cached by content in
    `cache_dir`, the network run on `threads` as write_split_logits does."""
    loaded = load_checkpoint(checkpoint, for_inference=True)
    fmt = ImageFormat.of_checkpoint(loaded)
    paths, labels, indices, digests = split_files(
        manifest_path, split_path, split_name, choose=None if whole_split else suite.images
    )
    if not paths:
        raise ValueError(f"the {split_name} split holds no images to corrupt")

    def logits_of(batch: np.ndarray) -> np.ndarray:
        # a view: collect_logits lays out each batch
        return checkpoint_logits(
            loaded, torch.from_numpy(batch).permute(0, 3, 1, 2), batch_size=batch_size, device=device
        ).numpy()

    chunks = (
        load_images_nhwc(
            data_dir,
            paths[start : start + DECODED_AT_A_TIME],
            fmt.mode,
            fmt.framing,
            digests=digests[start : start + DECODED_AT_A_TIME],  # each file's bytes as the run pinned them
        )
        for start in range(0, len(paths), DECODED_AT_A_TIME)
    )
    with intra_op_threads(threads):
        logits = cell_logits(
            chunks,
            len(paths),
            suite,
            logits_of,
            f"{file_sha256(checkpoint)} logits {LOGITS_VERSION}",
            cache_dir,
            progress=f"logits {split_name}, {len(suite.cells)} corrupted copies",
            cells_at_once=suite_cells_at_once(device),
        )
    return logits, labels, indices


# Most suite cells read by the network at once. Each thread holds a corrupted copy of a chunk (111 MB
# at 224 px for DECODED_AT_A_TIME RGB images) and a forward pass's activations: this bounds the
# suite at five copies however many cores the machine has.
MAX_SUITE_CELLS_AT_ONCE = 4


def suite_cells_at_once(device: str) -> int:
    """How many cells of the corruption suite the network reads at once: on the CPU, as many as
    the cores hold forward passes of torch's current intra-op threads (train.threads; two cores
    and one thread: two), each a separate pass with no barrier between them, unlike one pass on
    more threads (docs/training.md, Threads); on a GPU one, the card being the limit."""
    if resolve_runtime(device).device.type != "cpu":
        return 1
    return max(1, min(MAX_SUITE_CELLS_AT_ONCE, cpu_cores() // torch.get_num_threads()))


def write_shift_logits(
    checkpoint: str,
    data_dir: str,
    manifest_path: str,
    split_path: str,
    suite: Suite,
    out_path: str,
    *,
    batch_size: int = 512,
    device: str = "auto",
    cache_dir: str | None = None,
    threads: int | str | None = None,
) -> str:
    """The network's logits on every cell of the corruption suite (on the test images it picks,
    Suite.images), saved with their labels and manifest rows."""
    logits, labels, indices = _suite_logits_of_split(
        checkpoint,
        data_dir,
        manifest_path,
        split_path,
        "test",
        suite,
        batch_size=batch_size,
        device=device,
        threads=threads,
        cache_dir=cache_dir,
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
    *,
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
        checkpoint,
        data_dir,
        manifest_path,
        split_path,
        "calibration",
        suite,
        batch_size=batch_size,
        device=device,
        threads=threads,
        cache_dir=cache_dir,
        whole_split=True,
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


def load_logits(path: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as saved:
        return saved["logits"], saved["labels"]


def input_example(data_dir: str, manifest_path: str, split_path: str, checkpoint: str, n: int = 2) -> np.ndarray:
    """A few test images as the served model takes them: uint8 (N, H, W, C)."""
    loaded = load_checkpoint(checkpoint)
    fmt = ImageFormat.of_checkpoint(loaded)
    images, _, _ = load_split_images(data_dir, manifest_path, split_path, "test", fmt, limit=n)
    return images.permute(0, 2, 3, 1).contiguous().numpy()
