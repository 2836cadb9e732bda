"""Classifiers and their checkpoints.

Every model takes raw uint8 images (N, C, H, W) and does its own scaling and per-channel
normalisation, with the statistics of the training split stored as buffers: the registered model
then needs no preprocessing code beside it, and serving cannot drift from training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """What it takes to rebuild the network: saved inside every checkpoint."""

    arch: str
    in_channels: int
    num_classes: int
    image_height: int
    image_width: int
    width: int = 32
    dropout: float = 0.0  # before the classifier head; 0 builds no dropout layer (older checkpoints)


class ImageClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", mean.reshape(1, -1, 1, 1).float())
        self.register_buffer("std", std.reshape(1, -1, 1, 1).float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        return self.backbone((x - self.mean) / self.std)


def small_cnn(in_channels: int, num_classes: int, width: int = 32, dropout: float = 0.0) -> nn.Module:
    """Three conv stages for tiny images (8x8 digits upward); global pooling makes it size-agnostic."""

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

    w = width
    return nn.Sequential(
        *block(in_channels, w),
        *block(w, w),
        nn.MaxPool2d(2),
        *block(w, 2 * w),
        *block(2 * w, 2 * w),
        nn.MaxPool2d(2),
        *block(2 * w, 4 * w),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        *_head(4 * w, num_classes, dropout),
    )


class DropoutHead(nn.Sequential):
    """Dropout, then the linear classifier: where MC dropout samples its masks
    (calibflow/training/ensembles.py finds it by this type)."""


def _head(features: int, num_classes: int, dropout: float) -> list[nn.Module]:
    # Without dropout, the bare Linear: the state dict keys of models built before dropout existed
    # stay the same.
    if dropout > 0:
        return [DropoutHead(nn.Dropout(dropout), nn.Linear(features, num_classes))]
    return [nn.Linear(features, num_classes)]


def small_image_resnet18(in_channels: int, num_classes: int, dropout: float = 0.0) -> nn.Module:
    """torchvision's resnet18 with the CIFAR-style stem: a 3x3 stride-1 first conv and no max-pool,
    since the ImageNet stem would shrink a 32x32 (let alone 8x8) image to nothing."""
    from torchvision.models import resnet18  # here, not at the top: torchvision costs ~1.5 s to import

    net = resnet18(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    if dropout > 0:
        net.fc = _head(net.fc.in_features, num_classes, dropout)[0]
    return net


def build_model(spec: ModelSpec, mean: torch.Tensor | None = None, std: torch.Tensor | None = None) -> ImageClassifier:
    if spec.arch == "small_cnn":
        backbone = small_cnn(spec.in_channels, spec.num_classes, spec.width, spec.dropout)
    elif spec.arch == "resnet18":
        backbone = small_image_resnet18(spec.in_channels, spec.num_classes, spec.dropout)
    else:
        raise ValueError(f"unknown model.arch {spec.arch!r}: use small_cnn or resnet18")
    mean = torch.zeros(spec.in_channels) if mean is None else mean
    std = torch.ones(spec.in_channels) if std is None else std
    return ImageClassifier(backbone, mean, std)


def load_pretrained_weights(model: ImageClassifier, path: str | Path) -> None:
    """Load a state_dict a user has put on disk (nothing is downloaded); shapes must match."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.weights_path {path} does not exist: put the state_dict there or set it to null")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    target = model.backbone if not any(k.startswith("backbone.") for k in state) else model
    missing, unexpected = target.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{path}: unexpected keys {unexpected[:5]}; is it a {type(model.backbone).__name__}?")
    if missing:
        # The classifier head and stem are expected to differ (other classes, small-image stem).
        print(f"weights from {path}: left {len(missing)} tensors at their initial values (e.g. {missing[:3]})")


def state_dict_of(model: ImageClassifier) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def save_checkpoint(
    path: str | Path,
    model: ImageClassifier,
    spec: ModelSpec,
    classes: list[str],
    image_mode: str,
    *,
    more_members: tuple[ImageClassifier, ...] = (),
    mc_samples: int = 1,
    mc_seed: int = 0,
) -> Path:
    """`model`, and for an ensemble its other members; mc_samples > 1: serve MC dropout (seeded mc_seed)."""
    path = Path(path)
    torch.save(
        {
            "spec": asdict(spec),
            "classes": list(classes),
            "image_mode": image_mode,
            "state_dict": state_dict_of(model),
            "more_members": [state_dict_of(m) for m in more_members],
            "mc_samples": mc_samples,
            "mc_seed": mc_seed,
        },
        path,
    )
    return path


@dataclass(frozen=True)
class Checkpoint:
    model: ImageClassifier  # the first (or only) member
    spec: ModelSpec
    classes: list[str]
    image_mode: str
    members: tuple[ImageClassifier, ...] = ()  # every member, `model` first
    mc_samples: int = 1
    mc_seed: int = 0


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    record = torch.load(Path(path), map_location="cpu", weights_only=True)
    spec = ModelSpec(**record["spec"])
    members = []
    for state in [record["state_dict"], *record.get("more_members", [])]:
        model = build_model(spec)
        model.load_state_dict(state)
        members.append(model.to(device).eval())
    return Checkpoint(
        model=members[0],
        spec=spec,
        classes=list(record["classes"]),
        image_mode=record["image_mode"],
        members=tuple(members),
        mc_samples=int(record.get("mc_samples", 1)),
        mc_seed=int(record.get("mc_seed", 0)),
    )
