"""Everything that talks to MLflow: run tracking, the calibrated pyfunc model, the registry.

This is the only module of the library that imports MLflow. Calls take an explicit run id
rather than relying on MLflow's "active run", because Prefect may run tasks on other threads.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode

from calibflow.disk_cache import file_sha256
from calibflow.tracking.names import CALIBRATED, TEMPERATURE, on_test, version_tag
from calibflow.errors import (
    ModelArtifactsChanged,
    PromotionConflict,
    RegistrationLeftBehind,
    StoreUnreachable,
    UnverifiedModel,
    one_line,
    unreachable,
)

CHAMPION = "champion"
CHALLENGER = "challenger"
STATUS_TAG = "calibflow.status"


_DEFAULT_URI_SET: str | None = None  # mlflow.set_tracking_uri also exports the URI to the environment


def configure_tracking(repo_root: str | Path = ".") -> str:
    """MLFLOW_TRACKING_URI when the user set it; otherwise MLflow 3's default store,
    sqlite:///mlflow.db, pinned to the repository root (not the current directory) so every
    command sees the same registry. The registry URI follows the tracking URI unless
    MLFLOW_REGISTRY_URI says otherwise (MLflow reads that itself)."""
    global _DEFAULT_URI_SET
    from_user = os.environ.get("MLFLOW_TRACKING_URI")
    if from_user and from_user != _DEFAULT_URI_SET:
        uri = from_user
    else:
        uri = _DEFAULT_URI_SET = f"sqlite:///{Path(repo_root).resolve() / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    return uri


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


def client() -> MlflowClient:
    """An MlflowClient whose calls raise StoreUnreachable, saying how long they waited, when the
    tracking server does not answer."""
    return _AnsweringClient(MlflowClient())  # type: ignore[return-value]  # same methods


@contextmanager
def store_wait():
    """Turn a tracking server that did not answer the calls in this block into StoreUnreachable,
    whose message says which server, how long the block waited and what the retry settings were."""
    started = time.monotonic()
    try:
        yield
    except MlflowException as error:
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
            f"the MLflow tracking server at {mlflow.get_tracking_uri()} did not answer: gave up "
            f"after waiting {waited:.1f} s ({settings}); is it running? ({_root_cause(error)})"
        ) from error


def _root_cause(error: BaseException) -> str:
    """The innermost reason of a failed request, e.g. "... [Errno 111] Connection refused"."""
    import requests

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, requests.RequestException):
            reason = getattr(seen.args[0], "reason", None) if seen.args else None
            return str(reason or seen)
        seen = seen.__cause__ or seen.__context__
    return str(error)


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


# ---------------------------------------------------------------------------------------------
# Tracking


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


# ---------------------------------------------------------------------------------------------
# The served model
#
# Stored so that loading it unpickles nothing: the network's weights are a state dict read with
# torch.load(weights_only=True), its shape, classes and calibrator are JSON, and the pyfunc is
# built by running calibflow/tracking/served_model_code.py (MLflow's models-from-code) rather than by
# unpickling a python_model.pkl. Every file of the stored model is hashed at registration
# (DIGEST_TAG), and load_model checks a downloaded copy against that hash before MLflow reads
# any of it; infra/TRUST.md says what that protects against.

SERVED_MODEL_CODE = Path(__file__).with_name("served_model_code.py")
DIGEST_TAG = "artifacts_sha256"
CLASSES_TAG = "classes"  # JSON list of the class folder names, in the order of the output columns


# What the served model returns, chosen with MLflow's inference params ({"output": ...}), declared
# in its signature. The default stays the probabilities, so clients written before decisions
# existed read the same array; the decision columns are docs/decisions.md's schema, versioned by
# calibflow.gates.decisions.DECISION_SCHEMA_VERSION.
OUTPUT_PARAM = "output"
OUTPUTS = ("probabilities", "decisions", "ood")


class CalibratedImageClassifier(mlflow.pyfunc.PythonModel):
    """pyfunc: a batch of uint8 images (N, H, W, C) in. Out, by default: calibrated class
    probabilities (N, K), float64, the network's fp32 logits through the fitted calibrator
    (softmax(logits / T) for temperature scaling; an ensemble's or MC dropout's mean of calibrated
    probabilities, calibflow.training.ensembles); column k is the class `classes[k]`. With
    params={"output": "decisions"}: a DataFrame, one row per image, of the fitted decision
    policy's answers (label, confidence, and abstained / positive / prediction_set when those
    rules are fitted) beside one column per class probability. With params={"output": "ood"}: a
    DataFrame of the out-of-distribution scores, `msp` (the top calibrated probability) and
    `energy` (-T logsumexp(z / T), lower = more in-distribution; calibflow.evaluation.ood), beside the
    class probabilities."""

    def load_context(self, context) -> None:
        self.load(context.artifacts)

    def load(self, artifacts: Mapping[str, str]) -> None:
        import torch

        from calibflow.gates.decisions import DecisionPolicy
        from calibflow.training.ensembles import model_calibrator_from_state
        from calibflow.training.models import ModelSpec, build_model

        network = json.loads(Path(artifacts["network"]).read_text())
        spec = ModelSpec(**network["spec"])
        self.classes = [str(name) for name in json.loads(Path(artifacts["classes"]).read_text())]
        if len(self.classes) != spec.num_classes:
            raise ValueError(
                f"the model lists {len(self.classes)} classes but its network has {spec.num_classes} outputs"
            )
        weights = torch.load(artifacts["weights"], map_location="cpu", weights_only=True)
        # An ensemble's weights file holds {"members": [state dict, ...]}; a single network's is its state dict.
        self.members = []
        for state in weights["members"] if "members" in weights else [weights]:
            member = build_model(spec)
            member.load_state_dict(state)
            self.members.append(member.eval())
        self.model = self.members[0]
        self.mc_samples, self.mc_seed = int(network.get("mc_samples", 1)), int(network.get("mc_seed", 0))
        self.image_mode = network["image_mode"]
        self.image_size = (spec.image_width, spec.image_height)
        state = json.loads(Path(artifacts["calibration"]).read_text())
        # States from before pluggable calibrators are {"method": "temperature", "temperature": T}
        # only; the class count they lack is the network's.
        state.setdefault("n_classes", spec.num_classes)
        self.calibrator = model_calibrator_from_state(state)
        # Versions registered before decisions have no policy: they decide the label only.
        self.decision_policy = (
            DecisionPolicy.load(artifacts["decisions"])
            if "decisions" in artifacts
            else DecisionPolicy(tuple(self.classes))
        )

    def logits(self, images: np.ndarray) -> np.ndarray | None:
        """The network's logits (N, K), or (N, M, K) for an ensemble; None for an empty batch."""
        import torch

        from calibflow.training.ensembles import predictive_logits

        images = np.asarray(images, dtype=np.uint8)
        if images.ndim != 4:
            raise ValueError(f"expected a batch of images shaped (N, H, W, C), got shape {images.shape}")
        if len(images) == 0:  # an empty batch has an empty answer, not an error
            return None
        return predictive_logits(
            self.members, torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), self.mc_samples, self.mc_seed
        ).numpy()

    def probabilities(self, images: np.ndarray, logits: np.ndarray | None = None) -> np.ndarray:
        logits = self.logits(images) if logits is None else logits
        if logits is None:
            return np.zeros((0, len(self.classes)), dtype=np.float64)
        return self.calibrator.transform(logits).numpy()

    def predict(self, context, model_input: np.ndarray, params=None):
        output = (params or {}).get(OUTPUT_PARAM, OUTPUTS[0])
        if output not in OUTPUTS:
            raise ValueError(f"params {{'{OUTPUT_PARAM}': {output!r}}}: use one of {', '.join(OUTPUTS)}")
        if output == "ood":
            return self.ood(model_input)
        probabilities = self.probabilities(model_input)
        if output == "probabilities":
            return probabilities
        return self.decisions(probabilities)

    def ood(self, images: np.ndarray):
        import pandas as pd

        from calibflow.evaluation.ood import ood_scores

        logits = self.logits(images)
        if logits is None:
            frame = pd.DataFrame({"msp": pd.Series(dtype=np.float64), "energy": pd.Series(dtype=np.float64)})
            probabilities = np.zeros((0, len(self.classes)))
        else:
            frame = pd.DataFrame(ood_scores(logits, self.calibrator))
            probabilities = self.probabilities(images, logits)
        for k, name in enumerate(self.classes):
            frame[f"p_{name}"] = probabilities[:, k]
        return frame

    def decisions(self, probabilities: np.ndarray):
        import pandas as pd

        frame = (
            pd.DataFrame(self.decision_policy.decide(probabilities))
            if len(probabilities)
            else pd.DataFrame({"label": pd.Series(dtype=object), "confidence": pd.Series(dtype=np.float64)})
        )
        for k, name in enumerate(self.classes):
            frame[f"p_{name}"] = probabilities[:, k]
        return frame


