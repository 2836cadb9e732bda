"""Classifiers and their checkpoints.

Every model takes raw uint8 images (N, C, H, W) and does its own scaling and per-channel
normalisation, with the statistics of the training split stored as buffers: the registered model
then needs no preprocessing code beside it, and serving cannot drift from training.

model.arch is small_cnn (ours) or any classification model of torchvision's registry, built by
torchvision.models.get_model; what this module adds to torchvision's networks (docs/models.md):
the small-image stem below SMALL_IMAGE px, a first conv for other than 3 input channels, dropout
before the head, and loading weights of another class count or channel count.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import functools
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.utils.fusion
from torch import nn

from calibflow.data.images import Framing
from calibflow.errors import ConfigError

# Images from this size up (the shorter side, px) get the family's own ImageNet stem; smaller ones
# the small-image stem where the family has one (SMALL_STEM_FAMILIES), or a ConfigError.
SMALL_IMAGE = 64
# The families with a small-image stem of ours: resnet/resnext/wide_resnet get the CIFAR stem (a
# 3x3 stride-1 conv1 and no max-pool, He et al. 2016, section 4.2); mobilenet and efficientnet keep
# their 3x3 first conv and its weights, at stride 1 instead of 2.
RESNET_FAMILY = ("resnet", "resnext", "wide_resnet")
STRIDE_ONE_FAMILY = ("mobilenet", "efficientnet")
# Auxiliary classifiers that torchvision's pretrained files hold and the models built here do not
# (aux_logits=False: training reads one output).
AUX_KEY_PREFIXES = ("AuxLogits.", "aux1.", "aux2.")


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
    # "small" or "imagenet": chosen from the image size when not given (default_stem), then
    # recorded, so that a checkpoint rebuilds the network it was trained as.
    stem: str = ""

    def __post_init__(self) -> None:
        if not self.stem:
            object.__setattr__(self, "stem", default_stem(self.arch, self.image_height, self.image_width))

    @classmethod
    def from_record(cls, record: dict) -> "ModelSpec":
        """The spec a checkpoint or a served model recorded. Records from before `stem` existed
        built resnet18 with the small-image stem at every size."""
        record = dict(record)
        if not record.get("stem"):
            record["stem"] = "small" if record["arch"] in ("small_cnn", "resnet18") else ""
        return cls(**record)


def default_stem(arch: str, height: int, width: int) -> str:
    return "small" if arch == "small_cnn" or min(height, width) < SMALL_IMAGE else "imagenet"


class ImageClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", mean.reshape(1, -1, 1, 1).float())
        self.register_buffer("std", std.reshape(1, -1, 1, 1).float())
        # Set by prepare_for_inference: uint8 batches are converted into a new float tensor, then
        # scaled and shifted in place (x * 1/(255 std) - mean/std), where training's forward
        # allocates four tensors.
        self.normalize_fused = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.normalize_fused and images.dtype == torch.uint8:
            # .float() is a new tensor, so the in-place steps leave the caller's batch alone; it
            # gives the same bits as uint8 * float (which promotes each value the same way), at a
            # third of the time: that mixed-dtype multiply converts value by value, 3x slower at
            # 224 px on one thread
            return self.backbone(images.float().mul_(1.0 / (255.0 * self.std)).sub_(self.mean / self.std))
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
    return torchvision_backbone(ModelSpec("resnet18", in_channels, num_classes, 32, 32, dropout=dropout, stem="small"))


# --------------------------------------------------------------------------------------------
# torchvision's registry
# --------------------------------------------------------------------------------------------


@functools.cache
def torchvision_archs() -> tuple[str, ...]:
    """The classification models of torchvision's registry (not detection, segmentation, video)."""
    import torchvision.models  # here, not at the top: torchvision costs ~1.5 s to import

    return tuple(torchvision.models.list_models(module=torchvision.models))


def known_archs() -> tuple[str, ...]:
    return ("small_cnn", *torchvision_archs())


