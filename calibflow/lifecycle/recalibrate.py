"""`calibflow recalibrate`: a new calibrator for a registered network, on newly labeled images.

When monitoring says the calibration drifted but the accuracy held (`calibflow monitor` exit 1),
retraining is not needed: the network's logits on newly labeled images (a DVC-pinned ImageFolder
with the model's classes) are split, stratified and seeded, into a calibration half and a test half;
`calibration.method` is fitted on the first; the gates read the second, the relative ones against
the version being recalibrated (the champion, by default) on the same images. A version that
passes the absolute gates is registered with the network's weights byte for byte (the served
`weights.pt` is written from the source run's checkpoint, as the source's was), the new calibrator,
tag `recalibrated_from`, the source's lineage tags (data_hash, params_hash, git_commit, ...) and
the new data's as `recalibration_data_*`. It gets @challenger; `calibflow promote` moves
@champion as for any candidate, reading the new test half (reproduce.rebuild_test_split follows
`recalibration_data_*`). No training: the cost is one forward pass over the new images.

Not supported yet: a source whose served decision rules (decision:) were fitted to its old
calibrator; those thresholds would be stale, so such a version must be retrained.
"""

from __future__ import annotations

import json
import tempfile
import time
from functools import partial
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from calibflow.tracking import registration
from calibflow.tracking import served_model
from calibflow.tracking import store
from calibflow.config import Config
from calibflow.gates.checks import GateVerdict, Predictions, evaluate_gates
from calibflow.errors import GateInputError
from calibflow.data.images import DECODED_AT_A_TIME, load_images_nhwc
from calibflow.data.manifest import build_manifest, manifest_fingerprint, save_manifest
from calibflow.metrics import probability_report
from calibflow.names import CALIBRATED, CALIBRATION_METHOD, TEMPERATURE, UNCALIBRATED, on_test
from calibflow.lifecycle.promotion import champion_for, seen_by
from calibflow.lifecycle.reproduce import (
    decode_rows,
    predict_rows,
    served_classes,
    served_policy,
    verified_run_artifact,
)
from calibflow.pipeline.tagging import gate_tags, run_artifact_tags, run_verdict
from calibflow.data.splits import stratified_split
from calibflow.data.versioning import resolve_data
from calibflow.errors import RecalibrationError

# What a recalibrated version keeps from its source: the network's lineage.
LINEAGE_TAGS = (
    "data_hash",
    "data_path",
    "data_rev",
    "git_commit",
    "code_tree",
    "params_hash",
    "init_weights_sha256",
    "seed",
    "split_digest",
    "manifest_fingerprint",
)
RECALIBRATION_FRACTIONS = {"train": 0.0, "val": 0.0, "calibration": 0.5, "test": 0.5}


@dataclass
class Recalibration:
    source: registration.VersionRecord
    run_id: str
    verdict: GateVerdict
    before: dict[str, float]  # the source's calibrator on the new test half
    after: dict[str, float]  # the new calibrator on it
    seconds: float
    version: registration.RegisteredVersion | None = None  # None: rejected by the gates

    @property
    def registered(self) -> bool:
        return self.version is not None


