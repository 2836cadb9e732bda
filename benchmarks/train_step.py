"""The project's training function against a bare torch loop, and torch's thread count on an idle
and on a busy machine.

Ratio (always): `train_classifier` on the default model spec and data (params.yaml, read by the
pipeline's own loaders) against the loop below on the same model, data, optimiser, one-cycle
schedule, augmentation and thread count, with nothing else in it: no validation, no loss read
back, no progress bar. Both run in this process, alternating AB, BA, ... so a shared machine's
load falls on both; each is timed over the whole call (images trained / wall seconds). The first
pair's weights are compared: equal bits show the two did the same work.

Threads (--threads-table): the project's training and logit collection at each thread count,
alone and beside --busy CPU-burning processes (one-thread matmul loops started for the duration),
interleaved the same way.

    python benchmarks/train_step.py [--repeats 5] [--check] [--busy N] [--threads-table] [--layout-table] [--set KEY=VALUE ...]
Layouts (--layout-table): train_classifier with its weights and batches in torch's default format
against the layout models.training_memory_format picks (channels_last for a convolutional network),
interleaved, on the configured model and data and on photo-sized images (small_cnn at 224 px,
resnet18 at 128 px; random pixels).

    python benchmarks/train_step.py --smoke   # 90 digits, 1 epoch, 1 repeat, the thread and layout tables: seconds

Writes its tables to docs/results/train_step.md (benchmarks/_common.py). Runs on the CPU (train.device=cpu): the bare loop has no CUDA path. --check exits 1 when the
median ratio is below 0.97 (issue 16's bar).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _common  # noqa: E402
from calibflow.config import Config, TrainConfig, load_config  # noqa: E402
from calibflow.data.images import channel_stats  # noqa: E402
from calibflow.pipeline import data_steps  # noqa: E402
from calibflow.training.loop import (  # noqa: E402
    TrainingInputs,
    collect_logits,
    intra_op_threads,
    random_translate,
    seed_everything,
    train_classifier,
)
from calibflow.training.models import ModelSpec, build_model, training_memory_format  # noqa: E402

THRESHOLD = 0.97
# One thread of dense float math, forever: the "another job on the machine" of CI runners and
# shared workstations, at normal priority.
BURNER = (
    "import numpy as np\n"
    "a = np.random.default_rng(0).standard_normal((256, 256))\n"
    "while True:\n"
    "    a = np.tanh(a @ a)\n"
)


@dataclasses.dataclass(frozen=True)
class Data:
    spec: ModelSpec
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor


def load_data(config: Config) -> Data:
    """The train and val splits exactly as `calibflow run` reads them (manifest, seeded split, decode)."""
    with tempfile.TemporaryDirectory() as tmp:
        manifest = data_steps.write_manifest(config.data.path, f"{tmp}/manifest.parquet")
        split = data_steps.write_split(manifest.path, config.split, config.seed, f"{tmp}/splits.json")
        fmt = data_steps.image_format(manifest.path, config.data)
        train_x, train_y, _ = data_steps.load_split_images(config.data.path, manifest.path, split.path, "train", fmt)
        val_x, val_y, _ = data_steps.load_split_images(config.data.path, manifest.path, split.path, "val", fmt)
    spec = ModelSpec(
        arch=config.model.arch,
        in_channels=fmt.channels,
        num_classes=len(manifest.classes),
        image_height=fmt.height,
        image_width=fmt.width,
        width=config.model.width,
        dropout=config.model.dropout,
    )
    return Data(spec, train_x, train_y, val_x, val_y)


def bare_loop(
    spec: ModelSpec, images: torch.Tensor, labels: torch.Tensor, config: TrainConfig, seed: int
) -> torch.nn.Module:
    """What training needs and nothing more, on the CPU: the same seeds, model, memory format, SGD,
    one-cycle schedule and random shifts as train_classifier, in the same order."""
    seed_everything(seed)
    mean, std = channel_stats(images)
    model = build_model(spec, mean, std)
    memory_format = training_memory_format(model, "cpu")
    model.to(memory_format=memory_format)
    labels = labels.long()
    n, size = len(images), config.batch_size
    steps = n // size + (1 if n % size > 1 else 0)  # a last batch of one is skipped (BatchNorm)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.momentum > 0,
        weight_decay=config.weight_decay,
    )
    total = config.epochs * steps
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=total, pct_start=0.3 if total == 4 else 0.25
    )
    generator = torch.Generator().manual_seed(seed)
    max_shift = max(1, min(spec.image_height, spec.image_width) // 8)
    model.train()
    for _ in range(config.epochs):
        for index in torch.randperm(n, generator=generator).split(size):
            if len(index) < 2:
                continue
            batch = images[index]
            if config.augment:
                batch = random_translate(batch, max_shift, config.hflip, generator)
            batch = batch.contiguous(memory_format=memory_format)
            loss = F.cross_entropy(model(batch), labels[index], label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def images_per_epoch(n: int, batch_size: int) -> int:
    return n - (1 if n % batch_size == 1 else 0)


def _busy_ticks() -> int | None:
    """Clock ticks every CPU of the machine has spent busy (Linux /proc/stat), None elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return user + nice + system + irq + softirq + steal