def declare_served_model() -> None:
    """Called by calibflow/tracking/served_model_code.py when MLflow runs it to build the pyfunc."""
    mlflow.models.set_model(CalibratedImageClassifier())


def write_model_files(
    checkpoint_path: str | Path,
    calibrator_state_path: str | Path,
    out_dir: str | Path,
    decisions_path: str | Path | None = None,
) -> dict[str, str]:
    """The served model's files, from a training checkpoint, a fitted calibrator and the decision
    policy (calibflow.gates.decisions; none: the label only): name -> path."""
    import torch

    from calibflow.training.models import load_checkpoint

    checkpoint = load_checkpoint(checkpoint_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        name: out / filename
        for name, filename in (
            ("weights", "weights.pt"),
            ("network", "network.json"),
            ("classes", "classes.json"),
            ("calibration", "calibration.json"),
        )
    }
    states = [{k: v.detach().cpu() for k, v in member.state_dict().items()} for member in checkpoint.members]
    torch.save(states[0] if len(states) == 1 else {"members": states}, files["weights"])
    files["network"].write_text(
        json.dumps(
            {
                "spec": asdict(checkpoint.spec),
                "image_mode": checkpoint.image_mode,
                "members": len(states),
                "mc_samples": checkpoint.mc_samples,
                "mc_seed": checkpoint.mc_seed,
            }
        )
    )
    files["classes"].write_text(json.dumps(list(checkpoint.classes)))
    files["calibration"].write_text(Path(calibrator_state_path).read_text())
    if decisions_path is not None:
        files["decisions"] = out / "decisions.json"
        files["decisions"].write_text(Path(decisions_path).read_text())
    return {name: str(path) for name, path in files.items()}


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    alias: str
    model_uri: str
    replaced: str | None = None  # the version `alias` pointed to before this one took it