def _shift_inputs(served, calibrator, new: NewImages, config: Config, champion, source):
    """The corruption suite (shift:) on the new test half, when a shift gate reads it: the
    candidate's probabilities per cell, the champion's beside them for the increase gate (on the
    same images, framed as the champion frames them), and the suite tag that lets `calibflow gate`
    rebuild it; a cell at a time. The OOD gate reads a folder recorded by a training run; a
    recalibration has none."""
    from calibflow.evaluation.corruptions import corrupt_batch
    from calibflow.evaluation.shift import SUITE_TAG, cell_report, suite_of

    gates = config.gates
    if gates.max_ood_fpr95 is not None:
        raise RecalibrationError(
            "gates.max_ood_fpr95 reads the OOD folder of the run that trained the network; a "
            "recalibration has none: pass --set gates.max_ood_fpr95=null, or retrain"
        )
    if gates.max_shift_ece is None and gates.max_shift_ece_increase is None:
        return None, None, {}, None
    suite = suite_of(config.shift, config.seed)
    rows = suite.images(new.test_rows, new.manifest)
    labels = new.labels[rows]
    champion_model = champion_loaded = None
    if champion is not None and gates.max_shift_ece_increase is not None:
        if champion.version == source.version:
            champion_model = served
        else:
            champion_loaded = registration.load_model(f"models:/{source.name}/{champion.version}")
            champion_model = champion_loaded.unwrap_python_model()
    ours: dict[str, list[np.ndarray]] = {key: [] for key in suite.keys}
    theirs_parts: dict[str, list[np.ndarray]] = {key: [] for key in suite.keys}
    # DECODED_AT_A_TIME rows at a time, each chunk's cells made and read before the next is decoded
    for start in range(0, len(rows), DECODED_AT_A_TIME):
        chunk = rows[start : start + DECODED_AT_A_TIME]
        clean = new.images(chunk)
        champion_clean = (
            decode_rows(champion_loaded, new.data.local_dir, new.manifest, chunk)
            if champion_loaded is not None and champion_model.framing != served.framing
            else clean
        )
        for corruption, severity in suite.cells:
            key = suite.key(corruption, severity)
            cell = corrupt_batch(clean, corruption, severity, suite.seed)
            ours[key].append(served.logits(cell, framed=True))
            if champion_model is not None:
                if champion_clean is not clean:
                    cell = corrupt_batch(champion_clean, corruption, severity, suite.seed)
                theirs_parts[key].append(champion_model.probabilities(cell, framed=True))
    logits = {key: np.concatenate(parts) for key, parts in ours.items()}
    theirs = (
        {key: Predictions(np.concatenate(parts), labels) for key, parts in theirs_parts.items()}
        if champion_model is not None
        else {}
    )
    shift = {key: Predictions(calibrator.transform(z).numpy(), labels) for key, z in logits.items()}
    n_bins = config.evaluation.n_bins
    # what `calibflow evaluate` reproduces (reproduce.reproduce_shift), as the run's shift/shift_metrics.json
    metrics = {
        "suite": json.loads(suite.to_json()),
        "cells": {
            key: {
                "before": cell_report(served.calibrator.transform(z).numpy(), labels, n_bins),
                "after": cell_report(shift[key].probabilities, labels, n_bins),
            }
            for key, z in logits.items()
        },
    }
    comparison = {key: (shift[key], theirs[key]) for key in shift} if champion_model is not None else None
    return shift, comparison, {SUITE_TAG: suite.to_json()}, metrics


def _split_logits(logits: np.ndarray, labels: np.ndarray, rows: np.ndarray, path: Path) -> str:
    np.savez(path, logits=logits[rows], labels=labels[rows], indices=rows)
    return str(path)


@dataclass(frozen=True, eq=False)
class NewImages:
    """The newly labeled images, pinned, split into a calibration and a test half, with the
    source network's logits on every one of them."""

    data: object  # calibflow.data.versioning.DataVersion
    manifest: object  # pandas.DataFrame, calibflow.data.manifest's columns
    split: object  # calibflow.data.splits.Split
    logits: np.ndarray
    labels: np.ndarray
    image_mode: str  # how the served model decodes a file (its metadata's image_mode and framing)
    framing: object  # calibflow.data.images.Framing, or (W, H), or None

    @property
    def test_rows(self) -> np.ndarray:
        return self.split.indices["test"]

    def images(self, rows: np.ndarray) -> np.ndarray:
        """uint8 (len(rows), H, W, C) of manifest rows, decoded as the served model takes them: a
        few rows at a time (the suite's, an input example), never the whole folder."""
        paths = self.manifest["path"].iloc[rows].tolist()
        digests = self.manifest["sha256"].iloc[rows].tolist()  # the bytes the manifest hashed, or a refusal
        return load_images_nhwc(self.data.local_dir, paths, self.image_mode, self.framing, digests=digests)


