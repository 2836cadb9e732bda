"""The training loop and logit collection.

In the spirit of airbench and nanoGPT: the data is one uint8 tensor resident on the device, an
epoch is a random permutation, augmentation is batched tensor indexing, and the loop never calls
`.item()` per step (that would stall the GPU pipeline on every batch); losses accumulate on the
device and are read once per epoch.

Reading order: `train_classifier` is the whole loop. `set_up_training` turns the `TrainingInputs`
into a `Training` (model, optimiser, schedule, random streams, the data on the device);
`resume_from_checkpoint` restores a killed run's last epoch; each epoch is `train_one_epoch`
(`training_step` on each `training_batch`), then `validate` and `save_epoch_checkpoint`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import itertools
import random
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F

from calibflow.data.image_files import ImageFiles, ImageSource, closing, every_nth, in_order, read_batches
from calibflow.data.images import channel_stats
from calibflow.training.losses import OUTLIER_EXPOSURE_WEIGHT, BatchMixer, outlier_exposure_loss, training_loss
from calibflow.metrics import expected_calibration_error
from calibflow.training.models import (
    ImageClassifier,
    ModelSpec,
    build_model,
    head_parameter_names,
    in_memory_format,
    inference_memory_format,
    training_memory_format,
    load_pretrained_weights,
)
from calibflow.training.resume import EpochCheckpoints, random_states, restore_random_states
from calibflow.progress import progress_bar

if TYPE_CHECKING:  # config sits above training: it reads its records, never imports it
    from calibflow.config import TrainConfig


@dataclass(frozen=True)
class Runtime:
    """Where and how the math runs; `resolve_runtime` picks it from train.device / train.precision."""

    device: torch.device
    autocast_dtype: torch.dtype | None  # None: plain fp32
    # the batches' layout: resolve_runtime sets it on a GPU, set_up_training for the network it
    # trains (models.training_memory_format)
    channels_last: bool

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> torch.autocast:
        """The context a forward pass runs in: autocast to `autocast_dtype`, or plain fp32."""
        return torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        )


def resolve_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device = {device!r} but torch sees no CUDA device: use train.device=auto or cpu")
    dev = torch.device(device)
    on_cuda = dev.type == "cuda"
    if precision == "auto":
        # bf16 keeps fp32's exponent range, so no loss scaler is needed; CPUs without AMX run it
        # slower than fp32, hence fp32 there.
        precision = "bf16" if on_cuda and torch.cuda.is_bf16_supported() else "fp32"
    return Runtime(device=dev, autocast_dtype=torch.bfloat16 if precision == "bf16" else None, channels_last=on_cuda)


@contextmanager
def cudnn_autotune(enabled: bool) -> Iterator[None]:
    """Run the block with cuDNN timing its convolution algorithms for each new input shape and
    keeping the fastest (torch.backends.cudnn.benchmark), as torchvision's reference training
    does, and restore the previous setting after it. Training's batches share one shape but the
    last (validation's and outlier exposure's add a few more), so each search runs a handful of
    times in a whole training. Left off where the process asked for deterministic results
    (cudnn.deterministic or torch.use_deterministic_algorithms): timing picks an algorithm by
    chance, as torchvision's reference turns it off under --use-deterministic-algorithms.
    Disabled, the setting is not touched; on the CPU it changes nothing."""
    deterministic = torch.backends.cudnn.deterministic or torch.are_deterministic_algorithms_enabled()
    previous = torch.backends.cudnn.benchmark
    switch = enabled and not deterministic and not previous
    if switch:
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        if switch:
            torch.backends.cudnn.benchmark = previous


@contextmanager
def intra_op_threads(threads: int | Literal["auto"] | None) -> Iterator[None]:
    """Run the block with torch's intra-op thread count at `threads` and restore the previous
    count after it, even on an error: the pipeline, `calibflow` commands and the tests are
    long-lived processes, and the setting is process-wide. "auto" or None leaves torch's count
    (one per physical core, or OMP_NUM_THREADS) as it is."""
    previous = torch.get_num_threads()
    if threads not in (None, "auto") and threads != previous:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    train_loss: float
    # None on epochs that did not validate (train.val_every): there is no number to report.
    val_accuracy: float | None
    learning_rate: float
    # Images per second of the epoch's training steps alone (augmentation, forward, backward,
    # optimiser and schedule), validation excluded: the speed of training, whatever val_every is.
    images_per_second: float
    # NLL and 15-bin ECE of the uncalibrated softmax on the validation split, beside its accuracy:
    # how over-confident the network grows while it trains (None where val_accuracy is None).
    val_nll: float | None = None
    val_ece: float | None = None

    @property
    def validated(self) -> bool:
        return self.val_accuracy is not None


def validates_after(epoch: int, epochs: int, val_every: int) -> bool:
    """Whether epoch `epoch` (1-based) of `epochs` ends with a validation pass: every `val_every`
    epochs, and always the last, so a run always reports its final val accuracy."""
    return epoch % val_every == 0 or epoch == epochs


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def to_device(tensor: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.on_cuda:
        # Pinned host memory lets the copy run asynchronously (non_blocking) with compute.
        return tensor.pin_memory().to(runtime.device, non_blocking=True)
    return tensor.to(runtime.device)


def random_translate(images: torch.Tensor, max_shift: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to `max_shift` pixels (zero fill) and optionally mirror it: one
    gather for the whole batch instead of a Python loop over images."""
    n, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (max_shift, max_shift, max_shift, max_shift))
    dy = torch.randint(0, 2 * max_shift + 1, (n, 1), device=device, generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n, 1), device=device, generator=generator)
    rows = dy + torch.arange(h, device=device)  # (n, h)
    cols = dx + torch.arange(w, device=device)  # (n, w)
    if hflip:
        flip = torch.rand((n, 1), device=device, generator=generator) < 0.5
        cols = torch.where(flip, cols.flip(1), cols)
    batch = torch.arange(n, device=device)[:, None, None, None]
    chan = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


