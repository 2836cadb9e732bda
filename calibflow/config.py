"""The one run configuration: params.yaml loaded into frozen, typed dataclasses.

Unknown keys are an error that names the key (a typo in a gate threshold must never be silently
ignored), every value is type-checked, and `params_hash` identifies the resolved config so a
registered model can say exactly which settings built it.

Each field declares its own bounds beside its default (`bounded(default, Range(...), Rule(...))`),
and each section's relations between its fields are its `validate()`, right under them; a value
a run cannot use is a ConfigError that names the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from calibflow.errors import ConfigError

# The defaults the library's functions share with params.yaml live with the code they are about,
# which never imports this module; they are re-exported here, where the keys they are defaults of are.
from calibflow.calibrators.temperature import DEFAULT_MAX_TEMPERATURE, DEFAULT_MIN_TEMPERATURE
from calibflow.data.splits import SPLIT_NAMES
from calibflow.evaluation.corruptions import CORRUPTION_NAMES
from calibflow.metrics.reliability import DEFAULT_N_BINS

# Sections that decide what happens to a model, not what model is built (left out of params_hash).
OPERATIONAL_SECTIONS = ("gates", "promotion", "monitor", "registry", "schedule")
HOW_DATA_IS_READ = ("in_memory_max_mb", "workers")  # data keys that change how a split is read, not what
# Keys read only when another key is set: changing one while that key is null builds nothing new.
UNUSED_UNLESS = {
    ("data", "resize_size"): ("data", "image_size"),
    ("data", "min_side"): ("data", "image_size"),
    ("train", "crop_min_scale"): ("data", "image_size"),
    ("data", "soft_label_tolerance"): ("data", "soft_labels"),
    ("data", "soft_label_agreement"): ("data", "soft_labels"),
}
NOT_HYPERPARAMETERS = ("registry", "schedule")  # not MLflow params: where a model goes and when, not what it is
# torchrun's own default port for node 0's rendezvous (train.rendezvous without one).
DEFAULT_RENDEZVOUS_PORT = 29500


# --------------------------------------------------------------------------------------------
# Bounds: what one field allows, declared beside it and checked by _check_fields
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """A number in [low, high]: high None means no upper end, low_open / high_open refuse that end
    itself. The error is `message` formatted with key, value, low, high and allowed (the range in
    words). None (an optional key left unset) and a string ("auto") are not numbers to check."""

    low: float
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    message: str = "{key} = {value}: {allowed}"

    @property
    def allowed(self) -> str:
        if self.high is None:
            return "must be positive" if self.low == 0 and self.low_open else f"must be {self.low} or more"
        opening, closing = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"must be in {opening}{self.low}, {self.high}{closing}"

    def __call__(self, key: str, value: Any) -> None:
        if value is None or isinstance(value, str):
            return
        above = self.low < value if self.low_open else self.low <= value
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        if not (above and below):
            raise ConfigError(
                self.message.format(key=key, value=value, low=self.low, high=self.high, allowed=self.allowed)
            )


@dataclass(frozen=True)
class Rule:
    """A test the value must pass (None, an optional key left unset, is not tested). The error is
    `message` formatted with key and value, or what `message(key, value)` returns."""

    test: Callable[[Any], Any]
    message: str | Callable[[str, Any], str]

    def __call__(self, key: str, value: Any) -> None:
        if value is not None and not self.test(value):
            message = self.message
            raise ConfigError(message(key, value) if callable(message) else message.format(key=key, value=value))


@dataclass(frozen=True)
class Each:
    """A check of every item of a list, each error naming the item."""

    check: Callable[[str, Any], None]

    def __call__(self, key: str, values: tuple[Any, ...]) -> None:
        for value in values:
            self.check(key, value)


def bounded(default: Any, *checks: Callable[[str, Any], None]) -> Any:
    """A field with its default and its checks, which _check_fields runs in order on a loaded config."""
    return field(default=default, metadata={"checks": checks})


POSITIVE = Range(0, low_open=True)
NOT_NEGATIVE = Range(0)
PROBABILITY = Range(0, 1)  # [0, 1]
OPEN_UNIT = Range(0, 1, low_open=True, high_open=True)  # (0, 1)
FRACTION = Range(0, 1, high_open=True)  # [0, 1)
ONCE_EACH = Rule(
    lambda values: len(set(values)) == len(values), lambda key, values: f"{key} = {list(values)}: each must appear once"
)


def _known_corruption(key: str, name: str) -> str:
    close = difflib.get_close_matches(name, CORRUPTION_NAMES, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{key}: unknown corruption {name!r}{hint}; known: {', '.join(CORRUPTION_NAMES)}"


KNOWN_CORRUPTIONS = Each(Rule(lambda name: name in CORRUPTION_NAMES, _known_corruption))


# --------------------------------------------------------------------------------------------
# The sections of params.yaml
# --------------------------------------------------------------------------------------------


# Upper ends of the whole numbers that size an allocation or a loop. Each is far beyond any real
# run, so that only a typo meets it (an extra zero or a number pasted into the wrong key): one
# more than these would otherwise surface as an OOM kill, an overflow traceback deep in torch or
# numpy, or a run that never ends, instead of a message naming the key.
MAX_EPOCHS = 10_000
MAX_BATCH_SIZE = 65_536  # a batch is held on the device whole: beyond this it is one bigger than memory
MAX_IMAGES = 10_000_000  # images a setting may ask to read: past any real folder
MAX_RAPS_K_REG = 100_000  # a rank past every class count a dataset of folders has


def _at_most(high: int, what: str) -> Range:
    """At most `high` (after POSITIVE, which says what is wrong below), the error naming what the
    key counts and the fix."""
    return Range(1, high, message="{key} = {value}: " + what + " must be at most {high}; set {key} to {high} or less")


def _is_size(size: str) -> bool:
    width, x, height = size.partition("x")
    return bool(x and width.isdigit() and height.isdigit())


@dataclass(frozen=True)
class DataConfig:
    path: str = "data/digits"
    min_per_class: int = bounded(10, POSITIVE, _at_most(MAX_IMAGES, "images per class"))
    # "WxH" strings; empty means "every image has the same size as the most common one".
    allowed_sizes: tuple[str, ...] = bounded(
        (), Each(Rule(_is_size, "{key}: {value!r} is not WIDTHxHEIGHT (for example 32x32)"))
    )
    # PIL modes ("L", "RGB"); empty means "every image has the most common mode".
    allowed_modes: tuple[str, ...] = ()
    # Photos of mixed sizes (docs/pipeline.md, "Image sizes"): the model reads image_size x
    # image_size pixels, trained on torchvision's reference RandomResizedCrop (train.augment,
    # train.hflip, train.crop_min_scale) and evaluated, and served, on its Resize(resize_size) +
    # CenterCrop(image_size). null: every image has one size (allowed_sizes) and is read whole.
    image_size: int | None = bounded(
        None, Range(8, 4096, message="{key} = {value}: use a side in pixels in [{low}, {high}], or null")
    )
    # The evaluation resize of the shorter side; null: image_size x 256/224, torchvision's reference
    # (256 for 224). At least image_size: the centre crop is cut from it.
    resize_size: int | None = bounded(
        None, Range(8, 8192, message="{key} = {value}: use a side in pixels in [{low}, {high}], or null")
    )
    # With image_size: validation refuses an image whose shorter side is below this (a thumbnail or
    # a 1x1 pixel read at 224 px is an invented image), and so does reading it later.
    min_side: int = bounded(32, POSITIVE, _at_most(4096, "the smallest side in pixels"))
    # Soft labels (docs/soft_labels.md): a CSV at the root of data.path (so DVC's hash of the folder
    # covers it), `path,<class 1>,...,<class K>`, one row per image: probabilities, or annotator
    # counts (whole numbers, normalised). null: every image's label is its folder.
    soft_labels: str | None = None
    # A row of probabilities must sum to 1 within this (counts are normalised whatever their total).
    soft_label_tolerance: float = bounded(1e-3, Range(0, 0.5, low_open=True))
    # argmax: an image's folder must be among its row's most probable classes; none: not checked.
    soft_label_agreement: Literal["argmax", "none"] = "argmax"
    # How a split is read, which changes memory and speed, never a pixel: decoded into memory when
    # its uint8 pixels (images x channels x height x width) take at most this many MB, else from
    # its files a batch at a time (0: always from the files). 1,024 MB holds about 7,100 RGB
    # images at 224 px, or all of CIFAR-10 at 32 px.
    in_memory_max_mb: int = bounded(1024, NOT_NEGATIVE)
    # DataLoader worker processes that decode a split read from its files; auto: one per core
    # beyond the first, at most 8 (calibflow.data.image_files.auto_workers); 0 decodes in the
    # run's own process, with a thread pool.
    workers: int | Literal["auto"] = bounded(
        "auto", Range(0, 64, message="{key} = {value}: use a number of processes in [{low}, {high}] or auto")
    )

    def validate(self) -> None:
        if self.soft_labels is not None:
            name = Path(self.soft_labels)
            if name.is_absolute() or ".." in name.parts or len(name.parts) != 1:
                raise ConfigError(
                    f"data.soft_labels = {self.soft_labels!r}: name a CSV file at the root of data.path "
                    f"({self.path}), for example soft_labels.csv, so the folder's DVC hash covers it"
                )
        if self.image_size is None:
            if self.resize_size is not None:
                raise ConfigError(
                    f"data.resize_size = {self.resize_size} needs data.image_size: the resize frames the centre "
                    f"crop of image_size; set data.image_size (for example 224) or data.resize_size to null"
                )
            return
        if self.allowed_sizes:
            raise ConfigError(
                f"data.allowed_sizes = {list(self.allowed_sizes)} and data.image_size = {self.image_size}: with "
                f"image_size every image is resized and cropped to it, whatever its size; set one of them to empty / null"
            )
        if self.resize_size is not None and self.resize_size < self.image_size:
            raise ConfigError(
                f"data.resize_size = {self.resize_size} is below data.image_size = {self.image_size}: the centre "
                f"crop of image_size is cut from the resized image; use at least {self.image_size}, or null "
                f"(image_size x 256/224)"
            )


SPLIT_FRACTION = Range(0, 1, low_open=True, high_open=True, message="{key} = {value}: each split fraction {allowed}")


@dataclass(frozen=True)
class SplitConfig:
    # A small train share over-fits the default digits (the over-confidence the default run shows
    # being corrected); large calibration and test shares fit T and read the gates on enough images.
    train: float = bounded(0.3, SPLIT_FRACTION)
    val: float = bounded(0.05, SPLIT_FRACTION)
    calibration: float = bounded(0.25, SPLIT_FRACTION)
    test: float = bounded(0.4, SPLIT_FRACTION)

    def validate(self) -> None:
        total = sum(self.fractions().values())
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(f"split fractions sum to {total:.4f}; they must sum to 1")

    def fractions(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in SPLIT_NAMES}


# A first block of more than 1024 channels is far beyond what images of this size need. Deep
# ensembles stop gaining past a handful of members (Lakshminarayanan et al. 2017 use 5; Ovadia et
# al. 2019 see little beyond 10), and each member is a full training run; MC dropout likewise
# converges within tens of passes, each a full forward pass at serving time.
MAX_MODEL_WIDTH, MAX_ENSEMBLE, MAX_MC_SAMPLES = 1024, 32, 256


def _known_arch(key: str, arch: str) -> None:
    if arch != "small_cnn":  # the default needs no torchvision (~1.5 s to import)
        from calibflow.training.models import check_arch

        check_arch(key, arch)


@dataclass(frozen=True)
class ModelConfig:
    # small_cnn, or any classification model of torchvision's registry (resnet50, efficientnet_b0,
    # convnext_tiny, vit_b_16, ...): docs/models.md says which stem each gets at which image size.
    arch: str = bounded("small_cnn", _known_arch)
    width: int = bounded(32, Range(1, MAX_MODEL_WIDTH))  # channels of the first conv block (small_cnn only)
    # Optional state_dict a user has put on disk; nothing is ever downloaded.
    weights_path: str | None = None
    # Or torchvision's weights of model.arch by name (IMAGENET1K_V1, DEFAULT, ...), read from torch
    # hub's cache (<TORCH_HOME>/hub/checkpoints/), where the file must already be: nothing is
    # downloaded. A head of another class count is left at its initial values (docs/models.md).
    pretrained: str | None = bounded(
        None, Rule(str.strip, "{key} is empty: name torchvision weights (e.g. DEFAULT) or null")
    )
    # Deep ensemble (Lakshminarayanan et al. 2017): members trained one after the other with seeds
    # seed, seed+1, ...; the served probabilities are the mean of the members' calibrated ones.
    ensemble: int = bounded(1, POSITIVE, Range(1, MAX_ENSEMBLE))
    # Dropout before the classifier head (0: none). With mc_dropout S > 1 it stays on at inference
    # and the model serves the mean of S stochastic passes (Gal & Ghahramani 2016), seeded.
    dropout: float = bounded(0.0, FRACTION)
    mc_dropout: int = bounded(1, POSITIVE, Range(1, MAX_MC_SAMPLES))

    def validate(self) -> None:
        if self.weights_path and self.pretrained:
            raise ConfigError(
                f"model.weights_path and model.pretrained = {self.pretrained} both name the initial weights: set one"
            )
        if self.pretrained:
            from calibflow.training.models import torchvision_weights

            torchvision_weights(self.arch, self.pretrained)  # a name the arch has (the file is checked at training)
        if self.mc_dropout > 1 and self.dropout == 0:
            raise ConfigError(
                f"model.mc_dropout = {self.mc_dropout}: needs model.dropout > 0 (e.g. 0.2), or its "
                f"passes would all be the same"
            )


# torch starts one OS thread per intra-op thread: thousands are a typo, not a machine.
MAX_THREADS = 1024
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


@dataclass(frozen=True)
class TrainConfig:
    device: str = bounded(  # auto | cpu | cuda | cuda:N
        "auto", Rule(DEVICE_PATTERN.fullmatch, "{key} = {value!r}: use auto, cpu, cuda or cuda:N (N = 0, 1, ...)")
    )
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    epochs: int = bounded(30, POSITIVE, _at_most(MAX_EPOCHS, "the number of epochs"))
    batch_size: int = bounded(64, POSITIVE, _at_most(MAX_BATCH_SIZE, "the batch size"))
    lr: float = bounded(0.05, POSITIVE)
    momentum: float = bounded(0.9, FRACTION)
    weight_decay: float = bounded(5e-4, NOT_NEGATIVE)
    label_smoothing: float = bounded(0.0, FRACTION)
    # random translation by up to 1/8 of the image side; with data.image_size, RandomResizedCrop
    augment: bool = True
    hflip: bool = False  # horizontal flips: right for CIFAR-like data, wrong for digits
    # What the loss is computed against (docs/soft_labels.md): hard, the folder's class; soft, the
    # image's row of data.soft_labels (cross-entropy on the distribution); sampled, a class drawn
    # from that row each epoch (the "noisy labels" remedy), seeded and resumable like the order.
    targets: Literal["hard", "soft", "sampled"] = "hard"
    # With data.image_size and augment: RandomResizedCrop's smallest share of an image's area
    # (torchvision's reference 0.08; larger keeps more of each photo in every crop).
    crop_min_scale: float = bounded(0.08, Range(0, 1, low_open=True))
    # Train-time calibration (calibflow/training/losses.py): each composes with label_smoothing and mix.
    loss: Literal["cross_entropy", "focal", "flsd53", "confidence_penalty", "mmce"] = "cross_entropy"
    # loss focal: (1 - p)^gamma; 0 is cross-entropy (flsd53 picks its own)
    focal_gamma: float = bounded(3.0, NOT_NEGATIVE)
    # loss confidence_penalty: beta in CE - beta * H(p) (Pereyra et al. 2017)
    confidence_penalty: float = bounded(0.1, NOT_NEGATIVE)
    mmce_weight: float = bounded(2.0, NOT_NEGATIVE)  # loss mmce: lambda in CE + lambda * MMCE (Kumar et al. 2018)
    mix: Literal["none", "mixup", "cutmix"] = "none"  # torchvision.transforms.v2 MixUp / CutMix
    mix_alpha: float = bounded(1.0, POSITIVE)  # lambda ~ Beta(alpha, alpha)
    # Epochs between validation passes; the last epoch always validates. A pass over the val split
    # costs 4-6.5% of an epoch on the default digits, which held every epoch to 0.947x a bare
    # training loop (issue 16); every 5th measured 0.977x (benchmarks/train_step.py; 10 was no
    # faster within the noise and leaves half the points on the val curve). The weights do not
    # depend on it: validation draws no random numbers and changes no state.
    val_every: int = bounded(5, POSITIVE, _at_most(MAX_EPOCHS, "epochs between validation passes"))
    # Fine-tuning (docs/models.md): freeze_backbone trains the classifier head alone (the
    # backbone's parameters get no gradient; its BatchNorm statistics still follow the data);
    # backbone_lr_factor scales the backbone's learning rate (lr x factor, the head keeps lr) in
    # its own optimizer parameter group. 1 and false: one group, the training as before.
    freeze_backbone: bool = False
    backbone_lr_factor: float = bounded(1.0, Range(0, 1, low_open=True))
    # torch intra-op threads for training and for collecting logits (restored afterwards), or
    # "auto" for torch's own choice (one per physical core, or OMP_NUM_THREADS). 1 by default:
    # on a 2-core machine that another process shares, 2 threads fall far below 1 thread (1
    # thread 4,361 img/s, 2 threads 1,744 beside one busy process; 1,501 and 155 beside ~2.3 busy
    # cores), while an idle one gives 2 threads 1.6x (README, "Training loop and threads"). A fixed count also
    # keeps the trained weights the same on any machine: gradient sums are split across threads,
    # so the count changes their rounding. Logits are the same on any count (tested).
    threads: int | Literal["auto"] = bounded(
        1,
        Range(
            1,
            MAX_THREADS,
            message="{key} = {value}: use a number of threads in [{low}, {high}] or auto (torch's default: one per "
            "physical core)",
        ),
    )
    # Outlier exposure (Hendrycks, Mazeika & Dietterich 2019): a DVC-tracked folder of auxiliary
    # outlier images (flat or <class>/<image>, resized to the model's input); each step adds 0.5 x
    # the cross-entropy from the uniform distribution to the softmax of as many outliers.
    outlier_exposure: str | None = bounded(
        None, Rule(str.strip, "{key} is empty: name a DVC-tracked folder of outlier images, or null")
    )
    # Training on more than one process (calibflow/training/distributed.py): "ddp" runs the training step
    # under torchrun, DistributedDataParallel with NCCL on GPUs and gloo on the CPU; batch_size is
    # the global batch. nproc: processes on this node (auto: one per GPU, or per train.threads CPU
    # cores). nnodes > 1: this node is node 0 and serves the rendezvous at HOST:PORT, which the
    # other nodes reach (README, "More than one process").
    distributed: Literal["none", "ddp"] = "none"
    nproc: int | Literal["auto"] = bounded(
        "auto",
        Range(1, MAX_THREADS, message="{key} = {value}: use a number of processes per node in [{low}, {high}] or auto"),
    )
    nnodes: int = bounded(1, Range(1), _at_most(MAX_THREADS, "the number of nodes"))
    rendezvous: str | None = None

    def validate(self) -> None:
        """What can be told without the machine; calibflow.training.distributed.resolve_nproc checks
        nproc against its cores or GPUs."""
        if self.distributed == "none":
            for key, value, default in (("nproc", self.nproc, "auto"), ("nnodes", self.nnodes, 1)):
                if value != default:
                    raise ConfigError(
                        f"train.{key} = {value} needs train.distributed = ddp (it is none): set it, or remove train.{key}"
                    )
            return
        if self.nnodes > 1 and not self.rendezvous:
            raise ConfigError(
                f"train.nnodes = {self.nnodes} needs train.rendezvous: HOST:PORT of this node (node 0), which the "
                f"other nodes reach (README, 'More than one process')"
            )
        if self.nnodes > 1:
            rendezvous_address(self.rendezvous)
        if ":" in self.device:
            raise ConfigError(
                f"train.device = {self.device!r} picks one GPU and train.distributed = ddp uses train.nproc of them "
                f"(cuda:0 ... cuda:nproc-1, as CUDA_VISIBLE_DEVICES allows): use auto or cuda"
            )


def rendezvous_address(rendezvous: str | None) -> tuple[str, int]:
    """train.rendezvous as (host, port); the port defaults to torchrun's 29500."""
    host, colon, port = (rendezvous or "").strip().rpartition(":")
    if not colon:
        host, port = port, str(DEFAULT_RENDEZVOUS_PORT)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"train.rendezvous = {rendezvous!r}: name node 0 as HOST:PORT, an address every node reaches "
            f"(e.g. calibflow-ddp.calibflow.svc.cluster.local:{DEFAULT_RENDEZVOUS_PORT})"
        )
    return host, int(port)


