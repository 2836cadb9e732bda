"""The scheduled retraining deployment of the `calibflow-train` flow.

params.yaml's `schedule:` section names the deployment, gives its cron schedule (in its timezone),
the work pool it goes to and the data revision a scheduled run reads. Two ways to run it, both
against a Prefect server (PREFECT_API_URL): the server's scheduler is what creates the cron's flow
runs, and Prefect's temporary local API does not run it.

- `serve`: this process registers the deployment and runs its flow runs itself, one at a time,
  until it is stopped (`make serve`, `calibflow schedule`).
- `deploy`: registers the deployment with the work pool and returns; a worker
  (`prefect worker start --pool calibflow`) runs the flow runs (`calibflow schedule --deploy`).

Either way a flow run executes in another process, in another directory, so the deployment
carries the checkout's absolute path as `repo_root`, and params.yaml is read again by every run:
edits to training params apply from the next run on, edits to `schedule:` once the deployment is
served or deployed again.
"""

from __future__ import annotations

from pathlib import Path

from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron
from prefect.types.entrypoint import EntrypointType

from calibflow.config import Config
from flows.train_calibrate import train_calibrate_register

DESCRIPTION = (
    "Retrain, calibrate, gate and register on a schedule (calibflow). Skips when @champion was built "
    "from the same data, params, initial weights and code; run with force=true to retrain anyway."
)


def split_overrides(overrides: list[str] | tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(`schedule.*` overrides, the rest). The first shape the deployment only; the rest are passed to
    every run, so a scheduled run's params hash equals that of `calibflow run` with the same --set."""
    schedule = [o for o in overrides if o.strip().startswith("schedule.")]
    return schedule, [o for o in overrides if o not in schedule]


def build_deployment(
    config: Config,
    repo_root: str | Path = ".",
    params_path: str = "params.yaml",
    overrides: list[str] | tuple[str, ...] = (),
) -> RunnerDeployment:
    """The retraining deployment that `config.schedule` describes. `config` is what
    `repo_root/params_path` with `overrides` loads to; the overrides other than `schedule.*` are
    passed to every run."""
    _, run_overrides = split_overrides(overrides)
    schedule = config.schedule
    return train_calibrate_register.to_deployment(
        name=schedule.deployment,
        schedules=[Cron(schedule.cron, timezone=schedule.timezone)],
        parameters={
            "repo_root": str(Path(repo_root).resolve()),
            "params_path": params_path,
            "overrides": run_overrides,
            "data_rev": schedule.data_rev,
            "force": False,
        },
        # Two retrains at once would race for the registry's aliases; a late one waits for a slot.
        concurrency_limit=1,
        description=DESCRIPTION,
        tags=["calibflow", "retrain"],
        # Imported by module path: any process with calibflow installed can load the flow, wherever
        # it runs, with no code storage or image to set up.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def build_monitor_deployment(
    config: Config,
    repo_root: str | Path = ".",
    params_path: str = "params.yaml",
    overrides: list[str] | tuple[str, ...] = (),
) -> RunnerDeployment | None:
    """`calibflow monitor` on schedule.monitor_cron (None when it is not set), served beside the
    retraining deployment by the same process or work pool."""
    from flows.monitor import monitor_model

    schedule = config.schedule
    if schedule.monitor_cron is None:
        return None
    _, run_overrides = split_overrides(overrides)
    return monitor_model.to_deployment(
        name=f"{schedule.deployment}-monitor",
        schedules=[Cron(schedule.monitor_cron, timezone=schedule.timezone)],
        parameters={
            "repo_root": str(Path(repo_root).resolve()),
            "params_path": params_path,
            "overrides": run_overrides,
            "model": schedule.monitor_model,
            "data": schedule.monitor_data,
        },
        concurrency_limit=1,
        description="Check the registered model for drift on new images (calibflow monitor)",
        tags=["calibflow", "monitor"],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def full_name(deployment: RunnerDeployment) -> str:
    """`flow/deployment`, the name `prefect deployment run` and `run_deployment` take."""
    return f"{deployment.flow_name}/{deployment.name}"


def serve(*deployments: RunnerDeployment) -> None:
    """Register the deployments and run their flow runs in this process's children until
    interrupted. On shutdown Prefect pauses the schedules, so no runs pile up while nothing serves
    them."""
    from prefect import serve as prefect_serve

    prefect_serve(*deployments, limit=1)


def deploy(deployment: RunnerDeployment, work_pool: str) -> str:
    """Register the deployment with `work_pool` (which must exist); return its id."""
    from prefect import deploy as prefect_deploy

    [deployment_id] = prefect_deploy(
        deployment, work_pool_name=work_pool, build=False, push=False, ignore_warnings=True
    )
    return str(deployment_id)