@dataclass(frozen=True)
class ProcessGroup:
    """The processes training one model together: one (the default), or the torch.distributed
    group that calibflow.training.distributed started under torchrun."""

    rank: int = 0
    world_size: int = 1

    @staticmethod
    def current() -> "ProcessGroup":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return ProcessGroup(dist.get_rank(), dist.get_world_size())
        return ProcessGroup()

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    def sum(self, total: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
        """`total` and `count` added up over the processes (as they are, for one)."""
        if self.world_size == 1:
            return total, count
        import torch.distributed as dist

        both = torch.stack([total.double(), torch.tensor(float(count), device=total.device, dtype=torch.float64)])
        dist.all_reduce(both)
        return both[0], int(both[1].item())

    def from_rank0(self, value):
        """Rank 0's `value` in every process."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def copy_buffers_from_rank0(self, model: torch.nn.Module) -> None:
        """Rank 0's BatchNorm statistics in every process (each updated its own on its share; DDP
        copies rank 0's anyway at the next training step, so this changes no later step)."""
        import torch.distributed as dist

        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)

    def gather_to_all(self, value) -> list:
        """Every process's `value`, by rank, in every process."""
        import torch.distributed as dist

        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered


@dataclass(frozen=True, eq=False)
class TrainingInputs:
    """What a training computes its weights from: the same inputs (and train.threads) give the same
    weights, bit for bit on the CPU. `weights_path`: a state_dict to start from instead of the
    seeded initialisation (model.weights_path); `outlier_images`: train.outlier_exposure's images,
    in memory or read from their files as a split is.
    eq=False: tensors have no single truth value, so two records are equal only if they are one."""

    spec: ModelSpec
    train_images: ImageSource
    train_labels: torch.Tensor
    val_images: ImageSource
    val_labels: torch.Tensor
    config: TrainConfig
    seed: int
    weights_path: str | None = None
    weights_sha256: str | None = None  # the digest the run recorded for weights_path: read only if it still holds
    outlier_images: ImageSource | None = None
    workers: int = 0  # DataLoader processes for a split read from its files (ImageFiles)
    # train.targets soft or sampled: each train image's distribution over the classes (N, K)
    train_targets: torch.Tensor | None = None


@dataclass(frozen=True, eq=False)
class DeviceData:
    """The splits on the training device (a split read from its files stays there, and its batches
    are copied over), labels as int64; `outliers` None without outlier exposure."""

    train_images: ImageSource
    train_labels: torch.Tensor
    val_images: ImageSource
    val_labels: torch.Tensor
    outliers: ImageSource | None
    workers: int
    val_share: ImageSource  # this process's share of the val split (all of it in one process)
    train_targets: torch.Tensor | None = None  # (N, K) float32, with train.targets soft or sampled