@dataclass(frozen=True)
class CalibrationConfig:
    # auto: the method with the best cross-validated NLL on the calibration split (one-SE rule,
    # so temperature unless a richer method is clearly better); platt and beta: binary tasks only.
    method: Literal["temperature", "vector", "matrix", "histogram", "isotonic", "platt", "beta", "auto"] = "temperature"
    # Search range for T. An optimum on the boundary means no interior minimum exists (for
    # example every calibration prediction is right with a wide margin): that is an error.
    min_temperature: float = bounded(DEFAULT_MIN_TEMPERATURE, POSITIVE)
    max_temperature: float = DEFAULT_MAX_TEMPERATURE  # above min_temperature (validate)
    # Tomani et al. 2021 ("Post-hoc calibration of neural networks by perturbation"): fit on the
    # calibration split plus copies of it corrupted by `shift_corruptions` at severities 1-5, so
    # the calibrator sees the confidence a model has on harder images. The default corruption is
    # not in the default `shift:` suite, so the suite measures shifts the calibrator never saw.
    shift_aware: bool = False
    shift_corruptions: tuple[str, ...] = bounded(("speckle_noise",), KNOWN_CORRUPTIONS)
    # What temperature scaling is fitted against (docs/soft_labels.md): hard, the folder's class;
    # soft, each calibration image's row of data.soft_labels (the cross-entropy to the annotators).
    targets: Literal["hard", "soft"] = "hard"

    def validate(self) -> None:
        if self.max_temperature <= self.min_temperature:
            raise ConfigError(
                f"calibration.max_temperature = {self.max_temperature}: must be above "
                f"calibration.min_temperature ({self.min_temperature})"
            )
        if self.shift_aware and not self.shift_corruptions:
            raise ConfigError("calibration.shift_aware needs calibration.shift_corruptions (e.g. [speckle_noise])")


