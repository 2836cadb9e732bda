"""How the input path scales with the number of photos: images per second, peak memory, wall time.

Photos are stood in for by CIFAR-10's training JPEGs from ../shared/datasets, upscaled to 224x224
(bilinear) and saved as JPEG (quality 90), the classes balanced, for each N of --sizes (default
1,000, 5,000 and 20,000).

1. **The input path alone**: one pass over the N images in a seeded random order, batches of 64,
   each decoded to a uint8 (3, 224, 224) tensor, by calibflow's `read_batches` over an
   `ImageFiles` and by torchvision's reference, `ImageFolder` (its PIL loader) with `PILToTensor`
   and a `DataLoader` over the same batches, with the same number of worker processes
   (`data.workers`' auto value unless --workers). Each runs in a fresh process, interleaved
   (ours, reference, ours, ...) so that a busy machine weighs on both alike; the table shows the
   median img/s and the ratio. Target: ours >= 0.9x the reference.
2. **`calibflow run`** on the N images (--run-sizes, default 1,000 and 5,000: a run at 224 px
   trains at about 28 img/s on two cores), once with every split read from its files
   (`data.in_memory_max_mb=0`) and once decoded into memory (the pre-streaming path), with a
   minimal model (small_cnn, width 4, two epochs) and the default corruption suite: the peak memory
   of the process tree (PSS summed over the run and its workers, polled every 0.1 s), the wall time,
   and the corruption suite's and OOD's share of it (task times read back from Prefect); each run
   starts from a cold cache (`CALIBFLOW_CACHE_DIR`) and an empty registry (no champion). Targets:
   the streamed run's peak memory grows by under 1 GB from the smallest to the largest N; the suite
   and OOD take at most 20% of the wall time.
3. **The corruption suite alone**, on the smallest run size's streamed run (its checkpoint and test
   split): `write_shift_logits` as the flow calls it, in a fresh process each, interleaved, once
   with one cell in the network at a time and once with as many as the cores hold
   (`model_steps.suite_cells_at_once`): the seconds each (median) and whether both wrote the same
   logits to the bit.

    python benchmarks/data_scale.py [--sizes 1000 5000 20000] [--run-sizes 1000 5000] [--workers N] \\
        [--in-memory-sizes 1000]     # the in-memory run only at these sizes
    python benchmarks/data_scale.py --smoke    # 60 images of 64 px, one run each way: about a minute

Writes docs/results/data_scale.md and data_scale.json (every pass, every task's seconds: a full
run), or --out.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

CIFAR = _common.REPO.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"
SIZES, RUN_SIZES = (1000, 5000, 20000), (1000, 5000)
SIDE, QUALITY, BATCH, REPEATS, EPOCHS = 224, 90, 64, 3, 2
MEMORY_TARGET_GB, RATIO_TARGET, SUITE_SHARE_TARGET = 1.0, 0.9, 0.20
SUITE_TASKS = ("collect-shift-logits", "evaluate-shift", "evaluate-ood")
RUN_PARAMS = """\
seed: 0
data: {{path: data/photos, min_per_class: 5, in_memory_max_mb: {in_memory_max_mb}}}
model: {{arch: small_cnn, width: 4}}
train: {{epochs: {epochs}, batch_size: 32, lr: 0.05, val_every: {epochs}}}
calibration: {{max_temperature: 100}}
gates: {{max_ece: 1.0, min_accuracy: 0.0, max_ece_increase: null, max_accuracy_drop: null}}
registry: {{model_name: scale-photos, experiment: data-scale}}
"""


# ------------------------------------------------------------------ the photos


def _upscaled(job: tuple[bytes, str, str, int]) -> None:
    from PIL import Image, UnidentifiedImageError

    data, name, out, side = job
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.convert("RGB").resize((side, side), Image.Resampling.BILINEAR).save(out, quality=QUALITY)
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{name} in the archive cannot be read as an image ({error})") from None


def photos(folder: Path, n: int, side: int, source: Path | None) -> Path:
    """N images of side x side in folder/<class>/, classes balanced (the first files of each class
    by name, class by class), upscaled on every core: CIFAR-10's training JPEGs, or, without the
    archive (--smoke), the tiny digit archive of _common. A folder built from the same archive is
    reused; one built from another (its .done says which) is built again."""
    archive = Path(source or CIFAR)
    if not archive.is_file():
        raise SystemExit(f"{archive}: no such archive; ../shared/datasets/README.md says where CIFAR-10's is")
    stamp = f"{n} images of {side} px from {archive.resolve()} ({archive.stat().st_size} bytes)"
    done = folder / ".done"
    if done.is_file() and done.read_text() == stamp:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    jobs = []
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith("train/")]
        classes = sorted({m.name.split("/")[1] for m in members})
        if not classes:
            raise SystemExit(f"{archive}: no train/<class>/<image> files; an ImageFolder archive has them")
        per_class = -(-n // len(classes))
        chosen: dict[str, list[str]] = {k: [] for k in classes}
        for member in sorted(members, key=lambda m: m.name):
            label = member.name.split("/")[1]
            if len(chosen[label]) < per_class:
                chosen[label].append(member.name)
        wanted = set([name for label in classes for name in chosen[label]][:n])
        for label in classes:
            (folder / label).mkdir(parents=True, exist_ok=True)
        for member in members:  # in the archive's order: a gzip stream read backwards starts over
            if member.name in wanted:
                out = folder / member.name.split("/")[1] / f"{Path(member.name).stem}.jpg"
                jobs.append((tar.extractfile(member).read(), member.name, str(out), side))
    chunk = 64
    workers = max(1, min(len(os.sched_getaffinity(0)), -(-len(jobs) // chunk)))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_upscaled, jobs, chunksize=chunk))
    done.write_text(stamp)
    return folder


def listing(root: Path) -> tuple[list[str], list[int]]:
    """ImageFolder's order: classes sorted, files sorted within each."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    paths, labels = [], []
    for k, label in enumerate(classes):
        for path in sorted((root / label).iterdir()):
            paths.append(f"{label}/{path.name}")
            labels.append(k)
    return paths, labels