def log_calibrated_model(
    run_id: str,
    checkpoint_path: str | Path,
    calibrator_state_path: str | Path,
    input_example: np.ndarray,
    decisions_path: str | Path | None = None,
    name: str = "calibrated_classifier",
) -> str:
    """Log the pyfunc (weights, network, classes, fitted calibrator, the calibflow code) to the run;
    return its URI."""
    from importlib.metadata import version as installed

    import torch

    import calibflow

    version = lambda v: v.split("+")[0]  # noqa: E731  local builds ("+cu130") are not on PyPI
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = write_model_files(checkpoint_path, calibrator_state_path, tmp, decisions_path)
        model = CalibratedImageClassifier()
        model.load(artifacts)
        # Build the signature from a real prediction so input and output specs are exact; the
        # output param is declared so MLflow accepts it, with the probabilities as its default.
        signature = infer_signature(
            input_example, model.predict(None, input_example), params={OUTPUT_PARAM: OUTPUTS[0]}
        )
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(SERVED_MODEL_CODE),
                artifacts=artifacts,
                code_paths=[str(Path(calibflow.__file__).parent)],
                signature=signature,
                input_example=input_example,
                pip_requirements=[
                    f"torch=={version(torch.__version__)}",
                    f"torchvision=={version(installed('torchvision'))}",
                    f"numpy=={np.__version__}",
                    f"mlflow=={mlflow.__version__}",
                    "pillow",
                ],
                metadata={
                    "classes": model.classes,
                    "image_mode": model.image_mode,
                    "calibration_method": model.calibrator.method,
                    "image_size": list(model.image_size),
                    "temperature": getattr(model.calibrator, "temperature", None),
                    "input": "uint8 images (N, H, W, C)",
                    "output": "calibrated probabilities (N, K)",
                    "outputs": {
                        "probabilities": "calibrated probabilities (N, K), float64 (the default)",
                        "decisions": "one row per image: label, confidence, abstained, positive, "
                        "prediction_set (the fitted rules), p_<class>; docs/decisions.md",
                        "ood": "one row per image: msp, energy (-T logsumexp(z/T)), p_<class>; docs/shift_and_ood.md",
                    },
                    "decision_schema_version": model.decision_policy.schema_version,
                },
            )
    return info.model_uri