# Thousands of reliability bins on a test split of thousands of images measure nothing, and the
# process would be OOM-killed long before it said so.
MAX_N_BINS = 1000


@dataclass(frozen=True)
class EvaluationConfig:
    n_bins: int = bounded(DEFAULT_N_BINS, Range(1, MAX_N_BINS))
    batch_size: int = bounded(512, POSITIVE, _at_most(MAX_BATCH_SIZE, "the batch size"))


# Fewer than 100 resamples cannot place a 95% bound; more than 100,000 add no precision to it and
# run for hours.
MIN_N_RESAMPLES, MAX_N_RESAMPLES = 100, 100_000


@dataclass(frozen=True)
class GatesConfig:
    # Absolute gates, on the test split after calibration. ECE passes only when the upper
    # confidence bound of the candidate's ECE is below max_ece (accuracy: the lower bound).
    max_ece: float = bounded(0.07, PROBABILITY)
    min_accuracy: float = bounded(0.75, PROBABILITY)
    max_nll: float | None = bounded(None, NOT_NEGATIVE)
    # Opt-in, with data.soft_labels (docs/soft_labels.md): against each test image's distribution
    # over the classes, the upper bound of the cross-entropy, and of the calibration error
    # (`metric`) whose "accuracy" is the annotators' probability of the predicted class.
    max_soft_nll: float | None = bounded(None, NOT_NEGATIVE)
    max_soft_ece: float | None = bounded(None, PROBABILITY)
    # Relative to the champion, on the same test images (paired bounds, docs/gates.md).
    max_ece_increase: float | None = bounded(0.01, NOT_NEGATIVE)
    max_accuracy_drop: float | None = bounded(0.01, NOT_NEGATIVE)
    # Opt-in: the paired Brier score, candidate - champion (calibration and sharpness together, a
    # proper score): passes retrains of equal quality far more often than max_ece_increase can.
    max_brier_increase: float | None = bounded(None, NOT_NEGATIVE)
    # one-sided level of every bound
    confidence: float = bounded(
        0.95, Range(0.5, 1, low_open=True, high_open=True, message="{key} = {value}: {allowed}, e.g. 0.95")
    )
    # Simulated test sets per size in `calibflow gate plan`; the gates themselves resample nothing.
    n_resamples: int = bounded(200, Range(MIN_N_RESAMPLES, MAX_N_RESAMPLES))
    # Which calibration error max_ece and max_ece_increase read: "smooth_ece" (Blasiok & Nakkiran,
    # 2023; consistent, and no bin edges to be noisy at: benchmarks/gate_soundness.py measures it
    # keeping its confidence with far more power against a champion) or "ece" (15 equal-width bins).
    metric: Literal["ece", "smooth_ece"] = "smooth_ece"
    # Shift gates (need a `shift:` suite), read on the corrupted copies of the test split: the mean
    # over the suite's cells of each cell's upper bound of the calibration error (`metric`), each
    # at the Bonferroni level 1 - (1 - confidence) / cells, so all hold at once at `confidence`.
    max_shift_ece: float | None = bounded(None, PROBABILITY)
    # ... and of the increase over the champion's, on the corrupted shared test images.
    max_shift_ece_increase: float | None = bounded(None, NOT_NEGATIVE)
    # Out-of-distribution gate (needs ood.path): upper bound of the share of OOD images scored as
    # in-distribution at the threshold that keeps 95% of the test split (docs/shift_and_ood.md).
    max_ood_fpr95: float | None = bounded(None, PROBABILITY)
    # Decision gates (need the matching decision: rule), read at the served thresholds on the
    # test split: the upper bound of the selective risk, the lower bound of the sets' coverage.
    max_selective_risk: float | None = bounded(None, OPEN_UNIT)
    min_conformal_coverage: float | None = bounded(None, OPEN_UNIT)

    def soft_gates(self) -> list[str]:
        """The soft-label gates that are set: they read data.soft_labels' rows of the test images."""
        return [name for name in ("max_soft_nll", "max_soft_ece") if getattr(self, name) is not None]