# ------------------------------------------------------------------ measuring a process tree


def peak_tree_memory(process: subprocess.Popen, every_s: float = 0.1) -> tuple[float, float]:
    """(peak memory in MB of the process and all its descendants, summed; wall seconds) until it
    exits. Each process counts its proportional set size (PSS: a page shared by k processes
    counts 1/k in each), so DataLoader workers that share torch's pages with their server are
    not counted several times over, as a sum of RSS would (800 MB too much for two workers)."""
    import psutil

    root = psutil.Process(process.pid)
    peak, started = 0, time.perf_counter()
    stop = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not stop.is_set():
            total = 0
            try:
                for member in [root, *root.children(recursive=True)]:
                    try:
                        total += member.memory_full_info().pss
                    except (psutil.Error, AttributeError):  # AttributeError: no PSS off Linux
                        try:
                            total += member.memory_info().rss
                        except psutil.Error:
                            pass
            except psutil.Error:
                break
            peak = max(peak, total)
            stop.wait(every_s)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    process.wait()
    wall = time.perf_counter() - started
    stop.set()
    watcher.join()
    return peak / 2**20, wall


def measured(command: list[str], cwd: Path, env: dict | None = None) -> tuple[float, float, str]:
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out_lines: list[str] = []
    reader = threading.Thread(target=lambda: out_lines.append(process.stdout.read()), daemon=True)
    err_lines: list[str] = []
    err_reader = threading.Thread(target=lambda: err_lines.append(process.stderr.read()), daemon=True)
    reader.start()
    err_reader.start()
    peak, wall = peak_tree_memory(process)
    reader.join()
    err_reader.join()
    if process.returncode != 0:
        raise SystemExit(f"`{' '.join(command)}` exited {process.returncode}:\n{''.join(err_lines)[-3000:]}")
    return peak, wall, "".join(out_lines)


