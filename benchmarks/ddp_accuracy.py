"""Does DDP train as well as one process at the same global batch? (issue 14)

scikit-learn's digits (1,000 train, 100 val, 697 test images, shuffled per seed), small_cnn width
16, 8 epochs, global batch 64, on the CPU: one process (calibflow.training.loop.train_classifier) and
`--nproc` gloo processes under torchrun (calibflow.training.distributed.train_distributed), for each seed.
Writes each seed's test accuracy, the means and standard deviations, the paired difference with
its standard error, and the wall time of each side (torchrun's launch included) to
docs/results/ddp_accuracy.md. About 1 minute for 5 seeds on 2 cores.

    python benchmarks/ddp_accuracy.py [--seeds 5] [--nproc 2] [--epochs 8]
    python benchmarks/ddp_accuracy.py --smoke   # 1 seed of 1 epoch: one torchrun launch (sd: n/a)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import _common  # noqa: E402
from calibflow.config import TrainConfig  # noqa: E402
from calibflow.training.models import ModelSpec  # noqa: E402

SPEC = ModelSpec(arch="small_cnn", in_channels=1, num_classes=10, image_height=8, image_width=8, width=16)
DDP = TrainConfig(epochs=8, batch_size=64, device="cpu", threads=1, distributed="ddp", nproc=2)


def digits(seed: int):
    """scikit-learn's digits as uint8 8x8 images: 1,000 train, 100 val, 697 test, shuffled by `seed`."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images * 16, dtype=torch.float32).clamp(0, 255).to(torch.uint8)[:, None]
    labels = torch.tensor(data.target)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    train, val, test = order[:1000], order[1000:1100], order[1100:]
    return (images[train], labels[train]), (images[val], labels[val]), (images[test], labels[test])


def accuracy(model, images, labels) -> float:
    with torch.no_grad():
        return (model.eval()(images).argmax(1) == labels).double().mean().item()


def sd(values) -> float | None:
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def _number(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> dict:
    from calibflow.training.distributed import train_distributed
    from calibflow.training.loop import TrainingInputs, train_classifier

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _common.add_arguments(parser)
    parser.add_argument("--seeds", type=int, default=None, help="default 5 (1 with --smoke)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=None, help="default 8 (1 with --smoke)")
    args = parser.parse_args(argv)
    out = _common.results_dir(args, parser)
    seeds = args.seeds or (1 if args.smoke else 5)
    epochs = args.epochs or (1 if args.smoke else DDP.epochs)
    config = dataclasses.replace(DDP, epochs=epochs, nproc=args.nproc)
    single_config = dataclasses.replace(config, distributed="none", nproc="auto")
    rows, seconds = [], {"one": 0.0, "ddp": 0.0}
    for seed in range(seeds):
        train, val, (test_x, test_y) = digits(seed)
        started = time.perf_counter()
        single, _ = train_classifier(TrainingInputs(SPEC, *train, *val, single_config, seed), progress=False)
        seconds["one"] += time.perf_counter() - started
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as work:
            distributed, _ = train_distributed(TrainingInputs(SPEC, *train, *val, config, seed), work_dir=work)
        seconds["ddp"] += time.perf_counter() - started
        rows.append(
            {"seed": seed, "one": accuracy(single, test_x, test_y), "ddp": accuracy(distributed, test_x, test_y)}
        )
        print(f"seed {seed}: 1 process {rows[-1]['one']:.4f}, {args.nproc} processes {rows[-1]['ddp']:.4f}", flush=True)
    one, many = [r["one"] for r in rows], [r["ddp"] for r in rows]
    difference = np.array(many) - np.array(one)
    spread = sd(difference)
    result = {
        "seeds": rows,
        "nproc": args.nproc,
        "epochs": epochs,
        "one": {"mean": float(np.mean(one)), "sd": sd(one), "seconds": seconds["one"]},
        "ddp": {"mean": float(np.mean(many)), "sd": sd(many), "seconds": seconds["ddp"]},
        "difference": {
            "mean": float(difference.mean()),
            "standard_error": None if spread is None else spread / np.sqrt(seeds),
        },
    }
    lines = [
        f"scikit-learn's digits (1,000 train, 100 val, 697 test images, shuffled per seed), small_cnn width "
        f"{SPEC.width}, {epochs} epochs, global batch {config.batch_size}, CPU; test accuracy of one process "
        f"against {args.nproc} gloo processes under torchrun, {seeds} seeds",
        "",
        "| seed | 1 process | " + f"{args.nproc} processes |",
        "| ---: | ---: | ---: |",
        *(f"| {r['seed']} | {r['one']:.4f} | {r['ddp']:.4f} |" for r in rows),
        "",
        "| | mean | sd | wall time, all seeds (s) |",
        "| --- | ---: | ---: | ---: |",
        *(
            f"| {label} | {result[key]['mean']:.4f} | {_number(result[key]['sd'])} | {result[key]['seconds']:.1f} |"
            for key, label in (("one", "1 process"), ("ddp", f"{args.nproc} processes"))
        ),
        "",
        f"paired difference {result['difference']['mean']:+.4f}, standard error "
        f"{_number(result['difference']['standard_error'])} ({seeds} seeds)",
    ]
    text = "\n".join(lines)
    print(text)
    _common.publish("ddp_accuracy", "DDP against one process at the same global batch", text, args, out, argv, result)
    return result


if __name__ == "__main__":
    main()