def _cost(of_one: str) -> Range:
    return Range(0, low_open=True, message="{key} = {value}: costs must be positive (the cost of one " + of_one + ")")


@dataclass(frozen=True)
class DecisionConfig:
    """What the served model decides with its calibrated probabilities, fitted on the calibration
    split (calibflow.gates.decisions; docs/decisions.md). Every rule is off by default."""

    # Binary decisions (K = 2, or one class against the rest): the class folder name that counts as
    # positive, and one rule: both costs (Bayes threshold c_fp / (c_fp + c_fn)), or a precision or
    # recall target certified on the calibration split.
    positive_class: str | None = None
    cost_fp: float | None = bounded(None, _cost("false positive"))
    cost_fn: float | None = bounded(None, _cost("false negative"))
    min_precision: float | None = bounded(None, OPEN_UNIT)
    min_recall: float | None = bounded(None, OPEN_UNIT)
    # Abstain below the confidence whose selective risk (error rate of the kept predictions) is
    # certified at most this.
    max_risk: float | None = bounded(None, OPEN_UNIT)
    # Prediction sets that hold the true class with probability >= 1 - alpha (split conformal).
    conformal_alpha: float | None = bounded(None, OPEN_UNIT)
    # lac: the smallest sets on average; aps/raps adapt the size to the image, but on two classes
    # (or any model whose error rate exceeds alpha) aps holds both labels nearly always
    # (benchmarks/decision_guarantees.py), so lac is the default.
    conformal_score: Literal["lac", "aps", "raps"] = "lac"
    # RAPS's penalty per label past raps_k_reg (Angelopoulos et al. 2021)
    raps_lambda: float = bounded(0.01, NOT_NEGATIVE)
    raps_k_reg: int = bounded(
        1, Range(0, MAX_RAPS_K_REG, message="{key} = {value}: a number of labels, must be in [{low}, {high}]")
    )
    # The certified rules (min_precision, min_recall, max_risk) hold with probability >= 1 - delta.
    delta: float = bounded(0.05, OPEN_UNIT)

    def validate(self) -> None:
        """One binary rule at most, with both costs or neither, and a positive class exactly when a
        binary rule reads one."""
        given = {
            "cost_fp/cost_fn": self.cost_fp is not None or self.cost_fn is not None,
            "min_precision": self.min_precision is not None,
            "min_recall": self.min_recall is not None,
        }
        rules = [name for name, set_ in given.items() if set_]
        if len(rules) > 1:
            raise ConfigError(f"decision: {' and '.join(rules)} are each a rule for the binary threshold; set one")
        if (self.cost_fp is None) != (self.cost_fn is None):
            set_, unset = ("cost_fp", "cost_fn") if self.cost_fp is not None else ("cost_fn", "cost_fp")
            raise ConfigError(
                f"decision.{set_} is set but decision.{unset} is not: the cost threshold needs both costs"
            )
        if self.binary_rule and not self.positive_class:
            raise ConfigError(
                f"decision.{rules[0].split('/')[0]} needs decision.positive_class: the class folder name "
                f"whose probability the threshold reads"
            )
        if self.positive_class is not None and not self.binary_rule:
            raise ConfigError(
                "decision.positive_class is set but no rule uses it: add decision.cost_fp and cost_fn, "
                "decision.min_precision or decision.min_recall (or remove positive_class)"
            )

    @property
    def binary_rule(self) -> str | None:
        if self.cost_fp is not None or self.cost_fn is not None:
            return "cost"
        if self.min_precision is not None:
            return "min_precision"
        if self.min_recall is not None:
            return "min_recall"
        return None

    @property
    def any_rule(self) -> bool:
        return self.binary_rule is not None or self.max_risk is not None or self.conformal_alpha is not None