def artifacts_digest(directory: str | Path) -> str:
    """sha256 over every file under `directory`, in order of relative path: the path, what it
    is (file or link) and the sha256 of its bytes (or link target). Changing, adding, removing or
    renaming any file changes it."""
    root = Path(directory)
    entries = []
    for folder, subfolders, files in os.walk(root):  # does not follow links
        for name in subfolders + files:
            path = Path(folder) / name
            relative = path.relative_to(root).as_posix()
            if path.is_symlink():
                entries.append((relative, "link", hashlib.sha256(os.readlink(path).encode()).hexdigest()))
            elif path.is_file():
                entries.append((relative, "file", file_sha256(path)))
    digest = hashlib.sha256()
    for relative, kind, content in sorted(entries):
        digest.update(f"{relative}\0{kind}\0{content}\n".encode())
    return digest.hexdigest()


def stored_model_tags(model_uri: str) -> dict[str, str]:
    """What registration records about a logged model's files (`models:/<model id>`, as
    log_calibrated_model returns): their digest and the class list."""
    # Downloaded from where the files are stored, not through the models:/ URI: that route adds a
    # registered_model_meta file of its own to the local copy.
    with tempfile.TemporaryDirectory() as tmp, store_wait():
        location = mlflow.get_logged_model(model_uri.removeprefix("models:/")).artifact_location
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=tmp))
        classes = json.loads((local / "artifacts" / "classes.json").read_text())
        return {DIGEST_TAG: artifacts_digest(local), CLASSES_TAG: json.dumps(classes)}


def register_version(model_uri: str, model_name: str, tags: Mapping[str, Any]) -> RegisteredVersion:
    """Register the logged model with all its tags in one call, then give it an alias: champion
    when the model has none yet, else challenger. The alias is the last write; if it fails, the
    new version is deleted again, so no half-registered version is left behind (or, when even
    that fails, RegistrationLeftBehind says so)."""
    c = client()
    tags = {**{k: str(v) for k, v in tags.items()}, **stored_model_tags(model_uri)}
    with store_wait():
        number = str(mlflow.register_model(model_uri, model_name, tags=tags).version)
    try:
        # Decided under the lock `promote` takes: two first registrations at once would otherwise
        # both see no champion, both report @champion, and leave one of them bare.
        with promotion_lock(model_name, _holder(f"registration of version {number}")):
            before = aliases(model_name)
            alias = CHALLENGER if before.get(CHAMPION) else CHAMPION
            c.set_registered_model_alias(model_name, alias, number)
    except Exception as error:
        _delete_version(model_name, number, error)
        raise
    return RegisteredVersion(model_name, number, alias, f"models:/{model_name}@{alias}", replaced=before.get(alias))


def _delete_version(model_name: str, version: str, cause: BaseException) -> None:
    try:
        client().delete_model_version(model_name, version)
    except Exception as error:
        raise RegistrationLeftBehind(
            f"version {version} of {model_name} was registered, then the run failed ({type(cause).__name__}: "
            f"{cause}), and deleting it failed too ({type(error).__name__}: {error}); it may still be registered, "
            f"with an alias: check `calibflow status --model {model_name}` and delete it in the MLflow UI, or with "
            f"MlflowClient().delete_model_version({model_name!r}, {version!r}), once the store answers"
        ) from cause