@dataclass(frozen=True)
class GatedCalibrator:
    """The new calibrator, fitted on the calibration half, and what the gates read on the test half."""

    fit: object  # calibflow.pipeline.evaluation_steps.CalibrationRecord
    verdict: GateVerdict
    before: dict[str, float]  # the source's calibrator
    after: dict[str, float]  # the new one
    softmax: dict[str, float]  # the network's own softmax
    suite_tags: dict[str, str]
    shift_metrics: dict | None
    against: str | None = None  # the champion version the relative gates compared with (None: none)


def recalibrate(
    model_uri: str, data_path: str, config: Config, repo_root: str | Path = ".", against: str | None = "@champion"
) -> Recalibration:
    started = time.perf_counter()
    soft_gates = config.gates.soft_gates()
    if config.calibration.targets == "soft":
        raise RecalibrationError(
            "calibration.targets = soft fits against the soft labels of a training run's calibration split; "
            "a recalibration fits on new images that have none: pass --set calibration.targets=hard, or retrain"
        )
    if soft_gates:
        raise RecalibrationError(
            f"gates.{soft_gates[0]} reads the soft labels of a training run's test split; a recalibration "
            f"is measured on new images that have none: pass --set gates.{soft_gates[0]}=null, or retrain"
        )
    source = registration.resolve_model_uri(model_uri)
    model = registration.load_model(f"models:/{source.name}/{source.version}")
    if not served_policy(model).is_empty:
        raise RecalibrationError(
            f"{source.name} version {source.version} serves decision rules fitted to its "
            f"calibrator, which a new calibrator would leave stale: retrain it (calibflow run)"
        )
    new = _new_images(model, data_path, config, repo_root, seen_by(source))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        gated = _fit_and_gate(source, model.unwrap_python_model(), new, config, against, work)
        run_id = _record_run(source, new, gated, config, repo_root, work)
        result = Recalibration(source, run_id, gated.verdict, gated.before, gated.after, 0.0)
        if gated.verdict.absolute_passed:
            result.version = _register(source, new, gated, run_id, config, work)
        else:
            store.end_run(run_id, "failed", gated.verdict.summary())
    result.seconds = time.perf_counter() - started
    return result


def _new_images(model, data_path: str, config: Config, repo_root: str | Path, seen: set[str]) -> NewImages:
    """The new folder, refused unless it labels every class the model predicts, holds no image the
    network was fitted on (`seen`) and its test half is large enough for the gates; the source
    network's logits on it, in one forward pass."""
    from calibflow.gates.plan import small_test_split_warning

    classes = served_classes(model)
    data = resolve_data(repo_root, data_path, None)
    manifest = build_manifest(data.local_dir)
    found = sorted(manifest["label"].unique().tolist())
    if found != classes:
        raise RecalibrationError(
            f"{data_path} has the classes {', '.join(found)} but the model predicts "
            f"{', '.join(classes)}: recalibration needs labeled images of every class the "
            f"model predicts, in folders named like them"
        )
    _refuse_seen(manifest, seen, data_path)
    split = stratified_split(
        manifest["label_index"].to_numpy(),
        manifest["sha256"].to_numpy(),
        RECALIBRATION_FRACTIONS,
        config.seed,
        manifest_fingerprint(manifest),
    )
    n_test = len(split.indices["test"])
    warning = small_test_split_warning(n_test, len(classes), config.gates, config.evaluation.n_bins)
    if warning:
        raise RecalibrationError(
            f"{data_path} is too small to recalibrate on: its test half has {n_test} images. {warning}"
        )
    meta = model.metadata.metadata
    new = NewImages(
        data,
        manifest,
        split,
        np.zeros((0, len(classes))),
        manifest["label_index"].to_numpy(),
        meta["image_mode"],
        served_model.framing_of(meta),
    )
    served = model.unwrap_python_model()
    # decoded DECODED_AT_A_TIME at a time, as evaluate and gate read a split: memory bounded
    chunks = [
        served.logits(new.images(np.arange(start, min(start + DECODED_AT_A_TIME, len(manifest)))), framed=True)
        for start in range(0, len(manifest), DECODED_AT_A_TIME)
    ]
    return replace(new, logits=np.concatenate(chunks))