def _process_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime


class Background:
    """CPU cores that processes other than this one (and its burners) kept busy over a span: the
    load a measurement on a shared machine ran beside, which it cannot control but can report."""

    def __init__(self, burner_pids: list[int]):
        self.pids = burner_pids
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __enter__(self) -> "Background":
        self.cores = None
        self.start = (
            time.perf_counter(),
            _busy_ticks(),
            sum(os.times()[:2]),
            sum(_process_ticks(pid) for pid in self.pids),
        )
        return self

    def __exit__(self, *exc) -> None:
        wall, busy, ours, burners_ = self.start
        busy_now = _busy_ticks()
        if busy is None or busy_now is None:
            return
        others = (
            (busy_now - busy) / self.tick
            - (sum(os.times()[:2]) - ours)
            - (sum(_process_ticks(pid) for pid in self.pids) - burners_) / self.tick
        )
        self.cores = max(0.0, others / (time.perf_counter() - wall))


@contextlib.contextmanager
def burners(count: int):
    """`count` CPU-burning processes for the duration of the block (their pids yielded), stopped after it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    processes = [subprocess.Popen([sys.executable, "-c", BURNER], env=env) for _ in range(count)]
    try:
        if processes:
            time.sleep(1.0)  # past numpy's import: burning when the timed work starts
        yield [process.pid for process in processes]
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait()


def train_project(data: Data, config: Config) -> torch.nn.Module:
    inputs = TrainingInputs(data.spec, data.train_x, data.train_y, data.val_x, data.val_y, config.train, config.seed)
    return train_classifier(inputs, progress=False)[0]


def time_project(data: Data, config: Config) -> tuple[float, float]:
    """(wall, CPU) seconds of one train_classifier call."""
    wall, cpu = time.perf_counter(), time.process_time()
    train_project(data, config)
    return time.perf_counter() - wall, time.process_time() - cpu


def time_bare(data: Data, config: Config) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    with intra_op_threads(config.train.threads):
        bare_loop(data.spec, data.train_x, data.train_y, config.train, config.seed)
    return time.perf_counter() - wall, time.process_time() - cpu


def same_weights(data: Data, config: Config) -> bool:
    project = train_project(data, config)
    with intra_op_threads(config.train.threads):
        bare = bare_loop(data.spec, data.train_x, data.train_y, config.train, config.seed)
    a, b = project.state_dict(), bare.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "low": min(values), "high": max(values), "values": values}


def measure_ratio(data: Data, config: Config, repeats: int, val_every: list[int]) -> dict:
    """Images/s of the bare loop and of train_classifier at each val_every, and their ratios. Each
    repeat runs every arm once, the order rotated from repeat to repeat, and a ratio is taken
    within one repeat. Wall time is what a user waits; CPU time (this process's, all its
    threads) is the work done, which another process's load disturbs far less."""
    images = config.train.epochs * images_per_epoch(len(data.train_x), config.train.batch_size)
    arms = [None, *val_every]  # None: the bare loop
    wall = {arm: [] for arm in arms}
    cpu = {arm: [] for arm in arms}
    for repeat in range(repeats):
        shift = repeat % len(arms)
        for arm in arms[shift:] + arms[:shift]:
            if arm is None:
                seconds = time_bare(data, config)
            else:
                seconds = time_project(
                    data, dataclasses.replace(config, train=dataclasses.replace(config.train, val_every=arm))
                )
            wall[arm].append(images / seconds[0])
            cpu[arm].append(images / seconds[1])
    return {
        "bare_images_per_second": summary(wall[None]),
        "bare_images_per_cpu_second": summary(cpu[None]),
        "project": [
            {
                "val_every": arm,
                "images_per_second": summary(wall[arm]),
                "ratio": summary([p / b for p, b in zip(wall[arm], wall[None])]),
                "cpu_ratio": summary([p / b for p, b in zip(cpu[arm], cpu[None])]),
            }
            for arm in val_every
        ],
    }


