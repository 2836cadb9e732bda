"""The default run's headline numbers and reliability diagram, from the real pipeline.

What `make run` does, in a fresh copy of this checkout: the checkout's files (tracked and
untracked, not ignored) copied into a new git repository, `dvc repro prepare` (the embedded default
data), then `calibflow run --force --json PATH` on params.yaml, in its own process, with its own
MLflow store (the copy's `mlflow.db`: no registry of yours is touched). The code that runs is this
checkout's (the installed `calibflow`). The run's `--json` result and its `reports/metrics.json` are
read back (and checked to agree), and written to

- `docs/results/default_run.json`: every run's numbers, the command, date and git commit;
- `docs/results/default_run.md`: the same as tables;
- `docs/images/default-digits-reliability.png`: the run's `reports/plots/reliability_diagram.png`
  (test split, before and after calibration) for the first seed;
- README.md, between `<!-- BEGIN default_run -->` and `<!-- END default_run -->`: the headline
  table of the first seed (`--no-readme` leaves README.md alone).

`tests/test_readme.py` runs the default pipeline again and checks README.md and
`docs/results/default_run.json` against what it produced.

    python benchmarks/default_run.py                  # seed 0 (params.yaml's), about 1.5 min on 2 cores
    python benchmarks/default_run.py --seeds 0-4      # and the spread over seeds 0-4 (one run each)
    python benchmarks/default_run.py --smoke --out /tmp/default-run   # a 2-epoch run, files under --out only

Each seed runs in its own fresh copy (so no run is compared against another's champion). The
default run is deterministic on one CPU: the same code, data and params give the same numbers to
the last digit (locked versions, `train.threads: 1`). On another CPU they need not: the kernels a
CPU training runs (oneDNN's convolutions, MKL's GEMM, ATen's vectorised loops) are picked by the
CPU's vendor and instruction sets, each rounds its own way, and 30 epochs turn those last bits into
another model, as another seed would (seed 0 gave T 1.4425 on the CPU of the 2026-12-06 record
and 1.5027 on an AMD EPYC with AVX-512 BF16, from the same code). So the record names the CPU it
was made on (`cpu_signature`), and the README test checks the numbers on that CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NAME = "default_run"
IMAGE_NAME = "default-digits-reliability.png"
BEGIN, END = "<!-- BEGIN default_run -->", "<!-- END default_run -->"
# A quick run that exercises every step of this script: few epochs, no corruption suite, gates
# any model passes (the numbers mean nothing).
SMOKE_OVERRIDES = (
    "train.epochs=2",
    "shift.corruptions=[]",
    "shift.severities=[]",
    "gates.max_ece=1.0",
    "gates.min_accuracy=0.0",
)
QUIET = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
    "PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
}
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "calibflow benchmark",
    "GIT_AUTHOR_EMAIL": "benchmark@calibflow.invalid",
    "GIT_COMMITTER_NAME": "calibflow benchmark",
    "GIT_COMMITTER_EMAIL": "benchmark@calibflow.invalid",
}


def environment() -> dict[str, str]:
    """The run's environment: this venv first on PATH, telemetry off, and the copy's own MLflow
    store (a MLFLOW_TRACKING_URI of yours would send the run to your server)."""
    env = {**QUIET, **os.environ, **GIT_IDENTITY}
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} exited {result.returncode} in {cwd}:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return result


def checkout_files(source: Path = REPO) -> list[str]:
    """The checkout's files as git sees them: tracked, and untracked but not ignored."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=source,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sorted({name for name in listed.split("\0") if name})


def prepare_workspace(dest: Path, source: Path = REPO, env: dict[str, str] | None = None) -> Path:
    """A fresh repository holding the checkout's files and the default data, as `make run` finds
    it on a fresh clone after `dvc repro prepare`. Returns its root."""
    env = env or environment()
    dest.mkdir(parents=True, exist_ok=False)
    for name in checkout_files(source):
        path = source / name
        if path.is_symlink() or not path.is_file():  # a file deleted in the working tree, or a link
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    _run(["git", "init", "-q", "-b", "main"], dest, env)
    _run(["git", "add", "-A"], dest, env)
    _run(["git", "commit", "-qm", "calibflow checkout"], dest, env)
    _run([str(BIN / "dvc"), "repro", "-q", "prepare"], dest, env)
    _run(["git", "add", "-A"], dest, env)  # dvc.lock, when the stage's record changed
    _run(["git", "commit", "-qm", "dvc repro prepare", "--allow-empty"], dest, env)
    return dest