def _refuse_seen(manifest, seen: set[str], data_path: str) -> None:
    """Refused, not filtered: on images the network was fitted on (its train, val or calibration
    split, or its source's) its logits are memorised, more confident and more often right than on
    new ones, so a calibrator fitted there is biased toward over-confidence and gates read there
    pass what new images would fail. Dropping them silently would recalibrate on a folder other
    than the one the user pinned and named; a folder that holds them is a mistake to fix upstream."""
    hits = manifest["sha256"].isin(seen).to_numpy()
    if hits.any():
        examples = ", ".join(manifest["path"][hits].head(3))
        raise RecalibrationError(
            f"{data_path}: {int(hits.sum())} of its {len(manifest)} images are images the network was "
            f"fitted on (its train, val or calibration split; e.g. {examples}), and a calibrator fitted "
            f"or gated on them would be biased: recalibrate on newly labeled images the network has not seen"
        )


def _fit_and_gate(source, served, new: NewImages, config: Config, against: str | None, work: Path) -> GatedCalibrator:
    """Fit the calibrator on the calibration half, then gate it on the test half: absolutely, and
    against `against` (the champion by default) on the same images."""
    from calibflow.pipeline import evaluation_steps
    from calibflow.training.ensembles import uncalibrated_probabilities

    n_bins, test_rows, labels = config.evaluation.n_bins, new.test_rows, new.labels
    fit = evaluation_steps.fit_calibration(
        _split_logits(new.logits, labels, new.split.indices["calibration"], work / "logits_calibration.npz"),
        config.calibration,
        str(work / "calibration.json"),
    )
    calibrator = evaluation_steps.load_calibrator(fit.state_path)
    candidate = calibrator.transform(new.logits[test_rows]).numpy()
    source_probabilities = served.calibrator.transform(new.logits[test_rows]).numpy()
    ours = Predictions(candidate, labels[test_rows])
    comparison = None
    champion = champion_for(source.name, against, candidate_version="")  # the new version has no number yet
    if champion is not None:
        theirs = (
            source_probabilities
            if champion.version == source.version
            # decoded as the champion frames its images (its own data.image_size), not as the source does
            else predict_rows(
                registration.load_model(f"models:/{source.name}/{champion.version}"),
                new.data.local_dir,
                new.manifest,
                test_rows,
            )
        )
        comparison = (ours, Predictions(np.asarray(theirs), labels[test_rows]))
    shift, shift_comparison, suite_tags, shift_metrics = _shift_inputs(
        served, calibrator, new, config, champion, source
    )
    try:
        verdict = evaluate_gates(
            ours, config.gates, comparison, n_bins=n_bins, shift=shift, shift_comparison=shift_comparison
        )
    except GateInputError as error:
        raise RecalibrationError(f"the gates cannot read a recalibration: {error}") from error
    return GatedCalibrator(
        fit=fit,
        verdict=verdict,
        before=probability_report(source_probabilities, labels[test_rows], n_bins),
        after=probability_report(candidate, labels[test_rows], n_bins),
        softmax=probability_report(uncalibrated_probabilities(new.logits[test_rows]), labels[test_rows], n_bins),
        suite_tags=suite_tags,
        shift_metrics=shift_metrics,
        against=champion.version if champion is not None else None,
    )


