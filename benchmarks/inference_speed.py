"""How fast the CPU reads logits, and what each of the flow's two inference preparations buys.

Three arms, each `collect_logits` (the function every logit of the flow and the served model goes
through) on the same random uint8 images at photo size, one thread, interleaved (each repeat runs
every arm, the order rotated), images/s over the whole call:

- default: the network as it trained, weights and batches in torch's default (contiguous) format;
- channels_last: weights and batches in channels_last, whatever the network (the table's
  "layout" column says which of the two `models.inference_memory_format` picks for it: channels_last
  for a convolutional network, the default format for one of mostly Linear weights);
- prepared: `models.prepare_for_inference`, what the flow and the served model read with: each
  BatchNorm folded into its convolution, then laid out as inference_memory_format picks.

Ratios are taken within one repeat against the default arm; the largest difference between the
prepared arm's logits and the default arm's is reported beside them, against the logits' scale
(the BatchNorm statistics are set to a trained network's scale first: an untrained network's 0 and 1
would make folding nearly a no-op). Random pixels: a convolution's speed does not depend on what
an image shows.

    python benchmarks/inference_speed.py [--repeats 5] [--archs small_cnn resnet18 ...] [--size 224]
    python benchmarks/inference_speed.py --smoke   # small_cnn and resnet18 at 32 px, 1 repeat: seconds

Writes docs/results/inference_speed.md (benchmarks/_common.py).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

import _common  # noqa: E402
import calibflow.training.loop as loop  # noqa: E402
from calibflow.training.loop import collect_logits, inference_batch, intra_op_threads  # noqa: E402
from calibflow.training.models import ModelSpec, build_model, inference_memory_format, prepare_for_inference  # noqa: E402

ARCHS = [
    "small_cnn",
    "resnet18",
    "resnet50",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "convnext_tiny",
    "vit_b_16",
]
ARMS = ("default", "channels_last", "prepared")


def default_format(model: torch.nn.Module, device) -> torch.memory_format:
    return torch.contiguous_format


def channels_last(model: torch.nn.Module, device) -> torch.memory_format:
    return torch.channels_last


def trained_scale(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """BatchNorm statistics and affine weights of a trained network's scale, seeded."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
            module.running_var.copy_(torch.rand(n, generator=generator) * 2 + 0.1)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)
    return model.eval()


def measure(arch: str, size: int, width: int, count: int, repeats: int) -> dict:
    spec = ModelSpec(arch, 3, 10, size, size, width=width)
    torch.manual_seed(0)
    network = trained_scale(build_model(spec, torch.full((3,), 120.0), torch.full((3,), 60.0)))
    prepared = prepare_for_inference(copy.deepcopy(network), "cpu")
    images = torch.randint(
        0, 256, (count, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    batch = inference_batch(512, images, "cpu")

    def read(arm: str) -> tuple[float, torch.Tensor]:
        model = prepared if arm == "prepared" else network
        layout = {"default": default_format, "channels_last": channels_last, "prepared": inference_memory_format}[arm]
        with mock.patch.object(loop, "inference_memory_format", layout):
            started = time.perf_counter()
            logits = collect_logits(model, images, batch)
            return count / (time.perf_counter() - started), logits

    speeds = {arm: [] for arm in ARMS}
    for arm in ARMS:  # one untimed pass each: the first call pays for oneDNN's kernel set-up
        read(arm)
    logits = {}
    for repeat in range(repeats):
        shift = repeat % len(ARMS)
        for arm in ARMS[shift:] + ARMS[:shift]:
            speed, logits[arm] = read(arm)
            speeds[arm].append(speed)
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in network.modules())
    left = sum(isinstance(m, torch.nn.BatchNorm2d) for m in prepared.modules())
    scale = float(logits["default"].abs().max())
    return {
        "arch": arch,
        "width": width if arch == "small_cnn" else None,
        "size": size,
        "images": count,
        "batch": batch,
        "layout": "channels_last" if inference_memory_format(network, "cpu") == torch.channels_last else "default",
        "batch_norms": norms,
        "folded": norms - left,
        "images_per_second": {arm: summary(values) for arm, values in speeds.items()},
        "ratio": {
            arm: summary([a / d for a, d in zip(speeds[arm], speeds["default"])])
            for arm in ("channels_last", "prepared")
        },
        "max_logit_difference": float((logits["prepared"] - logits["default"]).abs().max()),
        "logit_scale": scale,
    }


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "low": min(values), "high": max(values), "values": values}


def markdown(rows: list[dict], repeats: int) -> str:
    lines = [
        f"`collect_logits`, one thread, {repeats} interleaved repeats; images/s median, ratio to the default arm "
        "median (range):",
        "",
        "| network | px | images, batch | layout picked | BatchNorms folded | default img/s | channels_last | prepared "
        "(folded + layout) | prepared logits vs default: max difference / logit scale |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        name = row["arch"] + (f" width {row['width']}" if row["width"] else "")
        speed, ratio = row["images_per_second"], row["ratio"]
        cells = [
            f"{ratio[arm]['median']:.2f}x ({ratio[arm]['low']:.2f}-{ratio[arm]['high']:.2f})"
            for arm in ("channels_last", "prepared")
        ]
        lines.append(
            f"| {name} | {row['size']} | {row['images']}, {row['batch']} | {row['layout']} "
            f"| {row['folded']} of {row['batch_norms']} | {speed['default']['median']:,.1f} | {cells[0]} | {cells[1]} "
            f"| {row['max_logit_difference']:.1e} / {row['logit_scale']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_arguments(parser)
    parser.add_argument("--archs", nargs="+", default=None, help=f"default: {' '.join(ARCHS)}")
    parser.add_argument("--size", type=int, default=224, help="image side, px")
    parser.add_argument("--images", type=int, default=54, help="images per call (two CPU batches at 224 px)")
    parser.add_argument("--width", type=int, default=4, help="small_cnn's width")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    out = _common.results_dir(args, parser)
    if args.smoke:
        args.archs, args.size, args.images, args.repeats = args.archs or ["small_cnn", "resnet18"], 32, 8, 1
    archs = args.archs or ARCHS
    rows = []
    with intra_op_threads(1):
        for arch in archs:
            rows.append(measure(arch, args.size, args.width, args.images, args.repeats))
            print(
                f"{arch}: prepared {rows[-1]['ratio']['prepared']['median']:.2f}x, "
                f"channels_last {rows[-1]['ratio']['channels_last']['median']:.2f}x",
                flush=True,
            )
    text = markdown(rows, args.repeats)
    print(text)
    results = {"rows": rows, "repeats": args.repeats}
    _common.publish("inference_speed", "Inference speed on the CPU", text, args, out, argv, results)
    return results


if __name__ == "__main__":
    main()
