"""The MLflow tracking store: which store (configure_tracking), a client whose every call turns a
server that does not answer into StoreUnreachable, and the runs (start, log, describe, end).

Calls take an explicit run id rather than relying on MLflow's "active run", because Prefect may run
tasks on other threads.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from calibflow.errors import (
    StoreUnreachable,
    unreachable,
)


STATUS_TAG = "calibflow.status"


_DEFAULT_URI_SET: str | None = None  # mlflow.set_tracking_uri also exports the URI to the environment


def configure_tracking(repo_root: str | Path = ".") -> str:
    """MLFLOW_TRACKING_URI when the user set it; otherwise MLflow 3's default store,
    sqlite:///mlflow.db, pinned to the repository root (not the current directory) so every
    command sees the same registry. The registry URI follows the tracking URI unless
    MLFLOW_REGISTRY_URI says otherwise (MLflow reads that itself).

    Returns the URI as it may be shown (display_uri: a password or token masked), because every
    caller puts it in a log line, a description or a result; MLflow keeps the real one."""
    global _DEFAULT_URI_SET
    from_user = os.environ.get("MLFLOW_TRACKING_URI")
    if from_user and from_user != _DEFAULT_URI_SET:
        uri = from_user
    else:
        uri = _DEFAULT_URI_SET = f"sqlite:///{Path(repo_root).resolve() / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    return display_uri(uri)


def tracking_uri() -> str:
    """The tracking URI MLflow connects to, credentials included: to connect with, never to show
    (tracking_uri_for_display)."""
    return mlflow.get_tracking_uri()


def tracking_uri_for_display() -> str:
    return display_uri(mlflow.get_tracking_uri())


MASK = "***"
# "scheme://netloc": the netloc runs to the first / ? # or blank.
_NETLOC = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<netloc>[^/?#\s]*)")
# A query parameter "name=value" after ? or &.
_QUERY_PARAM = re.compile(r"(?P<lead>[?&;])(?P<name>[^=&;#\s]+)=(?P<value>[^&;#\s]*)")
# Query parameters that carry a credential: ?token=, ?access_token=, ?api_key=, presigned URLs'
# X-Amz-Signature and X-Amz-Credential, ...
_SECRET_NAME = re.compile(
    r"token|secret|passw(?:or)?d|credential|signature|api[_-]?key|access[_-]?key|^(?:pwd|key|sig|auth|code)$",
    re.IGNORECASE,
)
# Shorter secrets are masked only where they sit in a URL: replacing a two-letter password wherever
# it occurs would garble the rest of the text.
_MIN_LITERAL_SECRET = 4


def _mask_netloc(match: re.Match) -> str:
    # rpartition: a password may hold a raw "@", the host never does (an IPv6 host is in brackets)
    userinfo, at, hostport = match["netloc"].rpartition("@")
    user, colon, password = userinfo.partition(":")
    if not at or not colon or not password:
        return match[0]
    return f"{match['scheme']}{user}:{MASK}@{hostport}"


def _mask_query(match: re.Match) -> str:
    if not match["value"] or not _SECRET_NAME.search(match["name"]):
        return match[0]
    return f"{match['lead']}{match['name']}={MASK}"


def display_uri(uri: str) -> str:
    """`uri` as it may be shown in a log line, a description or an artifact: the password of its
    userinfo and the values of credential query parameters (token, access_token, api_key, ...)
    replaced by ***, e.g. http://user:***@host:5000/?token=***. A URI without them is unchanged."""
    return _QUERY_PARAM.sub(_mask_query, _NETLOC.sub(_mask_netloc, uri))


def _secrets_of(uri: str) -> set[str]:
    """The password and credential parameter values in `uri`, as written and percent-decoded."""
    from urllib.parse import unquote

    found = set()
    for netloc in _NETLOC.finditer(uri):
        userinfo, at, _ = netloc["netloc"].rpartition("@")
        if at and ":" in userinfo:
            found.add(userinfo.partition(":")[2])
    found |= {m["value"] for m in _QUERY_PARAM.finditer(uri) if m["value"] and _SECRET_NAME.search(m["name"])}
    return {form for secret in found for form in (secret, unquote(secret)) if len(form) >= _MIN_LITERAL_SECRET}