@dataclass(frozen=True, eq=False)
class Training:
    """One training's moving parts, made by set_up_training; the epochs update them in place."""

    config: TrainConfig
    runtime: Runtime
    group: ProcessGroup
    data: DeviceData
    model: ImageClassifier  # the plain module: validation, checkpoints and the result read it
    forward: torch.nn.Module  # what the steps call: `model`, or DistributedDataParallel around it
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.OneCycleLR
    order: torch.Generator  # each epoch's data order
    draws: torch.Generator  # augmentation and outliers: `order` itself in one process
    mixer: BatchMixer
    max_shift: int  # random_translate's largest shift, 1/8 of the image's shorter side
    batch_sizes: tuple[int, ...]  # an epoch's global batches that train (see set_up_training)

    @property
    def smallest_batch(self) -> int:
        # A global batch trains when every process gets at least two of its images (BatchNorm
        # cannot train on one): the same rule, and so the same schedule, in every process.
        return 2 * self.group.world_size

    @property
    def steps_per_epoch(self) -> int:
        return max(1, len(self.batch_sizes))

    @property
    def images_per_epoch(self) -> int:
        return sum(self.batch_sizes)


def train_classifier(
    inputs: TrainingInputs,
    *,
    runtime: Runtime | None = None,
    on_epoch_end: Callable[[EpochStats], None] | None = None,
    progress: bool = True,
    checkpoints: EpochCheckpoints | None = None,
) -> tuple[ImageClassifier, list[EpochStats]]:
    """Build `inputs.spec`, train it with SGD + one-cycle LR on the train split, with
    `config.threads` intra-op threads; report each epoch, with val accuracy every
    `config.val_every` epochs and after the last. Under a torch.distributed process group
    (calibflow.training.distributed) each process trains through DDP on its share of every batch.

    With `inputs.outlier_images` (train.outlier_exposure), each step also reads as many outliers as
    the batch holds, drawn at random (outlier_batches), forwards them in the same pass (one set of BatchNorm statistics, as Hendrycks
    et al. 2019 do) and adds OUTLIER_EXPOSURE_WEIGHT times their cross-entropy to the uniform.

    With `checkpoints` (calibflow.training.resume), each completed epoch's full state is saved
    there, and a training that finds one continues after that epoch (replaying the saved epochs
    through `on_epoch_end`), ending with the weights an uninterrupted training would have. The last
    epoch's stays (an ensemble member done before a kill is not trained again); the caller clears
    them when the whole training is done."""
    config = inputs.config
    sources = (inputs.train_images, inputs.val_images, inputs.outlier_images)
    runtime = runtime or resolve_runtime(config.device, config.precision)
    with (
        intra_op_threads(config.threads),
        cudnn_autotune(runtime.on_cuda),
        closing(*(s for s in sources if s is not None)) as also_close,
    ):
        training = set_up_training(inputs, runtime)
        also_close.append(training.data.val_share)
        history = resume_from_checkpoint(training, checkpoints, on_epoch_end)
        progress = progress and training.group.is_rank0
        bar = progress_bar(config.epochs * training.images_per_epoch, "train", enabled=progress, leave=True)
        bar.update(len(history) * training.images_per_epoch)  # the epochs a killed run completed
        for epoch in range(len(history) + 1, config.epochs + 1):
            train_loss, images_per_second = train_one_epoch(training, epoch, bar)
            val = validate(training) if validates_after(epoch, config.epochs, config.val_every) else {}
            stats = EpochStats(
                epoch=epoch,
                train_loss=train_loss,
                val_accuracy=val.get("accuracy"),
                learning_rate=training.schedule.get_last_lr()[0],
                images_per_second=images_per_second,
                val_nll=val.get("nll"),
                val_ece=val.get("ece"),
            )
            history.append(stats)
            if checkpoints is not None:
                save_epoch_checkpoint(training, checkpoints, history)
            bar.set_postfix(_bar_postfix(stats))
            if on_epoch_end is not None:
                on_epoch_end(stats)
        bar.close()
        training.model.eval()
        return training.model.cpu(), history


