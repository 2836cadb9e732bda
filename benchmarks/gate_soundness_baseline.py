"""The previous gates (percentile bootstrap of plug-in estimates) on the same scenarios.

Runs `evaluate_gates` as it stood at a git revision (default 345bcd0, the last commit before the
bounds of docs/gates.md, where it lived in calibflow/gates.py) on the scenario suite of
benchmarks/gate_soundness.py, so that the new false-rejection rates can be set beside the old
ones on the same draws' law. Needs that revision in the clone's history.

    python benchmarks/gate_soundness_baseline.py [--rev 345bcd0] [--trials 150] [--json PATH]   # docs/results/
    python benchmarks/gate_soundness_baseline.py --smoke   # n = 200, 2 trials a cell: seconds
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
import types
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _common  # noqa: E402
import gate_soundness as suite  # noqa: E402

OLD_PATH = "calibflow/gates.py"  # evaluate_gates' module at the default revision

OLD_GATES_CONFIG = (
    "max_ece",
    "min_accuracy",
    "max_nll",
    "max_ece_increase",
    "max_accuracy_drop",
    "confidence",
    "n_resamples",
)


@functools.cache
def old_gates(rev: str, path: str = OLD_PATH) -> types.ModuleType:
    """The module at `path` as it was at `rev`, run against today's calibflow (its imports)."""
    shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True)
    if shown.returncode != 0:
        raise SystemExit(f"cannot read {path} at {rev} (a shallow clone lacks it): {shown.stderr.strip()}")
    module = types.ModuleType("calibflow_gates_old")
    sys.modules[module.__name__] = module  # its dataclasses look their module up there
    exec(compile(shown.stdout, f"{rev}:{path}", "exec"), module.__dict__)
    return module


def run_cell(job) -> dict:
    s, n, trials, seed, rev, path = job
    gates_module = old_gates(rev, path)
    rng = np.random.default_rng(seed)
    gates = suite.gates_for(s)
    passes = 0
    started = time.perf_counter()
    for trial in range(trials):
        candidate, comparison = suite.draw(s, n, rng)
        verdict = gates_module.evaluate_gates(candidate, gates, comparison, seed=trial)
        passes += next(c for c in verdict.checks if c.name == s.gate).passed
    low, high = suite.wilson(passes, trials)
    counts_passes = s.kind != "false rejection"
    rate_of = passes if counts_passes else trials - passes
    return {
        "scenario": s.name,
        "gate": s.gate,
        "metric": "ece",
        "n": n,
        "true_value": s.truth,
        "limit": s.limit,
        "kind": s.kind,
        "trials": trials,
        "passes": passes,
        "rate": rate_of / trials,
        "wilson_low": low if counts_passes else 1 - high,
        "wilson_high": high if counts_passes else 1 - low,
        "seconds": time.perf_counter() - started,
        "implementation": rev,
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_arguments(parser)
    parser.add_argument("--rev", default="345bcd0")
    parser.add_argument("--path", default=OLD_PATH, help="evaluate_gates' module at --rev")
    parser.add_argument("--trials", type=int, default=None, help="per cell (default 150; 2 with --smoke)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="default 1000 10000; 200 with --smoke")
    parser.add_argument("--workers", type=int, default=None, help="processes (default 2; 1 with --smoke)")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    out = _common.results_dir(args, parser)
    trials = args.trials or (2 if args.smoke else 150)
    sizes = args.sizes or ([200] if args.smoke else [1000, 10000])
    workers = args.workers or (1 if args.smoke else 2)
    jobs = []
    for b in suite.boundary_scenarios():
        if b.metric != "ece":
            continue  # the old gates had no smooth ECE
        for s in [b] + suite.power_scenarios(b):
            jobs += [(s, n, trials, 104729 * len(jobs) + n, args.rev, args.path) for n in sizes]
    rows = []
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    for done, row in enumerate((pool.map if pool else map)(run_cell, jobs), 1):
        rows.append(row)
        print(
            f"[{done}/{len(jobs)}] {row['gate']} {row['scenario']} n={row['n']} truth={row['true_value']:.4g}: "
            f"{row['kind']} {row['rate']:.1%}",
            file=sys.stderr,
            flush=True,
        )
    if pool:
        pool.shutdown()
    lines = [
        f"`evaluate_gates` of {args.rev} ({args.path}), {trials} trials a cell; rates of the measured kind",
        "",
        "| gate | scenario | true value | limit | measured | "
        + " | ".join(f"n={n:,} ({args.rev})" for n in sizes)
        + " |",
        "| --- | --- | ---: | ---: | --- |" + " ---: |" * len(sizes),
    ]
    cells: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        cells.setdefault((r["gate"], r["scenario"], r["true_value"], r["limit"], r["kind"]), {})[r["n"]] = r
    for (gate, scenario, truth, limit, kind), by_n in cells.items():
        lines.append(
            f"| {gate} | {scenario} | {truth:.4g} | {limit:.4g} | {kind} | "
            + " | ".join(f"{by_n[n]['rate']:.1%}" for n in sizes)
            + " |"
        )
    text = "\n".join(lines)
    print(text)
    _common.publish(
        "gate_soundness_baseline", "Gate soundness: the gates before docs/gates.md", text, args, out, argv, rows
    )
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