def _known_uris() -> list[str]:
    known = [os.environ.get(name, "") for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")]
    try:
        known += [mlflow.get_tracking_uri(), mlflow.get_registry_uri()]
    except Exception:  # noqa: BLE001  redaction must never be the reason a message is lost
        pass
    return [uri for uri in known if uri]


def redact(text: str) -> str:
    """`text` (an error message, a log line, a traceback) with every URL's credentials masked as
    display_uri masks them, and the secrets of the configured tracking and registry URIs masked
    wherever else they appear (an exception's message may quote them out of their URL)."""
    shown = display_uri(text)
    for secret in sorted({s for uri in _known_uris() for s in _secrets_of(uri)}, key=len, reverse=True):
        shown = shown.replace(secret, MASK)
    return shown


def client() -> MlflowClient:
    """An MlflowClient whose calls raise StoreUnreachable, saying how long they waited, when the
    tracking server does not answer; a server that does not answer at all is named after one request
    timeout (check_answers), not after every retry of it."""
    check_answers()
    return _AnsweringClient(MlflowClient())  # type: ignore[return-value]  # same methods


_ANSWERED: set[str] = set()  # tracking servers that have answered this process once


def check_answers() -> None:
    """Ask an HTTP tracking server once, without retries, for any answer within
    CALIBFLOW_FIRST_ANSWER_TIMEOUT (10 s): a server that accepts connections and never answers
    (hung, or a port held by something else) raises StoreUnreachable naming it after that one
    wait, where MLflow's retries would repeat MLFLOW_HTTP_REQUEST_TIMEOUT for every request. A
    refused connection or an error answer is left to the request that follows, which retries and
    reports it. Once a server has answered, this process does not ask again; other stores are not
    asked."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")) or uri in _ANSWERED:
        return
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    from calibflow.environment import first_answer_timeout_s

    timeout = first_answer_timeout_s()
    started = time.monotonic()
    try:
        http_request(
            get_default_host_creds(uri),
            "/api/2.0/mlflow/experiments/search",
            "GET",
            max_retries=0,
            timeout=timeout,
            params={"max_results": 1},
        )
    except Exception as error:  # noqa: BLE001  only silence is said here
        if _timed_out(error):
            raise StoreUnreachable(
                f"the MLflow tracking server at {display_uri(uri)} did not answer: gave up after waiting "
                f"{time.monotonic() - started:.1f} s for a first answer (CALIBFLOW_FIRST_ANSWER_TIMEOUT={timeout:g}); "
                f"it accepts connections and says nothing: is it hung, or is another program on that port? "
                f"Check MLFLOW_TRACKING_URI"
            ) from None
        return
    _ANSWERED.add(uri)


def _timed_out(error: BaseException) -> bool:
    """True when `error` (or what it was raised from) is a connect or read timeout."""
    import requests
    import urllib3

    def timeout(seen: BaseException | None) -> bool:
        # urllib3's NewConnectionError (a refused connection) subclasses its ConnectTimeoutError
        return isinstance(seen, (requests.Timeout, urllib3.exceptions.TimeoutError)) and not isinstance(
            seen, urllib3.exceptions.NewConnectionError
        )

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, urllib3.exceptions.NewConnectionError):
            return False
        if timeout(seen) or (isinstance(seen, urllib3.exceptions.MaxRetryError) and timeout(seen.reason)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextmanager
def store_wait():
    """Turn a tracking server that did not answer the calls in this block into StoreUnreachable,
    whose message says which server, how long the block waited and what the retry settings were."""
    started = time.monotonic()
    try:
        yield
    except MlflowException as error:
        _redact_message(error)
        if not unreachable(error):
            raise
        waited = time.monotonic() - started
        settings = ", ".join(
            f"{name}={os.environ.get(name, 'MLflow default')}"
            for name in (
                "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                "MLFLOW_HTTP_REQUEST_TIMEOUT",
            )
        )
        raise StoreUnreachable(
            f"the MLflow tracking server at {tracking_uri_for_display()} did not answer: gave up "
            f"after waiting {waited:.1f} s ({settings}); is it running? ({_root_cause(error)})"
        ) from error


def _redact_message(error: MlflowException) -> None:
    """MLflow's messages quote the URL they requested, credentials included ("API request to
    http://user:password@host/... failed"): masked in place, so that no log line, state message or
    traceback built from the error shows them."""
    try:
        error.message = redact(str(error.message))
        error.args = tuple(redact(a) if isinstance(a, str) else a for a in error.args)
    except Exception:  # noqa: BLE001  an exception without these attributes: the log filters still mask it
        pass


def _root_cause(error: BaseException) -> str:
    """The innermost reason of a failed request, e.g. "... [Errno 111] Connection refused"."""
    import requests

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, requests.RequestException):
            reason = getattr(seen.args[0], "reason", None) if seen.args else None
            return redact(str(reason or seen))
        seen = seen.__cause__ or seen.__context__
    return redact(str(error))


class _AnsweringClient:
    """MlflowClient, each of whose calls runs under store_wait()."""

    def __init__(self, wrapped: MlflowClient):
        self._wrapped = wrapped

    def __getattr__(self, name: str):
        attribute = getattr(self._wrapped, name)
        if not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            with store_wait():
                return attribute(*args, **kwargs)

        return call


@dataclass(frozen=True)
class RunSource:
    """What MLflow's run page shows as "Created by" and "Source" (its standard mlflow.* tags, which
    MlflowClient.create_run does not set itself)."""

    name: str  # the entry point, e.g. flows/train_calibrate.py
    git_commit: str | None = None
    git_branch: str | None = None
    git_repo_url: str | None = None


def source_tags(source: RunSource) -> dict[str, str]:
    import getpass

    from mlflow.entities import SourceType
    from mlflow.utils import mlflow_tags

    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001  no login name (a container without one): MLflow's own fallback
        user = "unknown"
    tags = {
        mlflow_tags.MLFLOW_USER: user,
        mlflow_tags.MLFLOW_SOURCE_NAME: source.name,
        mlflow_tags.MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.LOCAL),
    }
    for key, value in (
        (mlflow_tags.MLFLOW_GIT_COMMIT, source.git_commit),
        (mlflow_tags.MLFLOW_GIT_BRANCH, source.git_branch),
        (mlflow_tags.MLFLOW_GIT_REPO_URL, source.git_repo_url),
    ):
        if value:
            tags[key] = value
    return tags


def start_run(
    experiment: str,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    repo_root: str | Path = ".",
    source: RunSource | None = None,
) -> str:
    c = client()
    found = c.get_experiment_by_name(experiment)
    if found:
        experiment_id = found.experiment_id
    else:
        # With the embedded store, MLflow would put artifacts in ./mlruns of whatever directory the
        # command ran from; pin them next to mlflow.db. A tracking server chooses its own.
        embedded = mlflow.get_tracking_uri() == _DEFAULT_URI_SET
        location = (Path(repo_root).resolve() / "mlruns").as_uri() if embedded else None
        experiment_id = c.create_experiment(experiment, artifact_location=location)
    standard = source_tags(source) if source is not None else {}
    run = c.create_run(experiment_id, run_name=run_name, tags={STATUS_TAG: "running", **standard, **(tags or {})})
    return run.info.run_id


DESCRIPTION_TAG = "mlflow.note.content"  # what MLflow's UI shows as a run's description


def set_run_description(run_id: str, text: str) -> None:
    set_tags(run_id, {DESCRIPTION_TAG: text})


def set_version_description(model_name: str, version: str, text: str) -> None:
    client().update_model_version(model_name, version, description=text)


def version_description(model_name: str, version: str) -> str:
    return client().get_model_version(model_name, version).description or ""


def log_dataset(
    run_id: str, name: str, source_uri: str, digest: str, context: str, profile: Mapping[str, Any] | None = None
) -> None:
    """Record the data a run read as an MLflow dataset input (the run page's "Datasets" and the
    experiment's dataset filter): `digest` is the DVC hash, `source_uri` where it lives."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    # MLflow's own record of a local folder: source type "local", source {"uri": ...}
    entity = Dataset(
        name=name,
        digest=digest,
        source_type="local",
        source=json.dumps({"uri": source_uri}),
        profile=json.dumps(dict(profile)) if profile is not None else None,
    )
    client().log_inputs(run_id, datasets=[DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])])