def set_up_training(inputs: TrainingInputs, runtime: Runtime) -> Training:
    """Seed every random stream from `inputs.seed`, then build the model, move the data to the
    device and make the optimiser, its schedule and the loop's own random streams, in that order
    (the order the streams are drawn in is part of the weights)."""
    config, seed, group = inputs.config, inputs.seed, ProcessGroup.current()
    seed_everything(seed)
    model, forward = build_network(inputs, runtime, group)
    # the batches follow the weights' layout (channels_last for a convolutional network)
    runtime = dataclasses.replace(
        runtime, channels_last=training_memory_format(model, runtime.device) == torch.channels_last
    )
    data = move_to_device(inputs, runtime, group)
    # An epoch's global batches, less any with fewer images than every process needs (see
    # Training.smallest_batch): in practice a short last batch.
    batch_sizes = tuple(
        size for size in _batch_sizes(len(data.train_images), config.batch_size) if size >= 2 * group.world_size
    )
    groups = parameter_groups(model, inputs.spec.num_classes, config)
    optimizer = torch.optim.SGD(
        groups,
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.momentum > 0,
        weight_decay=config.weight_decay,
    )
    max_lr = [group["lr"] for group in groups] if isinstance(groups, list) else config.lr
    schedule = one_cycle_schedule(optimizer, max_lr, config.epochs * max(1, len(batch_sizes)))
    order = torch.Generator(device=runtime.device).manual_seed(seed)
    # One process draws the data order and its augmentation from one stream, as it always has.
    # Several draw the same order (the same seed) and their augmentation from their own stream.
    draws = order
    if group.world_size > 1:
        draws = torch.Generator(device=runtime.device).manual_seed(seed + 7919 * (group.rank + 1))
    spec = inputs.spec
    return Training(
        config=config,
        runtime=runtime,
        group=group,
        data=data,
        model=model,
        forward=forward,
        optimizer=optimizer,
        schedule=schedule,
        order=order,
        draws=draws,
        mixer=BatchMixer(config.mix, config.mix_alpha, spec.num_classes),
        max_shift=max(1, min(spec.image_height, spec.image_width) // 8),
        batch_sizes=batch_sizes,
    )


def parameter_groups(model: ImageClassifier, num_classes: int, config: TrainConfig):
    """What the optimiser steps: every parameter in one group (the training as it always was), or
    for fine-tuning (train.freeze_backbone, train.backbone_lr_factor < 1) the classifier head at
    train.lr and the backbone at lr x backbone_lr_factor, or not at all when frozen (its parameters
    then get no gradient either)."""
    if not config.freeze_backbone and config.backbone_lr_factor == 1:
        return model.parameters()
    head_names = head_parameter_names(model, num_classes)
    head = [p for name, p in model.named_parameters() if name in head_names]
    backbone = [p for name, p in model.named_parameters() if name not in head_names]
    if config.freeze_backbone:
        for parameter in backbone:
            parameter.requires_grad_(False)
        return [{"params": head, "lr": config.lr}]
    return [{"params": head, "lr": config.lr}, {"params": backbone, "lr": config.lr * config.backbone_lr_factor}]


def build_network(
    inputs: TrainingInputs, runtime: Runtime, group: ProcessGroup
) -> tuple[ImageClassifier, torch.nn.Module]:
    """The model on the device, initialised from the seeded global stream or `inputs.weights_path`,
    and what the training steps call: the model itself, or DistributedDataParallel around it."""
    train = inputs.train_images
    if isinstance(train, torch.Tensor):
        mean, std = channel_stats(train)
    else:
        # of the images as evaluation frames them: the same statistics whatever crops an epoch draws
        whole = train.evaluated() if train.crops else train
        with closing(whole):
            mean, std = channel_stats(read_batches(whole, in_order(len(whole), 256), workers=inputs.workers))
    model = build_model(inputs.spec, mean, std)
    if inputs.weights_path:
        load_pretrained_weights(model, inputs.weights_path, inputs.spec.arch, sha256=inputs.weights_sha256)
    model.to(runtime.device)
    model.to(memory_format=training_memory_format(model, runtime.device))
    if group.world_size == 1:
        return model, model
    # Under DistributedDataParallel every process built the same initial weights from the seed (DDP
    # also broadcasts rank 0's); each then draws its own dropout, mixing and augmentation, and steps
    # on its share of every global batch.
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(inputs.seed + group.rank)
    return model, DistributedDataParallel(model, device_ids=[runtime.device.index] if runtime.on_cuda else None)


def move_to_device(inputs: TrainingInputs, runtime: Runtime, group: ProcessGroup) -> DeviceData:
    outliers = inputs.outlier_images
    val_images = _to_device(inputs.val_images, runtime)
    return DeviceData(
        train_images=_to_device(inputs.train_images, runtime),
        train_labels=to_device(inputs.train_labels.long(), runtime),
        val_images=val_images,
        # taken once: a streamed share is an ImageFiles of its own, whose workers serve every pass
        val_share=val_images if group.world_size == 1 else every_nth(val_images, group.rank, group.world_size),
        val_labels=to_device(inputs.val_labels.long(), runtime),
        outliers=_to_device(outliers, runtime) if outliers is not None and len(outliers) else None,
        workers=inputs.workers,
        train_targets=to_device(inputs.train_targets.float(), runtime) if inputs.train_targets is not None else None,
    )


def _to_device(source: ImageSource, runtime: Runtime) -> ImageSource:
    return to_device(source, runtime) if isinstance(source, torch.Tensor) else source


def train_one_epoch(training: Training, epoch: int, bar) -> tuple[float, float]:
    """One pass over the train split in a new random order: the epoch's mean training loss over
    every process, and its images per second (the training steps alone)."""
    config, group = training.config, training.group
    started = time.perf_counter()
    training.model.train()
    loss_sum = torch.zeros((), device=training.runtime.device)
    seen = 0
    source = training.data.train_images
    labels = epoch_labels(training)
    order = torch.randperm(len(source), device=training.runtime.device, generator=training.order)
    # BatchNorm cannot train on a single sample: a global batch too small for every process is left out
    global_batches = [batch for batch in order.split(config.batch_size) if len(batch) >= training.smallest_batch]
    shares = [batch[group.rank :: group.world_size] for batch in global_batches]  # this process's
    images = read_batches(
        source,
        _indices_for(source, shares),
        workers=training.data.workers,
        pin_memory=training.runtime.on_cuda,
        seeds=_crop_seeds(training, global_batches) if crops_when_read(source) else None,
    )
    outliers = outlier_batches(training, shares)
    batches = zip(global_batches, shares, images, outliers)
    for step, (global_batch, batch_index, batch_images, batch_outliers) in enumerate(batches, start=1):
        bar.set_description_str(
            f"train epoch {epoch}/{config.epochs} batch {step}/{training.steps_per_epoch}", refresh=False
        )
        loss = training_step(training, batch_index, batch_images, labels, batch_outliers)
        loss_sum += loss.detach() * len(batch_index)
        seen += len(batch_index)
        bar.update(len(global_batch))  # no host sync: on a GPU the bar runs ahead of its queue
    # The one host sync of the epoch: it also waits for the GPU's queued steps, so the clock read
    # after it times the training steps alone. Several processes add up their shares.
    loss_sum, seen = group.sum(loss_sum, seen)
    train_loss = (loss_sum / max(seen, 1)).item()
    train_seconds = time.perf_counter() - started
    return train_loss, seen / max(train_seconds, 1e-9)


def outlier_batches(training: Training, shares: list[torch.Tensor]) -> Iterator[torch.Tensor | None]:
    """Under outlier exposure, each step's outliers: as many as this process's share of the batch,
    drawn with replacement for the whole epoch at its start from the augmentation stream, so that
    a folder read from its files is decoded ahead by its own DataLoader workers while the steps
    run (a draw per step would wait for its decoding); None for every step without."""
    source = training.data.outliers
    if source is None:
        return itertools.repeat(None)
    counts = [len(share) for share in shares]
    drawn = torch.randint(len(source), (sum(counts),), device=training.runtime.device, generator=training.draws)
    return read_batches(
        source,
        _indices_for(source, list(drawn.split(counts))),
        workers=training.data.workers,
        pin_memory=training.runtime.on_cuda,
    )


def crops_when_read(source: ImageSource) -> bool:
    """Whether `source` augments as it is read (data.image_size's RandomResizedCrop, seeded per
    image), in place of the loop's batched translation."""
    return isinstance(source, ImageFiles) and source.crops


def _crop_seeds(training: Training, global_batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """This process's images' crop seeds for the epoch, batched as its shares are: drawn from the
    augmentation stream (saved with each epoch's checkpoint, so a resumed training crops alike)."""
    group = training.group
    drawn = torch.randint(
        2**62, (sum(len(b) for b in global_batches),), device=training.runtime.device, generator=training.draws
    )
    batches = drawn.cpu().split([len(b) for b in global_batches])
    return [batch[group.rank :: group.world_size] for batch in batches]


def _indices_for(source: ImageSource, shares: list[torch.Tensor]) -> list[torch.Tensor]:
    """The shares as the source reads them: on its device for a tensor, as host lists for files
    (one copy of the epoch's order to the host, not one per batch)."""
    if isinstance(source, torch.Tensor) or not shares:
        return shares
    on_host = torch.cat(shares).cpu()
    return list(on_host.split([len(share) for share in shares]))


def epoch_labels(training: Training) -> torch.Tensor:
    """What this epoch's loss is computed against, one row per train image: the folder's class
    (train.targets hard), the image's distribution (soft), or a class drawn from it (sampled: a
    new draw each epoch from the augmentation stream, so a resumed training draws alike)."""
    data, targets = training.data, training.config.targets
    if targets == "hard" or data.train_targets is None:
        return data.train_labels
    if targets == "soft":
        return data.train_targets
    return sample_labels(data.train_targets, training.draws)


def sample_labels(distributions: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One class per row of `distributions` (N, K), drawn with its probabilities."""
    return torch.multinomial(distributions, 1, generator=generator).squeeze(1)


def training_step(
    training: Training,
    batch_index: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    outliers: torch.Tensor | None = None,
) -> torch.Tensor:
    """One optimiser step on the train `images` at `batch_index`, against `labels` (epoch_labels;
    the folders' classes without), with the step's `outliers` under outlier exposure; returns the
    step's loss."""
    config = training.config
    images, targets, n_in = training_batch(training, batch_index, images, labels, outliers)
    with training.runtime.autocast():
        logits = training.forward(images)
    loss = training_loss(
        logits[:n_in],
        targets,
        config.loss,
        config.label_smoothing,
        config.focal_gamma,
        config.confidence_penalty,
        config.mmce_weight,
    )
    if training.data.outliers is not None:
        loss = loss + OUTLIER_EXPOSURE_WEIGHT * outlier_exposure_loss(logits[n_in:])
    training.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    training.optimizer.step()
    training.schedule.step()
    return loss


def training_batch(
    training: Training,
    batch_index: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    outliers: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """What one step forwards: the train `images` at `batch_index` on the device, augmented and
    mixed (train.augment, train.mix), then the step's `outliers` under outlier exposure; their
    targets; and how many of the images are the batch's own (the rest are outliers)."""
    config, data = training.config, training.data
    labels = data.train_labels if labels is None else labels
    images, targets = images.to(training.runtime.device, non_blocking=True), labels[batch_index]
    if config.augment and not crops_when_read(data.train_images):
        images = random_translate(images, training.max_shift, config.hflip, training.draws)
    if config.mix != "none":
        # Blending needs floats; the model reads float images on the [0, 1] scale.
        images, targets = training.mixer(images.float().div_(255.0), targets)
    n_in = len(images)
    if data.outliers is not None:
        if outliers is None or len(outliers) != n_in:
            raise ValueError(f"outlier exposure needs {n_in} outliers for this step, as many as its own images")
        images = torch.cat([images, augmented_outliers(training, outliers, images.dtype)])
    if training.runtime.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets, n_in


def augmented_outliers(training: Training, outliers: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A step's outlier images on the device, augmented as the batch is, as `dtype`."""
    outliers = outliers.to(training.runtime.device, non_blocking=True)
    if training.config.augment:
        outliers = random_translate(outliers, training.max_shift, training.config.hflip, training.draws)
    # after mixing the batch is float on [0, 1]; the model reads uint8 or that scale
    return outliers if outliers.dtype == dtype else outliers.float().div_(255.0)


def validate(training: Training) -> dict[str, float]:
    """Accuracy, NLL and ECE on the val split of the model as it stands.

    Validation reads the weights under eval() and draws no random numbers, so skipping it changes
    nothing that training computes. Several processes each score their share of the val split
    with rank 0's weights and BatchNorm statistics: none waits idle on another (a wait past
    PEER_TIMEOUT_S would end the run), and the metrics are rank 0's model's."""
    model, data, group = training.model, training.data, training.group
    if group.world_size == 1:
        return validation_metrics(model, data.val_images, data.val_labels, training.runtime, workers=data.workers)
    group.copy_buffers_from_rank0(model)
    share = validation_logits(model, data.val_share, training.runtime, workers=data.workers)
    shares = group.gather_to_all(share)
    labels = [data.val_labels[rank :: group.world_size] for rank in range(group.world_size)]
    return logit_metrics(torch.cat([share for share in shares if len(share)]), torch.cat(labels))


def resume_from_checkpoint(
    training: Training, checkpoints: EpochCheckpoints | None, on_epoch_end: Callable[[EpochStats], None] | None
) -> list[EpochStats]:
    """The epochs a killed training completed, their state restored into `training` and replayed
    through `on_epoch_end` (the resumed run's curves are whole); none without a saved epoch."""
    group = training.group
    # Every process takes part: rank 0 reads the checkpoint and hands it to the others.
    saved = group.from_rank0(checkpoints.load() if checkpoints is not None and group.is_rank0 else None)
    if saved is None:
        return []
    training.model.load_state_dict(saved["model"])
    training.optimizer.load_state_dict(saved["optimizer"])
    training.schedule.load_state_dict(saved["schedule"])
    if group.world_size > 1:
        training.order.set_state(saved["order"])
        restore_random_states(training.draws, saved["random_by_rank"][group.rank])
    else:
        restore_random_states(training.order, saved["random"])
    history = [EpochStats(**stats) for stats in saved["history"]]
    for stats in history if on_epoch_end is not None else ():
        on_epoch_end(stats)
    return history


def save_epoch_checkpoint(training: Training, checkpoints: EpochCheckpoints, history: list[EpochStats]) -> None:
    """Everything the next epoch reads, after the last of `history`: one file, by rank 0, holding
    every process's random streams."""
    group = training.group
    epoch = history[-1].epoch
    state = {
        "epoch": epoch,
        "model": training.model.state_dict(),
        "optimizer": training.optimizer.state_dict(),
        "schedule": training.schedule.state_dict(),
        "history": [dataclasses.asdict(h) for h in history],
    }
    if group.world_size > 1:
        state["order"] = training.order.get_state()
        state["random_by_rank"] = group.gather_to_all(random_states(training.draws))
    else:
        state["random"] = random_states(training.order)
    if group.is_rank0:
        checkpoints.save(epoch, state)


def one_cycle_schedule(
    optimizer: torch.optim.Optimizer, max_lr: float | list[float], total_steps: int
) -> torch.optim.lr_scheduler.OneCycleLR:
    """One-cycle learning rate over `total_steps`, warming up over the first quarter. OneCycleLR
    divides by its warm-up's last step, pct_start * total_steps - 1: that is 0 at exactly 4 steps
    (e.g. one epoch over at most 256 images), where it raised ZeroDivisionError; warm up a little
    longer there."""
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=max_lr, total_steps=total_steps, pct_start=0.3 if total_steps == 4 else 0.25
    )


def _bar_postfix(stats: EpochStats) -> dict[str, str]:
    postfix = {"loss": f"{stats.train_loss:.4f}", "img_s": f"{stats.images_per_second:,.0f}"}
    if stats.validated:
        postfix["val_acc"] = f"{stats.val_accuracy:.4f}"
    return postfix


# Input values (images x channels x height x width) one inference batch may hold: at 224 px RGB
# 111 images. A network's activations are tens of times its input, so a batch sized for 8x8
# digits (1,024) held gigabytes at 224 px and set the run's peak memory, not the data. On the CPU
# a quarter of it (27 images at 224 px): activations that stay in cache read faster (one thread,
# 224 px, 32 images against 111: small_cnn width 4 1.29x, width 32 1.07x, resnet18 1.06x).
INFERENCE_VALUES = 1 << 24
CPU_INFERENCE_VALUES = 1 << 22
# Part of the key of every cached logit: bump when how collect_logits computes them changes their
# last bits (memory format, batch cap, BatchNorm folding, input normalization), so that no cache
# mixes them.
LOGITS_VERSION = "4"


def inference_batch(batch_size: int, images: ImageSource, device: str | torch.device = "cpu") -> int:
    """`batch_size`, capped so that a batch of these images holds at most INFERENCE_VALUES input
    values (CPU_INFERENCE_VALUES on the CPU). Eval mode: each image's logits do not depend on the
    batch it is in."""
    per_image = max(1, math.prod(images.shape[1:])) if len(images) else 1
    cap = CPU_INFERENCE_VALUES if torch.device(device).type == "cpu" else INFERENCE_VALUES
    return max(1, min(batch_size, cap // per_image))


def _batch_sizes(n: int, batch_size: int) -> list[int]:
    full, rest = divmod(n, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


@torch.no_grad()
def validation_logits(
    model: ImageClassifier, images: ImageSource, runtime: Runtime, batch_size: int = 1024, *, workers: int = 0
) -> torch.Tensor:
    """The model's logits of `images` under eval() and the training's autocast, on the CPU."""
    was_training = model.training
    model.eval()
    logits = []
    batch_size = inference_batch(batch_size, images, runtime.device)
    batches = read_batches(images, in_order(len(images), batch_size), workers=workers, pin_memory=runtime.on_cuda)
    # in the layout the training gives the weights, whichever model the caller passes
    with weights_in_layout(model, training_memory_format(model, runtime.device)) as memory_format:
        for batch in batches:
            batch = batch.to(runtime.device, non_blocking=True).contiguous(memory_format=memory_format)
            with runtime.autocast():
                logits.append(model(batch).float())
    model.train(was_training)
    return torch.cat(logits).cpu() if logits else torch.empty(0, 0)


def validation_metrics(
    model: ImageClassifier,
    images: ImageSource,
    labels: torch.Tensor,
    runtime: Runtime,
    batch_size: int = 1024,
    *,
    workers: int = 0,
) -> dict[str, float]:
    """Accuracy, NLL and 15-bin ECE of the model's plain softmax on `images`, under eval()."""
    return logit_metrics(validation_logits(model, images, runtime, batch_size, workers=workers), labels)


def logit_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    if not len(logits):
        return {"accuracy": 0.0, "nll": float("nan"), "ece": float("nan")}
    z = logits.double()
    y = labels.cpu().long()
    return {
        "accuracy": (z.argmax(dim=1) == y).double().mean().item(),
        "nll": F.cross_entropy(z, y).item(),
        "ece": expected_calibration_error(torch.softmax(z, dim=1), y),
    }


@torch.no_grad()
def collect_logits(
    model: ImageClassifier,
    images: ImageSource,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    progress: str | None = None,
    *,
    workers: int = 0,
) -> torch.Tensor:
    """Logits of `images` in fp32, under eval() (BatchNorm running stats, no dropout) and no_grad;
    `progress`: the label of a progress bar (on a terminal only), None for none.

    Always fp32, even where training used bf16: the temperature is fitted to these logits and
    the registered model serves fp32 logits, so both must be the same numbers.
    """
    model.eval()
    model.to(device)
    outputs = []
    with (
        progress_bar(len(images), progress or "", enabled=progress is not None) as bar,
        closing(images),
        inference_layout(model, device) as memory_format,
    ):
        on_cuda = torch.device(device).type == "cuda"
        batch_size = inference_batch(batch_size, images, device)
        batches = read_batches(images, in_order(len(images), batch_size), workers=workers, pin_memory=on_cuda)
        for step, batch in enumerate(batches, start=1):  # one whole pass: its workers are stopped below
            batch = batch.to(device).contiguous(memory_format=memory_format)
            outputs.append(model(batch).float().cpu())
            bar.update(len(batch))
            if step % TRIM_EVERY_BATCHES == 0:
                release_freed_memory()
    return torch.cat(outputs) if outputs else torch.empty(0, 0)


# Batches between two malloc_trim calls in a long inference pass. glibc's malloc keeps the blocks
# a forward pass frees in its arenas rather than give them back, and with batches from a
# DataLoader worker a prepared small_cnn at 224 px grew by 1.3 GB over 6,000 photos (one trim
# gave it all back); trimming every 16 batches kept it flat at the same speed. A pass of fewer
# batches (a served request; a suite cell of fewer than 432 photos at 224 px) never trims: a trim
# locks every arena while it runs, and what it gives back the next batch faults in again.
TRIM_EVERY_BATCHES = 16


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library this process runs on
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> None:
    """Hand the memory glibc's malloc holds free back to the system (malloc_trim(0)); nothing where
    the C library has no malloc_trim."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@contextmanager
def inference_layout(model: ImageClassifier, device: str | torch.device) -> Iterator[torch.memory_format]:
    """The block runs with `model`'s weights in inference_memory_format and yields that format for
    its batches (weights_in_layout)."""
    with weights_in_layout(model, inference_memory_format(model, device)) as memory_format:
        yield memory_format


@contextmanager
def weights_in_layout(model: ImageClassifier, memory_format: torch.memory_format) -> Iterator[torch.memory_format]:
    """The block runs with `model`'s weights in `memory_format` and yields it for its batches:
    oneDNN picks its convolution by the weights' layout, so the same weights give the same logits
    only in the same layout. Weights moved into it move back to the format they came in afterwards
    (a model loaded from a file is contiguous; a CUDA training leaves it channels_last), while a
    model laid out so already (a CPU training's, the served model's members) is left as it is."""
    moved = not in_memory_format(model, memory_format)
    came_in = torch.channels_last if memory_format == torch.contiguous_format else torch.contiguous_format
    if moved:
        model.to(memory_format=memory_format)
    try:
        yield memory_format
    finally:
        if moved:
            model.to(memory_format=came_in)
