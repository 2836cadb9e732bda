"""Prefect tasks: thin adapters around one calibflow library call each (retries, logging, artifacts)."""

from __future__ import annotations

import logging

from calibflow import errors


def retry_transient_only(task, task_run, state) -> bool:
    """Prefect retry condition: retry store hiccups (a locked database, an error answer), not the
    user's mistakes, nor what has been retried already (calibflow.errors)."""
    try:
        state.result()
    except Exception as error:
        return errors.may_retry(error)
    return True


class QuietRefusals(logging.Filter):
    """Prefect logs every failed task and flow run with its traceback. An expected refusal (data
    that fails validation, a failed gate, bad params) is a normal outcome: its log line keeps the
    message and loses the traceback; an unexpected error keeps its traceback.

    Every line, traceback included, goes out with the tracking store's credentials masked
    (store.redact): these lines reach the Prefect server, and MLflow's messages quote the URL they
    requested, password and all."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and errors.is_refusal(error):
            record.msg, record.args = f"{type(error).__name__}: {errors.one_line(error)}", ()
            record.exc_info, record.exc_text = None, None
        _redact(record)
        return True


def _redact(record: logging.LogRecord) -> None:
    from calibflow.tracking.store import redact

    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001  arguments that do not fit the format: logging reports that itself
        return
    shown = redact(message)
    if shown != message:
        record.msg, record.args = shown, ()
    if record.exc_info:  # handlers format the traceback from exc_text when it is set
        record.exc_text = redact(logging.Formatter().formatException(record.exc_info))


for _name in ("prefect.task_runs", "prefect.flow_runs"):
    if not any(isinstance(f, QuietRefusals) for f in logging.getLogger(_name).filters):
        logging.getLogger(_name).addFilter(QuietRefusals())