@dataclass(frozen=True)
class ShiftConfig:
    """The corruption suite run on the test split after calibration (calibflow.evaluation.shift). Each
    corruption at each severity is one cell; every cell is a corrupted copy of the same test images,
    seeded per image, so a rerun (or `calibflow evaluate`) rebuilds the same pixels."""

    # Empty: no suite. The default is fast (3 x 3 cells on at most 500 images: about a second on
    # the digits); the full suite is every name of CORRUPTION_NAMES at severities 1-5.
    corruptions: tuple[str, ...] = bounded(
        ("gaussian_noise", "gaussian_blur", "contrast"), KNOWN_CORRUPTIONS, ONCE_EACH
    )
    severities: tuple[int, ...] = bounded(
        (1, 3, 5), ONCE_EACH, Each(Range(1, 5, message="{key}: {value} is not a severity; use integers from 1 to 5"))
    )
    # At most N test images (all of them when fewer), each class its share, in the split's seeded
    # content-hash order within a class (calibflow.data.splits.stratified_subset).
    max_images: int = bounded(500, POSITIVE, _at_most(MAX_IMAGES, "the number of test images"))

    def validate(self) -> None:
        if bool(self.corruptions) != bool(self.severities):
            raise ConfigError("shift.corruptions and shift.severities must both be set (a suite) or both be [] (none)")


