"""Where the main job's time goes: the fixed cost of `calibflow run --force` over its work.

Runs the real command, `calibflow run --force` on the repository's params.yaml (the embedded
digits by default), in a fresh process as a user or a scheduler would, and measures its wall time
from spawn to exit. The flow's task runs are then read back from Prefect's API (both modes write
to the same Prefect database): the work is training, logit collection, the calibration fit and
its evaluation; the fixed cost is everything else (interpreter start and imports, Prefect's API
and bookkeeping, the DVC pin, GX validation, the gate power check, MLflow tracking and
registration, interpreter exit). The corruption suite and the OOD evaluation count as work: they
evaluate calibration, under shift and on out-of-distribution images.

Two ways of reaching Prefect, interleaved (A B A B ...) so that a busy shared machine weighs on
both alike:
- `temporary`: no PREFECT_API_URL, so Prefect starts its temporary API in a subprocess for the
  command and stops it at the end (what `calibflow run` alone did before issue 16);
- `local server`: the long-lived local server `make run` starts once and reuses
  (flows/local_server.py).

    python benchmarks/run_timing.py [--repeats 3] [--modes temporary,local-server] [--baseline DIR]
                                    [--set KEY=VALUE ...]

`--baseline DIR` (a checkout of another commit: `git worktree add --detach /tmp/before REV`) adds
that code's runs, with the temporary API, to the interleaving: before and after in one command.

Prints one table, a column per variant (median over repeats, and the range), and the fixed cost's ratio to
the work; `--json PATH` also writes every measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from calibflow.disk_cache import cache_dir  # noqa: E402

# The training and calibration work; the corruption suite and the OOD evaluation (issue 11) measure
# calibration too. Everything else is fixed cost.
WORK_TASKS = (
    "train-model",
    "collect-logits",
    "collect-shift-aware-logits",
    "fit-calibration",
    "evaluate-calibration",
    "collect-shift-logits",
    "evaluate-shift",
    "evaluate-ood",
)
BESIDE_TRAINING = ("check-gate-power",)  # submitted to run concurrently with train-model
MODES = ("temporary", "local-server")
FIXED_COST_TARGET_S = 10.0


def _calibflow() -> list[str]:
    """The console script's path (`python -m calibflow.cli` runs what `calibflow` runs) for the
    code of REPO, whichever checkout the interpreter's editable install points at."""
    return [sys.executable, "-m", "calibflow.cli"]


