"""calibflow's training against torchvision's reference classification training on one GPU: images
per second on the same card, the same photos, the same transforms and as many DataLoader workers
(issue 26, item 5).

Photos: CIFAR-10's training JPEGs (../shared/datasets, or --archive), upscaled to 224x224
(bilinear, JPEG quality 90: data_scale's photos, made on every core), --images of them
(default 10,000), the ten classes balanced. Both arms train on the same files: the train split
(90%, 9,000 of the default) of a seeded calibflow split.

Arms, each in a fresh process, interleaved (reference, calibflow, calibflow, reference, ...),
--repeats each:

- **reference**: the training step and data path of torchvision's
  `references/classification/train.py`, retyped here (the references are not part of the
  torchvision package, and nothing may be downloaded): `ImageFolder` with ClassificationPresetTrain's
  transforms (RandomResizedCrop(224), RandomHorizontalFlip, PILToTensor, ConvertImageDtype,
  Normalize with ImageNet's mean and std) in the workers, a DataLoader over a RandomSampler with
  pin_memory and W workers (not persistent: they start again every epoch, as there),
  `torchvision.models.resnet18(num_classes=10)`, SGD (momentum 0.9, weight decay 1e-4),
  `cudnn.benchmark`, its `--amp` (fp16 autocast and a GradScaler; on the CPU, fp32), and its metric
  logging (the loss, top-1 and top-5 accuracy read back every step).
- **calibflow**: the flow's own `train_model` task on the same split (`data.image_size: 224`:
  the same RandomResizedCrop, at the same scales and ratios, and flips, in the workers; every split
  read from its files by W DataLoader workers; resnet18 with the ImageNet stem), with what it does
  on a GPU: uint8 batches normalized on the device, bf16 autocast, channels_last, pinned memory and
  non-blocking copies, persistent workers, one host sync per epoch, `cudnn.benchmark` while it
  trains.

So the augmentation is the same and the rest is each pipeline as it is: the comparison is of the
two ways to train, not of one kernel. Both: batch --batch-size (default 128), W = data.workers'
auto value unless --workers, three epochs. Timed: the second epoch alone, images trained /
seconds, ended by a sync with the GPU (the first pays cuDNN's autotuning and calibflow's workers'
start, the last calibflow's validation). Reported: each arm's median img/s and calibflow's ratio
to the reference, the card's name.

    python benchmarks/gpu_train.py [--images 10000] [--repeats 3] [--workers W] [--batch-size 128]
    python benchmarks/gpu_train.py --smoke    # 60 digit images of 64 px on the CPU: about a minute

A full run needs a CUDA device (exit 2 without one) and writes docs/results/gpu_train.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import data_scale  # noqa: E402

CIFAR = data_scale.CIFAR
IMAGES, SIDE, BATCH, REPEATS, EPOCHS, TIMED_EPOCH = 10_000, 224, 128, 3, 3, 2
TRAIN_SHARE = 0.9
# torchvision's reference: ImageNet's statistics, SGD's momentum and weight decay (train.py's defaults)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
REFERENCE_LR, REFERENCE_MOMENTUM, REFERENCE_WEIGHT_DECAY = 0.1, 0.9, 1e-4
ARMS = ("reference", "calibflow")


# ------------------------------------------------------------------ the split both arms train on


def prepared(root: Path, photos_dir: Path, seed: int = 0) -> dict:
    """The manifest and the seeded split both arms train on: {"manifest" (its record), "split",
    "classes", "train_paths"}."""
    from calibflow.config import SplitConfig
    from calibflow.pipeline import data_steps

    root.mkdir(parents=True, exist_ok=True)
    manifest = data_steps.write_manifest(str(photos_dir), str(root / "manifest.parquet"))
    rest = (1 - TRAIN_SHARE) / 3
    split = data_steps.write_split(
        manifest.path,
        SplitConfig(train=TRAIN_SHARE, val=rest, calibration=rest, test=rest),
        seed,
        str(root / "splits.json"),
    )
    train = data_steps.split_files(manifest.path, split.path, "train")
    return {
        "manifest": dataclasses.asdict(manifest),
        "split": split.path,
        "classes": list(manifest.classes),
        "train_paths": train.paths,
    }


# ------------------------------------------------------------------ one arm, in its own process


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def reference_arm(photos_dir: str, setup: dict, batch_size: int, workers: int, epochs: int, side: int) -> dict:
    """torchvision's reference training step on the train split: img/s of each epoch."""
    import torch
    import torchvision
    from torch import nn
    from torchvision import transforms

    device = _device()
    torch.backends.cudnn.benchmark = True  # as train.py sets it
    train_transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(side, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
            transforms.RandomHorizontalFlip(0.5),
            transforms.PILToTensor(),
            transforms.ConvertImageDtype(torch.float),
            transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )
    folder = torchvision.datasets.ImageFolder(photos_dir, train_transform)
    if folder.classes != setup["classes"]:
        raise SystemExit(f"ImageFolder's classes {folder.classes} are not the manifest's {setup['classes']}")
    index = {Path(path).relative_to(photos_dir).as_posix(): i for i, (path, _) in enumerate(folder.samples)}
    dataset = torch.utils.data.Subset(folder, [index[path] for path in setup["train_paths"]])
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=torch.utils.data.RandomSampler(dataset),
        num_workers=workers,
        pin_memory=True,
    )
    model = torchvision.models.resnet18(num_classes=len(setup["classes"])).to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=REFERENCE_LR, momentum=REFERENCE_MOMENTUM, weight_decay=REFERENCE_WEIGHT_DECAY
    )
    scaler = torch.amp.GradScaler("cuda") if device == "cuda" else None  # train.py --amp
    per_epoch, images = [], []
    for _ in range(epochs):
        model.train()
        started, seen = time.perf_counter(), 0
        for image, target in loader:
            image, target = image.to(device), target.to(device)
            with torch.autocast(device, enabled=scaler is not None):
                output = model(image)
                loss = criterion(output, target)
            optimizer.zero_grad()
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            # train.py's MetricLogger: the loss, top-1 and top-5 accuracy read back every step
            loss.item()
            hits = output.topk(min(5, output.shape[1]), dim=1).indices == target[:, None]
            hits[:, 0].float().mean().item()  # top-1
            hits.any(1).float().mean().item()  # top-5
            seen += len(target)
        _sync(device)
        per_epoch.append(seen / (time.perf_counter() - started))
        images.append(seen)
    return {"images_per_second": per_epoch, "images": images, "device": device}


