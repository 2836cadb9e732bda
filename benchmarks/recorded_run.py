"""A recorded `calibflow run` on a photo-sized dataset, end to end: what a team moving its photo
classifier onto calibflow would see on its first run.

Photos are stood in for by CIFAR-10's training JPEGs from ../shared/datasets, each upscaled
(bilinear) to its own random size, the shorter side 128 to 224 px and the aspect 3:4 to 4:3, and
saved as JPEG (quality 90): --images of them (default 10,000), the ten classes balanced. The run
uses data.image_size (default 128: torchvision's reference RandomResizedCrop for training,
Resize + CenterCrop for everything else), every split read from its files a batch at a time
(the default data.in_memory_max_mb would keep the 10,000 photos' 0.5 GB at 128 px in memory; the
point here is the path that scales), small_cnn, the default corruption suite and the default
gates except min_accuracy (a two-epoch small CNN on CIFAR-10 does not reach the default 0.75).

Recorded: whether it registered or which gate refused it (exit 1 is a result, not a failure of
the benchmark), the peak memory of the process tree (PSS summed over the run and its DataLoader
workers, polled every 0.1 s), the wall time, each Prefect task's time, and the test metrics.

    python benchmarks/recorded_run.py [--images 10000] [--side 128] [--epochs 2]
    python benchmarks/recorded_run.py --smoke     # 60 images, about a minute

Writes docs/results/recorded_run.md (a full run), or --out.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import data_scale  # noqa: E402

IMAGES, SIDE, EPOCHS, QUALITY = 10_000, 128, 2, 90
SHORTEST, LONGEST_SHORT_SIDE = 128, 224  # the photos' shorter side, drawn uniformly in pixels
MIN_ACCURACY = 0.3
PARAMS = """\
seed: 0
data: {{path: data/photos, image_size: {side}, in_memory_max_mb: 0, min_side: {min_side}}}
model: {{arch: small_cnn, width: 8}}
train: {{epochs: {epochs}, batch_size: 64, lr: 0.05, val_every: {epochs}, hflip: true}}
gates: {{min_accuracy: {min_accuracy}}}
registry: {{model_name: recorded-photos, experiment: recorded-run}}
"""


def mixed_size_photos(folder: Path, n: int, shortest: int, longest_short_side: int, source: Path) -> Path:
    """N photos in folder/<class>/ of seeded random sizes: the shorter side in [shortest,
    longest_short_side], the aspect in [3/4, 4/3], either way round."""
    if (folder / ".done").is_file():
        return folder
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    shutil.rmtree(folder, ignore_errors=True)
    with tarfile.open(source) as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.isfile() and m.name.startswith("train/")), key=lambda m: m.name
        )
        classes = sorted({m.name.split("/")[1] for m in members})
        per_class = -(-n // len(classes))
        chosen = {k: [m for m in members if m.name.split("/")[1] == k][:per_class] for k in classes}
        written = 0
        for label in classes:
            (folder / label).mkdir(parents=True, exist_ok=True)
            for member in chosen[label]:
                if written == n:
                    break
                short = int(rng.integers(shortest, longest_short_side + 1))
                long = int(round(short * rng.uniform(1.0, 4.0 / 3.0)))
                size = (long, short) if rng.random() < 0.5 else (short, long)
                with tar.extractfile(member) as handle, Image.open(handle) as image:
                    photo = image.convert("RGB").resize(size, Image.Resampling.BILINEAR)
                    photo.save(folder / label / f"{Path(member.name).stem}.jpg", quality=QUALITY)
                written += 1
    (folder / ".done").write_text(str(n))
    return folder


def recorded_run(repo: Path, api_url: str) -> dict:
    """One `calibflow run`, from a cold cache: its exit code, verdict, peak memory, wall time,
    task times and test metrics."""
    import psutil

    import run_timing

    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=repo.parent))
    env = {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "PYTHONPATH": str(_common.REPO),
        "CALIBFLOW_CACHE_DIR": str(cache),
        # the project's own store, which run_record reads, whatever store the caller's environment names
        "MLFLOW_TRACKING_URI": f"sqlite:///{repo.resolve() / 'mlflow.db'}",
    }
    command = [*_common.calibflow_command(), "run", "--force"]
    process = subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_mb, wall = data_scale.peak_tree_memory(process)
    out, err = process.communicate()
    if process.returncode not in (0, 1):
        raise SystemExit(f"`{' '.join(command)}` exited {process.returncode}:\n{err[-3000:]}")
    # read back from the run's MLflow record, which a refused run has too (its --json is written
    # only when it registers)
    try:
        summary = run_record(repo)
    except LookupError as error:
        raise SystemExit(f"`{' '.join(command)}` exited {process.returncode} and {error}:\n{err[-3000:]}") from error
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        per_task, _, _ = run_timing.task_seconds(client, summary["prefect_flow_run_id"])
    shutil.rmtree(cache, ignore_errors=True)
    return {
        "exit_code": process.returncode,
        # the CLI's one-line verdict: on stdout when registered, on stderr when refused
        "verdict": next((line for line in (out + err).splitlines() if line.startswith("calibflow run:")), ""),
        "peak_memory_mb": peak_mb,
        "wall_s": wall,
        "task_seconds": per_task,
        "summary": summary,
        "cores": psutil.cpu_count(logical=True),
    }


def run_record(repo: Path) -> dict:
    """The latest run of the project's MLflow store: its test metrics before and after calibration,
    temperature, gate verdicts and Prefect flow run."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("recorded-run")
    runs = (
        client.search_runs([experiment.experiment_id], order_by=["start_time DESC"], max_results=1)
        if experiment
        else []
    )
    if not runs:
        raise LookupError(f"no run was logged to {repo / 'mlflow.db'}")
    run = runs[0]
    metrics, tags = run.data.metrics, run.data.tags

    def split(kind: str) -> dict:
        prefix = f"test/{kind}/"
        return {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)}

    return {
        "run_id": run.info.run_id,
        "prefect_flow_run_id": tags["prefect.flow_run_id"],
        "test_before": split("uncalibrated"),
        "test_after": split("calibrated"),
        "temperature": metrics.get("calibration/temperature"),
        "gates": {k.removeprefix("gate/"): v for k, v in tags.items() if k.startswith("gate/")},
        "verdict": {k.removeprefix("verdict/"): v for k, v in tags.items() if k.startswith("verdict/")},
    }


