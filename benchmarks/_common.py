"""What every benchmark shares: the --smoke and --out options, the results file, and the tiny
inputs a smoke run works on. Not a benchmark: tests/test_benchmarks_smoke.py runs every script of
benchmarks/ whose name does not start with an underscore.

The convention each benchmark follows:

- a full run (no --smoke) writes its results as markdown to docs/results/<name>.md (or --out DIR),
  under a header naming the command, the date and the git commit, so a number in the docs can be
  traced to the run that measured it;
- `--smoke` runs the same code at tiny sizes in seconds, to show that the benchmark still runs,
  and writes <name>.md and <name>.json (the figures behind the table) into --out DIR, or a new
  temporary folder; never into docs/. Its numbers measure nothing.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
RESULTS = DOCS / "results"

# The project a smoke run of an end-to-end benchmark works in: three digit classes, a network that
# trains in a second, a one-cell corruption suite, and gates that any model passes (every run
# registers, so the commands that read the registry have a champion to read).
SMOKE_PARAMS = """\
seed: 0
data:
  path: data/tiny
  min_per_class: 10
split: {train: 0.5, val: 0.1, calibration: 0.2, test: 0.2}
model: {arch: small_cnn, width: 8}
train: {epochs: 10, batch_size: 32, lr: 0.05, val_every: 5}
calibration: {min_temperature: 0.01}
shift: {corruptions: [gaussian_noise], severities: [1], max_images: 50}
gates: {max_ece: 1.0, min_accuracy: 0.0, max_ece_increase: null, max_accuracy_drop: null}
registry: {model_name: smoke-digits, experiment: smoke}
"""
SMOKE_MODEL = "smoke-digits"


def calibflow_command(code_dir: Path = REPO) -> list[str]:
    """What the `calibflow` script runs, for the code in code_dir (on PYTHONPATH), whichever
    checkout the interpreter's editable install points at: the `cli` package, or `calibflow.cli`
    in code that predates it (a benchmark's --baseline)."""
    return [sys.executable, "-m", "cli" if (code_dir / "cli" / "__main__.py").is_file() else "calibflow.cli"]


def add_arguments(parser: argparse.ArgumentParser, out_help: str | None = None) -> None:
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, seconds: checks that the benchmark runs; its numbers measure nothing. "
        "Results go to --out (default: a new temporary folder), never to docs/",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=out_help or "folder for <name>.md (default docs/results/; with --smoke a new temporary folder)",
    )


def results_dir(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    """Where this run's results go: --out, docs/results/ for a full run, a temporary folder for a
    smoke run. A smoke run's numbers measure nothing, so they must not land in the docs."""
    if args.out is not None:
        out = args.out.resolve()
        if args.smoke and out.is_relative_to(DOCS.resolve()):
            parser.error(f"--smoke writes nothing under docs/ (--out {args.out}): its numbers measure nothing")
    elif args.smoke:
        out = Path(tempfile.mkdtemp(prefix="calibflow-smoke-"))
    else:
        out = RESULTS
    out.mkdir(parents=True, exist_ok=True)
    return out


def _git(*arguments: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPO), *arguments], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def provenance(name: str, argv: list[str], smoke: bool) -> str:
    """The header line of a results file: the command, the date and the commit that produced it."""
    command = shlex.join(["python", f"benchmarks/{name}.py", *map(str, argv)])
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = " with uncommitted changes" if _git("status", "--porcelain", "--untracked-files=no") else ""
    line = f"Written by `{command}` on {time.strftime('%Y-%m-%d', time.gmtime())}, commit {commit}{dirty}"
    if smoke:
        return line + ". A smoke run: tiny sizes that check the benchmark runs; these numbers measure nothing."
    return line + "; the next full run of the benchmark overwrites this file."


