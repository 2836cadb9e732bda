"""Where the main job's time goes: the flow's fixed cost against the training and calibration work.

Runs the real flow once in this process on the repository's params.yaml (the embedded digits by
default), then reads each task run's start and end from Prefect's API. Reported as shares of the
same run's wall time, so the figures compare within one measurement on a noisy shared machine.

    python benchmarks/run_timing.py [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORK_TASKS = ("train-model", "collect-logits", "fit-calibration", "evaluate-calibration")


def import_seconds() -> float:
    """Cold import of everything the CLI pulls in, in a fresh interpreter."""
    code = ("import calibflow.environment as e; e.apply_quiet_defaults(); import torch, mlflow, prefect, dvc.api, "
            "great_expectations; import flows.train_calibrate")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)

    from calibflow.environment import apply_quiet_defaults

    apply_quiet_defaults()
    imports = import_seconds()
    started = time.perf_counter()
    from flows.train_calibrate import train_calibrate_register
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    in_process_imports = time.perf_counter() - started
    flow_started = time.perf_counter()
    result = train_calibrate_register(overrides=args.overrides, repo_root=str(REPO))
    flow_wall = time.perf_counter() - flow_started

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(result["prefect_flow_run_id"])
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    per_task: dict[str, float] = defaultdict(float)
    for task_run in task_runs:
        if task_run.start_time and task_run.end_time:
            per_task[task_run.name.rsplit("-", 1)[0]] += (
                task_run.end_time - task_run.start_time).total_seconds()
    flow_body = (flow_run.end_time - flow_run.start_time).total_seconds()
    server_start = flow_wall - flow_body  # temporary API start, flow run creation and teardown
    work = sum(per_task[name] for name in WORK_TASKS)
    total = imports + flow_wall

    print(f"\nmain job on {result['model_name']} (version {result['version']}, @{result['alias']}):")
    print("| part | seconds | share of total |\n| --- | ---: | ---: |")
    rows = [("imports (fresh interpreter)", imports),
            ("Prefect temporary API start + flow run bookkeeping", server_start),
            *[(f"task {name}", seconds) for name, seconds in sorted(per_task.items(), key=lambda kv: -kv[1])],
            ("flow body outside tasks", flow_body - sum(per_task.values()))]
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} | {seconds / total:.0%} |")
    print(f"| **total** | **{total:.1f}** | 100% |")
    print(f"\ntraining + calibration work: {work:.1f} s ({work / total:.0%}); "
          f"fixed cost (imports, Prefect, MLflow, data checks): {total - work:.1f} s ({(total - work) / total:.0%})"
          f"  [in-process import of the flow module: {in_process_imports:.1f} s]")


if __name__ == "__main__":
    main()