def _params_seed(repo: Path) -> int:
    return int(yaml.safe_load((repo / "params.yaml").read_text()).get("seed", 0))


def run_default(repo: Path, seed: int, overrides: tuple[str, ...] = (), env: dict[str, str] | None = None) -> dict:
    """`calibflow run --force` in `repo` (with --set seed=N when N is not params.yaml's seed):
    its numbers, checked against the reports/metrics.json it wrote."""
    env = env or environment()
    result_path = repo / ".calibflow-default-run.json"
    sets = [f"seed={seed}"] if seed != _params_seed(repo) else []
    sets += list(overrides)
    command = ["calibflow", "run", "--force", *(arg for s in sets for arg in ("--set", s)), "--json"]
    start = time.perf_counter()
    _run([str(BIN / "calibflow"), *command[1:], str(result_path)], repo, env)
    wall = time.perf_counter() - start
    result = json.loads(result_path.read_text())
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    for side, key in (("uncalibrated", "test_before"), ("calibrated", "test_after")):
        if metrics["test"][side] != result[key]:
            raise RuntimeError(f"reports/metrics.json test.{side} differs from the run's --json {key}")
    if metrics["calibration"].get("temperature") != result["temperature"]:
        raise RuntimeError("reports/metrics.json calibration.temperature differs from the run's --json")
    checks = {check["name"]: check for check in result["gates"]["checks"]}
    return {
        "seed": seed,
        "command": " ".join([*command, "PATH"]),
        "overrides": sets,
        "model": f"{result['model_name']} version {result['version']} @{result['alias']}",
        "calibration_method": result["calibration_method"],
        "temperature": result["temperature"],
        "test_images": result["gates"]["n_samples"],
        "test_before": result["test_before"],
        "test_after": result["test_after"],
        "calibration_split_nll": {
            "before": metrics["calibration"]["uncalibrated_nll"],
            "after": metrics["calibration"]["calibrated_nll"],
        },
        "gates_passed": result["gates"]["passed"],
        "gates": {
            name: {key: check[key] for key in ("metric", "value", "bound", "threshold", "comparison", "passed")}
            for name, check in checks.items()
        },
        "estimates": result["gates"].get("estimates", {}),
        "shift_mean_ece": {  # the corruption suite's mean ECE over its cells (None when the suite is off)
            "before": metrics.get("shift", {}).get("uncalibrated", {}).get("mean_ece"),
            "after": metrics.get("shift", {}).get("calibrated", {}).get("mean_ece"),
        },
        "wall_s": round(wall, 1),
    }


# The instruction sets that pick a CPU training's kernels.
ISA_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
)


def cpu_signature() -> dict[str, str]:
    """What decides a CPU training's last bits here: the architecture, the vendor and model of the
    first CPU (/proc/cpuinfo), its instruction sets among ISA_FLAGS, and the kernel level torch
    dispatches to."""
    import platform

    import torch

    first: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        first[key.strip()] = value.strip()
    flags = set(first.get("flags", "").split())
    return {
        "machine": platform.machine(),
        "vendor": first.get("vendor_id", "unknown"),
        "model": first.get("model name", platform.processor() or "unknown"),
        "isa": " ".join(flag for flag in ISA_FLAGS if flag in flags),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()


def parse_seeds(text: str) -> list[int]:
    """'0-4' -> [0, 1, 2, 3, 4]; '0,3,7' -> [0, 3, 7]."""
    seeds: list[int] = []
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        seeds += list(range(int(low), int(high or low) + 1))
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"seeds {text!r}: distinct non-negative integers, e.g. 0-4 or 0,3")
    return seeds


# What the README's headline shows, in order: (label, how to read it from a run record, decimals).
HEADLINE = (
    ("fitted temperature T", lambda r: r["temperature"], 4),
    ("accuracy", lambda r: r["test_after"]["accuracy"], 4),
    ("ECE (15 bins) before scaling", lambda r: r["test_before"]["ece"], 4),
    ("ECE (15 bins) after scaling", lambda r: r["test_after"]["ece"], 4),
    ("NLL before scaling", lambda r: r["test_before"]["nll"], 4),
    ("NLL after scaling", lambda r: r["test_after"]["nll"], 4),
    ("smooth ECE after scaling, its 95% upper bound (gate `max_ece`)", lambda r: r["gates"]["max_ece"]["bound"], 4),
)