def render(record: dict, n: int, side: int, epochs: int, sides: tuple[int, int]) -> str:
    summary, tasks = record["summary"], record["task_seconds"]
    registered = record["exit_code"] == 0
    outcome = (
        f"registered (exit 0): {record['verdict']}"
        if registered
        else f"refused by a gate (exit 1), nothing registered: {record['verdict']}"
    )
    lines = [
        f"{n:,} photos of mixed sizes (CIFAR-10 training JPEGs upscaled to a shorter side of {sides[0]}-"
        f"{sides[1]} px, aspect 3:4 to 4:3), `data.image_size: {side}`, every split read from its files, "
        f"small_cnn width 8, {epochs} epochs, the default corruption suite and gates (min_accuracy {MIN_ACCURACY}); "
        f"{record['cores']} cores, no GPU, cold cache.",
        "",
        f"- **Outcome:** {outcome}",
        f"- **Peak memory** (PSS summed over the run and its DataLoader workers): {record['peak_memory_mb'] / 1024:.2f} GB",
        f"- **Wall time:** {record['wall_s'] / 60:.1f} min",
        "",
        "| task | seconds | share of the wall |",
        "| --- | ---: | ---: |",
    ]
    for name, seconds in sorted(tasks.items(), key=lambda item: -item[1])[:10]:
        lines.append(f"| {name} | {seconds:.0f} | {seconds / record['wall_s']:.0%} |")
    before, after = summary.get("test_before") or {}, summary.get("test_after") or {}
    if after:
        lines += [
            "",
            f"Test split: accuracy {after['accuracy']:.3f}; ECE (15 bins) {before['ece']:.3f} before temperature "
            f"scaling, {after['ece']:.3f} after (T = {summary['temperature']:.2f}); NLL {before['nll']:.3f} before, "
            f"{after['nll']:.3f} after.",
        ]
    if summary.get("gates"):
        lines += ["", "Gates:", ""] + [f"- `{name}`: {verdict}" for name, verdict in sorted(summary["gates"].items())]
    suite = sum(tasks.get(name, 0.0) for name in data_scale.SUITE_TASKS)
    lines += [
        "",
        f"The corruption suite and OOD scoring took {suite:.0f} s, {suite / record['wall_s']:.0%} of the wall "
        f"(target at 224 px: at most {data_scale.SUITE_SHARE_TARGET:.0%}).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_arguments(parser)
    parser.add_argument("--images", type=int, default=None, help=f"photos (default {IMAGES:,})")
    parser.add_argument("--side", type=int, default=None, help=f"data.image_size (default {SIDE})")
    parser.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {EPOCHS})")
    parser.add_argument("--work", type=Path, default=None, help="where the photos and the project are built (kept)")
    args = parser.parse_args(argv)
    out = _common.results_dir(args, parser)
    n = args.images or (60 if args.smoke else IMAGES)
    side = args.side or (32 if args.smoke else SIDE)
    epochs = args.epochs or (10 if args.smoke else EPOCHS)
    work = args.work or (out / "recorded_run_work" if args.smoke else Path("/tmp/calibflow-recorded-run"))
    shortest, longest = (40, 64) if args.smoke else (SHORTEST, LONGEST_SHORT_SIDE)
    if args.smoke:  # the tiny digit archive, not the CIFAR-10 one
        source = _common.image_archive(work / "digits.tar.gz", [str(k) for k in range(3)], 20, 0, size=16)
    else:
        source = data_scale.CIFAR
    photos = mixed_size_photos(work / f"photos-{n}-{shortest}-{longest}", n, shortest, longest, source)
    params = PARAMS.format(side=side, min_side=min(shortest, side), epochs=epochs, min_accuracy=MIN_ACCURACY)
    if args.smoke:
        params += "shift: {corruptions: [gaussian_noise], severities: [1], max_images: 20}\n"
        params += "split: {train: 0.5, val: 0.1, calibration: 0.2, test: 0.2}\n"
        params += "calibration: {min_temperature: 0.01, max_temperature: 100}\n"
        params = params.replace(
            f"min_accuracy: {MIN_ACCURACY}",
            "min_accuracy: 0.0, max_ece: 1.0, max_ece_increase: null, max_accuracy_drop: null",
        )
    repo = data_scale.project(work / f"project-{n}", photos, params)
    import run_timing

    with run_timing.temporary_server() as api_url:
        record = recorded_run(repo, api_url)
    text = render(record, n, side, epochs, (shortest, longest))
    print(text)
    data = {**record, "images": n, "side": side, "epochs": epochs}
    _common.publish("recorded_run", "A recorded run on photos of mixed sizes", text, args, out, argv, data)
    return data


if __name__ == "__main__":
    main()