def check_arch(key: str, arch: str) -> None:
    """ConfigError unless `arch` is small_cnn or a torchvision classification model, naming close matches."""
    if arch == "small_cnn" or arch in torchvision_archs():
        return
    close = (
        difflib.get_close_matches(arch, known_archs(), n=4, cutoff=0.5)
        or [name for name in known_archs() if name.startswith(arch[:3])][:4]
    )
    hint = f" (close matches: {', '.join(close)})" if close else ""
    raise ConfigError(
        f"{key} = {arch!r}: must be one of small_cnn or a torchvision classification model{hint}; "
        f"the list: python -c 'import torchvision; print(torchvision.models.list_models(module=torchvision.models))' "
        f"(docs/models.md)"
    )


def _family(arch: str) -> str:
    for family in (*RESNET_FAMILY, *STRIDE_ONE_FAMILY, "vit", "maxvit", "inception", "googlenet"):
        if arch.startswith(family):
            return family
    return arch


# What sets the size a network reads, for the refusals below: data.image_size, else the images' own.
_SIZE_FIX = "set data.image_size to a size it takes"


def check_image_size(spec: ModelSpec) -> None:
    """ConfigError when `spec.arch` cannot take images of `spec`'s size with `spec.stem`, saying what it
    needs and that data.image_size sets that size."""
    arch, height, width = spec.arch, spec.image_height, spec.image_width
    family = _family(arch)
    if spec.stem not in ("small", "imagenet"):
        raise ConfigError(f"model stem {spec.stem!r}: use small or imagenet")
    if spec.stem == "small" and family not in ("small_cnn", *RESNET_FAMILY, *STRIDE_ONE_FAMILY):
        raise ConfigError(
            f"model.arch = {arch} needs images of at least {SMALL_IMAGE}x{SMALL_IMAGE} px (these are "
            f"{width}x{height}): it has no small-image stem here (resnet*, resnext*, wide_resnet*, "
            f"mobilenet* and efficientnet* do, as does small_cnn): pick one of those, or {_SIZE_FIX} "
            f"(at least {SMALL_IMAGE}; docs/models.md)"
        )
    if family == "vit":
        patch = int(arch.rsplit("_", 1)[1])
        if height != width or height % patch:
            raise ConfigError(
                f"model.arch = {arch} needs square images whose side is a multiple of {patch} px (these are "
                f"{width}x{height}), at least {SMALL_IMAGE}: {_SIZE_FIX}, e.g. 64, 96, 224"
            )
    if family == "maxvit" and (height % 224 or width % 224):
        raise ConfigError(
            f"model.arch = {arch} needs images whose sides are multiples of 224 px (its 7x7 attention "
            f"windows at 1/32 of the image); these are {width}x{height}: {_SIZE_FIX}, e.g. 224"
        )
    if family == "inception" and min(height, width) < 75:
        raise ConfigError(
            f"model.arch = {arch} needs images of at least 75x75 px; these are {width}x{height}: {_SIZE_FIX}"
        )