def _record_run(source, new: NewImages, gated: GatedCalibrator, config: Config, repo_root, work: Path) -> str:
    """An MLflow run with the new data's manifest and split, the verdict and the suite's numbers:
    what `calibflow gate` and `evaluate` read back for the version it may register."""
    run_id = store.start_run(
        config.registry.experiment,
        f"recalibrate v{source.version}",
        {
            "recalibrated_from": source.version,
            "recalibration_data_path": new.data.path,
            "recalibration_data_hash": new.data.dvc_hash,
        },
        repo_root,
    )
    store.set_tags(run_id, gate_tags(gated.verdict, gated.against))  # per check, and the three-part verdict
    store.log_metrics(
        run_id,
        {
            **{f"test/source/{k}": v for k, v in gated.before.items()},
            **{f"test/recalibrated/{k}": v for k, v in gated.after.items()},
        },
    )
    (work / "data").mkdir()
    save_manifest(new.manifest, work / "data" / "manifest.csv")
    new.split.save(work / "data" / "splits.json")
    (work / "gates").mkdir()
    (work / "gates" / "gates.json").write_text(json.dumps(gated.verdict.to_json(), indent=1))
    if gated.shift_metrics is not None:
        (work / "shift").mkdir()
        (work / "shift" / "shift_metrics.json").write_text(json.dumps(gated.shift_metrics, indent=1))
    for folder in ("data", "gates", "shift"):
        for file in _logged(work, folder):
            store.log_artifact(run_id, file, folder)
    return run_id


def _logged(work: Path, folder: str) -> list[Path]:
    """The files _record_run logs under `folder` (none when the folder was not written)."""
    return sorted((work / folder).iterdir()) if (work / folder).is_dir() else []


def _register(source, new: NewImages, gated: GatedCalibrator, run_id: str, config: Config, work: Path):
    """The source's network byte for byte with the new calibrator, through the registration
    transaction: the run is closed succeeded only with the version registered, or neither stands."""
    fit = gated.fit
    checkpoint = verified_run_artifact(source, "checkpoint/checkpoint.pt", work / "source")
    logged = served_model.log_calibrated_model(run_id, checkpoint, fit.state_path, new.images(new.test_rows[:2]))
    store.log_artifact(run_id, checkpoint, "checkpoint")  # the same network: a later recalibration reads it
    tags = {
        **{k: source.tags[k] for k in LINEAGE_TAGS if k in source.tags},
        "n_bins": str(config.evaluation.n_bins),
        CALIBRATION_METHOD: fit.method,
        TEMPERATURE: repr(fit.temperature) if fit.temperature else "",
        **{on_test(UNCALIBRATED, k): repr(float(v)) for k, v in gated.softmax.items()},
        **{on_test(CALIBRATED, k): repr(float(v)) for k, v in gated.after.items()},
        "recalibrated_from": source.version,
        "recalibration_data_path": new.data.path,
        "recalibration_data_rev": new.data.rev,
        "recalibration_data_hash": new.data.dvc_hash,
        **gated.suite_tags,
        # this run's own files (what `calibflow gate` and `evaluate` read back), and the network it reuses
        **run_artifact_tags(
            {
                **{
                    f"{folder}/{file.name}": str(file) for folder in ("data", "shift") for file in _logged(work, folder)
                },
                "checkpoint/checkpoint.pt": str(checkpoint),
            }
        ),
    }
    try:
        with registration.registration_transaction(
            partial(registration.register_version, logged, source.name, tags)
        ) as version:
            standing = run_verdict(gated.verdict, gated.against, version.alias).tags()
            registration.set_version_tags(source.name, version.version, standing)
            store.set_tags(run_id, standing)
            store.end_run(run_id, "succeeded")
    except Exception as error:
        try:
            store.end_run(run_id, "failed", f"registration failed: {error}")
        except Exception:  # noqa: BLE001  the store that failed the registration: its error is the one to say
            pass
        raise
    return version