def measure_threads(data: Data, config: Config, thread_counts: list[int], busy: int, repeats: int) -> list[dict]:
    """Training and logit collection images/s per (load, threads), interleaved: each repeat visits
    every cell, alternating the order of thread counts."""
    images = config.train.epochs * images_per_epoch(len(data.train_x), config.train.batch_size)
    loads = [0, busy] if busy else [0]
    cells = {(load, t): {"train": [], "logits": [], "background": []} for load in loads for t in thread_counts}
    model = train_project(data, config)
    # Logit collection's unit of work: every training image, a few times (one pass is milliseconds).
    passes, batch = 10, config.evaluation.batch_size
    for repeat in range(repeats):
        for load in loads:
            with burners(load) as pids:
                for t in thread_counts if repeat % 2 == 0 else thread_counts[::-1]:
                    run = dataclasses.replace(config, train=dataclasses.replace(config.train, threads=t))
                    with Background(pids) as background:
                        cells[(load, t)]["train"].append(images / time_project(data, run)[0])
                        with intra_op_threads(t):
                            started = time.perf_counter()
                            for _ in range(passes):
                                collect_logits(model, data.train_x, batch)
                            cells[(load, t)]["logits"].append(
                                passes * len(data.train_x) / (time.perf_counter() - started)
                            )
                    if background.cores is not None:
                        cells[(load, t)]["background"].append(background.cores)
    return [
        {
            "busy_processes": load,
            "threads": t,
            "train_images_per_second": summary(v["train"]),
            "logits_images_per_second": summary(v["logits"]),
            "background_cores": summary(v["background"]) if v["background"] else None,
        }
        for (load, t), v in cells.items()
    ]


def default_layout(model: torch.nn.Module, device) -> torch.memory_format:
    """The layout arm without channels_last: every weight and batch in torch's default format."""
    return torch.contiguous_format


def layout_cases(data: Data, config: Config, smoke: bool) -> list[tuple[str, ModelSpec, torch.Tensor, torch.Tensor]]:
    """What the layout table trains: the configured model on the configured data, then photo-sized
    images (random pixels: a convolution's speed does not depend on what they show)."""
    generator = torch.Generator().manual_seed(0)
    cases = [
        (f"{config.model.arch} width {config.model.width}, the configured data", data.spec, data.train_x, data.train_y)
    ]
    photos = [("small_cnn", 4, 32, 8)] if smoke else [("small_cnn", 4, 224, 64), ("small_cnn", 16, 224, 32)]
    photos += [] if smoke else [("resnet18", 32, 128, 32)]
    for arch, width, size, count in photos:
        spec = ModelSpec(arch, 3, 10, size, size, width=width)
        images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)
        labels = torch.arange(count) % 10
        name = f"{arch}" + (f" width {width}" if arch == "small_cnn" else "") + f", {count} images of {size} px"
        cases.append((name, spec, images, labels))
    return cases


