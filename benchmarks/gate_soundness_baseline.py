"""The previous gates (percentile bootstrap of plug-in estimates) on the same scenarios.

Runs `evaluate_gates` as it stood at a git revision (default 345bcd0, the last commit before the
bounds of docs/gates.md) on the scenario suite of benchmarks/gate_soundness.py, so that the
README can set the new false-rejection rates beside the old ones on the same draws' law.

    python benchmarks/gate_soundness_baseline.py [--rev 345bcd0] [--trials 150] [--json PATH]
"""

from __future__ import annotations

import argparse
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

import gate_soundness as suite  # noqa: E402

OLD_GATES_CONFIG = (
    "max_ece",
    "min_accuracy",
    "max_nll",
    "max_ece_increase",
    "max_accuracy_drop",
    "confidence",
    "n_resamples",
)


def old_gates(rev: str) -> types.ModuleType:
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:calibflow/gates/checks.py"], check=True, capture_output=True, text=True
    ).stdout
    module = types.ModuleType("calibflow_gates_old")
    sys.modules[module.__name__] = module  # its dataclasses look their module up there
    exec(compile(source, f"{rev}:calibflow/gates/checks.py", "exec"), module.__dict__)
    return module


def run_cell(job) -> dict:
    s, n, trials, seed, rev = job
    gates_module = old_gates(rev)
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
    parser.add_argument("--rev", default="345bcd0")
    parser.add_argument("--trials", type=int, default=150)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    jobs = []
    for b in suite.boundary_scenarios():
        if b.metric != "ece":
            continue  # the old gates had no smooth ECE
        for s in [b] + suite.power_scenarios(b):
            jobs += [(s, n, args.trials, 104729 * len(jobs) + n, args.rev) for n in args.sizes]
    rows = []
    with ProcessPoolExecutor(max(1, args.workers)) as pool:
        for done, row in enumerate(pool.map(run_cell, jobs), 1):
            rows.append(row)
            print(
                f"[{done}/{len(jobs)}] {row['gate']} {row['scenario']} n={row['n']} truth={row['true_value']:.4g}: "
                f"{row['kind']} {row['rate']:.1%}",
                file=sys.stderr,
                flush=True,
            )
    print(
        "| gate | scenario | true value | limit | measured | "
        + " | ".join(f"n={n:,} ({args.rev})" for n in args.sizes)
        + " |"
    )
    print("| --- | --- | ---: | ---: | --- |" + " ---: |" * len(args.sizes))
    cells: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        cells.setdefault((r["gate"], r["scenario"], r["true_value"], r["limit"], r["kind"]), {})[r["n"]] = r
    for (gate, scenario, truth, limit, kind), by_n in cells.items():
        print(
            f"| {gate} | {scenario} | {truth:.4g} | {limit:.4g} | {kind} | "
            + " | ".join(f"{by_n[n]['rate']:.1%}" for n in args.sizes)
            + " |"
        )
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
