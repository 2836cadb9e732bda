"""Data tasks: pin the DVC version, build the manifest, split, validate with Great Expectations."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from calibflow.pipeline import data_steps
from calibflow.tracking import store
from calibflow.config import Config
from calibflow.disk_cache import cache_dir
from calibflow.errors import DataValidationError
from calibflow.data.versioning import DataVersion, resolve_data
from tasks import retry_transient_only


@task(
    name="pin-data-version",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_transient_only,
    cache_policy=NO_CACHE,
)
def pin_data_version(repo_root: str, data_path: str, data_rev: str | None, run_id: str) -> DataVersion:
    version = resolve_data(repo_root, data_path, data_rev)
    store.set_tags(run_id, {"data_path": version.path, "data_hash": version.dvc_hash, "data_rev": version.rev})
    store.log_dataset(
        run_id,
        name=version.path,
        source_uri=str(Path(repo_root).resolve() / version.path),
        digest=version.dvc_hash,
        context="training",
        profile={"dvc_hash": version.dvc_hash, "rev": version.rev},
    )
    get_run_logger().info("data %s at %s: DVC hash %s", version.path, version.rev, version.dvc_hash)
    return version


@task(name="build-manifest", cache_policy=NO_CACHE)
def build_manifest(data: DataVersion, work_dir: str, run_id: str) -> data_steps.ManifestRecord:
    record = data_steps.write_manifest(data.local_dir, f"{work_dir}/manifest.csv")
    store.log_artifact(run_id, record.path, "data")
    store.set_tags(run_id, {"manifest_fingerprint": record.fingerprint})
    get_run_logger().info("manifest: %d files in %d classes", record.n_images, len(record.classes))
    return record


@task(name="split-dataset", cache_policy=NO_CACHE)
def split_dataset(
    manifest: data_steps.ManifestRecord, config: Config, work_dir: str, run_id: str
) -> data_steps.SplitRecord:
    record = data_steps.write_split(manifest.path, config.split, config.seed, f"{work_dir}/splits.json")
    store.log_artifact(run_id, record.path, "data")
    store.set_tags(run_id, {"split_digest": record.digest})
    store.log_params(run_id, {f"split_size.{name}": size for name, size in record.sizes.items()})
    get_run_logger().info("split %s: %s", record.digest, record.sizes)
    return record


@task(name="validate-data", cache_policy=NO_CACHE)
def validate_data(
    manifest: data_steps.ManifestRecord,
    split: data_steps.SplitRecord,
    config: Config,
    work_dir: str,
    run_id: str,
    repo_root: str,
    *,
    data_dir: str | None = None,
) -> dict:
    result_path = f"{work_dir}/data_validation.json"
    report = data_steps.validate_data(
        manifest.path,
        split.path,
        manifest.classes,
        config.data,
        result_path,
        cache_directory=cache_dir(repo_root),
        data_dir=data_dir,
    )
    store.log_artifact(run_id, result_path, "validation")
    reused = bool(report.statistics.get("reused_from_cache"))
    store.set_tags(
        run_id,
        {
            "data_validation": "passed" if report.success else "failed",
            # the GX suite passed on these same bytes before; its result is reused
            "data_validation_reused": str(reused).lower(),
        },
    )
    if not report.success:
        raise DataValidationError(report)
    data_steps.check_test_split_classes(manifest.path, split.path, dataset=config.data.path, split=config.split)
    get_run_logger().info("data validation passed: %s", report.statistics)
    return report.statistics