def readme_block(record: dict) -> str:
    """The README's headline table, from a default_run.json record: written by this script,
    checked by tests/test_readme.py."""
    run = record["headline"]
    threshold = run["gates"]["max_ece"]["threshold"]
    lines = [
        BEGIN,
        f"| `calibflow run --force`, seed {run['seed']}, {run['test_images']} test images | |",
        "| --- | ---: |",
    ]
    for label, read, digits in HEADLINE:
        label = label.replace("(gate `max_ece`)", f"(gate `max_ece` {threshold:g})")
        lines.append(f"| {label} | {read(run):.{digits}f} |")
    lines.append(END)
    return "\n".join(lines)


def update_readme(record: dict, readme: Path) -> None:
    text = readme.read_text()
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise RuntimeError(f"{readme} has no {BEGIN} ... {END} block to write the headline into")
    readme.write_text(pattern.sub(lambda _: readme_block(record), text, count=1))


def _spread(runs: list[dict]) -> dict:
    rows = {label: [read(run) for run in runs] for label, read, _ in HEADLINE}
    return {
        label: {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}
        for label, values in rows.items()
    }


def markdown(record: dict) -> str:
    run = record["headline"]
    lines = [
        "# The default run",
        "",
        f"Written by `{record['invocation']}` on {record['date']}, git commit `{record['git_commit'][:12]}`"
        + (" (with uncommitted changes)" if record["git_dirty"] else "")
        + (". **Smoke run: the numbers mean nothing.**" if record["smoke"] else "."),
        "",
        "CPU: "
        + ", ".join(f"{key} {value}" for key, value in (record.get("cpu") or {"unknown": ""}).items())
        + ". The run is deterministic on one CPU; another CPU's kernels round differently and its training "
        "ends elsewhere, as another seed's would (the module docstring of `benchmarks/default_run.py`).",
        "",
        "Each seed: a fresh copy of the checkout, `dvc repro prepare` (the embedded noisy digits), then "
        f"`{run['command']}` ({run['calibration_method']} calibration; each run about {run['wall_s']:.0f} s "
        "here, one process, CPU). Numbers on the test split unless said.",
        "",
        f"| seed {run['seed']} | value |",
        "| --- | ---: |",
    ]
    threshold = run["gates"]["max_ece"]["threshold"]
    for label, read, digits in HEADLINE:
        label = label.replace("(gate `max_ece`)", f"(gate `max_ece` {threshold:g})")
        lines.append(f"| {label} | {read(run):.{digits}f} |")
    lines += [
        f"| smooth ECE after scaling (point estimate) | {run['gates']['max_ece']['value']:.4f} |",
        f"| accuracy, 95% lower bound (gate `min_accuracy` {run['gates']['min_accuracy']['threshold']:g}) "
        f"| {run['gates']['min_accuracy']['bound']:.4f} |",
        f"| Brier before / after | {run['test_before']['brier']:.4f} / {run['test_after']['brier']:.4f} |",
        f"| calibration split NLL before / after | {run['calibration_split_nll']['before']:.4f} / "
        f"{run['calibration_split_nll']['after']:.4f} |",
        f"| gates | {'passed' if run['gates_passed'] else 'failed'} |",
    ]
    shift = run["shift_mean_ece"]
    if shift["before"] is not None and shift["after"] is not None:
        lines.append(
            f"| corruption suite (`shift:`), mean ECE before / after | {shift['before']:.4f} / {shift['after']:.4f} |"
        )
    lines.append("")
    if len(record["runs"]) > 1:
        seeds = ", ".join(str(r["seed"]) for r in record["runs"])
        lines += [
            f"Seeds {seeds} (each seeds the split, the weights and the data order):",
            "",
            "| seed | T | accuracy | ECE before | ECE after | smooth ECE after, 95% upper bound | gates |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in record["runs"]:
            lines.append(
                f"| {r['seed']} | {r['temperature']:.4f} | {r['test_after']['accuracy']:.4f} | "
                f"{r['test_before']['ece']:.4f} | {r['test_after']['ece']:.4f} | "
                f"{r['gates']['max_ece']['bound']:.4f} | {'passed' if r['gates_passed'] else 'failed'} |"
            )
        lines += ["", "| over the seeds | mean | range |", "| --- | ---: | --- |"]
        digits = {label: d for label, _, d in HEADLINE}
        for label, s in record["spread"].items():
            d = digits[label]
            lines.append(f"| {label} | {s['mean']:.{d}f} | {s['min']:.{d}f}-{s['max']:.{d}f} |")
        lines.append("")
    lines += [
        f"The reliability diagram of seed {run['seed']}: [`{record['image']}`]({record['image_link']}).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=parse_seeds, default=None, help="e.g. 0-4 or 0,3 (default: params.yaml's)")
    parser.add_argument("--out", type=Path, default=None, help="where the .json and .md go (default docs/results)")
    parser.add_argument("--images", type=Path, default=None, help="where the diagram goes (default docs/images)")
    parser.add_argument("--no-readme", action="store_true", help="leave README.md's headline block alone")
    parser.add_argument(
        "--smoke", action="store_true", help="a 2-epoch run; writes under --out only (default: a temporary folder)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the workspaces (their paths are printed)")
    args = parser.parse_args(argv)

    if args.smoke:
        out = args.out or Path(tempfile.mkdtemp(prefix="default-run-smoke-"))
        if out.resolve().is_relative_to((REPO / "docs").resolve()):
            parser.error(f"--smoke writes nothing under docs/ (--out {args.out}): its numbers measure nothing")
        images = out
    else:
        out = args.out or REPO / "docs" / "results"
        images = args.images or REPO / "docs" / "images"
    out.mkdir(parents=True, exist_ok=True)
    images.mkdir(parents=True, exist_ok=True)
    seeds = args.seeds or [_params_seed(REPO)]
    overrides = SMOKE_OVERRIDES if args.smoke else ()
    env = environment()
    # The code that runs, read before this script writes the diagram (a tracked file) into docs/images.
    commit, dirty = _git("rev-parse", "HEAD"), bool(_git("status", "--porcelain", "--untracked-files=no"))

    scratch = Path(tempfile.mkdtemp(prefix="calibflow-default-run-"))
    runs = []
    try:
        template = prepare_workspace(scratch / "template", env=env)
        for seed in seeds:
            repo = scratch / f"seed-{seed}"
            shutil.copytree(template, repo, symlinks=True)
            runs.append(run_default(repo, seed, overrides, env))
            print(
                f"seed {seed}: T {runs[-1]['temperature']:.4f}, ECE {runs[-1]['test_before']['ece']:.4f} -> "
                f"{runs[-1]['test_after']['ece']:.4f}, accuracy {runs[-1]['test_after']['accuracy']:.4f} "
                f"({runs[-1]['wall_s']:.0f} s)",
                flush=True,
            )
            if len(runs) == 1:
                shutil.copyfile(repo / "reports" / "plots" / "reliability_diagram.png", images / IMAGE_NAME)
    finally:
        if args.keep:
            print(f"workspaces kept under {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    image = images / IMAGE_NAME
    try:
        image_link = os.path.relpath(image, out)
    except ValueError:
        image_link = str(image)
    invocation = "python benchmarks/default_run.py" + (" --smoke" if args.smoke else "")
    if args.seeds:
        invocation += " --seeds " + ",".join(map(str, seeds))
    record = {
        "benchmark": NAME,
        "invocation": invocation,
        "smoke": args.smoke,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_commit": commit,
        "git_dirty": dirty,
        "cpu": cpu_signature(),
        "image": image.name,
        "image_link": image_link,
        "headline": runs[0],
        "runs": runs,
        "spread": _spread(runs) if len(runs) > 1 else None,
    }
    for value in (runs[0]["temperature"], runs[0]["test_after"]["ece"]):
        if not math.isfinite(value):
            raise RuntimeError(f"a non-finite headline number: {value}")
    (out / f"{NAME}.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / f"{NAME}.md").write_text(markdown(record))
    if not args.smoke and not args.no_readme:
        update_readme(record, REPO / "README.md")
    print(f"wrote {out / f'{NAME}.json'}, {out / f'{NAME}.md'}, {image}")
    return record


if __name__ == "__main__":
    main()
