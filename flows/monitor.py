"""The `calibflow-monitor` flow: `calibflow monitor` on a schedule (params.yaml schedule.monitor_*).

One task checks the registered model on the DVC-pinned folder of new images and logs the MLflow
run (calibflow.lifecycle.monitor); the flow run's summary artifact carries the verdict. A drift is a result
the flow reports, not a failure of the flow: the run ends Completed with the verdict, and the exit
code a CD job would act on is in its return value (`exit_code`) and in the MLflow run's tags.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from calibflow.tracking import store
from calibflow.config import load_config
from tasks.monitoring import check_drift


@flow(name="calibflow-monitor", log_prints=False)
def monitor_model(
    repo_root: str = ".",
    params_path: str = "params.yaml",
    overrides: list[str] | None = None,
    model: str = "@champion",
    data: str = "",
) -> dict:
    config = load_config(f"{repo_root}/{params_path}", overrides or [])
    store.configure_tracking(repo_root)
    model_uri = f"models:/{config.registry.model_name}{model if model.startswith('@') else '/' + model}"
    report, run_id = check_drift(model_uri, data, config, repo_root)
    create_markdown_artifact(
        key="calibflow-monitor",
        description="calibflow monitor verdict",
        markdown=f"# {report.verdict}\n\n" + "\n".join(f"- {r}" for r in report.reasons) + f"\n\nMLflow run `{run_id}`",
    )
    logger = get_run_logger()
    (logger.warning if report.exit_code else logger.info)("%s", report.summary())
    return {**report.to_json(), "run_id": run_id}