@dataclass(frozen=True)
class OODConfig:
    """Out-of-distribution evaluation (calibflow.evaluation.ood): a DVC-tracked folder of images of no trained
    class (an ImageFolder or a flat folder), resized to the model's input."""

    path: str | None = bounded(
        None, Rule(str.strip, "{key} is empty: name a DVC-tracked folder of images, or null for no OOD evaluation")
    )
    score: Literal["energy", "msp"] = "energy"  # what gates.max_ood_fpr95 reads
    max_images: int = bounded(2000, POSITIVE, _at_most(MAX_IMAGES, "the number of OOD images"))


@dataclass(frozen=True)
class PromotionConfig:
    # true: a run that passes every gate moves @champion itself; false: it stops at @challenger
    # and CD decides with `calibflow gate` / `calibflow promote`.
    auto: bool = False


@dataclass(frozen=True)
class MonitorConfig:
    """`calibflow monitor`: how far a registered model may move from what it recorded at
    registration before it is called drifted (calibflow.lifecycle.monitor), read at gates.confidence."""

    # exit 3 (retrain) when accuracy is shown below recorded - this
    max_accuracy_drop: float = bounded(0.05, NOT_NEGATIVE)
    # exit 1 (recalibrate) when the ECE is shown above recorded + this
    max_ece_increase: float = bounded(0.03, NOT_NEGATIVE)
    # unlabeled: the KS test's level for "the confidence distribution drifted"
    drift_alpha: float = bounded(0.05, OPEN_UNIT)