def jsonable(value: Any) -> Any:
    """`value` with numpy scalars and arrays, tuples and paths made JSON types (NaN kept as NaN)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return jsonable(value.tolist())
    return value


def publish(
    name: str, title: str, body: str, args: argparse.Namespace, out: Path, argv: list[str] | None, data: Any = None
) -> Path:
    """Write out/<name>.md (title, provenance, body); with --smoke also out/<name>.json (`data`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = out / f"{name}.md"
    path.write_text(f"# {title}\n\n{provenance(name, argv, args.smoke)}\n\n{body.strip()}\n")
    if args.smoke and data is not None:
        (out / f"{name}.json").write_text(json.dumps(jsonable(data), indent=1, allow_nan=True))
    print(f"results: {path}", flush=True)
    return path


def publish_record(
    name: str, title: str, text: str, record: Any, args: argparse.Namespace, out: Path, argv: list[str] | None
) -> Path:
    """publish(), with the record (made JSON-safe) also written to --json when the benchmark has it."""
    data = jsonable(record)
    json_path = getattr(args, "json_path", None)
    if json_path:
        json_path.write_text(json.dumps(data, indent=1) + "\n")
    return publish(name, title, text, args, out, argv, data)


# ------------------------------------------------------------------ tiny inputs for smoke runs


def _run(command: list[str], cwd: Path) -> None:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"`{' '.join(command)}` failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


def smoke_project(root: Path) -> Path:
    """A git + DVC repository holding data/tiny (120 noisy digits, 3 classes) and SMOKE_PARAMS:
    what `calibflow run` needs, in a few seconds."""
    from calibflow.data.prepare import NOISE_SD, write_digits

    dvc = str(Path(sys.executable).with_name("dvc"))
    root.mkdir(parents=True, exist_ok=True)
    _run(["git", "init", "-q", "-b", "main"], root)
    _run([dvc, "init", "-q"], root)
    _run([dvc, "config", "core.analytics", "false"], root)
    # the default dataset's pixel noise: the network makes mistakes, so a temperature can be fitted
    write_digits(root / "data" / "tiny", classes=(0, 1, 2), per_class=40, noise_sd=NOISE_SD)
    (root / "params.yaml").write_text(SMOKE_PARAMS)
    (root / "dvc.yaml").write_text("metrics:\n  - reports/metrics.json\n")
    (root / ".gitignore").write_text("mlflow.db\nmlruns/\nmlartifacts/\n.calibflow/\nreports/metrics.json\n")
    _run([dvc, "add", "-q", "data/tiny"], root)
    _run(["git", "add", "-A"], root)
    identity = ["-c", "user.name=calibflow benchmarks", "-c", "user.email=benchmarks@calibflow.invalid"]
    _run(["git", *identity, "commit", "-qm", "smoke project"], root)
    return root


def train_smoke_project(root: Path) -> Path:
    """smoke_project(root) with one `calibflow run` done: SMOKE_MODEL has a @champion."""
    smoke_project(root)
    _run([sys.executable, "-m", "cli", "run"], root)
    return root


def _digit_images(size: int, rgb: bool, noise_sd: float):
    """scikit-learn's digits as uint8 images of size x size (nearest-neighbour upscaling) with
    seeded pixel noise, tinted when rgb, and their labels: stand-ins for photographs
    that a small network learns in seconds without getting every one right (a temperature fit
    needs some mistakes)."""
    import numpy as np
    from sklearn.datasets import load_digits

    from calibflow.data.prepare import add_noise

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = images.repeat(-(-size // 8), axis=1).repeat(-(-size // 8), axis=2)[:, :size, :size]
    images = add_noise(images, noise_sd, seed=0)
    if rgb:
        tint = np.array([[1.0, 0.4, 0.4], [0.4, 1.0, 0.4], [0.4, 0.4, 1.0], [1.0, 1.0, 0.4], [0.4, 1.0, 1.0]])
        # the tint cycles over images, not classes: colour must not give the class away
        images = np.rint(images[..., None] * tint[np.arange(len(images)) % len(tint)][:, None, None, :])
        images = images.astype(np.uint8)
    return images, digits.target


def image_archive(
    path: Path,
    classes: list[str],
    train_per_class: int,
    test_per_class: int,
    size: int = 32,
    rgb: bool = True,
    suffix: str = ".jpg",
    noise_sd: float = 60.0,
) -> Path:
    """A .tar.gz laid out as the CIFAR-10 and MNIST archives of ../shared/datasets are
    (train/<class>/NNNN<suffix>, test/<class>/NNNN<suffix>): class i holds digit i's images."""
    from PIL import Image

    images, labels = _digit_images(size, rgb, noise_sd)
    staging = path.parent / f".{path.name}.d"
    for k, name in enumerate(classes):
        mine = images[labels == k]
        if len(mine) < train_per_class + test_per_class:
            raise ValueError(f"digit {k} has {len(mine)} images, fewer than {train_per_class + test_per_class}")
        for split, chosen in (("train", mine[:train_per_class]), ("test", mine[train_per_class:][:test_per_class])):
            folder = staging / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for n, image in enumerate(chosen):
                Image.fromarray(image).save(folder / f"{n:04d}{suffix}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(staging / split, arcname=split)
    return path