def calibflow_arm(photos_dir: str, setup: dict, batch_size: int, workers: int, epochs: int, side: int) -> dict:
    """The flow's train_model task on the same split: img/s of each epoch (EpochStats)."""
    from calibflow.config import load_config
    from calibflow.pipeline import data_steps, model_steps

    config = load_config(
        None,
        [
            f"data.path={photos_dir}",
            f"data.image_size={side}",
            "data.in_memory_max_mb=0",
            f"data.workers={workers}",
            "model.arch=resnet18",
            f"train.epochs={epochs}",
            f"train.val_every={epochs}",
            f"train.batch_size={batch_size}",
            f"train.lr={REFERENCE_LR}",
            "train.hflip=true",
            "shift.corruptions=[]",
            "shift.severities=[]",
        ],
    )
    manifest = data_steps.ManifestRecord(**{**setup["manifest"], "classes": tuple(setup["manifest"]["classes"])})
    per_epoch: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        model_steps.train_model(
            photos_dir,
            manifest,
            setup["split"],
            config,
            out,
            on_epoch_end=lambda stats: per_epoch.append(stats.images_per_second),
        )
    return {"images_per_second": per_epoch, "device": _device()}


def _child(arm: str, photos_dir: str, setup_path: str, batch_size: int, workers: int, epochs: int, side: int) -> None:
    setup = json.loads(Path(setup_path).read_text())
    run = reference_arm if arm == "reference" else calibflow_arm
    print("RESULT " + json.dumps(run(photos_dir, setup, batch_size, workers, epochs, side)), flush=True)


def measure(
    arm: str, photos_dir: Path, setup_path: Path, batch_size: int, workers: int, epochs: int, side: int
) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        arm,
        str(photos_dir),
        str(setup_path),
        str(batch_size),
        str(workers),
        str(epochs),
        str(side),
    ]
    env = {**os.environ, "PYTHONPATH": str(_common.REPO)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    line = next((line for line in done.stdout.splitlines() if line.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise SystemExit(f"the {arm} arm failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return json.loads(line.removeprefix("RESULT "))


# ------------------------------------------------------------------ the table


def render(passes: dict[str, list[dict]], setup: dict, settings: dict) -> str:
    timed = {arm: [p["images_per_second"][TIMED_EPOCH - 1] for p in runs] for arm, runs in passes.items()}
    medians = {arm: statistics.median(values) for arm, values in timed.items()}
    ratio = medians["calibflow"] / medians["reference"]
    lines = [
        f"Card: {settings['card']}. {len(setup['train_paths']):,} photos of {settings['side']} px "
        f"({settings['source']}), resnet18, batch {settings['batch_size']}, {settings['workers']} DataLoader workers each; "
        f"epoch {TIMED_EPOCH} of {settings['epochs']} timed, {settings['repeats']} interleaved fresh processes per arm.",
        "",
        "| arm | precision | img/s (median) | each pass | ratio to the reference |",
        "| --- | --- | ---: | --- | ---: |",
    ]
    precision = {"reference": "fp16 autocast + GradScaler", "calibflow": "bf16 autocast, channels_last"}
    if settings["device"] != "cuda":
        precision = dict.fromkeys(precision, "fp32")
    for arm in ARMS:
        each = ", ".join(f"{v:,.0f}" for v in timed[arm])
        share = ratio if arm == "calibflow" else 1.0
        lines.append(f"| {arm} | {precision[arm]} | {medians[arm]:,.0f} | {each} | {share:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["--child"]:
        arm, photos_dir, setup_path, batch_size, workers, epochs, side = arguments[1:8]
        _child(arm, photos_dir, setup_path, int(batch_size), int(workers), int(epochs), int(side))
        return {}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_arguments(parser)
    parser.add_argument("--images", type=int, default=None, help=f"photos (default {IMAGES:,})")
    parser.add_argument("--repeats", type=int, default=None, help=f"passes per arm (default {REPEATS})")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: data.workers' auto)")
    parser.add_argument("--batch-size", type=int, default=BATCH)
    parser.add_argument("--archive", type=Path, default=CIFAR, help="CIFAR-10's JPEG archive (../shared/datasets)")
    parser.add_argument("--work", type=Path, default=None, help="where the photos are built (kept)")
    args = parser.parse_args(arguments)
    import torch

    from calibflow.data.image_files import auto_workers

    device = _device()
    if device != "cuda" and not args.smoke:
        print("gpu_train: no CUDA device here; a full run measures a GPU (--smoke runs on the CPU)", file=sys.stderr)
        raise SystemExit(2)
    out = _common.results_dir(args, parser)
    side = 64 if args.smoke else SIDE
    n = args.images or (60 if args.smoke else IMAGES)
    repeats = args.repeats or (1 if args.smoke else REPEATS)
    workers = args.workers if args.workers is not None else (1 if args.smoke else auto_workers())
    batch_size = 16 if args.smoke else args.batch_size
    work = args.work or (out / "gpu_train_work" if args.smoke else Path(tempfile.gettempdir()) / "calibflow-gpu-train")
    archive = args.archive
    if args.smoke:  # the tiny digit archive, not the 20 MB CIFAR-10 one
        archive = _common.image_archive(work / "digits.tar.gz", [str(k) for k in range(3)], 20, 0, size=16)
    elif not archive.is_file():
        parser.error(f"{archive} not found: pass --archive PATH to CIFAR-10's JPEG archive")
    photos_dir = data_scale.photos(work / f"photos-{side}-{n}", n, side, archive)
    setup = prepared(work / f"setup-{side}-{n}", photos_dir)
    setup_path = work / f"setup-{side}-{n}" / "setup.json"
    setup_path.write_text(json.dumps(setup))
    passes: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for repeat in range(repeats):
        for arm in ARMS if repeat % 2 == 0 else ARMS[::-1]:
            passes[arm].append(measure(arm, photos_dir, setup_path, batch_size, workers, EPOCHS, side))
            print(f"{arm}: {passes[arm][-1]['images_per_second']}", file=sys.stderr, flush=True)
    settings = {
        "card": torch.cuda.get_device_name(0) if device == "cuda" else "none (the CPU)",
        "device": device,
        "side": side,
        "batch_size": batch_size,
        "workers": workers,
        "epochs": EPOCHS,
        "repeats": repeats,
        "torch": torch.__version__,
        "source": "digits, upscaled" if args.smoke else "CIFAR-10, upscaled",
    }
    text = render(passes, setup, settings)
    print(text)
    data = {"passes": passes, "settings": settings, "train_images": len(setup["train_paths"])}
    _common.publish("gpu_train", "Training on a GPU against torchvision's reference", text, args, out, argv, data)
    return data


if __name__ == "__main__":
    main()