def measure_layouts(data: Data, config: Config, repeats: int, smoke: bool) -> list[dict]:
    """train_classifier's images/s with its weights and batches in the default format and in the
    layout models.training_memory_format picks (channels_last for these networks on the CPU),
    interleaved: each repeat runs both arms, the order alternating; a ratio within one repeat."""
    from unittest import mock

    import calibflow.training.loop as loop

    rows = []
    for name, spec, images, labels in layout_cases(data, config, smoke):
        train = (
            config.train
            if name.endswith("configured data")
            else dataclasses.replace(config.train, epochs=1, batch_size=16)
        )
        inputs = TrainingInputs(spec, images, labels, images[:16], labels[:16], train, seed=config.seed)
        seen = train.epochs * images_per_epoch(len(images), train.batch_size)
        speed = {"default": [], "chosen": []}
        for repeat in range(repeats):
            for arm in ("default", "chosen") if repeat % 2 == 0 else ("chosen", "default"):
                layout = default_layout if arm == "default" else loop.training_memory_format
                with mock.patch.object(loop, "training_memory_format", layout), intra_op_threads(train.threads):
                    started = time.perf_counter()
                    model, _ = train_classifier(inputs, progress=False)
                    speed[arm].append(seen / (time.perf_counter() - started))
        rows.append(
            {
                "case": name,
                "epochs": train.epochs,
                "batch_size": train.batch_size,
                "layout": "channels_last"
                if loop.training_memory_format(model, "cpu") == torch.channels_last
                else "default",
                "default_images_per_second": summary(speed["default"]),
                "chosen_images_per_second": summary(speed["chosen"]),
                "ratio": summary([c / d for c, d in zip(speed["chosen"], speed["default"])]),
            }
        )
    return rows


