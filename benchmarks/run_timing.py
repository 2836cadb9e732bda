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
                                    [--set KEY=VALUE ...] [--repo DIR]
    python benchmarks/run_timing.py --smoke   # one run of a tiny project: about a minute

`--baseline DIR` (a checkout of another commit: `git worktree add --detach /tmp/before REV`) adds
that code's runs, with the temporary API, to the interleaving: before and after in one command.
`--repo DIR` runs the command in another project (its params.yaml, data, registry and cache).

Prints one table, a column per variant (median over repeats, and the range), and the fixed cost's
ratio to the work, and writes them to docs/results/run_timing.md; `--json PATH` also writes every
measurement. `--smoke` runs once, in the local-server mode, in a tiny project it makes under --out
(benchmarks/_common.py), against a Prefect server on a free port that it starts and stops
(Prefect's own temporary server): nothing on 127.0.0.1:4200 is started or touched.
"""

from __future__ import annotations

import argparse
import contextlib
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
sys.path.insert(0, str(REPO / "benchmarks"))

import _common  # noqa: E402
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


def _code_env(code_dir: Path) -> dict[str, str]:
    # PYTHONSAFEPATH: the working directory must not shadow code_dir on sys.path
    return {"PYTHONPATH": str(code_dir), "PYTHONSAFEPATH": "1"}


def _json_flag(code_dir: Path, project: Path) -> bool:
    """Whether a baseline's `calibflow run` has --json (before it, the result was printed as JSON)."""
    done = subprocess.run(
        [*_common.calibflow_command(code_dir), "run", "--help"],
        cwd=project,
        env={**os.environ, **_code_env(code_dir)},
        capture_output=True,
        text=True,
    )
    return "--json" in done.stdout


def _environment(mode: str, server_url: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    if mode == "local-server":
        env["PREFECT_API_URL"] = server_url
    return env


def timed_run(
    label: str,
    code_dir: Path,
    mode: str,
    server_url: str | None,
    overrides: list[str],
    project: Path,
    json_flag: bool,
    cold_cache: bool = False,
) -> dict:
    """One `calibflow run --force` of the code in code_dir, in project, in a fresh process: wall
    time and the flow run's id."""
    if cold_cache:
        shutil.rmtree(cache_dir(project), ignore_errors=True)
    result_path = project / ".calibflow" / "run_timing.json"
    command = [
        *_common.calibflow_command(code_dir),
        "run",
        "--force",
        *(arg for o in overrides for arg in ("--set", o)),
    ]
    if json_flag:
        result_path.parent.mkdir(parents=True, exist_ok=True)
        result_path.unlink(missing_ok=True)
        command += ["--json", str(result_path)]
    if code_dir != REPO and project == REPO:  # the baseline reads its own params: ours may hold keys it lacks
        command += ["--params", str(code_dir / "params.yaml")]
    env = {**_environment(mode, server_url), **_code_env(code_dir)}
    spawned = time.time()
    finished = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)
    exited = time.time()
    if finished.returncode != 0:
        raise SystemExit(f"`{' '.join(command)}` exited {finished.returncode}:\n{finished.stderr[-3000:]}")
    if json_flag:
        result = json.loads(result_path.read_text())
    else:
        result = json.loads(finished.stdout[finished.stdout.index("{\n") :])
    return {
        "mode": label,
        "api": server_url if mode == "local-server" else None,
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


def table(measured: dict[str, list[dict[str, float]]], repeats: int, load: float, baseline: bool) -> str:
    lines = [
        f"`calibflow run --force` in a fresh process, {repeats} runs of each interleaved; median seconds "
        f"[min-max]; load average {load:.1f} on {os.cpu_count()} CPUs",
        "",
    ]
    labels = list(measured)
    names = list(dict.fromkeys(name for rows in measured.values() for row in rows for name in row))
    lines += ["| part | " + " | ".join(labels) + " |", "| --- |" + " ---: |" * len(labels)]
    for name in names:
        cells = []
        for label in labels:
            values = [row.get(name, 0.0) for row in measured[label]]
            cells.append(f"{statistics.median(values):.1f} [{min(values):.1f}-{max(values):.1f}]")
        if name in ("wall", "work", "fixed") or any(not cell.startswith("0.0 [0.0") for cell in cells):
            shown = f"**{name}**" if name in ("wall", "work", "fixed") else name
            lines.append(f"| {shown} | " + " | ".join(cells) + " |")
    lines.append("")
    for label in labels:
        fixed = statistics.median(row["fixed"] for row in measured[label])
        work = statistics.median(row["work"] for row in measured[label])
        lines.append(
            f"{label}: fixed cost {fixed:.1f} s over {work:.1f} s of work (fixed / work {fixed / work:.2f}); "
            f"target <= {FIXED_COST_TARGET_S:.0f} s: {'met' if fixed <= FIXED_COST_TARGET_S else 'NOT met'}"
        )
    if baseline:
        base = statistics.median(row["fixed"] for row in measured[labels[0]])
        for label in labels[1:]:
            ratios = [b["fixed"] / a["fixed"] for a, b in zip(measured[label], measured[labels[0]])]
            lines.append(
                f"baseline fixed cost / {label}'s, run by run: {statistics.median(ratios):.1f}x "
                f"[{min(ratios):.1f}-{max(ratios):.1f}] (baseline median {base:.1f} s)"
            )
    return "\n".join(lines)


def local_server_url() -> str:
    """The server `make run` uses: PREFECT_API_URL when set, else this checkout's long-lived one,
    started when it does not run (`python -m flows.local_server ensure`, as the Makefile calls it)."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    done = subprocess.run(
        [sys.executable, "-m", "flows.local_server", "ensure"], cwd=REPO, capture_output=True, text=True
    )
    if done.returncode != 0 or not done.stdout.strip():
        raise SystemExit(f"no local Prefect server for the local-server mode:\n{done.stderr.strip()[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


@contextlib.contextmanager
def temporary_server():
    """Prefect's own temporary server on a free port, on this process's Prefect home (the database
    the temporary-mode runs write to), stopped at the end. Telemetry off as calibflow turns it off:
    the server's heartbeat otherwise wrote to the database while a run did ('database is locked')."""
    from prefect.server.api.server import SubprocessASGIServer

    from calibflow.environment import apply_quiet_defaults

    apply_quiet_defaults()
    server = SubprocessASGIServer()
    server.start()
    try:
        yield server.api_url
    finally:
        server.stop()


def read_back(runs: list[dict], api_url: str, measured: dict[str, list[dict[str, float]]]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        for run in runs:
            measured[run["mode"]].append(breakdown(run, *task_seconds(client, run["flow_run_id"])))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_arguments(parser)
    parser.add_argument("--repeats", type=int, default=None, help="default 3; 1 with --smoke")
    parser.add_argument(
        "--modes", default=None, help=f"comma-separated, of {', '.join(MODES)} (default all; local-server with --smoke)"
    )
    parser.add_argument("--baseline", type=Path, default=None, help="a checkout of the code to compare with")
    parser.add_argument(
        "--repo", type=Path, default=None, help="the project the command runs in (default this checkout)"
    )
    parser.add_argument(
        "--cold-cache",
        action="store_true",
        help="empty .calibflow/cache before each run of this code: a first run on new data or "
        "settings (the gate power check and the GX suite are computed, not read back)",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    out = _common.results_dir(args, parser)
    repeats = args.repeats or (1 if args.smoke else 3)
    modes = [m for m in (args.modes or ("local-server" if args.smoke else ",".join(MODES))).split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown or repeats < 1:
        parser.error(f"unknown modes {sorted(unknown)}" if unknown else "--repeats must be at least 1")
    project = args.repo.resolve() if args.repo else (_common.smoke_project(out / "project") if args.smoke else REPO)

    from calibflow.environment import apply_quiet_defaults

    apply_quiet_defaults()
    suffix = ", cold cache" if args.cold_cache else ""
    variants = [(f"this code, {mode}{suffix}", REPO, mode) for mode in modes]
    if args.baseline:
        variants.insert(0, ("baseline, temporary", args.baseline.resolve(), "temporary"))
    json_flags = {code: code == REPO or _json_flag(code, project) for _, code, _ in variants}
    # a smoke run never touches the long-lived server: its local-server mode runs against a
    # temporary server of its own, which also reads back the temporary-mode runs
    with contextlib.ExitStack() as stack:
        server_url = None
        if "local-server" in modes:
            server_url = stack.enter_context(temporary_server()) if args.smoke else local_server_url()
        runs = [
            timed_run(
                label,
                code,
                mode,
                server_url,
                args.overrides,
                project,
                json_flags[code],
                args.cold_cache and code == REPO,
            )
            for _ in range(repeats)
            for label, code, mode in variants
        ]
        # each run is read back from the database it was recorded in: the local server's, or for
        # the temporary mode this process's Prefect home, through a temporary server on it
        measured: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in variants}  # the table's order
        served = [run for run in runs if run["api"] is not None]
        if served:
            read_back(served, server_url, measured)
        alone = [run for run in runs if run["api"] is None]
        if alone:
            # a smoke run's own server already serves this process's Prefect home
            reader = server_url if args.smoke and server_url else stack.enter_context(temporary_server())
            read_back(alone, reader, measured)

    load = os.getloadavg()[0]
    text = table(measured, repeats, load, bool(args.baseline))
    print("\n" + text)
    results = {"load": load, "project": str(project), "runs": measured}
    _common.publish("run_timing", "Where a run's time goes", text, args, out, argv, results)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