def _holder(what: str) -> str:
    import socket

    return f"{what}, pid {os.getpid()} on {socket.gethostname()}"


def alias_version(model_name: str, alias: str) -> str | None:
    """The version `alias` points at, or None when the model or the alias does not exist."""
    try:
        aliases = client().get_registered_model(model_name).aliases
    except MlflowException as error:
        if error.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise
    version = aliases.get(alias)
    return None if version is None else str(version)


@dataclass(frozen=True)
class VersionRecord:
    name: str
    version: str
    run_id: str
    tags: dict[str, str]


def alias_record(model_name: str, alias: str) -> VersionRecord | None:
    version = alias_version(model_name, alias)
    return None if version is None else resolve_model_uri(f"models:/{model_name}/{version}")


def resolve_model_uri(model_uri: str) -> VersionRecord:
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION` to the registry's record of that version."""
    if not model_uri.startswith("models:/"):
        raise ValueError(f"{model_uri!r} is not a registry URI: use models:/NAME@ALIAS or models:/NAME/VERSION")
    rest = model_uri.removeprefix("models:/")
    c = client()
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            version = c.get_model_version_by_alias(name, alias)
        else:
            name, number = rest.rsplit("/", 1)
            version = c.get_model_version(name, number)
    except (MlflowException, StoreUnreachable) as error:
        raise LookupError(
            f"{model_uri} not found in the registry at {mlflow.get_tracking_uri()}: {one_line(error)}"
        ) from error
    return VersionRecord(
        name=version.name, version=str(version.version), run_id=version.run_id, tags=dict(version.tags)
    )


def load_model(model_uri: str):
    """The registered pyfunc at `model_uri` (models:/NAME@ALIAS or models:/NAME/VERSION), loaded
    from a local copy of its files only after their digest matched the one recorded at
    registration: until then nothing of it is unpickled, imported or run. UnverifiedModel (a
    LookupError) when there is no digest to check or it does not match."""
    record = resolve_model_uri(model_uri)
    expected = record.tags.get(DIGEST_TAG)
    if not expected:
        raise UnverifiedModel(
            f"version {record.version} of {record.name} has no {DIGEST_TAG} tag: it was registered before calibflow "
            f"stored models without pickles and recorded their digest, so calibflow will not load it (its "
            f"python_model.pkl would run as code); use a version registered since (infra/TRUST.md says how to retire "
            f"such a version from @champion)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        location = client().get_model_version_download_uri(record.name, record.version)
        with store_wait():
            local = mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=tmp)
        found = artifacts_digest(local)
        if found != expected:
            raise ModelArtifactsChanged(
                f"model artifacts changed since registration: the files of version {record.version} of {record.name} "
                f"at {location} hash to {found}, not the {DIGEST_TAG} {expected} recorded when it was registered; "
                f"nothing of it was loaded. Restore them from a trusted copy or retrain (see infra/TRUST.md)"
            )
        warn_requirement_mismatches(local)
        # MLflow's own check of the same requirements resolves every installed package's import
        # names from its file list: 2.5 s of every model load here, for the four pins we write.
        return mlflow.pyfunc.load_model(local, suppress_warnings=True)


def requirement_mismatches(model_dir: str | Path) -> list[str]:
    """The model's pinned requirements (requirements.txt, `name==version`, as
    log_calibrated_model writes them) and Python version that this environment does not have."""
    import platform
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    from mlflow.models import Model

    found = []
    requirements = Path(model_dir) / "requirements.txt"
    for line in requirements.read_text().splitlines() if requirements.exists() else []:
        name, _, pinned = line.strip().partition("==")
        if not pinned or name.startswith(("#", "-")):
            continue
        try:
            here = installed(name).split("+")[0]
        except PackageNotFoundError:
            here = "not installed"
        if here != pinned.split("+")[0]:
            found.append(f"{name}=={pinned} (here {here})")
    flavor = Model.load(str(Path(model_dir) / "MLmodel")).flavors.get("python_function", {})
    python = flavor.get("python_version")
    if python and python.rsplit(".", 1)[0] != platform.python_version().rsplit(".", 1)[0]:
        found.append(f"python {python} (here {platform.python_version()})")
    return found


def warn_requirement_mismatches(model_dir: str | Path) -> None:
    import logging

    mismatches = requirement_mismatches(model_dir)
    if mismatches:
        logging.getLogger(__name__).warning(
            "the model was logged with %s; its predictions may differ here", ", ".join(mismatches)
        )


# ---------------------------------------------------------------------------------------------
# Promotion: aliases moved under a registry-wide lock, all or nothing

PREVIOUS_CHAMPION = "previous-champion"
LOCK_SUFFIX = "--promotion-lock"


@contextmanager
def promotion_lock(model_name: str, holder: str, wait_s: float = 30.0, stale_after_s: float = 900.0):
    """Exclusive lock on a model's aliases, made of the registry's own uniqueness rule: creating a
    registered model whose name exists fails atomically in every MLflow store (a unique key in
    SQL), so whoever creates `<name>--promotion-lock` holds the lock until it deletes it. Works
    across processes and machines that share the tracking server. A lock older than
    `stale_after_s` (a crashed holder) is broken."""
    c = client()
    lock_name = model_name + LOCK_SUFFIX
    deadline = time.monotonic() + wait_s
    while True:
        try:
            c.create_registered_model(
                lock_name,
                tags={"holder": holder, "acquired_at": str(time.time())},
                description=f"promotion lock of {model_name}; delete it only if its holder died",
            )
            break
        except MlflowException as error:
            if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            held = _lock_info(lock_name)
            if held and time.time() - float(held.get("acquired_at", "inf")) > stale_after_s:
                _delete_quietly(lock_name)
                continue
            if time.monotonic() > deadline:
                raise PromotionConflict(
                    f"another promotion of {model_name} holds the lock ({held or 'unknown holder'}); "
                    f"try again when it is done"
                ) from error
            time.sleep(0.2)
    try:
        yield
    finally:
        _delete_quietly(lock_name)


def _lock_info(lock_name: str) -> dict[str, str] | None:
    try:
        return dict(client().get_registered_model(lock_name).tags)
    except (MlflowException, StoreUnreachable):
        return None


def _delete_quietly(lock_name: str) -> None:
    try:
        client().delete_registered_model(lock_name)
    except (MlflowException, StoreUnreachable):
        pass


def aliases(model_name: str) -> dict[str, str]:
    return {alias: str(version) for alias, version in client().get_registered_model(model_name).aliases.items()}


def apply_aliases(model_name: str, target: Mapping[str, str | None]) -> None:
    """Move aliases to `target` (None deletes one). Any failure restores every alias as it was."""
    c = client()
    before = aliases(model_name)
    try:
        for alias, version in target.items():
            if version is None:
                if alias in before:
                    c.delete_registered_model_alias(model_name, alias)
            else:
                c.set_registered_model_alias(model_name, alias, version)
    except Exception:
        _restore_aliases(model_name, before, target)
        raise


def _restore_aliases(model_name: str, before: Mapping[str, str], touched: Mapping[str, str | None]) -> None:
    c = client()
    for alias in touched:
        try:
            if alias in before:
                c.set_registered_model_alias(model_name, alias, before[alias])
            else:
                c.delete_registered_model_alias(model_name, alias)
        except (MlflowException, StoreUnreachable):
            pass  # never set in the first place


def undo_registration(version: RegisteredVersion) -> None:
    """Take back a version that a failed run registered, and its promotion to @champion if it got
    one. Under the promotion lock, each alias the version moved goes back where it was unless
    another process has moved it since (compare-and-swap: a later registration's @challenger
    stays); then the version is deleted. Any failure raises RegistrationLeftBehind, which says
    what may be left."""
    name, number = version.name, version.version
    try:
        with promotion_lock(name, _holder(f"undoing the registration of version {number}")):
            current = aliases(name)
            # alias -> (where it pointed before this version, where this version left it); None: unset
            moved: dict[str, tuple[str | None, str | None]] = {version.alias: (version.replaced, number)}
            if version.alias == CHALLENGER and current.get(CHAMPION) == number:
                # Promoted since (`promote`, by this run or by CD): @champion goes back to the version
                # it replaced, now @previous-champion, and @previous-champion to where that one was
                # promoted from, as `rollback` does; @challenger, which `promote` dropped, comes back.
                replaced = current.get(PREVIOUS_CHAMPION)
                moved.update({CHAMPION: (replaced, number), CHALLENGER: (version.replaced, None)})
                if replaced:
                    before = resolve_model_uri(f"models:/{name}/{replaced}").tags.get("promoted_from") or None
                    moved[PREVIOUS_CHAMPION] = (before, replaced)
            c = client()
            for alias, (before, left) in moved.items():
                if current.get(alias) != left or before == left:
                    continue  # moved by someone else since, or nothing to undo
                if before is None:
                    c.delete_registered_model_alias(name, alias)
                else:
                    c.set_registered_model_alias(name, alias, before)
            c.delete_model_version(name, number)  # also drops any alias still on it
    except Exception as error:
        raise RegistrationLeftBehind(
            f"version {number} of {name} was registered as @{version.alias}, then the run failed, and taking it back "
            f"failed ({type(error).__name__}: {error}): it may still be registered and aliased; check `calibflow status "
            f"--model {name}` and delete it in the MLflow UI, or with MlflowClient().delete_model_version({name!r}, "
            f"{number!r}), once the store answers"
        ) from error