def _environment(mode: str, server_url: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    if mode == "local-server":
        env["PREFECT_API_URL"] = server_url
    return env


def timed_run(
    label: str, code_dir: Path, mode: str, server_url: str | None, overrides: list[str], cold_cache: bool = False
) -> dict:
    """One `calibflow run --force` of the code in code_dir, in a fresh process: wall time and the
    flow run's id."""
    if cold_cache:
        shutil.rmtree(cache_dir(REPO), ignore_errors=True)
    command = [*_calibflow(), "run", "--force", *(arg for o in overrides for arg in ("--set", o))]
    if code_dir != REPO:  # the baseline reads its own params.yaml: this one may hold keys it does not know
        command += ["--params", str(code_dir / "params.yaml")]
    # PYTHONSAFEPATH: the working directory (REPO) must not shadow code_dir on sys.path
    env = {**_environment(mode, server_url), "PYTHONPATH": str(code_dir), "PYTHONSAFEPATH": "1"}
    spawned = time.time()
    finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    exited = time.time()
    if finished.returncode != 0:
        raise SystemExit(f"`{' '.join(command)}` exited {finished.returncode}:\n{finished.stderr[-3000:]}")
    result = json.loads(finished.stdout[finished.stdout.index("{\n") :])
    return {
        "mode": label,
        "code": str(code_dir),
        "spawned": spawned,
        "exited": exited,
        "wall": exited - spawned,
        "flow_run_id": result["prefect_flow_run_id"],
    }


def task_seconds(client, flow_run_id: str) -> tuple[dict[str, float], datetime, datetime]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run = client.read_flow_run(flow_run_id)
    task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    per_task: dict[str, float] = defaultdict(float)
    for task_run in task_runs:
        if task_run.start_time and task_run.end_time:
            per_task[task_run.name.rsplit("-", 1)[0]] += (task_run.end_time - task_run.start_time).total_seconds()
    return dict(per_task), flow_run.start_time, flow_run.end_time


def breakdown(run: dict, per_task: dict[str, float], flow_start: datetime, flow_end: datetime) -> dict[str, float]:
    work = sum(per_task.get(name, 0.0) for name in WORK_TASKS)
    beside = BESIDE_TRAINING if run["code"] == str(REPO) else ()  # a baseline may run them in series
    serial = {name: seconds for name, seconds in per_task.items() if name not in beside}
    parts = {
        "interpreter, imports, Prefect API start, flow run creation": flow_start.timestamp() - run["spawned"],
        **{f"task {name}": seconds for name, seconds in serial.items() if name not in WORK_TASKS},
        **{
            f"task {name} (beside training: not in the wall time)": per_task[name]
            for name in beside
            if name in per_task
        },
        "flow body outside tasks (Prefect task bookkeeping)": (flow_end - flow_start).total_seconds()
        - sum(serial.values()),
        "after the flow (API stop, interpreter exit)": run["exited"] - flow_end.timestamp(),
    }
    return {"wall": run["wall"], "work": work, "fixed": run["wall"] - work, **parts}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--baseline", type=Path, default=None, help="a checkout of the code to compare with")
    parser.add_argument(
        "--cold-cache",
        action="store_true",
        help="empty .calibflow/cache before each run of this code: a first run on new data or "
        "settings (the gate power check and the GX suite are computed, not read back)",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown or args.repeats < 1:
        parser.error(f"unknown modes {sorted(unknown)}" if unknown else "--repeats must be at least 1")

    from calibflow.environment import apply_quiet_defaults

    apply_quiet_defaults()
    from flows.local_server import DEFAULT_API_URL, ensure

    server_url = os.environ.get("PREFECT_API_URL") or DEFAULT_API_URL
    ensure(server_url)  # also where the results are read back from
    suffix = ", cold cache" if args.cold_cache else ""
    variants = [(f"this code, {mode}{suffix}", REPO, mode) for mode in modes]
    if args.baseline:
        variants.insert(0, ("baseline, temporary", args.baseline.resolve(), "temporary"))
    runs = [
        timed_run(label, code, mode, server_url, args.overrides, args.cold_cache and code == REPO)
        for _ in range(args.repeats)
        for label, code, mode in variants
    ]

    os.environ["PREFECT_API_URL"] = server_url
    from prefect.client.orchestration import get_client

    measured: dict[str, list[dict[str, float]]] = defaultdict(list)
    with get_client(sync_client=True) as client:
        for run in runs:
            measured[run["mode"]].append(breakdown(run, *task_seconds(client, run["flow_run_id"])))

    load = os.getloadavg()[0]
    print(
        f"\n`calibflow run --force` in a fresh process, {args.repeats} runs of each interleaved; median seconds "
        f"[min-max]; load average {load:.1f} on {os.cpu_count()} CPUs\n"
    )
    labels = list(measured)
    names = list(dict.fromkeys(name for rows in measured.values() for row in rows for name in row))
    print("| part | " + " | ".join(labels) + " |\n| --- |" + " ---: |" * len(labels))
    for name in names:
        cells = []
        for label in labels:
            values = [row.get(name, 0.0) for row in measured[label]]
            cells.append(f"{statistics.median(values):.1f} [{min(values):.1f}-{max(values):.1f}]")
        if name in ("wall", "work", "fixed") or any(not cell.startswith("0.0 [0.0") for cell in cells):
            print(
                f"| {'**' + name + '**' if name in ('wall', 'work', 'fixed') else name} | " + " | ".join(cells) + " |"
            )
    print()
    for label in labels:
        fixed = statistics.median(row["fixed"] for row in measured[label])
        work = statistics.median(row["work"] for row in measured[label])
        print(
            f"{label}: fixed cost {fixed:.1f} s over {work:.1f} s of work (fixed / work {fixed / work:.2f}); "
            f"target <= {FIXED_COST_TARGET_S:.0f} s: {'met' if fixed <= FIXED_COST_TARGET_S else 'NOT met'}"
        )
    if args.baseline:
        base = statistics.median(row["fixed"] for row in measured[labels[0]])
        for label in labels[1:]:
            ratios = [b["fixed"] / a["fixed"] for a, b in zip(measured[label], measured[labels[0]])]
            print(
                f"baseline fixed cost / {label}'s, run by run: {statistics.median(ratios):.1f}x "
                f"[{min(ratios):.1f}-{max(ratios):.1f}] (baseline median {base:.1f} s)"
            )
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"load": load, "runs": measured}, indent=2))


if __name__ == "__main__":
    main()
