"""The flow's steps as plain functions over files, by concern: data_steps, model_steps,
evaluation_steps; report_staging (reports/), tagging (what MLflow records) and run_summary (what
people read). Prefect tasks (tasks/) wrap them one-to-one; nothing here imports Prefect or MLflow."""