def set_version_tags(model_name: str, version: str, tags: Mapping[str, Any]) -> None:
    c = client()
    for key, value in tags.items():
        c.set_model_version_tag(model_name, version, key, str(value))


def list_versions(model_name: str) -> list[VersionRecord]:
    found = client().search_model_versions(_name_filter(model_name))
    return sorted(
        (VersionRecord(v.name, str(v.version), v.run_id, dict(v.tags)) for v in found if v.name == model_name),
        key=lambda r: int(r.version),
    )


def _name_filter(model_name: str) -> str:
    """An MLflow filter string selecting `model_name`. Its parser has no escape for a quote inside
    a quoted value (a name like "it's" broke `name='...'`), so the name is quoted with the quote
    it lacks; a name holding both is matched with LIKE, each quote a one-character wildcard, and
    callers keep only the exact name."""
    if "'" not in model_name:
        return f"name='{model_name}'"
    if '"' not in model_name:
        return f'name="{model_name}"'
    return "name LIKE '" + model_name.replace("'", "_").replace('"', "_") + "'"


def log_audit_run(experiment: str, run_name: str, tags: Mapping[str, Any], report_path: str | Path) -> str:
    """An MLflow run recording a gate or promotion decision, with its report as an artifact."""
    run_id = start_run(experiment, run_name=run_name, tags={k: str(v) for k, v in tags.items()})
    log_artifact(run_id, report_path)
    end_run(run_id, str(tags.get("decision", "recorded")))
    return run_id


# What `calibflow status` shows: here beside the registry rather than in calibflow.lifecycle.promotion,
# which imports torch and scipy for the gates; a status needs only the registry (under 2 s cold).
# The calibrated test ECE, accuracy and T under short column names, read with calibflow.tracking.names.version_tag
# so that versions registered before calibflow.tracking.names (tags ece_post, accuracy, temperature) show too.
STATUS_TAGS = {
    "ece": on_test(CALIBRATED, "ece"),
    "accuracy": on_test(CALIBRATED, "accuracy"),
    "temperature": TEMPERATURE,
    "data_hash": "data_hash",
    "promoted_from": "promoted_from",
}
STATUS_COLUMNS = ("version", "aliases", *STATUS_TAGS)


def status(model_name: str) -> list[dict[str, str]]:
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases(model_name).items():
        by_version.setdefault(version, []).append("@" + alias)
    return [
        {
            "version": r.version,
            "aliases": " ".join(sorted(by_version.get(r.version, []))),
            **{column: version_tag(r.tags, tag, "") for column, tag in STATUS_TAGS.items()},
        }
        for r in list_versions(model_name)
    ]