def layouts_markdown(rows: list[dict], threads: int) -> str:
    lines = [
        f"train_classifier with its weights and batches in the layout it picks against the default format ({threads} thread(s)):",
        "",
        "| network and data | epochs, batch | layout picked | default format img/s | picked img/s | ratio (median, range) |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for row in rows:
        d, c, r = row["default_images_per_second"], row["chosen_images_per_second"], row["ratio"]
        lines.append(
            f"| {row['case']} | {row['epochs']}, {row['batch_size']} | {row['layout']} | {d['median']:,.1f} "
            f"| {c['median']:,.1f} | {r['median']:.2f}x ({r['low']:.2f}-{r['high']:.2f}) |"
        )
    return "\n".join(lines)


def ratio_markdown(result: dict, config: Config, repeats: int) -> str:
    b = result["bare_images_per_second"]
    lines = [
        f"train_classifier vs bare loop: {config.model.arch} (width {config.model.width}), {config.train.epochs} epochs "
        f"of {result['train_images']} images, batch {config.train.batch_size}, threads {config.train.threads}, "
        f"{result['busy_processes']} busy processes; {repeats} repeats; same weights: {result['same_weights']}"
    ]
    if result["background_cores"] is not None:
        lines.append(f"other processes kept {result['background_cores']:.1f} cores busy on average meanwhile")
    lines += [
        "",
        "| arm | img/s (median, range) | ratio to bare, wall (median, range) | ratio to bare, CPU time |",
        "| --- | ---: | ---: | ---: |",
        f"| bare loop | {b['median']:,.0f} ({b['low']:,.0f}-{b['high']:,.0f}) | 1 | 1 |",
    ]
    for row in result["project"]:
        p, r, c = row["images_per_second"], row["ratio"], row["cpu_ratio"]
        lines.append(
            f"| train_classifier, val_every {row['val_every']} | {p['median']:,.0f} ({p['low']:,.0f}-{p['high']:,.0f}) "
            f"| {r['median']:.3f} ({r['low']:.3f}-{r['high']:.3f}) | {c['median']:.3f} ({c['low']:.3f}-{c['high']:.3f}) |"
        )
    return "\n".join(lines)


def threads_markdown(rows: list[dict]) -> str:
    lines = [
        "| busy processes | threads | training img/s (median, range) | logit collection img/s (median, range) "
        "| other processes' load, cores (median, range) |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        t, lg, bg = row["train_images_per_second"], row["logits_images_per_second"], row["background_cores"]
        load = f"{bg['median']:.1f} ({bg['low']:.1f}-{bg['high']:.1f})" if bg else "n/a"
        lines.append(
            f"| {row['busy_processes']} | {row['threads']} | {t['median']:,.0f} ({t['low']:,.0f}-{t['high']:,.0f}) "
            f"| {lg['median']:,.0f} ({lg['low']:,.0f}-{lg['high']:,.0f}) | {load} |"
        )
    return "\n".join(lines)


def exit_code(results: dict, check: bool) -> int:
    """--check: 1 when the configured val_every (the first arm) runs below THRESHOLD of the bare loop."""
    return 1 if check and results["ratio"]["project"][0]["ratio"]["median"] < THRESHOLD else 0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_arguments(parser)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="params.yaml override")
    parser.add_argument(
        "--repeats", type=int, default=None, help="pairs for the ratio, rounds for the thread table (default 5)"
    )
    parser.add_argument(
        "--busy",
        type=int,
        default=0,
        help="CPU-burning processes beside the ratio (and the thread table's busy rows: 1 when not given)",
    )
    parser.add_argument("--threads-table", action="store_true", help="also measure thread counts idle and busy")
    parser.add_argument(
        "--layout-table", action="store_true", help="also time training in the default format against channels_last"
    )
    parser.add_argument("--table-threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--table-epochs", type=int, default=10, help="epochs per training in the thread table")
    parser.add_argument(
        "--val-every",
        type=int,
        nargs="*",
        default=[],
        help="also time train_classifier at these train.val_every values (1: the old behaviour)",
    )
    parser.add_argument("--check", action="store_true", help=f"exit 1 when the median ratio is below {THRESHOLD}")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    out = _common.results_dir(args, parser)
    if args.smoke:
        # 90 digits (27 training images), a 4-channel network, one epoch, every table once
        from calibflow.data.prepare import write_digits

        write_digits(out / "digits", classes=(0, 1, 2), per_class=30)
        smoke = [f"data.path={out / 'digits'}", "train.epochs=1", "model.width=4"]
        args.overrides = [*smoke, *args.overrides]
        args.repeats = args.repeats or 1
        args.val_every = args.val_every or [1]
        args.threads_table, args.table_epochs, args.layout_table = True, 1, True
    args.repeats = args.repeats or 5

    config = load_config(REPO / "params.yaml", [*args.overrides, "train.device=cpu"])
    # params.yaml's data.path is relative to the repository, wherever this is run from.
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, path=str(REPO / config.data.path)))
    data = load_data(config)
    print(
        f"load average before: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs), torch default threads "
        f"{torch.get_num_threads()}",
        flush=True,
    )
    with burners(args.busy) as pids:
        arms = [config.train.val_every, *(v for v in args.val_every if v != config.train.val_every)]
        with Background(pids) as background:
            ratio = measure_ratio(data, config, args.repeats, arms)
        ratio.update(
            same_weights=same_weights(data, config),
            busy_processes=args.busy,
            background_cores=background.cores,
            train_images=images_per_epoch(len(data.train_x), config.train.batch_size),
        )
    sections = [ratio_markdown(ratio, config, args.repeats)]
    results = {
        "ratio": ratio,
        "config": {
            "epochs": config.train.epochs,
            "threads": config.train.threads,
            "val_every": config.train.val_every,
            "batch_size": config.train.batch_size,
        },
    }
    if args.threads_table:
        table_config = dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=args.table_epochs))
        results["threads"] = measure_threads(data, table_config, args.table_threads, max(1, args.busy), args.repeats)
        sections.append(f"threads ({args.table_epochs} epochs per training, {args.repeats} rounds):")
        sections.append(threads_markdown(results["threads"]))
    if args.layout_table:
        results["layouts"] = measure_layouts(data, config, args.repeats, args.smoke)
        sections.append(layouts_markdown(results["layouts"], config.train.threads))
    results["load_average_after"] = os.getloadavg()[0]
    sections.append(f"load average after: {results['load_average_after']:.2f}")
    text = "\n\n".join(sections)
    print(text)
    _common.publish("train_step", "Training loop and threads", text, args, out, argv, results)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    arguments = sys.argv[1:]
    sys.exit(exit_code(main(arguments), "--check" in arguments))