def torchvision_backbone(spec: ModelSpec) -> nn.Module:
    """torchvision's `spec.arch` for spec.num_classes classes, with our adaptations: the small-image
    stem, the first conv for spec.in_channels, dropout before the head."""
    import torchvision.models

    check_image_size(spec)
    family = _family(spec.arch)
    kwargs: dict = {"weights": None, "num_classes": spec.num_classes}
    if family == "vit":
        kwargs["image_size"] = spec.image_height
    elif family == "maxvit":
        kwargs["input_size"] = (spec.image_height, spec.image_width)
    elif family in ("inception", "googlenet"):
        kwargs.update(aux_logits=False, init_weights=True)
    net = torchvision.models.get_model(spec.arch, **kwargs)
    # The stem first, then the head: for resnet18 the order the seeded stream was always drawn in.
    if spec.stem == "small" and family in RESNET_FAMILY:
        net.conv1 = nn.Conv2d(spec.in_channels, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    else:
        name, conv = first_conv(net)
        if conv.in_channels != spec.in_channels:
            _set_module(net, name, _conv_like(conv, spec.in_channels))
        if spec.stem == "small":  # mobilenet, efficientnet: the same 3x3 conv at stride 1
            first_conv(net)[1].stride = (1, 1)
    if spec.dropout > 0:
        name, head = head_of(net, spec.num_classes)
        if not isinstance(head, nn.Linear):  # squeezenet's 1x1 conv: MC dropout samples a Linear's inputs
            raise ConfigError(
                f"model.dropout = {spec.dropout}: {spec.arch}'s head is a {type(head).__name__}, not a Linear; "
                f"set model.dropout to 0 (it has its own dropout)"
            )
        head = nn.Linear(head.in_features, spec.num_classes)
        _set_module(net, name, DropoutHead(nn.Dropout(spec.dropout), head))
    return net


def inference_memory_format(model: nn.Module, device: str | torch.device) -> torch.memory_format:
    """The memory format a forward pass of `model` reads its batches and weights in: channels_last
    for a convolutional network (most of its weights in Conv2d) on the CPU, where oneDNN's
    convolutions run faster on it (one thread, 224 px: small_cnn 1.93x, resnet18 1.21x, resnet50
    1.41x, mobilenet_v3_large 1.44x, efficientnet_b0 1.56x); the default format elsewhere
    (convnext_tiny, most of its weights in Linear layers, read 1.00x, vit_b_16 0.98x:
    docs/results/inference_speed.md; on a GPU it has not been measured)."""
    if torch.device(device).type != "cpu":
        return torch.contiguous_format
    total = conv = 0
    for module in model.modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        total += own
        conv += own if isinstance(module, nn.Conv2d) else 0
    return torch.channels_last if total and 2 * conv >= total else torch.contiguous_format


def training_memory_format(model: nn.Module, device: str | torch.device) -> torch.memory_format:
    """The memory format a training of `model` keeps its weights and batches in: channels_last on
    a GPU (every network, as NVIDIA's guidance for tensor cores has it) and where
    inference_memory_format picks it on the CPU. train_classifier, one thread, against the default
    format: 1.23x on the default digits, 1.70x small_cnn width 4 at 224 px, 1.08x resnet18 at
    128 px (docs/results/train_step.md)."""
    if torch.device(device).type == "cuda":
        return torch.channels_last
    return inference_memory_format(model, device)


def prepare_for_inference(
    model: ImageClassifier, device: str | torch.device, folds: list[list[str]] | None = None
) -> ImageClassifier:
    """`model`, in place, as a network loaded only to read images (a checkpoint's members in the
    flow, the served model's): in eval(), each BatchNorm2d whose input is a Conv2d's output and
    nothing else folded into that convolution (torch.nn.utils.fusion.fuse_conv_bn_eval), and its
    weights laid out in inference_memory_format, and uint8 batches converted once and normalized in
    place (ImageClassifier.normalize_fused). A folded BatchNorm becomes an Identity and every
    other module stays where it was, so hooks on them (MC dropout's on the head) still fire. One
    thread, 224 px, against channels_last alone: small_cnn 3.24x against 1.93x, resnet50 1.68x
    against 1.41x, mobilenet_v3_large 2.16x against 1.44x (docs/results/inference_speed.md). Its
    logits differ from the unfolded network's in the last bits, so every logit the flow records and
    the served model's come from networks prepared here. It cannot train afterwards.

    `folds`: the (conv, norm) pairs batch_norm_folds found when the checkpoint was saved (what
    checkpoints and network.json record). Only a file written before they were recorded is traced
    here: torch.fx swaps nn.Module.__call__ for the whole process while it traces, so a trace at
    load would break forward passes that other threads run meanwhile (a server answering requests
    while it loads another version)."""
    model.eval()
    backbone = model.backbone
    for conv_name, norm_name in batch_norm_folds(model) if folds is None else folds:
        conv, norm = backbone.get_submodule(conv_name), backbone.get_submodule(norm_name)
        if not isinstance(conv, nn.Conv2d) or not isinstance(norm, nn.BatchNorm2d):
            raise ValueError(
                f"the recorded fold {conv_name} -> {norm_name} is not a Conv2d and a BatchNorm2d of this "
                f"network ({type(conv).__name__}, {type(norm).__name__}): the file does not belong to it"
            )
        _set_module(backbone, conv_name, torch.nn.utils.fusion.fuse_conv_bn_eval(conv, norm))
        _set_module(backbone, norm_name, nn.Identity())
    model.normalize_fused = True
    model.to(memory_format=inference_memory_format(model, device))
    return model


def batch_norm_folds(model: ImageClassifier) -> list[list[str]]:
    """[conv, norm] module names (under model.backbone) where a BatchNorm2d with running statistics
    reads a Conv2d's output and nothing else reads it, each module called once, found in torch.fx's
    trace of the forward pass; none for a backbone fx cannot trace (its forward branches on its
    input's values). A function of the architecture alone, not of the weights."""
    from torch import fx

    backbone = model.backbone
    try:
        graph = fx.symbolic_trace(backbone).graph
    except Exception:  # fx raises several kinds for code it cannot trace; such a network stays unfolded
        return []
    modules = dict(backbone.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        norm = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(norm, nn.BatchNorm2d) or norm.running_mean is None or len(node.args) != 1:
            continue
        source = node.args[0]
        if (
            isinstance(source, fx.Node)
            and source.op == "call_module"
            and isinstance(modules.get(source.target), nn.Conv2d)
            and len(source.users) == 1
            and calls[source.target] == calls[node.target] == 1
        ):
            pairs.append([source.target, node.target])
    return pairs


def in_memory_format(model: nn.Module, memory_format: torch.memory_format) -> bool:
    """Whether every 4-D weight of `model` is laid out in `memory_format` already."""
    return all(p.is_contiguous(memory_format=memory_format) for p in model.parameters() if p.ndim == 4)


def first_conv(net: nn.Module) -> tuple[str, nn.Conv2d]:
    """The stem's conv, the first Conv2d torchvision's classifiers register."""
    return next((name, m) for name, m in net.named_modules() if isinstance(m, nn.Conv2d))


def head_of(net: nn.Module, num_classes: int) -> tuple[str, nn.Module]:
    """The classifier head: the last registered DropoutHead, or Linear (Conv2d for squeezenet) with
    `num_classes` outputs."""
    found = None
    for name, m in net.named_modules():
        if isinstance(m, DropoutHead):
            return name, m
        if (isinstance(m, nn.Linear) and m.out_features == num_classes) or (
            isinstance(m, nn.Conv2d) and m.out_channels == num_classes and m.kernel_size == (1, 1)
        ):
            found = (name, m)
    if found is None:
        raise ValueError(f"{type(net).__name__} has no classifier head with {num_classes} outputs")
    return found


def head_parameter_names(model: ImageClassifier, num_classes: int) -> set[str]:
    """The names (in `model`) of the head's parameters; every other parameter is the backbone."""
    name, head = head_of(model.backbone, num_classes)
    return {f"backbone.{name}.{p}" for p, _ in head.named_parameters()}


def _conv_like(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    return nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups if conv.groups == 1 else in_channels,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )


def _set_module(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, name = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def build_model(spec: ModelSpec, mean: torch.Tensor | None = None, std: torch.Tensor | None = None) -> ImageClassifier:
    if spec.arch == "small_cnn":
        backbone = small_cnn(spec.in_channels, spec.num_classes, spec.width, spec.dropout)
    else:
        check_arch("model.arch", spec.arch)
        backbone = torchvision_backbone(spec)
    mean = torch.zeros(spec.in_channels) if mean is None else mean
    std = torch.ones(spec.in_channels) if std is None else std
    return ImageClassifier(backbone, mean, std)


# --------------------------------------------------------------------------------------------
# Pretrained weights: a file on disk, never a download
# --------------------------------------------------------------------------------------------


def torchvision_weights(arch: str, name: str):
    """torchvision's weights enum member `name` (e.g. IMAGENET1K_V1, DEFAULT) of `arch`."""
    import torchvision.models

    if arch == "small_cnn":
        raise ConfigError("model.pretrained: small_cnn has no torchvision weights; set model.pretrained to null")
    check_arch("model.arch", arch)
    try:
        enum = torchvision.models.get_model_weights(arch)
    except ValueError as error:
        raise ConfigError(f"model.pretrained: torchvision has no weights for {arch} ({error})") from None
    names = list(enum.__members__)
    if name not in names:
        raise ConfigError(f"model.pretrained = {name!r}: {arch} has the weights {', '.join(names)}")
    return enum[name]


def hub_weights_file(arch: str, name: str) -> Path:
    """Where torch hub keeps the file of `arch`'s weights `name`: <torch.hub.get_dir()>/checkpoints/<file>."""
    weights = torchvision_weights(arch, name)
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def pretrained_weights_file(arch: str, name: str | None) -> Path | None:
    """The hub cache's file of model.pretrained, which must already be there: nothing is downloaded.
    None without model.pretrained; a ConfigError (exit 2) naming the path when it is absent."""
    if name is None:
        return None
    path = hub_weights_file(arch, name)
    if not path.is_file():
        url = torchvision_weights(arch, name).url
        raise ConfigError(
            f"model.pretrained = {name} of {arch}: {path} does not exist and nothing is downloaded here. "
            f"Put the file there: on a machine with internet, `curl -L -o {path.name} {url}` (or "
            f"`python -c \"import torchvision; torchvision.models.get_model('{arch}', weights='{name}')\"`, "
            f"which leaves it in that machine's {Path('~/.cache/torch/hub/checkpoints') / path.name}), then copy "
            f"it to {path} (TORCH_HOME moves the cache); or set model.pretrained to null"
        )
    return path


def load_pretrained_weights(
    model: ImageClassifier, path: str | Path, arch: str, *, sha256: str | None = None, report: bool = True
) -> None:
    """Load a state_dict from disk (model.weights_path, or model.pretrained's file in the hub
    cache; nothing is downloaded), read with weights_only=True, into `model`, a network of
    model.arch `arch`. Tensors of another shape are left at their initial values, the classifier
    head of another class count and the small-image stem's conv, except a 3-channel first conv on
    1-channel images: its kernels summed over RGB. A registered ensemble's weights.pt ({"members":
    [state dict, ...]}) starts from its first member.

    `sha256`: the digest the run recorded for the file (its tags, the same-build skip and the
    resume key name those bytes): the file is read once, and bytes that no longer have that digest
    are a ConfigError rather than weights other than the recorded ones. `report`: print what was
    left at its initial values (False for a check before the training that prints it)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model.weights_path {path} does not exist: put the state_dict there or set it to null")
    data = path.read_bytes()
    if sha256 is not None and (now := hashlib.sha256(data).hexdigest()) != sha256:
        raise ConfigError(
            f"the initial weights {path} changed while the run used them (sha256 {sha256[:12]}... when the run "
            f"started, {now[:12]}... now): the run records the bytes it hashed; leave the file alone until the "
            f"run ends and start it again"
        )
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001  not a file torch writes, or one that needs unpickling
        raise ConfigError(
            f"{path} is not a state dict torch.load(weights_only=True) reads ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}): point model.weights_path at a torch.save'd state_dict"
        ) from None
    finally:
        del data  # the file's bytes, as large as the weights: not held while they load into the model
    if isinstance(state, dict) and isinstance(state.get("members"), list) and state["members"]:
        members = len(state["members"])
        if report:
            print(f"weights from {path}: an ensemble of {members} members; starting from the first")
        state = state["members"][0]
    if isinstance(state, dict):
        state = state.get("state_dict", state)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path} holds no state dict (names to tensors): point model.weights_path at one")
    whole = any(k.startswith("backbone.") for k in state)
    target = model if whole else model.backbone
    state = {k: v for k, v in state.items() if not k.startswith(AUX_KEY_PREFIXES)}
    own = target.state_dict()
    prefix = "backbone." if whole else ""
    state = _fit_vit_positions(model.backbone, state, prefix)
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise ConfigError(f"{path}: unexpected keys {unexpected[:5]}; are these weights of model.arch {arch}?")
    may_differ = _head_and_stem_keys(model.backbone, prefix)
    fitted, mismatched = {}, []
    for key, tensor in state.items():
        shape = own[key].shape
        if tensor.shape == shape:
            fitted[key] = tensor
        elif key in ("mean", "std") and tensor.numel() == 3 and own[key].numel() == 1:
            # calibflow's own RGB weights on gray images: the statistics averaged over the channels
            # (a gray pixel is about their mean), not summed as the first conv's kernels are
            fitted[key] = tensor.mean().reshape(shape)
        elif tensor.dim() == 4 and tensor.shape[1] == 3 and shape[1] == 1 and tensor.shape[2:] == shape[2:]:
            fitted[key] = tensor.sum(dim=1, keepdim=True)  # RGB kernels summed: the same response to gray
        elif key not in may_differ:
            mismatched.append(f"{key} {tuple(tensor.shape)} in the file, {tuple(shape)} in the model")
    if mismatched:
        # Only the head (another class count) and the stem (the small-image one) may differ: any
        # other shape means weights of another architecture or width, which would train from a mix.
        raise ConfigError(
            f"{path}: size mismatch for {len(mismatched)} tensors outside the classifier head and the stem "
            f"(e.g. {'; '.join(mismatched[:3])}): are these weights of model.arch {arch} at this "
            f"model.width?"
        )
    if not fitted:
        raise ConfigError(f"{path}: no tensor fits model.arch {arch}; are these weights of another architecture?")
    target.load_state_dict(fitted, strict=False)
    left = [k for k in own if k not in fitted and not k.endswith("num_batches_tracked") and k not in ("mean", "std")]
    if left and report:
        # The classifier head and stem are expected to differ (other classes, small-image stem).
        print(f"weights from {path}: left {len(left)} tensors at their initial values (e.g. {left[:3]})")


def _head_and_stem_keys(backbone: nn.Module, prefix: str) -> set[str]:
    """The state-dict keys (with `prefix`) of the classifier head and the stem's conv: the tensors
    pretrained weights may hold in another shape (another class count; the small-image stem)."""
    finals = [m for m in backbone.modules() if isinstance(m, nn.Linear)] or [
        m for m in backbone.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
    ]
    keys: set[str] = set()
    if finals:
        last = finals[-1]
        classes = last.out_features if isinstance(last, nn.Linear) else last.out_channels
        head_name, head = head_of(backbone, classes)
        keys |= {f"{prefix}{head_name}.{k}" for k in head.state_dict()}
    stem_name, stem = first_conv(backbone)
    keys |= {f"{prefix}{stem_name}.{k}" for k in stem.state_dict()}
    return keys


def _fit_vit_positions(backbone: nn.Module, state: dict, prefix: str) -> dict:
    """A vision transformer's position embeddings, interpolated to this image size (torchvision's own
    interpolate_embeddings) when the file's were for another."""
    key = f"{prefix}encoder.pos_embedding"
    if key not in state or not hasattr(backbone, "patch_size"):
        return state
    if state[key].shape == backbone.encoder.pos_embedding.shape:
        return state
    from torchvision.models.vision_transformer import interpolate_embeddings

    inner = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    inner = interpolate_embeddings(backbone.image_size, backbone.patch_size, inner)
    return {**{k: v for k, v in state.items() if not k.startswith(prefix)}, **{prefix + k: v for k, v in inner.items()}}


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
    framing: Framing | None = None,
) -> Path:
    """`model`, and for an ensemble its other members; mc_samples > 1: serve MC dropout (seeded
    mc_seed); `framing`: how an image of any size becomes the network's input (data.image_size),
    none for a network of one image size that reads each image whole."""
    path = Path(path)
    torch.save(
        {
            "spec": asdict(spec),
            "classes": list(classes),
            "image_mode": image_mode,
            "framing": framing.for_evaluation().to_record() if framing is not None else None,
            "state_dict": state_dict_of(model),
            "more_members": [state_dict_of(m) for m in more_members],
            "mc_samples": mc_samples,
            "mc_seed": mc_seed,
            # traced here, after training, so that loading for inference never traces (prepare_for_inference)
            "folds": batch_norm_folds(model),
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
    framing: Framing | None = None  # data.image_size's Resize + CenterCrop; None: read whole
    folds: list[list[str]] | None = None  # batch_norm_folds at save; None: a checkpoint from before them


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", *, for_inference: bool = False) -> Checkpoint:
    """The checkpoint's members on `device` in eval(); `for_inference`: each prepared to read images
    only (prepare_for_inference), as every logit the flow records is read."""
    record = torch.load(Path(path), map_location="cpu", weights_only=True)
    spec = ModelSpec.from_record(record["spec"])
    members = []
    for state in [record["state_dict"], *record.get("more_members", [])]:
        model = build_model(spec)
        model.load_state_dict(state)
        model.to(device).eval()
        members.append(prepare_for_inference(model, device, record.get("folds")) if for_inference else model)
    return Checkpoint(
        model=members[0],
        spec=spec,
        classes=list(record["classes"]),
        image_mode=record["image_mode"],
        members=tuple(members),
        mc_samples=int(record.get("mc_samples", 1)),
        mc_seed=int(record.get("mc_seed", 0)),
        framing=Framing.from_record(record["framing"]) if record.get("framing") else None,
        folds=record.get("folds"),
    )