@dataclass(frozen=True)
class ScheduleConfig:
    deployment: str = "nightly-retrain"
    cron: str = bounded(
        "0 2 * * *",
        Rule(lambda cron: len(cron.split()) == 5, "{key} = {value!r}: use five cron fields, e.g. '0 2 * * *'"),
    )
    timezone: str = "UTC"
    work_pool: str = "calibflow"
    data_rev: str | None = None  # None: the working tree of the served checkout
    # `calibflow monitor` on a cron, beside the retraining (flows/monitor.py): off while null
    monitor_cron: str | None = None
    monitor_data: str | None = None  # the DVC-tracked folder of new images it reads (labeled or flat)
    monitor_model: str = "@champion"  # the alias or version of registry.model_name it checks

    def validate(self) -> None:
        if self.monitor_cron is not None and not self.monitor_data:
            raise ConfigError(
                "schedule.monitor_cron needs schedule.monitor_data: the DVC-tracked folder of new images to monitor"
            )


@dataclass(frozen=True)
class RegistryConfig:
    model_name: str = bounded(  # what MLflow refuses, found before training
        "calibflow-digits",
        Rule(
            lambda name: name.strip() and "/" not in name and ":" not in name,
            "{key} = {value!r}: must be non-empty, without '/' or ':'",
        ),
    )
    experiment: str = "calibflow"


@dataclass(frozen=True)
class Config:
    seed: int = bounded(0, Range(0, 2**32 - 1))  # what numpy's seed accepts
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    decision: DecisionConfig = field(default_factory=DecisionConfig)
    shift: ShiftConfig = field(default_factory=ShiftConfig)
    ood: OODConfig = field(default_factory=OODConfig)
    gates: GatesConfig = field(default_factory=GatesConfig)
    promotion: PromotionConfig = field(default_factory=PromotionConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def validate(self) -> None:
        """Each section's own relations (its validate()), then those across sections: no gate
        without the rule, suite or folder it reads."""
        for section in dataclasses.fields(self):
            validate = getattr(getattr(self, section.name), "validate", None)
            if validate is not None:
                validate()
        for gate, rule, reads in (
            ("max_selective_risk", "max_risk", "the abstention threshold that rule fits"),
            ("min_conformal_coverage", "conformal_alpha", "the prediction sets that rule fits"),
        ):
            if getattr(self.gates, gate) is not None and getattr(self.decision, rule) is None:
                raise ConfigError(f"gates.{gate} needs decision.{rule}: the gate reads {reads}")
        for gate in ("max_shift_ece", "max_shift_ece_increase"):
            if getattr(self.gates, gate) is not None and not self.shift.corruptions:
                raise ConfigError(f"gates.{gate} needs a corruption suite: set shift.corruptions and shift.severities")
        if self.gates.max_ood_fpr95 is not None and not self.ood.path:
            raise ConfigError("gates.max_ood_fpr95 needs ood.path: a DVC-tracked folder of out-of-distribution images")
        if (
            self.data.image_size is not None
            and self.train.augment
            and self.train.distributed == "ddp"
            and self.train.nnodes > 1
        ):
            raise ConfigError(
                f"data.image_size with train.augment reads the train split from its files (a new crop each "
                f"epoch), which train.nnodes = {self.train.nnodes} nodes would each need a copy of: train on one "
                f"node, or set train.augment to false"
            )
        soft_gates = self.gates.soft_gates()
        if soft_gates and self.data.soft_labels is None:
            raise ConfigError(
                f"gates.{soft_gates[0]} reads each test image's distribution over the classes: set "
                f"data.soft_labels to their CSV (docs/soft_labels.md), or unset the gate"
            )
        if self.calibration.targets == "soft":
            fits_soft = {
                "data.soft_labels": self.data.soft_labels is not None,
                "calibration.method: temperature": self.calibration.method == "temperature",
                "calibration.shift_aware: false": not self.calibration.shift_aware,
                "model.ensemble: 1": self.model.ensemble == 1,
            }
            missing = [need for need, holds in fits_soft.items() if not holds]
            if missing:
                raise ConfigError(
                    f"calibration.targets = soft fits temperature scaling against each calibration image's soft "
                    f"label, and needs {', '.join(missing)} (docs/soft_labels.md)"
                )
        if self.train.targets != "hard":
            if self.data.soft_labels is None:
                raise ConfigError(
                    f"train.targets = {self.train.targets} needs data.soft_labels: the CSV of each image's "
                    f"distribution over the classes (docs/soft_labels.md)"
                )
        exposure = self.train.outlier_exposure
        if exposure is not None and self.ood.path and Path(exposure) == Path(self.ood.path):
            raise ConfigError(
                f"train.outlier_exposure and ood.path are both {self.ood.path!r}: the OOD evaluation "
                f"must use outliers the model was not trained on; use another folder for one of them"
            )

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def flat(self) -> dict[str, Any]:
        """Dotted keys, the form MLflow params and `--set` use."""
        return _flatten(self.to_dict())

    def hyperparameters(self) -> dict[str, Any]:
        """What a run logs as MLflow params: flat(), less where it is registered and when it is
        scheduled (NOT_HYPERPARAMETERS), which config.yaml keeps."""
        return {k: v for k, v in self.flat().items() if k.split(".")[0] not in NOT_HYPERPARAMETERS}

    @property
    def params_hash(self) -> str:
        """Hash of the sections that shape the model (seed, data, split, model, train, calibration,
        evaluation): two runs with the same hash, data and code build the same model, whatever
        their gates, promotion policy, registry names or schedule."""
        shaping = {k: v for k, v in self.to_dict().items() if k not in OPERATIONAL_SECTIONS}
        for key in HOW_DATA_IS_READ:  # memory and speed, not one pixel: no new build
            shaping["data"].pop(key, None)
        for (section, key), needs in UNUSED_UNLESS.items():  # read only with another key set: no new build
            if shaping[needs[0]][needs[1]] is None:
                shaping[section].pop(key, None)
        canonical = json.dumps(shaping, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def load_config(path: str | Path | None = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load params.yaml (or defaults when `path` is None), apply `key=value` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"params file {path} not found: run from the repository root or pass --params PATH")
        loaded = _read_yaml(path)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, got {type(loaded).__name__}")
        raw = loaded
    for override in overrides:
        _apply_override(raw, override)
    config = _build(Config, raw, prefix="")
    _check(config)
    return config


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r} is not KEY=VALUE (for example train.epochs=3)")
    parts = key.strip().split(".")
    _resolve_key(parts)  # unknown keys fail here, naming the key
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
        node = child
    try:
        node[parts[-1]] = _parse_yaml(text, f"override {override!r}") if text.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"override {override!r}: the value is not YAML ({_yaml_problem(error)})") from error


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping: PyYAML keeps the last one
    silently, so a second `max_ece:` further down would quietly replace the first."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise ConfigError(
                            f"{self.name}: key {key!r} is given twice (lines {seen[key]} and {line}); keep one"
                        )
                    seen[key] = line
                except TypeError:  # an unhashable key: SafeLoader's own error says so
                    continue
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, name: str) -> Any:
    loader = _UniqueKeyLoader(text)
    loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"params file {path} is not UTF-8 text (byte {error.start}): it must be a YAML file "
            f"like the repository's params.yaml"
        ) from error
    except OSError as error:
        raise ConfigError(f"params file {path} cannot be read: {error.strerror or error}") from error
    try:
        return _parse_yaml(text, str(path))
    except yaml.YAMLError as error:
        raise ConfigError(f"params file {path} is not valid YAML: {_yaml_problem(error)}") from error


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's message on one line: what is wrong and where."""
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return f"{error.problem or error.context}{where}"
    return " ".join(str(error).split())


