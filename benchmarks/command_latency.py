"""How long each `calibflow` command takes to answer, cold, in a fresh process.

Each command is started as a user or a CD job starts it (`python -m cli ...`, which is what the
`calibflow` script runs), from spawn to exit, against the repository's registry (the default
model must be registered: `make run` first), or another project's with --repo. With `--baseline
DIR` (a checkout of another commit, e.g. `git worktree add --detach /tmp/before REV`) the same
commands run on that code too, interleaved with this one's (A B A B ...), so both see the same
machine load, and the table shows the ratio. The table goes to docs/results/command_latency.md.

    python benchmarks/command_latency.py [--repeats 5] [--baseline DIR] [--repo DIR] [--json PATH]
    python benchmarks/command_latency.py --smoke   # each command once, on a tiny project it trains

--smoke makes that project under --out (benchmarks/_common.py) unless --repo names one whose
model is registered, and skips the page-cache warm-up run of each command.

Targets (issue 16): --help and status under 2 s, predict of one image under 5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import _common  # noqa: E402

TARGETS_S = {"--help": 2.0, "status": 2.0, "predict (1 image)": 5.0}


def commands(model: str, image: str) -> dict[str, list[str]]:
    return {
        "--help": ["--help"],
        "status": ["status", "--model", model],
        "gate": ["gate", "--model", model, "--candidate", "@champion", "--against", "@champion"],
        "evaluate": ["evaluate", "--model", f"models:/{model}@champion"],
        "predict (1 image)": ["predict", "--model", f"models:/{model}@champion", image],
    }


def timed(code_dir: Path, arguments: list[str], project: Path) -> float:
    if code_dir != REPO and project == REPO and arguments[0] == "gate":
        arguments = [*arguments, "--params", str(code_dir / "params.yaml")]  # a baseline's params may lack our keys
    # PYTHONSAFEPATH: the working directory must not shadow code_dir on sys.path
    env = {**os.environ, "PYTHONPATH": str(code_dir), "PYTHONSAFEPATH": "1"}
    started = time.perf_counter()
    finished = subprocess.run(
        [*_common.calibflow_command(code_dir), *arguments], cwd=project, env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    # gate of @champion against itself exits 0 or 1 by its verdict; anything else is a broken measurement
    if finished.returncode not in (0, 1):
        raise SystemExit(
            f"calibflow {' '.join(arguments)} ({code_dir}) exited {finished.returncode}:\n{finished.stderr[-2000:]}"
        )
    return seconds


def table(measured: dict[str, dict[str, list[float]]], repeats: int, load: float) -> str:
    baseline = "baseline" in measured
    lines = [
        f"fresh process, spawn to exit; median [min-max] of {repeats} runs; load average {load:.1f} on "
        f"{os.cpu_count()} CPUs",
        "",
    ]
    columns = ["command", "this code (s)", *(["baseline (s)", "baseline / this"] if baseline else []), "target"]
    lines += ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for name, values in measured["this code"].items():
        row = f"| `calibflow {name}` | {statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}] |"
        if baseline:
            before = measured["baseline"][name]
            row += (
                f" {statistics.median(before):.2f} [{min(before):.2f}-{max(before):.2f}] |"
                f" {statistics.median(b / a for a, b in zip(values, before)):.1f}x |"
            )
        target = TARGETS_S.get(name)
        met = target is not None and statistics.median(values) < target
        row += f" {f'< {target:.0f} s: ' + ('met' if met else 'NOT met') if target else ''} |"
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_arguments(parser)
    parser.add_argument("--repeats", type=int, default=None, help="default 5; 1 with --smoke")
    parser.add_argument("--baseline", type=Path, default=None, help="a checkout of the code to compare with")
    parser.add_argument(
        "--repo", type=Path, default=None, help="the project whose registry is read (default this checkout)"
    )
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    out = _common.results_dir(args, parser)
    repeats = args.repeats or (1 if args.smoke else 5)
    if args.repo:
        project = args.repo.resolve()
    elif args.smoke:
        project = _common.train_smoke_project(out / "project")
    else:
        project = REPO

    from calibflow.config import load_config

    config = load_config(project / "params.yaml", [])
    data = project / config.data.path
    image = str(next(p for p in sorted(data.rglob("*")) if p.is_file()))
    codes = {"this code": REPO, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    measured: dict[str, dict[str, list[float]]] = {name: {} for name in codes}
    for name, arguments in commands(config.registry.model_name, image).items():
        if not args.smoke:
            timed(REPO, arguments, project)  # warm the page cache once: the runs compare code, not the disk
        for _ in range(repeats):
            for code, directory in codes.items():
                measured[code].setdefault(name, []).append(timed(directory, arguments, project))

    load = os.getloadavg()[0]
    text = table(measured, repeats, load)
    print("\n" + text)
    results = {"load": load, "project": str(project), "seconds": measured}
    _common.publish("command_latency", "How long each command takes", text, args, out, argv, results)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