def log_params(run_id: str, params: Mapping[str, Any]) -> None:
    # MLflow caps a param value at 6000 characters; ours are short scalars and lists.
    batch = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in params.items()]
    for start in range(0, len(batch), 100):  # log_batch accepts at most 100 params per call
        client().log_batch(run_id, params=batch[start : start + 100])


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    now = int(time.time() * 1000)
    client().log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def set_tags(run_id: str, tags: Mapping[str, Any]) -> None:
    client().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_artifact(run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    client().log_artifact(run_id, str(path), artifact_path)


RUN_STATUS = {"failed": "FAILED", "killed": "KILLED"}  # MLflow's run status of an outcome; others FINISHED


def end_run(run_id: str, outcome: str, reason: str = "") -> None:
    """Close the run: outcome "succeeded", "skipped" (nothing to do), "failed" or "killed" (its
    process died without closing it), or an audit run's decision, with why."""
    status_tags = {STATUS_TAG: outcome}
    if reason:
        status_tags["calibflow.reason"] = reason[:4000]
    set_tags(run_id, status_tags)
    client().set_terminated(run_id, RUN_STATUS.get(outcome, "FINISHED"))


def running_runs(experiment: str) -> list[tuple[str, dict[str, str]]]:
    """(run id, tags) of the experiment's runs whose status is still RUNNING."""
    c = client()
    found = c.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = c.search_runs([found.experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000)
    return [(r.info.run_id, dict(r.data.tags)) for r in runs]


def download_run_artifact(run_id: str, artifact_path: str, destination: str | Path) -> Path:
    return Path(
        mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=str(destination))
    )


def log_audit_run(experiment: str, run_name: str, tags: Mapping[str, Any], report_path: str | Path) -> str:
    """An MLflow run recording a gate or promotion decision, with its report as an artifact."""
    run_id = start_run(experiment, run_name=run_name, tags={k: str(v) for k, v in tags.items()})
    log_artifact(run_id, report_path)
    end_run(run_id, str(tags.get("decision", "recorded")))
    return run_id
