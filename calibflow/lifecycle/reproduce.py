"""Rebuild a registered model's test split and recompute its metrics in a fresh process.

Everything comes from the registry: the version's tags name the data (path, DVC hash, git
revision), the run's artifacts hold the split indices, and the served pyfunc produces the
probabilities. Matching the logged numbers shows the gate read what the registry serves.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from calibflow.tracking import registration
from calibflow.tracking import served_model
from calibflow.tracking import store
from calibflow.config import DEFAULT_N_BINS
from calibflow.errors import is_store_error
from calibflow.gates.decisions import DECISION_TAG_PREFIX, DecisionPolicy, evaluate_policy
from calibflow.data.images import DECODED_AT_A_TIME, decode_image, load_images_nhwc
from calibflow.data.manifest import build_manifest, manifest_fingerprint
from calibflow.data.soft_labels import recorded_targets
from calibflow.metrics import probability_report, soft_report
from calibflow.disk_cache import file_sha256
from calibflow.errors import ModelArtifactsChanged, UnverifiedModel
from calibflow.names import CALIBRATED, RUN_ARTIFACTS_TAG, on_test, version_tag
from calibflow.data.splits import Split
from calibflow.data.versioning import DataVersion, resolve_recorded_data


@dataclass(frozen=True)
class Reproduction:
    model_uri: str
    version: str
    recomputed: dict[str, float]
    logged: dict[str, float]
    gates: str | None = None  # the gate verdict recorded at registration (registration.recorded_verdict)

    def mismatches(self, ece_tolerance: float = 1e-6) -> list[str]:
        """ECE to `ece_tolerance` (the served pyfunc recomputes the logits in another process);
        accuracy and every decision number exactly (counts of images, and thresholds read back
        from the model's own files)."""
        problems = [
            f"{name} {self.recomputed.get(name)!r} != logged {logged!r}"
            for name, logged in self.logged.items()
            if name.startswith(DECISION_TAG_PREFIX) and not _same(self.recomputed.get(name), logged)
        ]
        if abs(self.recomputed["ece"] - self.logged["ece"]) > ece_tolerance:
            problems.append(f"ece {self.recomputed['ece']!r} != logged {self.logged['ece']!r}")
        if self.recomputed["accuracy"] != self.logged["accuracy"]:
            problems.append(f"accuracy {self.recomputed['accuracy']!r} != logged {self.logged['accuracy']!r}")
        # the metrics against the soft labels (calibflow.metrics.soft), to the same tolerance
        problems += [
            f"{name} {self.recomputed.get(name)!r} != logged {logged!r}"
            for name, logged in self.logged.items()
            if name.startswith("soft_") and not abs(self.recomputed.get(name, np.inf) - logged) <= ece_tolerance
        ]
        # the corruption suite's cells: accuracy exactly, ECE and NLL to the same tolerance
        problems += [
            f"{name} {self.recomputed.get(name)!r} != logged {logged!r}"
            for name, logged in self.logged.items()
            if name.startswith("shift_")
            and not (
                self.recomputed.get(name) == logged
                if name.endswith("_accuracy")
                else abs(self.recomputed.get(name, np.inf) - logged) <= ece_tolerance
            )
        ]
        return problems


def _same(a: float | None, b: float) -> bool:
    return a is not None and (a == b or (np.isnan(a) and np.isnan(b)))


def predict_in_batches(model, images_nhwc: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """A loaded model's calibrated probabilities on images calibflow framed as the model frames them
    (served_model.framing_of): sent as they are."""
    params = served_model.framed_input_params(model.metadata.metadata) or None
    return np.concatenate(
        [model.predict(images_nhwc[i : i + batch_size], params=params) for i in range(0, len(images_nhwc), batch_size)]
    )


def verified_run_artifact(record: registration.VersionRecord, artifact_path: str, directory: str | Path) -> Path:
    """A file the version's run logged, downloaded and checked against the sha256 recorded in the
    version's tags at registration (RUN_ARTIFACTS_TAG): an edit in the artifact store since, or a
    version registered without the digest, is refused before anything reads the file."""
    import json

    recorded = json.loads(record.tags.get(RUN_ARTIFACTS_TAG) or "{}")
    if artifact_path not in recorded:
        raise UnverifiedModel(
            f"version {record.version} of {record.name} has no recorded digest of its run's {artifact_path} (tag "
            f"{RUN_ARTIFACTS_TAG}): it was registered before calibflow recorded them, so calibflow will not read "
            f"that file; retrain, or recalibrate a version registered since"
        )
    local = store.download_run_artifact(record.run_id, artifact_path, directory)
    found = file_sha256(local)
    if found != recorded[artifact_path]:
        raise ModelArtifactsChanged(
            f"run artifact {artifact_path} of version {record.version} of {record.name} (MLflow run {record.run_id}) "
            f"changed since registration: it hashes to {found}, not the {recorded[artifact_path]} recorded then; "
            f"nothing was read from it. Restore it from a trusted copy or retrain (see infra/TRUST.md)"
        )
    return Path(local)


@dataclass(frozen=True)
class RebuiltTestSplit:
    data: DataVersion
    manifest: pd.DataFrame
    split: Split


def rebuild_test_split(record: registration.VersionRecord, repo_root: str | Path = ".") -> RebuiltTestSplit:
    """The data a registered version was trained on, at its recorded revision (checked against its
    DVC hash), with the manifest and split indices of its run (checked against each other)."""
    tags = record.tags
    # A recalibrated version (calibflow.lifecycle.recalibrate) was measured on the new images it was fitted on.
    prefix = "recalibration_data" if "recalibration_data_hash" in tags else "data"
    data = resolve_recorded_data(repo_root, tags[f"{prefix}_path"], tags[f"{prefix}_rev"], tags[f"{prefix}_hash"])
    with tempfile.TemporaryDirectory() as tmp:
        split = Split.load(verified_run_artifact(record, "data/splits.json", tmp))
    manifest = build_manifest(data.local_dir)
    if manifest_fingerprint(manifest) != split.manifest_fingerprint:
        raise ValueError(f"the manifest of {data.path} at {data.rev} no longer matches the one the split was made on")
    return RebuiltTestSplit(data, manifest, split)


def served_classes(model) -> list[str]:
    """The class names of a loaded model's probability columns, in column order."""
    return [str(name) for name in model.metadata.metadata["classes"]]


def served_policy(model) -> DecisionPolicy | None:
    """The decision policy a loaded model serves; None for versions registered before decisions."""
    return getattr(model.unwrap_python_model(), "decision_policy", None)


def predict_rows(model, data_dir: str, manifest: pd.DataFrame, rows: np.ndarray) -> np.ndarray:
    """A loaded model's (registration.load_model) calibrated probabilities on manifest rows, decoded
    its own way, DECODED_AT_A_TIME at a time. Columns in the model's class order (served_classes)."""
    paths = manifest["path"].iloc[rows].tolist()
    if not paths:
        return np.zeros((0, len(served_classes(model))))
    return predict_files_of(model, data_dir, paths, digests=manifest["sha256"].iloc[rows].tolist())


def _framed_chunks(
    model, data_dir: str | Path, paths: list[str], digests: Sequence[str] | None = None
) -> Iterator[np.ndarray]:
    """uint8 (n, H, W, C) chunks of files under data_dir, framed as a loaded model frames them,
    DECODED_AT_A_TIME at a time. `digests`: each file's SHA-256 as its manifest recorded it, checked
    against the bytes decoded (images.checked_bytes), so that a file changed since is refused, not
    measured."""
    meta = model.metadata.metadata
    framing = served_model.framing_of(meta)
    for start in range(0, len(paths), DECODED_AT_A_TIME):
        end = start + DECODED_AT_A_TIME
        yield load_images_nhwc(
            data_dir,
            paths[start:end],
            meta["image_mode"],
            framing,
            digests=None if digests is None else digests[start:end],
        )


def predict_files_of(
    model, data_dir: str | Path, paths: list[str], *, digests: Sequence[str] | None = None
) -> np.ndarray:
    """A loaded model's calibrated probabilities on files under data_dir (_framed_chunks): memory
    bounded whatever their number."""
    return np.concatenate(
        [predict_in_batches(model, chunk) for chunk in _framed_chunks(model, data_dir, paths, digests)]
    )


def decode_rows(model, data_dir: str, manifest: pd.DataFrame, rows: np.ndarray) -> np.ndarray:
    """uint8 images (N, H, W, C) of manifest rows, decoded as a loaded model takes them, each
    file's bytes checked against the manifest's SHA-256."""
    meta = model.metadata.metadata
    return load_images_nhwc(
        data_dir,
        manifest["path"].iloc[rows].tolist(),
        meta["image_mode"],
        served_model.framing_of(meta),
        digests=manifest["sha256"].iloc[rows].tolist(),
    )


def shift_predictions(model, data_dir: str, manifest: pd.DataFrame, rows: np.ndarray, suite) -> dict[str, np.ndarray]:
    """A loaded model's calibrated probabilities on every cell of a corruption suite, on the
    manifest rows (corrupted as in the run: seeded by each image's bytes, so the same pixels), a
    cell at a time, as the run made them, decoded DECODED_AT_A_TIME rows at a time."""
    from calibflow.evaluation.corruptions import corrupt_batch

    if len(rows) == 0:
        return {key: np.zeros((0, len(served_classes(model)))) for key in suite.keys}
    parts: dict[str, list[np.ndarray]] = {key: [] for key in suite.keys}
    for start in range(0, len(rows), DECODED_AT_A_TIME):
        images = decode_rows(model, data_dir, manifest, rows[start : start + DECODED_AT_A_TIME])
        for corruption, severity in suite.cells:
            cell = corrupt_batch(images, corruption, severity, suite.seed)
            parts[suite.key(corruption, severity)].append(predict_in_batches(model, cell))
    return {key: np.concatenate(found) for key, found in parts.items()}


def ood_scores_of(model, images_nhwc: np.ndarray, batch_size: int = 1024) -> dict[str, np.ndarray]:
    """A loaded model's out-of-distribution scores ({"msp", "energy"}) on uint8 images (N, H, W, C),
    from the served pyfunc (params={"output": "ood"})."""
    params = {served_model.OUTPUT_PARAM: "ood", **served_model.framed_input_params(model.metadata.metadata)}
    frames = [
        model.predict(images_nhwc[i : i + batch_size], params=params) for i in range(0, len(images_nhwc), batch_size)
    ]
    return {name: np.concatenate([np.asarray(f[name], np.float64) for f in frames]) for name in ("msp", "energy")}


def recorded_ood_scores(
    model, record: registration.VersionRecord, rebuilt: RebuiltTestSplit, repo_root: str | Path = "."
) -> tuple[str, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(score name, scores on the test split, scores on the OOD images) of a version registered
    with an OOD folder (ood.OOD_TAG): the folder re-read at its recorded revision and checked
    against its DVC hash and the digest of the files the version scored, both sets scored by the
    served pyfunc, each file checked against its digest as it is decoded. KeyError when the version
    has no OOD folder."""
    import json

    from calibflow.evaluation.ood import OOD_TAG, recorded_ood_files

    recorded = json.loads(record.tags[OOD_TAG])
    folder = recorded_ood_files(repo_root, recorded)
    test = rebuilt.split.indices["test"]
    outside = ood_scores_of_files(model, folder.local_dir, folder.files, digests=folder.sha256)
    inside = ood_scores_of_files(
        model,
        rebuilt.data.local_dir,
        rebuilt.manifest["path"].iloc[test].tolist(),
        digests=rebuilt.manifest["sha256"].iloc[test].tolist(),
    )
    return recorded["score"], inside, outside


def ood_scores_of_files(
    model, data_dir: str | Path, paths: list[str], *, digests: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """ood_scores_of on files (_framed_chunks)."""
    chunks = [ood_scores_of(model, chunk) for chunk in _framed_chunks(model, data_dir, paths, digests)]
    return {name: np.concatenate([chunk[name] for chunk in chunks]) for name in ("msp", "energy")}


def reproduce_shift(model, record: registration.VersionRecord, rebuilt: RebuiltTestSplit) -> tuple[dict, dict]:
    """(recomputed, logged) per-cell accuracy, ECE and NLL after calibration of the version's
    corruption suite: the run's shift/shift_metrics.json against the served pyfunc on the
    rebuilt, re-corrupted test images."""
    import json

    from calibflow.evaluation.shift import SUITE_TAG, Suite, cell_report

    suite = Suite.from_json(record.tags[SUITE_TAG])
    with tempfile.TemporaryDirectory() as tmp:
        logged_result = json.loads(verified_run_artifact(record, "shift/shift_metrics.json", tmp).read_text())
    rows = suite.images(rebuilt.split.indices["test"], rebuilt.manifest)
    labels = rebuilt.manifest["label_index"].to_numpy()[rows]
    n_bins = int(record.tags.get("n_bins", DEFAULT_N_BINS))
    recomputed, logged = {}, {}
    for key, probabilities in shift_predictions(model, rebuilt.data.local_dir, rebuilt.manifest, rows, suite).items():
        for name, value in cell_report(probabilities, labels, n_bins).items():
            recomputed[f"shift_{key}_{name}"] = value
            logged[f"shift_{key}_{name}"] = float(logged_result["cells"][key]["after"][name])
    return recomputed, logged


def reproduce(model_uri: str, repo_root: str | Path = ".") -> Reproduction:
    record = registration.resolve_model_uri(model_uri)
    rebuilt = rebuild_test_split(record, repo_root)
    rows = rebuilt.split.indices["test"]
    # The version just resolved, even if the alias moves meanwhile.
    model = registration.load_model(f"models:/{record.name}/{record.version}")
    probabilities = predict_rows(model, rebuilt.data.local_dir, rebuilt.manifest, rows)
    labels = rebuilt.manifest["label_index"].to_numpy()[rows]
    tags = record.tags
    recomputed = probability_report(probabilities, labels, int(tags.get("n_bins", DEFAULT_N_BINS)))
    # calibflow.names' tags (test/calibrated/ece, ...), or a version registered before them (ece_post, ...)
    logged = {
        name: float(version_tag(tags, on_test(CALIBRATED, name))) for name in ("ece", "accuracy", "nll", "brier", "mce")
    }
    targets = recorded_targets(tags, rebuilt.data.local_dir, rebuilt.manifest.iloc[rows], served_classes(model))
    if targets is not None:
        soft = soft_report(probabilities, targets, int(tags.get("n_bins", DEFAULT_N_BINS)))
        recomputed.update(soft)
        logged.update({name: float(tags[on_test(CALIBRATED, name)]) for name in soft})
    decided = {name: float(value) for name, value in tags.items() if name.startswith(DECISION_TAG_PREFIX)}
    policy = served_policy(model)
    if decided and policy is not None:
        confidence = decided.pop(f"{DECISION_TAG_PREFIX}confidence")
        logged.update(decided)
        recomputed.update(
            {
                f"{DECISION_TAG_PREFIX}{name}": float(value)
                for name, value in evaluate_policy(policy, probabilities, labels, confidence).items()
                if "_class_" not in name
            }
        )
    from calibflow.evaluation.shift import SUITE_TAG

    if tags.get(SUITE_TAG):
        shift_recomputed, shift_logged = reproduce_shift(model, record, rebuilt)
        recomputed.update(shift_recomputed)
        logged.update(shift_logged)
    return Reproduction(
        model_uri=model_uri,
        version=record.version,
        recomputed=recomputed,
        logged=logged,
        gates=recorded_gates(record),
    )


def recorded_gates(record: registration.VersionRecord) -> str | None:
    """The verdict the version's gates gave when it was registered: from its own tags, or (a
    version registered before they carried it) from its run's gate tags; None when neither has one."""
    verdict = registration.recorded_verdict(record.tags)
    if verdict is None and record.run_id:
        try:
            verdict = registration.recorded_verdict(store.client().get_run(record.run_id).data.tags)
        except Exception as error:
            if not is_store_error(error):
                raise
            return None  # its run deleted: the reproduction still stands, with no verdict to show
    return verdict


@dataclass(frozen=True)
class Prediction:
    path: str
    label: str  # the top class, or "abstain" when the model's abstention rule holds it back
    probability: float  # the top class's calibrated probability
    decisions: dict = field(default_factory=dict)  # the other fitted rules' answers (positive, prediction_set)


def predict_files(model_uri: str, paths: list[str]) -> list[Prediction]:
    """Each file's calibrated answer, the files decoded DECODED_AT_A_TIME at a time: memory bounded
    whatever their number."""
    if not paths:
        return []
    model = registration.load_model(model_uri)
    meta = model.metadata.metadata
    framing = served_model.framing_of(meta)
    chunks = (paths[start : start + DECODED_AT_A_TIME] for start in range(0, len(paths), DECODED_AT_A_TIME))
    probabilities = np.concatenate(
        [
            predict_in_batches(model, np.stack([decode_image(p, meta["image_mode"], framing) for p in chunk]))
            for chunk in chunks
        ]
    )
    policy = served_policy(model) or DecisionPolicy(tuple(served_classes(model)))
    decided = policy.decide(probabilities)
    extra = [name for name in ("positive", "prediction_set") if name in decided]
    return [
        Prediction(
            path=p,
            label=str(decided["label"][i]),
            probability=float(decided["confidence"][i]),
            decisions={name: _plain(decided[name][i]) for name in extra},
        )
        for i, p in enumerate(paths)
    ]


def _plain(value):
    return bool(value) if isinstance(value, np.bool_) else value