# ------------------------------------------------------------------ 1. the input path


def read_pass(kind: str, root: str, workers: int, side: int) -> dict:
    """One pass in this process (the --child mode): images per second of the pass."""
    import torch

    paths, _ = listing(Path(root))
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(0))
    batches = [batch.tolist() for batch in order.split(BATCH)]
    started = time.perf_counter()
    seen = 0
    if kind == "calibflow":
        from calibflow.data.image_files import ImageFiles, read_batches

        for images in read_batches(ImageFiles(root, paths, "RGB", (side, side)), batches, workers=workers):
            seen += len(images)
    else:
        from torchvision import datasets, transforms

        folder = datasets.ImageFolder(root, transform=transforms.PILToTensor())
        loader = torch.utils.data.DataLoader(folder, batch_sampler=batches, num_workers=workers)
        for images, _ in loader:
            seen += len(images)
    seconds = time.perf_counter() - started
    return {"images": seen, "seconds": seconds, "img_s": seen / seconds}


def input_path(root: Path, workers: int, repeats: int, side: int) -> dict:
    runs: dict[str, list[dict]] = {"calibflow": [], "torchvision": []}
    for _ in range(repeats):
        for kind in runs:  # interleaved
            command = [sys.executable, __file__, "--child", kind, str(root), str(workers), str(side)]
            peak, wall, out = measured(command, _common.REPO)
            runs[kind].append({**json.loads(out.strip().splitlines()[-1]), "peak_memory_mb": peak, "wall": wall})
    median = {kind: statistics.median(r["img_s"] for r in rows) for kind, rows in runs.items()}
    return {
        "runs": runs,
        "img_s": median,
        "ratio": median["calibflow"] / median["torchvision"],
        "peak_memory_mb": {kind: max(r["peak_memory_mb"] for r in rows) for kind, rows in runs.items()},
    }


# ------------------------------------------------------------------ 2. calibflow run


def project(root: Path, images: Path, params: str) -> Path:
    """A git + DVC repository whose data/photos is a copy of `images` (built once, kept), with
    `params` as its params.yaml (written each time, and left out of git: one project serves
    several settings)."""
    if not (root / ".done").is_file():
        shutil.rmtree(root, ignore_errors=True)
        dvc = str(Path(sys.executable).with_name("dvc"))
        root.mkdir(parents=True)
        for command in (
            ["git", "init", "-q", "-b", "main"],
            [dvc, "init", "-q"],
            [dvc, "config", "core.analytics", "false"],
        ):
            subprocess.run(command, cwd=root, check=True, capture_output=True)
        shutil.copytree(images, root / "data" / "photos", ignore=shutil.ignore_patterns(".*"))
        (root / ".gitignore").write_text("mlflow.db\nmlruns/\nmlartifacts/\n.calibflow/\nreports/\nparams.yaml\n")
        subprocess.run([dvc, "add", "-q", "data/photos"], cwd=root, check=True, capture_output=True)
        subprocess.run(["git", "add", "-A"], cwd=root, check=True, capture_output=True)
        identity = ["-c", "user.name=calibflow benchmarks", "-c", "user.email=benchmarks@calibflow.invalid"]
        subprocess.run(["git", *identity, "commit", "-qm", "photos"], cwd=root, check=True, capture_output=True)
        (root / ".done").write_text("")
    (root / "params.yaml").write_text(params)
    return root


