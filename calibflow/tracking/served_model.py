"""The served model: the calibrated pyfunc MLflow serves, the files it is stored as, and their digest.

Stored so that loading it unpickles nothing: the network's weights are a state dict read with
torch.load(weights_only=True), its shape, classes and calibrator are JSON, and the pyfunc is built
by running calibflow/tracking/served_model_code.py (MLflow's models-from-code) rather than by
unpickling a python_model.pkl. Every file of the stored model is hashed at registration
(DIGEST_TAG), and registration.load_model checks a downloaded copy against that hash before MLflow
reads any of it; infra/TRUST.md says what that protects against.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import Schema, TensorSpec

from calibflow.disk_cache import file_sha256
from calibflow.errors import ServedModelRefusal
from calibflow.tracking.store import store_wait

if TYPE_CHECKING:
    from calibflow.data.images import Framing


SERVED_MODEL_CODE = Path(__file__).with_name("served_model_code.py")


DIGEST_TAG = "artifacts_sha256"


CLASSES_TAG = "classes"  # JSON list of the class folder names, in the order of the output columns


# What the served model returns, chosen with MLflow's inference params ({"output": ...}), declared
# in its signature. The default stays the probabilities, so clients written before decisions
# existed read the same array; the decision columns are docs/decisions.md's schema, versioned by
# calibflow.gates.decisions.DECISION_SCHEMA_VERSION.
OUTPUT_PARAM = "output"


OUTPUTS = ("probabilities", "decisions", "ood")


# What the served model is given, chosen with the inference param {"input": ...}: "photos" (the
# default), images of any size, each framed as the pipeline framed its files (data.image_size:
# Resize + CenterCrop; else stretched to the one size, when it differs); "framed", images already
# at the network's size, read as they are (what calibflow's own commands send: corrupted copies
# of framed images, and files they framed themselves).
INPUT_PARAM = "input"
INPUTS = ("photos", "framed")


class RequestError(MlflowException, ServedModelRefusal):
    """A request the served model cannot answer, said in words. An MlflowException with
    INVALID_PARAMETER_VALUE, so that `mlflow models serve` answers 400 with this message (any other
    exception becomes its generic "unexpected error" with the message buried in a stack trace); a
    ServedModelRefusal (a ValueError) for callers in this process, whose error policy refuses it
    rather than blaming the store."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


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

        from calibflow.data.images import Framing
        from calibflow.gates.decisions import DecisionPolicy
        from calibflow.training.ensembles import model_calibrator_from_state
        from calibflow.training.models import ModelSpec, build_model, prepare_for_inference

        network = json.loads(Path(artifacts["network"]).read_text())
        spec = ModelSpec.from_record(network["spec"])
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
            # Prepared once as the flow read its logits (folded, laid out): concurrent requests
            # never move weights, and T reads the numbers it was fitted on.
            self.members.append(prepare_for_inference(member, "cpu", network.get("folds")))
        self.model = self.members[0]
        self.mc_samples, self.mc_seed = int(network.get("mc_samples", 1)), int(network.get("mc_seed", 0))
        self.image_mode = network["image_mode"]
        self.image_size = (spec.image_width, spec.image_height)
        # How an image of another size becomes the network's input: data.image_size's Resize +
        # CenterCrop, or (a model of one image size) a stretch to it.
        self.framing = (
            Framing.from_record(network["framing"])
            if network.get("framing")
            else Framing(spec.image_width, spec.image_height)
        )
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

    def framed(self, images: np.ndarray) -> np.ndarray:
        """Images of any size (N, H, W, C), each framed as the pipeline framed its files: the same
        Framing on the same PIL image, so the same pixels as a file of these pixels gave in training
        and evaluation. ValueError naming the image for one below the model's smallest side."""
        from PIL import Image

        if images.shape[1:3] == (self.image_size[1], self.image_size[0]) and self.framing.resize is None:
            return images  # already the one size, which a stretch leaves as it is
        out = []
        for index, image in enumerate(images):
            picture = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image, mode=self.image_mode)
            if min(picture.size) < self.framing.min_side:
                raise RequestError(
                    f"image {index} of the request: {picture.size[0]}x{picture.size[1]} pixels, smaller than "
                    f"the {self.framing.min_side} pixels on its shorter side this model was trained to read "
                    f"(data.min_side): send a larger image"
                )
            array = np.asarray(self.framing.apply(picture), dtype=np.uint8)
            out.append(array[:, :, None] if array.ndim == 2 else array)
        return np.stack(out)

    def logits(self, images: np.ndarray, *, framed: bool = False) -> np.ndarray | None:
        """The network's logits (N, K), or (N, M, K) for an ensemble; None for an empty batch.
        `framed`: the images are at the network's size already (INPUTS' "framed"); else each is
        framed first (self.framed)."""
        import torch

        from calibflow.training.ensembles import predictive_logits

        images = np.asarray(images, dtype=np.uint8)
        channels = len(self.image_mode)
        if images.ndim != 4 or images.shape[3] != channels:
            raise RequestError(
                f"expected a batch of {self.image_mode} images shaped (N, H, W, {channels}), got shape {images.shape}"
            )
        if len(images) == 0:  # an empty batch has an empty answer, not an error
            return None
        if not framed:
            images = self.framed(images)
        elif images.shape[1:3] != (self.image_size[1], self.image_size[0]):
            raise RequestError(
                f"params {{'{INPUT_PARAM}': 'framed'}} reads images at the network's {self.image_size[0]}x"
                f"{self.image_size[1]}, got {images.shape[2]}x{images.shape[1]}: send them with the default "
                f"'{INPUTS[0]}' for the model to frame them"
            )
        return predictive_logits(
            self.members, torch.from_numpy(images).permute(0, 3, 1, 2), self.mc_samples, self.mc_seed
        ).numpy()

    def probabilities(
        self, images: np.ndarray, logits: np.ndarray | None = None, *, framed: bool = False
    ) -> np.ndarray:
        logits = self.logits(images, framed=framed) if logits is None else logits
        if logits is None:
            return np.zeros((0, len(self.classes)), dtype=np.float64)
        return self.calibrator.transform(logits).numpy()

    def predict(self, context, model_input: np.ndarray, params=None):
        params = params or {}
        output = params.get(OUTPUT_PARAM, OUTPUTS[0])
        if output not in OUTPUTS:
            raise RequestError(f"params {{'{OUTPUT_PARAM}': {output!r}}}: use one of {', '.join(OUTPUTS)}")
        given = params.get(INPUT_PARAM, INPUTS[0])
        if given not in INPUTS:
            raise RequestError(f"params {{'{INPUT_PARAM}': {given!r}}}: use one of {', '.join(INPUTS)}")
        framed = given == "framed"
        if output == "ood":
            return self.ood(model_input, framed=framed)
        probabilities = self.probabilities(model_input, framed=framed)
        if output == "probabilities":
            return probabilities
        return self.decisions(probabilities)

    def ood(self, images: np.ndarray, *, framed: bool = False):
        import pandas as pd

        from calibflow.evaluation.ood import ood_scores

        logits = self.logits(images, framed=framed)
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

    from calibflow.training.models import batch_norm_folds, load_checkpoint

    checkpoint = load_checkpoint(checkpoint_path)
    # the BatchNorms the served model folds at load: the checkpoint's, or traced now for one saved
    # before checkpoints recorded them, so that loading never traces (prepare_for_inference)
    folds = checkpoint.folds if checkpoint.folds is not None else batch_norm_folds(checkpoint.model)
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
                "framing": checkpoint.framing.to_record() if checkpoint.framing is not None else None,
                "members": len(states),
                "mc_samples": checkpoint.mc_samples,
                "mc_seed": checkpoint.mc_seed,
                "folds": folds,
            }
        )
    )
    files["classes"].write_text(json.dumps(list(checkpoint.classes)))
    files["calibration"].write_text(Path(calibrator_state_path).read_text())
    if decisions_path is not None:
        files["decisions"] = out / "decisions.json"
        files["decisions"].write_text(Path(decisions_path).read_text())
    return {name: str(path) for name, path in files.items()}


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
        # the example is framed already (input_example): read as it is, as calibflow's commands send it
        signature = infer_signature(
            input_example,
            model.predict(None, input_example, params={INPUT_PARAM: "framed"}),
            params={OUTPUT_PARAM: OUTPUTS[0], INPUT_PARAM: INPUTS[0]},
        )
        if model.framing.resize is not None:
            # images of any height and width: the model frames each one (data.image_size)
            signature.inputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, len(model.image_mode)))])
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(SERVED_MODEL_CODE),
                artifacts=artifacts,
                code_paths=[str(Path(calibflow.__file__).parent)],
                signature=signature,
                # with its params: MLflow checks the example by predicting it, and it is framed already
                input_example=(input_example, {INPUT_PARAM: "framed"}),
                pip_requirements=[
                    f"torch=={version(torch.__version__)}",
                    f"torchvision=={version(installed('torchvision'))}",
                    f"numpy=={np.__version__}",
                    f"mlflow=={mlflow.__version__}",
                    # the served model frames each photo with Pillow's decoder and resize: another
                    # version could give other pixels than training read
                    f"pillow=={installed('pillow')}",
                ],
                metadata={
                    "classes": model.classes,
                    "image_mode": model.image_mode,
                    "calibration_method": model.calibrator.method,
                    "image_size": list(model.image_size),
                    "temperature": getattr(model.calibrator, "temperature", None),
                    "framing": model.framing.to_record(),
                    "input": _input_description(model),
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


def framing_of(metadata: Mapping) -> Framing:
    """How a registered model (its MLflow metadata) frames an image: data.image_size's Resize +
    CenterCrop, or for a model of one image size a stretch to it."""
    from calibflow.data.images import Framing

    if metadata.get("framing"):
        return Framing.from_record(metadata["framing"])
    width, height = metadata["image_size"]
    return Framing(int(width), int(height))


def framed_input_params(metadata: Mapping) -> dict[str, str]:
    """The params that send images calibflow framed itself (framing_of) to a registered model as
    they are: {"input": "framed"} for a model that declares the param; versions registered
    before it read every image as it is, and are sent none."""
    return {INPUT_PARAM: "framed"} if "framing" in metadata else {}


def _input_description(model: CalibratedImageClassifier) -> str:
    width, height = model.image_size
    framing = model.framing
    how = (
        f"of any size, each resized to {framing.resize} px on its shorter side and cropped to the centre "
        f"{width}x{height} (torchvision's Resize + CenterCrop, as evaluation read the files)"
        if framing.resize is not None
        else f"at {width}x{height}, the size every training image had"
    )
    return f"uint8 {model.image_mode} images (N, H, W, {len(model.image_mode)}) {how}; params {{'{INPUT_PARAM}': 'framed'}}: already {width}x{height}, read as they are"


# MLflow writes this file into the folder it downloads a registered model to, whenever that folder
# is fetched through a models:/NAME/VERSION or models:/NAME@ALIAS URI (ModelsArtifactRepository.
# download_artifacts): YAML of the two keys model_name and model_version. On a local store that
# "download" is the stored folder itself, so `mlflow models serve -m models:/...` or
# mlflow.pyfunc.load_model on such a URI leaves it among the files registration hashed. MLflow never
# reads it back when loading, yet it sits in the folder MLflow loads from: so it is left out of the
# digest only when it is exactly that record of the version being checked (artifacts_digest's
# registered_as), and hashed like any other file otherwise, which fails the check.
REGISTERED_MODEL_META = "registered_model_meta"


def is_mlflow_registered_model_meta(path: Path, model_name: str, model_version: str) -> bool:
    """Whether `path` is a plain file holding exactly what MLflow writes for this model's name and
    version, and nothing else."""
    import yaml

    if path.is_symlink() or not path.is_file() or path.stat().st_size > 4096:
        return False
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError):
        return False
    if not isinstance(content, dict) or set(content) != {"model_name", "model_version"}:
        return False
    name, version = content["model_name"], content["model_version"]
    # MLflow writes the version as the URI spells it (a string) or as the registry answers an alias
    # (an integer); a bool is neither.
    version_ok = (isinstance(version, str) or (isinstance(version, int) and not isinstance(version, bool))) and str(
        version
    ) == str(model_version)
    return isinstance(name, str) and name == model_name and version_ok


def artifacts_digest(directory: str | Path, registered_as: tuple[str, str] | None = None) -> str:
    """sha256 over every file under `directory`, in order of relative path: the path, what it
    is (file or link) and the sha256 of its bytes (or link target). Changing, adding, removing or
    renaming any file changes it. With registered_as=(name, version), a top-level
    registered_model_meta that is exactly MLflow's record of that name and version is left out
    (REGISTERED_MODEL_META says why); with any other content it counts like any file."""
    root = Path(directory)
    entries = []
    for folder, subfolders, files in os.walk(root):  # does not follow links
        for name in subfolders + files:
            path = Path(folder) / name
            relative = path.relative_to(root).as_posix()
            if (
                registered_as is not None
                and relative == REGISTERED_MODEL_META
                and is_mlflow_registered_model_meta(path, *registered_as)
            ):
                continue
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
