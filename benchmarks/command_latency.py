"""How long each `calibflow` command takes to answer, cold, in a fresh process.

Each command is started as a user or a CD job starts it (`python -m calibflow.cli ...`, which
is what the `calibflow` script runs), from spawn to exit, against the repository's registry
(the default model must be registered: `make run` first). With `--baseline DIR` (a checkout of
another commit, e.g. `git worktree add --detach /tmp/before REV`) the same commands run on that
code too, interleaved with this one's (A B A B ...), so both see the same machine load, and the
table shows the ratio.

    python benchmarks/command_latency.py [--repeats 5] [--baseline DIR] [--json PATH]

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

TARGETS_S = {"--help": 2.0, "status": 2.0, "predict (1 image)": 5.0}


def commands(model: str, image: str) -> dict[str, list[str]]:
    return {
        "--help": ["--help"],
        "status": ["status", "--model", model],
        "gate": ["gate", "--model", model, "--candidate", "@champion", "--against", "@champion"],
        "evaluate": ["evaluate", "--model", f"models:/{model}@champion"],
        "predict (1 image)": ["predict", "--model", f"models:/{model}@champion", image],
    }


def timed(code_dir: Path, arguments: list[str]) -> float:
    if code_dir != REPO and arguments[0] == "gate":  # a baseline reads its own params: ours may hold newer keys
        arguments = [*arguments, "--params", str(code_dir / "params.yaml")]
    # PYTHONSAFEPATH: the working directory (REPO) must not shadow code_dir on sys.path
    env = {**os.environ, "PYTHONPATH": str(code_dir), "PYTHONSAFEPATH": "1"}
    started = time.perf_counter()
    finished = subprocess.run(
        [sys.executable, "-m", "calibflow.cli", *arguments], cwd=REPO, env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    # gate of @champion against itself exits 0 or 1 by its verdict; anything else is a broken measurement
    if finished.returncode not in (0, 1):
        raise SystemExit(
            f"calibflow {' '.join(arguments)} ({code_dir}) exited {finished.returncode}:\n{finished.stderr[-2000:]}"
        )
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", type=Path, default=None, help="a checkout of the code to compare with")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)

    from calibflow.config import load_config

    config = load_config(REPO / "params.yaml", [])
    data = REPO / config.data.path
    image = str(next(p for p in sorted(data.rglob("*")) if p.is_file()))
    codes = {"this code": REPO, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    measured: dict[str, dict[str, list[float]]] = {name: {} for name in codes}
    for name, arguments in commands(config.registry.model_name, image).items():
        timed(REPO, arguments)  # warm the page cache once: the runs compare code, not the disk
        for _ in range(args.repeats):
            for code, directory in codes.items():
                measured[code].setdefault(name, []).append(timed(directory, arguments))

    load = os.getloadavg()[0]
    print(
        f"\nfresh process, spawn to exit; median [min-max] of {args.repeats} runs; load average {load:.1f} on "
        f"{os.cpu_count()} CPUs\n"
    )
    columns = ["command", "this code (s)", *(["baseline (s)", "baseline / this"] if args.baseline else []), "target"]
    print("| " + " | ".join(columns) + " |\n|" + " --- |" * len(columns))
    for name, values in measured["this code"].items():
        row = f"| `calibflow {name}` | {statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}] |"
        if args.baseline:
            before = measured["baseline"][name]
            row += (
                f" {statistics.median(before):.2f} [{min(before):.2f}-{max(before):.2f}] |"
                f" {statistics.median(b / a for a, b in zip(values, before)):.1f}x |"
            )
        target = TARGETS_S.get(name)
        row += f" {'< %.0f s: %s' % (target, 'met' if statistics.median(values) < target else 'NOT met') if target else ''} |"
        print(row)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"load": load, "seconds": measured}, indent=2))


if __name__ == "__main__":
    main()