def calibflow_run(repo: Path, streamed: bool, api_url: str, workers: int) -> dict:
    import run_timing

    result = repo / ".calibflow" / "data_scale.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    command = [*_common.calibflow_command(), "run", "--force", "--json", str(result)]
    command += ["--set", f"data.in_memory_max_mb={0 if streamed else 1024}", "--set", f"data.workers={workers}"]
    # a cold cache each run: the two runs train the same weights, so the second would read the
    # first's corruption-suite logits (and gate-power simulation) back instead of computing them
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=repo.parent))
    env = {**os.environ, "PREFECT_API_URL": api_url, "PYTHONPATH": str(_common.REPO), "CALIBFLOW_CACHE_DIR": str(cache)}
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # the project's own store, emptied below
        env.pop(name, None)
    shutil.rmtree(repo / ".calibflow" / "cache", ignore_errors=True)
    # an empty registry each run: a champion left by an earlier run would add its comparison (the
    # champion's predictions on the shared test images) to some runs and not others
    (repo / "mlflow.db").unlink(missing_ok=True)
    for store in ("mlruns", "mlartifacts"):
        shutil.rmtree(repo / store, ignore_errors=True)
    peak, wall, _ = measured(command, repo, env)
    recorded = json.loads(result.read_text())
    flow_run_id = recorded["prefect_flow_run_id"]
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        per_task, _, _ = run_timing.task_seconds(client, flow_run_id)
    suite = sum(per_task.get(name, 0.0) for name in SUITE_TASKS)
    return {
        "streamed": streamed,
        "peak_memory_mb": peak,
        "wall": wall,
        "suite_and_ood_s": suite,
        "suite_share": suite / wall,
        "train_s": per_task.get("train-model", 0.0),
        "task_seconds": per_task,  # every task's, to see where the rest of the wall went
        "run_dir": str(repo / ".calibflow" / "runs" / recorded["run_id"]),
    }


# ------------------------------------------------------------------ 3. the suite alone

SUITE_ARMS = ("one cell at a time", "cells at once")


def suite_pass(arm: str, repo: str, run_dir: str, out: str) -> dict:
    """One `write_shift_logits` of the default suite on a run's test split, as the flow calls it
    (train.threads 1, no cache), in this process: its seconds and the cells it read at once."""
    from unittest import mock

    from calibflow.config import load_config
    from calibflow.evaluation.shift import suite_of
    from calibflow.pipeline import model_steps

    os.chdir(repo)
    config = load_config("params.yaml")  # the project's, as its run read them
    suite = suite_of(config.shift, seed=config.seed)
    from calibflow.training.loop import intra_op_threads

    with intra_op_threads(config.train.threads):  # as write_shift_logits reads it
        at_once = 1 if arm == SUITE_ARMS[0] else model_steps.suite_cells_at_once("cpu")
    with mock.patch.object(model_steps, "suite_cells_at_once", lambda device: at_once):
        started = time.perf_counter()
        model_steps.write_shift_logits(
            f"{run_dir}/checkpoint.pt",
            "data/photos",
            f"{run_dir}/manifest.csv",
            f"{run_dir}/splits.json",
            suite,
            out,
            device="cpu",
            cache_dir=None,
            threads=config.train.threads,
        )
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "cells_at_once": at_once, "cells": len(suite.cells)}


def suite_alone(repo: Path, run_dir: str, repeats: int) -> dict:
    passes: dict[str, list[dict]] = {arm: [] for arm in SUITE_ARMS}
    outs = {arm: str(repo.parent / f"suite-{i}.npz") for i, arm in enumerate(SUITE_ARMS)}
    env = {**os.environ, "PYTHONPATH": str(_common.REPO)}
    for repeat in range(repeats):
        for arm in SUITE_ARMS if repeat % 2 == 0 else SUITE_ARMS[::-1]:
            command = [sys.executable, __file__, "--suite-child", arm, str(repo), run_dir, outs[arm]]
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"the suite pass ({arm}) exited {done.returncode}:\n{done.stderr[-3000:]}")
            passes[arm].append(json.loads(done.stdout.strip().splitlines()[-1]))
    import numpy as np

    first, second = (np.load(outs[arm]) for arm in SUITE_ARMS)
    same = sorted(first.files) == sorted(second.files) and all(np.array_equal(first[k], second[k]) for k in first.files)
    seconds = {arm: statistics.median(p["seconds"] for p in passes[arm]) for arm in SUITE_ARMS}
    with np.load(outs[SUITE_ARMS[0]]) as logits:
        images = len(logits["labels"])
    return {
        "passes": passes,
        "seconds": seconds,
        "speedup": seconds[SUITE_ARMS[0]] / seconds[SUITE_ARMS[1]],
        "cells_at_once": passes[SUITE_ARMS[1]][0]["cells_at_once"],
        "cells": passes[SUITE_ARMS[1]][0]["cells"],
        "images": images,
        "same_logits": same,
    }