def _resolve_key(parts: list[str]) -> None:
    cls: Any = Config
    for depth, part in enumerate(parts):
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise ConfigError(f"unknown key {'.'.join(parts)!r}: {'.'.join(parts[:depth])} is a value, not a section")
        hints = typing.get_type_hints(cls)
        if part not in hints:
            raise ConfigError(_unknown_key_message(".".join(parts[: depth + 1]), part, hints))
        cls = hints[part]


def _unknown_key_message(dotted: str, key: str, hints: dict[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(hints), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    known = ", ".join(sorted(hints))
    return f"unknown key {dotted!r}{hint}; known keys here: {known}"


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'params'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    unknown = [k for k in raw if k not in hints]
    if unknown:
        raise ConfigError(_unknown_key_message(prefix + str(unknown[0]), str(unknown[0]), hints))
    values = {}
    for name, hint in hints.items():
        if name not in raw:
            continue
        dotted = prefix + name
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            values[name] = _build(hint, raw[name], dotted + ".")
        else:
            values[name] = _coerce(raw[name], hint, dotted)
    return cls(**values)


def _coerce(value: Any, hint: Any, dotted: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, dotted)
            except ConfigError:
                pass
        raise ConfigError(f"{dotted} = {value!r}: expected {hint}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{dotted} = {value!r}: must be one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{dotted} = {value!r}: expected a list")
        return tuple(_coerce(item, args[0], f"{dotted}[{i}]") for i, item in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{dotted} = {value!r}: expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{dotted} = {value!r}: expected an integer{_written_as_digits(value)}")
        return value
    if hint is float:
        # YAML reads 5e-4 as a string (it wants 5.0e-4); accept the form people write.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{dotted} = {value!r}: expected a number")
        return float(value)
    if hint is str:
        # YAML reads a class folder named 8 (`decision.positive_class=8`) as a number; a whole
        # number means its digits, while 1.0 or true could mean several strings and stay errors.
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{dotted} = {value!r}: expected a string")
        return value
    raise ConfigError(f"{dotted}: unsupported type {hint}")  # a programming error in this module


def _written_as_digits(value: Any) -> str:
    """The fix for a number given in a form an integer key cannot take (YAML reads 1e3 as text and
    1.0e+3 as a float)."""
    try:
        float(value)
    except (TypeError, ValueError):
        return ""
    return " written in digits (e.g. 64, not 6.4e1)"


def _check(config: Config) -> None:
    """Values a type check lets through but a run cannot use. Each error names the key, the value
    and what is allowed, so a mistake is a clear exit 2 before anything starts, never a crash, an
    OOM kill or a gate that silently always fails (which CD would read as a rejected model)."""
    for key, value in config.flat().items():
        # `nan <= 0` is False, so NaN would slip through every range check.
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} = {value}: must be a finite number")
    _check_fields(config)
    config.validate()  # relations between fields, which may now assume each one is in range


def _check_fields(section: Any, prefix: str = "") -> None:
    """Every field's own checks (bounded()'s metadata), in the order the sections declare them."""
    for spec in dataclasses.fields(section):
        value = getattr(section, spec.name)
        if dataclasses.is_dataclass(value):
            _check_fields(value, f"{prefix}{spec.name}.")
        for check in spec.metadata.get("checks", ()):
            check(prefix + spec.name, value)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat
