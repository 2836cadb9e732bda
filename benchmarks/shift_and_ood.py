"""Calibration under corruption and OOD detection on CIFAR-10, on the CPU (issue 11's results).

One small_cnn trained on a CIFAR-10 subset from ../shared/datasets (the over-confident recipe of
examples/cifar10-overconfident.yaml, with more training images), through calibflow's own library
calls (no Prefect, no MLflow: the numbers are the ones the flow would log):

- ECE, accuracy and NLL on the clean test images and mean over the full corruption suite (the
  nine corruptions of calibflow.evaluation.corruptions at severities 1-5), before calibration, after
  temperature scaling, and after shift-aware temperature scaling (calibration split plus its
  speckle-noise copies at severities 1-5; speckle noise is then left out of the suite's mean);
- AUROC and FPR95 of MSP and energy against MNIST test digits resized to 32x32 RGB, for the plain
  model and one trained with outlier exposure (weight 0.5) on jigsaw-shuffled CIFAR-10 images
  that are in none of the splits (4x4 patches of 8x8 pixels, permuted per image).

    python benchmarks/shift_and_ood.py [--per-class 200] [--epochs 30]   # docs/results/shift_and_ood.md
    python benchmarks/shift_and_ood.py --smoke   # 3 generated classes, a few images each, 1 epoch: seconds

--smoke runs the same steps on archives it generates (digits laid out as the CIFAR-10 and MNIST
archives are), under --out: nothing is read from ../shared/datasets.
"""

from __future__ import annotations

import argparse
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
DATASETS = REPO.parent / "shared" / "datasets"

import _common  # noqa: E402


def unpack(name: str, where: Path, datasets: Path = DATASETS) -> Path:
    target = where / name
    if not target.is_dir():
        where.mkdir(parents=True, exist_ok=True)
        with tarfile.open(datasets / f"{name}.tar.gz") as archive:
            archive.extractall(where / f".{name}", filter="data")
        inner = next(p for p in (where / f".{name}").rglob("train") if p.is_dir()).parent
        inner.rename(target)
    return target


def files_of(root: Path, classes: list[str], per_class: int, skip: int = 0) -> tuple[list[str], np.ndarray]:
    paths, labels = [], []
    for k, name in enumerate(classes):
        chosen = sorted((root / name).iterdir())[skip : skip + per_class]
        paths += [str(p.relative_to(root)) for p in chosen]
        labels += [k] * len(chosen)
    return paths, np.array(labels)


def jigsaw(images: torch.Tensor, seed: int, grid: int = 4) -> torch.Tensor:
    """Each image cut into grid x grid patches, put back in a random order (seeded per image)."""
    n, c, h, w = images.shape
    ph, pw = h // grid, w // grid
    patches = images.reshape(n, c, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5).reshape(n, grid * grid, c, ph, pw)
    generator = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(grid * grid, generator=generator) for _ in range(n)])
    shuffled = patches[torch.arange(n)[:, None], order]
    return shuffled.reshape(n, grid, grid, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w).contiguous()


# --smoke's sizes: every step runs, on a handful of images
SMOKE = {"per_class": 4, "val": 2, "epochs": 1, "calibration": 4, "test": 4, "ood": 20}


def smoke_datasets(where: Path) -> Path:
    """Stand-ins for cifar10-jpg.tar.gz (3 classes of 32x32 RGB) and mnist-png.tar.gz (28x28 gray)."""
    _common.image_archive(where / "cifar10-jpg.tar.gz", ["airplane", "automobile", "bird"], 25, 5)
    _common.image_archive(where / "mnist-png.tar.gz", ["0", "1", "2"], 2, 10, size=28, rgb=False, suffix=".png")
    return where


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_arguments(parser)
    parser.add_argument("--per-class", type=int, default=200, help="training images per class")
    parser.add_argument("--val", type=int, default=20, help="validation images per class")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--calibration", type=int, default=300, help="calibration images per class")
    parser.add_argument("--test", type=int, default=100, help="test images per class (clean and each cell)")
    parser.add_argument("--ood", type=int, default=1000, help="MNIST test images")
    parser.add_argument("--datasets", type=Path, default=DATASETS, help="holds cifar10-jpg.tar.gz and mnist-png.tar.gz")
    parser.add_argument("--work", type=Path, default=Path("/tmp/calibflow-shift-ood"))
    args = parser.parse_args(argv)
    out = _common.results_dir(args, parser)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        args.work = out / "work"
        args.datasets = smoke_datasets(out / "datasets")

    from calibflow.config import CORRUPTION_NAMES, TrainConfig
    from calibflow.training.ensembles import fit_model_calibrator, uncalibrated_probabilities
    from calibflow.data.images import load_images
    from calibflow.metrics import probability_report
    from calibflow.training.models import ModelSpec
    from calibflow.evaluation.ood import detection_metrics, ood_scores
    from calibflow.evaluation.shift import Suite, corrupted_images
    from calibflow.training.loop import TrainingInputs, collect_logits, train_classifier

    started = time.perf_counter()
    work = Path(args.work)
    cifar, mnist = unpack("cifar10-jpg", work, args.datasets), unpack("mnist-png", work, args.datasets)
    classes = sorted(p.name for p in (cifar / "train").iterdir() if p.is_dir())
    take = {}
    offset = 0
    for name, count in (
        ("train", args.per_class),
        ("val", args.val),
        ("calibration", args.calibration),
        ("test", args.test),
        ("outliers", args.per_class),
    ):
        take[name] = files_of(cifar / "train", classes, count, offset)
        offset += count
    load = lambda part: load_images(cifar / "train", take[part][0], "RGB", (32, 32))  # noqa: E731
    x = {part: load(part) for part in take}
    y = {part: torch.as_tensor(take[part][1]) for part in take}
    ood_paths = sorted(str(p.relative_to(mnist / "test")) for p in (mnist / "test").rglob("*.png"))
    ood_paths = [ood_paths[i] for i in np.random.default_rng(0).permutation(len(ood_paths))[: args.ood]]
    x_ood = load_images(mnist / "test", ood_paths, "RGB", (32, 32))
    outliers = jigsaw(x["outliers"], seed=0)

    spec = ModelSpec(
        arch="small_cnn", in_channels=3, num_classes=len(classes), image_height=32, image_width=32, width=16
    )
    config = TrainConfig(epochs=args.epochs, batch_size=64, lr=0.05, weight_decay=0.0, augment=False)
    suite = Suite(tuple(CORRUPTION_NAMES), (1, 2, 3, 4, 5), 10**9, 0)
    nhwc = lambda t: t.permute(0, 2, 3, 1).contiguous().numpy()  # noqa: E731
    chw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    cache = work / "cache"
    test_cells = corrupted_images(nhwc(x["test"]), suite, cache)
    aware_suite = Suite(("speckle_noise",), (1, 2, 3, 4, 5), 10**9, 0)
    calibration_cells = corrupted_images(nhwc(x["calibration"]), aware_suite, cache)
    print(f"data ready in {time.perf_counter() - started:.0f} s", flush=True)

    lines, ood_rows, measured = [], [], {"calibration": [], "ood": []}
    for exposure in (False, True):
        t0 = time.perf_counter()
        inputs = TrainingInputs(
            spec,
            x["train"],
            y["train"],
            x["val"],
            y["val"],
            config,
            seed=0,
            outlier_images=outliers if exposure else None,
        )
        model, history = train_classifier(inputs, progress=False)
        trained_s = time.perf_counter() - t0
        logits = lambda images: collect_logits(model, images, 512).numpy()  # noqa: E731, B023 (used in this iteration)
        z_cal, z_test, z_ood = logits(x["calibration"]), logits(x["test"]), logits(x_ood)
        z_cells = {key: logits(chw(images)) for key, images in test_cells.items()}
        y_cal, y_test = y["calibration"].numpy(), y["test"].numpy()
        plain = fit_model_calibrator("temperature", z_cal, y_cal)
        z_aware = np.concatenate([z_cal, *(logits(chw(images)) for images in calibration_cells.values())])
        aware = fit_model_calibrator("temperature", z_aware, np.tile(y_cal, 6))
        label = "with outlier exposure" if exposure else "plain"
        if not exposure:
            unseen = [k for k in suite.keys if not k.startswith("speckle_noise")]
            rows = []
            for name, transform in (
                ("softmax (no calibration)", lambda z: uncalibrated_probabilities(z)),
                (f"temperature scaling (T = {plain.temperature:.3f})", plain.transform),
                (f"shift-aware (T = {aware.temperature:.3f})", aware.transform),
            ):
                clean = probability_report(transform(z_test), y_test)
                cells = {k: probability_report(transform(z), y_test) for k, z in z_cells.items()}
                by_severity = [
                    np.mean([cells[f"{c}_s{s}"]["ece"] for c in CORRUPTION_NAMES if c != "speckle_noise"])
                    for s in range(1, 6)
                ]
                measured["calibration"].append(
                    {
                        "probabilities": name,
                        "test_accuracy": clean["accuracy"],
                        "test_ece": clean["ece"],
                        "suite_mean_ece": float(np.mean([cells[k]["ece"] for k in unseen])),
                        "suite_ece_by_severity": by_severity,
                        "suite_mean_accuracy": float(np.mean([cells[k]["accuracy"] for k in unseen])),
                        "suite_mean_nll": float(np.mean([cells[k]["nll"] for k in unseen])),
                    }
                )
                rows.append(
                    f"| {name} | {clean['accuracy']:.3f} | {clean['ece']:.4f} | "
                    f"{np.mean([cells[k]['ece'] for k in unseen]):.4f} | "
                    + " / ".join(f"{e:.3f}" for e in by_severity)
                    + f" | {np.mean([cells[k]['accuracy'] for k in unseen]):.3f} | "
                    f"{np.mean([cells[k]['nll'] for k in unseen]):.3f} |"
                )
            lines += [
                f"CIFAR-10, small_cnn width 16, {args.per_class} training images a class, {args.epochs} epochs "
                f"(no weight decay, no augmentation), trained in {trained_s:.0f} s on the CPU; "
                f"{args.calibration * len(classes)} calibration and {args.test * len(classes)} test images; the "
                f"suite's mean over "
                f"the {len(unseen)} cells of the 8 corruptions other than speckle noise:",
                "",
                "| probabilities | test accuracy | test ECE | mean ECE under the suite | mean ECE by severity 1-5 "
                "| mean accuracy under the suite | mean NLL under the suite |",
                "| --- | ---: | ---: | ---: | --- | ---: | ---: |",
                *rows,
                "",
            ]
        for score in ("msp", "energy"):
            inside = ood_scores(z_test, plain)
            outside = ood_scores(z_ood, plain)
            sign = 1.0 if score == "msp" else -1.0
            m = detection_metrics(sign * inside[score], sign * outside[score])
            measured["ood"].append({"model": label, "score": score, **m, "val_accuracy": history[-1].val_accuracy})
            ood_rows.append(
                f"| {label} | {score} | {m['auroc']:.3f} | {m['aupr']:.3f} | {m['fpr95']:.3f} | "
                f"{history[-1].val_accuracy:.3f} |"
            )
        print(f"{label}: trained in {trained_s:.0f} s", flush=True)
    lines += [
        f"OOD: {args.ood} MNIST test digits as 32x32 RGB against the {args.test * len(classes)} CIFAR-10 test "
        f"images (scores after temperature scaling; outlier exposure on {args.per_class * len(classes)} jigsaw-shuffled "
        f"CIFAR-10 images):",
        "",
        "| model | score | AUROC | AUPR-In | FPR95 | val accuracy |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
        *ood_rows,
        "",
        f"total {time.perf_counter() - started:.0f} s",
    ]
    text = "\n".join(lines)
    print(text)
    _common.publish(
        "shift_and_ood", "Shift and out-of-distribution inputs on CIFAR-10", text, args, out, argv, measured
    )
    return measured


if __name__ == "__main__":
    main()