# ------------------------------------------------------------------ the table


def render(
    inputs: dict[int, dict],
    runs: dict[int, list[dict]],
    workers: int,
    side: int,
    suite: dict | None = None,
    source: str = "CIFAR-10 training JPEGs",
) -> str:
    lines = [
        f"Photos: {source} upscaled to {side}x{side}. Input path: one pass in a seeded random "
        f"order, batches of {BATCH}, {workers} DataLoader worker(s), median of the interleaved repeats; "
        f"peak memory: PSS summed over the process tree.",
        "",
        "| images | calibflow img/s | torchvision img/s | ratio | target | calibflow peak memory | torchvision peak memory |",
        "| ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for n, row in inputs.items():
        met = "met" if row["ratio"] >= RATIO_TARGET else "NOT met"
        lines.append(
            f"| {n:,} | {row['img_s']['calibflow']:.0f} | {row['img_s']['torchvision']:.0f} | {row['ratio']:.2f}x "
            f"| >= {RATIO_TARGET}x: {met} | {row['peak_memory_mb']['calibflow']:,.0f} MB "
            f"| {row['peak_memory_mb']['torchvision']:,.0f} MB |"
        )
    if runs:
        lines += [
            "",
            "`calibflow run` (small_cnn width 4, two epochs, default corruption suite; a cold cache and an empty "
            "registry each run), every split read from its files (streamed) or decoded into memory:",
            "",
            "| images | splits | peak memory | wall | training | suite + OOD | suite + OOD share | share target |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for n, pair in runs.items():
            for r in pair:
                met = "met" if r["suite_share"] <= SUITE_SHARE_TARGET else "NOT met"
                lines.append(
                    f"| {n:,} | {'streamed' if r['streamed'] else 'in memory'} | {r['peak_memory_mb']:,.0f} MB "
                    f"| {r['wall']:.0f} s | {r['train_s']:.0f} s | {r['suite_and_ood_s']:.0f} s "
                    f"| {r['suite_share']:.0%} | <= {SUITE_SHARE_TARGET:.0%}: {met} |"
                )
        streamed = {n: next(r for r in pair if r["streamed"]) for n, pair in runs.items()}
        smallest, largest = min(streamed), max(streamed)
        growth = (streamed[largest]["peak_memory_mb"] - streamed[smallest]["peak_memory_mb"]) / 1024
        met = "met" if growth < MEMORY_TARGET_GB else "NOT met"
        lines += [
            "",
            f"Streamed peak memory from {smallest:,} to {largest:,} images: {growth:+.2f} GB "
            f"(target: under {MEMORY_TARGET_GB:.0f} GB from 1,000 to 20,000 images: {met} over these sizes).",
        ]
    if suite:
        one, many = (suite["seconds"][arm] for arm in SUITE_ARMS)
        lines += [
            "",
            f"The corruption suite alone ({suite['cells']} cells of the {suite['n']:,}-photo run's "
            f"{suite['images']:,} test images, `write_shift_logits` in a fresh process each, train.threads 1, "
            f"median of {len(suite['passes'][SUITE_ARMS[0]])} interleaved): one cell in the network at a time "
            f"{one:.1f} s, {suite['cells_at_once']} at once {many:.1f} s ({suite['speedup']:.2f}x); "
            f"the same logits to the bit: {'yes' if suite['same_logits'] else 'NO'}.",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["--suite-child"]:
        print(json.dumps(suite_pass(*arguments[1:5])))
        return {}
    if arguments[:1] == ["--child"]:
        kind, root, workers, side = arguments[1:5]
        print(json.dumps(read_pass(kind, root, int(workers), int(side))))
        return {}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_arguments(parser)
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="input-path sizes (default 1000 5000 20000)")
    parser.add_argument(
        "--run-sizes", type=int, nargs="*", default=None, help="calibflow run sizes (default 1000 5000)"
    )
    parser.add_argument(
        "--in-memory-sizes",
        type=int,
        nargs="*",
        default=None,
        help="run sizes also run decoded into memory (default: every run size; 20,000 photos decoded need 3 GB)",
    )
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: data.workers' auto)")
    parser.add_argument("--repeats", type=int, default=None, help=f"input-path passes each (default {REPEATS})")
    parser.add_argument("--work", type=Path, default=None, help="where the photos and projects are built (kept)")
    args = parser.parse_args(argv)
    out = _common.results_dir(args, parser)
    from calibflow.data.image_files import auto_workers

    side = 64 if args.smoke else SIDE
    sizes = args.sizes or ([60] if args.smoke else list(SIZES))
    run_sizes = args.run_sizes if args.run_sizes is not None else ([60] if args.smoke else list(RUN_SIZES))
    workers = args.workers if args.workers is not None else (1 if args.smoke else auto_workers())
    repeats = args.repeats or (1 if args.smoke else REPEATS)
    epochs = 10 if args.smoke else EPOCHS  # the smoke's 60 images learn nothing in fewer
    work = args.work or (out / "data_scale_work" if args.smoke else Path("/tmp/calibflow-data-scale"))
    source = None
    if args.smoke:  # the tiny digit archive, not the 20 MB CIFAR-10 one
        source = _common.image_archive(work / "digits.tar.gz", [str(k) for k in range(3)], 20, 0, size=16)

    inputs = {}
    for n in sizes:
        root = photos(work / f"photos-{side}-{n}", n, side, source)
        inputs[n] = input_path(root, workers, repeats, side)
        print(f"input path, {n} images: {inputs[n]['ratio']:.2f}x", file=sys.stderr, flush=True)
    runs: dict[int, list[dict]] = {}
    if run_sizes:
        import run_timing

        with run_timing.temporary_server() as api_url:
            for n in run_sizes:
                repo = project(
                    work / f"project-{side}-{n}",
                    photos(work / f"photos-{side}-{n}", n, side, source),
                    RUN_PARAMS.format(in_memory_max_mb=1024, epochs=epochs),
                )
                modes = (True, False) if args.in_memory_sizes is None or n in args.in_memory_sizes else (True,)
                runs[n] = [calibflow_run(repo, streamed, api_url, workers) for streamed in modes]
                print(f"calibflow run, {n} images: done", file=sys.stderr, flush=True)
    suite = None
    if runs:
        n = min(runs)
        streamed = next(r for r in runs[n] if r["streamed"])
        repo = work / f"project-{side}-{n}"
        suite = {"n": n, **suite_alone(repo, streamed["run_dir"], repeats)}
        print(f"the suite alone: {suite['speedup']:.2f}x", file=sys.stderr, flush=True)
    text = render(inputs, runs, workers, side, suite, "digits" if args.smoke else "CIFAR-10 training JPEGs")
    print(text)
    data = {"inputs": inputs, "runs": runs, "workers": workers, "side": side, "suite_alone": suite}
    _common.publish("data_scale", "Data scale: the input path at photo size", text, args, out, argv, data)
    if not args.smoke:  # every pass and every task's seconds, beside the table they make
        (out / "data_scale.json").write_text(json.dumps(_common.jsonable(data), indent=1))
    return data


if __name__ == "__main__":
    main()
