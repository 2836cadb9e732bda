"""Monitoring task: one library call (calibflow.lifecycle.monitor) and its MLflow run."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from calibflow.lifecycle import monitor
from calibflow.config import Config
from tasks import retry_transient_only


@task(
    name="check-drift",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[5, 15],
    retry_condition_fn=retry_transient_only,
)
def check_drift(model_uri: str, data: str, config: Config, repo_root: str) -> tuple[monitor.MonitorReport, str]:
    report = monitor.monitor_version(model_uri, data, config, repo_root)
    return report, monitor.log_monitor_run(report, repo_root)
