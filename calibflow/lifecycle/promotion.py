"""May this version replace the champion? Gate, promote, roll back, with numbers from the registry.

The test images a gate reads are pinned: the candidate's own test split, rebuilt from its
recorded data revision and split indices. The absolute gates read all of it; the comparison with
the champion reads the part the champion was not fitted on (its train, val and calibration
splits, matched by content hash), so neither model is judged on images it learned from. Both
models are the registered pyfuncs, loaded from the registry; the numbers are recomputed here,
never read from tags.
"""

from __future__ import annotations

import getpass
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd

from calibflow.tracking import registration
from calibflow.tracking import served_model
from calibflow.tracking import store
from calibflow.config import DEFAULT_N_BINS, GatesConfig, load_config
from calibflow.data.soft_labels import recorded_targets
from calibflow.gates.checks import GateVerdict, OODScores, Predictions, ShiftedPredictions, evaluate_gates
from calibflow.errors import GateInputError
from calibflow.data.manifest import list_classes, load_manifest
from calibflow.gates.decisions import DecisionPolicy
from calibflow.lifecycle.reproduce import (
    predict_rows,
    rebuild_test_split,
    recorded_ood_scores,
    served_classes,
    served_policy,
    shift_predictions,
    verified_run_artifact,
)
from calibflow.data.splits import Split
from calibflow.errors import AlreadyChampion, GateUndecided, NotComparable, NotFound
from calibflow import errors
from calibflow import names
from calibflow.pipeline import tagging

AUDIT_EXPERIMENT = "calibflow-promotions"
# On a promoted version: each gate that `calibflow promote --set` changed from params.yaml for that
# promotion, "max_ece_increase 0.01 -> 0.9 (loosened)", "; "-separated, or "none".
PROMOTION_GATES_TAG = "promotion/gates_set"
FIT_SPLITS = ("train", "val", "calibration")
# Where CI systems put the id of the job that is running (first one found wins).
CI_JOB_VARIABLES = ("GITHUB_RUN_ID", "CI_JOB_ID", "BUILD_ID", "BUILDKITE_BUILD_ID", "CIRCLE_WORKFLOW_JOB_ID", "JOB_ID")


def resolve_ref(model_name: str, ref: str) -> registration.VersionRecord:
    """`@alias` or a version number to the registry's record."""
    uri = f"models:/{model_name}@{ref[1:]}" if ref.startswith("@") else f"models:/{model_name}/{ref}"
    return registration.resolve_model_uri(uri)


def seen_by(record: registration.VersionRecord) -> set[str]:
    """Content hashes of every image the version was fitted on (train, val, calibration)."""
    with tempfile.TemporaryDirectory() as tmp:
        manifest = load_manifest(verified_run_artifact(record, "data/manifest.csv", tmp))
        split = Split.load(verified_run_artifact(record, "data/splits.json", tmp))
    rows = np.concatenate([split.indices[name] for name in FIT_SPLITS])
    seen = set(manifest["sha256"].iloc[rows])
    source = record.tags.get("recalibrated_from")
    if source:  # its network learned from the source's images too
        seen |= seen_by(registration.resolve_model_uri(f"models:/{record.name}/{source}"))
    return seen


def unseen_test_rows(manifest: pd.DataFrame, split: Split, seen: set[str]) -> tuple[np.ndarray, int]:
    """The test rows whose content the champion never saw, and how many were dropped."""
    test = split.indices["test"]
    keep = ~manifest["sha256"].iloc[test].isin(seen).to_numpy()
    return test[keep], int((~keep).sum())


@dataclass(frozen=True)
class GateReport:
    model: str
    candidate: str
    champion: str | None
    excluded_seen_by_champion: int
    verdict: GateVerdict

    @property
    def passed(self) -> bool:
        return self.verdict.passed

    @property
    def may_promote(self) -> bool:
        """Every gate passed, and against the champion when there is one."""
        return self.passed and (self.champion is None or self.verdict.n_shared > 0)

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "candidate": self.candidate,
            "champion": self.champion,
            "excluded_seen_by_champion": self.excluded_seen_by_champion,
            **self.verdict.to_json(),
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=2))
        return path


def champion_for(model_name: str, against: str | None, candidate_version: str) -> registration.VersionRecord | None:
    """The version to compare with: `against` (an alias that may not exist yet, or a version that
    must), or None when there is none or it is the candidate itself."""
    if against is None:
        return None
    if against.startswith("@") and registration.alias_version(model_name, against[1:]) is None:
        return None
    champion = resolve_ref(model_name, against)
    return None if champion.version == candidate_version else champion


def class_order(candidate_classes: list[str], champion_classes: list[str], champion_version: str) -> np.ndarray:
    """Column indices that put the champion's probabilities in the candidate's class order
    (`champion_probs[:, order]`), matching classes by name, not position. NotComparable when the
    two models do not predict the same set of classes."""
    if sorted(candidate_classes) != sorted(champion_classes):
        only_candidate = sorted(set(candidate_classes) - set(champion_classes))
        only_champion = sorted(set(champion_classes) - set(candidate_classes))
        raise NotComparable(
            f"not comparable: classes differ: the candidate has {candidate_classes}, champion version "
            f"{champion_version} has {champion_classes} (only the candidate: {only_candidate}; only the champion: "
            f"{only_champion}). A model of other classes is another model: train it under another "
            f"registry.model_name, or move @champion to it by hand if replacing the served classes is intended"
        )
    column = {name: k for k, name in enumerate(champion_classes)}
    return np.array([column[name] for name in candidate_classes], dtype=np.int64)


def _comparable_champion(model_name: str, champion: registration.VersionRecord, candidate_classes: list[str]):
    """The champion's model, verified and loaded, and the column order that matches its classes
    to the candidate's (class_order); NotComparable before anything is predicted when they differ."""
    if served_model.CLASSES_TAG not in champion.tags or served_model.DIGEST_TAG not in champion.tags:
        raise NotComparable(
            f"not comparable: champion version {champion.version} of {model_name} was registered before calibflow "
            f"recorded a model's classes and artifact digest (tags {served_model.CLASSES_TAG}, {served_model.DIGEST_TAG}), so "
            f"its classes are unknown and calibflow will not load it. Gate against a version registered since "
            f"(--against VERSION), or retire it: a person deletes its @champion alias once, and the next run's "
            f"version becomes the champion on the absolute gates (infra/TRUST.md)"
        )
    model = registration.load_model(f"models:/{model_name}/{champion.version}")
    return model, class_order(candidate_classes, served_classes(model), champion.version)


def _comparison(
    model_name: str,
    champion: registration.VersionRecord | None,
    candidate_probs: np.ndarray,
    candidate_classes: list[str],
    test_rows: np.ndarray,
    *,
    manifest: pd.DataFrame,
    split: Split,
    data_dir: str,
    required: bool = True,
) -> tuple[tuple[Predictions, Predictions] | None, int]:
    """(candidate, champion) predictions on the test rows the champion was not fitted on, the
    champion's columns in the candidate's class order. Models of different classes: NotComparable,
    before anything is compared. With no rows left: GateUndecided, or (not `required`) no
    comparison, which never promotes."""
    if champion is None:
        return None, 0
    champion_model, champion_columns = _comparable_champion(model_name, champion, candidate_classes)
    shared, excluded = unseen_test_rows(manifest, split, seen_by(champion))
    if len(shared) == 0:
        if not required:
            return None, excluded
        raise GateUndecided(
            f"champion version {champion.version} was fitted on every test image of the candidate; "
            f"there is nothing to compare them on (retrain with the champion's seed to share its split)"
        )
    keep = np.isin(test_rows, shared)
    labels = manifest["label_index"].to_numpy()[test_rows[keep]]
    champion_probs = predict_rows(champion_model, data_dir, manifest, test_rows[keep])[:, champion_columns]
    return (Predictions(candidate_probs[keep], labels), Predictions(champion_probs, labels)), excluded


def _shift_comparison(
    model_name: str,
    champion: registration.VersionRecord,
    shifted: ShiftedPredictions,
    candidate_classes: list[str],
    manifest: pd.DataFrame,
    split: Split,
    data_dir: str,
) -> dict[str, tuple[Predictions, Predictions]] | None:
    """(candidate, champion) on every cell, on the suite's images the champion was not fitted on,
    corrupted the same way (each image seeded by its own bytes); None when there are none."""
    champion_model, columns = _comparable_champion(model_name, champion, candidate_classes)
    shared, _ = unseen_test_rows(manifest, split, seen_by(champion))
    keep = np.isin(shifted.rows, shared)
    if not keep.any():
        return None
    rows = shifted.rows[keep]
    labels = manifest["label_index"].to_numpy()[rows]
    theirs = shift_predictions(champion_model, data_dir, manifest, rows, shifted.suite)
    return {
        key: (Predictions(p[keep], labels), Predictions(theirs[key][:, columns], labels))
        for key, p in shifted.probabilities.items()
    }


def _wants_shift(gates: GatesConfig) -> bool:
    return gates.max_shift_ece is not None or gates.max_shift_ece_increase is not None


@dataclass(frozen=True)
class EvaluationSet:
    """What the gates of a registered candidate read: its test split, and the images it shares
    with the champion (neither model fitted on them), both models' probabilities recomputed."""

    candidate: registration.VersionRecord
    champion: registration.VersionRecord | None
    predictions: Predictions
    comparison: tuple[Predictions, Predictions] | None
    excluded_seen_by_champion: int
    decisions: DecisionPolicy | None = None  # the candidate's served decision policy
    shift: dict[str, Predictions] | None = None  # the candidate on its corruption suite (when a gate reads it)
    shift_comparison: dict[str, tuple[Predictions, Predictions]] | None = None
    ood: OODScores | None = None  # the candidate's OOD scores on its test split and its OOD folder


def _ood_gate_scores(candidate: registration.VersionRecord, model, rebuilt, repo_root: str | Path) -> OODScores:
    """The score the run gated on (ood.score), recomputed by the served pyfunc on the test split
    and on the OOD folder the version recorded, re-read at its revision and DVC hash."""
    from calibflow.evaluation.ood import OOD_TAG, in_distribution_score

    if not candidate.tags.get(OOD_TAG):
        raise GateUndecided(
            f"candidate {candidate.version} was registered without an OOD folder (ood.path), so "
            f"gates.max_ood_fpr95 has nothing to read: unset it, or retrain with ood.path set"
        )
    try:
        score, inside, outside = recorded_ood_scores(model, candidate, rebuilt, repo_root)
    except Exception as error:  # DataVersionError, a DVC error reading the revision, an unreadable image
        raise GateUndecided(
            f"candidate {candidate.version}'s OOD scores cannot be recomputed (its OOD folder or test split "
            f"read back): {error}"
        ) from error
    return OODScores(
        in_distribution_score(score, inside),
        in_distribution_score(score, outside),
        "MSP" if score == "msp" else "minus energy",
    )


def evaluation_set(
    model_name: str,
    candidate_ref: str,
    against: str | None = "@champion",
    repo_root: str | Path = ".",
    with_shift: bool = False,
    with_ood: bool = False,
    with_soft_labels: bool = False,
) -> EvaluationSet:
    """Both models from the registry, on the candidate's pinned test images."""
    try:
        candidate = resolve_ref(model_name, candidate_ref)
        champion = champion_for(model_name, against, candidate.version)
    except LookupError as error:
        raise GateUndecided(str(error)) from error
    try:
        rebuilt = rebuild_test_split(candidate, repo_root)
    except Exception as error:  # DataVersionError, a DVC error reading the revision, a changed manifest
        raise GateUndecided(f"candidate {candidate.version}'s test data cannot be rebuilt: {error}") from error
    data, manifest, split = rebuilt.data, rebuilt.manifest, rebuilt.split
    test_rows = split.indices["test"]
    labels = manifest["label_index"].to_numpy()[test_rows]
    candidate_model = registration.load_model(f"models:/{model_name}/{candidate.version}")
    candidate_probs = predict_rows(candidate_model, data.local_dir, manifest, test_rows)
    comparison, excluded = _comparison(
        model_name,
        champion,
        candidate_probs,
        served_classes(candidate_model),
        test_rows,
        manifest=manifest,
        split=split,
        data_dir=data.local_dir,
    )
    shift = shift_comparison = None
    if with_shift:
        from calibflow.evaluation.shift import SUITE_TAG, Suite

        if not candidate.tags.get(SUITE_TAG):
            raise GateUndecided(
                f"candidate {candidate.version} was registered without a corruption suite, so the "
                f"shift gates have nothing to read: unset gates.max_shift_ece and "
                f"gates.max_shift_ece_increase, or retrain with a shift: suite"
            )
        suite = Suite.from_json(candidate.tags[SUITE_TAG])
        rows = suite.images(test_rows, manifest)
        shifted = ShiftedPredictions(
            suite, rows, shift_predictions(candidate_model, data.local_dir, manifest, rows, suite)
        )
        shift = shifted.predictions(manifest)
        if comparison is not None:
            shift_comparison = _shift_comparison(
                model_name, champion, shifted, served_classes(candidate_model), manifest, split, data.local_dir
            )
    ood = _ood_gate_scores(candidate, candidate_model, rebuilt, repo_root) if with_ood else None
    targets = (
        recorded_targets(candidate.tags, data.local_dir, manifest.iloc[test_rows], served_classes(candidate_model))
        if with_soft_labels
        else None
    )
    return EvaluationSet(
        candidate,
        champion,
        Predictions(candidate_probs, labels, targets),
        comparison,
        excluded,
        served_policy(candidate_model),
        shift,
        shift_comparison,
        ood,
    )


def gate_version(
    model_name: str,
    candidate_ref: str,
    gates: GatesConfig,
    against: str | None = "@champion",
    repo_root: str | Path = ".",
    n_bins: int = DEFAULT_N_BINS,
) -> GateReport:
    """`calibflow gate`: both models from the registry, on the pinned test images."""
    inputs = evaluation_set(
        model_name,
        candidate_ref,
        against,
        repo_root,
        with_shift=_wants_shift(gates),
        with_ood=gates.max_ood_fpr95 is not None,
        with_soft_labels=bool(gates.soft_gates()),
    )
    try:
        verdict = evaluate_gates(
            inputs.predictions,
            gates,
            inputs.comparison,
            n_bins=n_bins,
            decisions=inputs.decisions,
            shift=inputs.shift,
            shift_comparison=inputs.shift_comparison,
            ood=inputs.ood,
        )
    except GateInputError as error:
        raise GateUndecided(f"candidate {inputs.candidate.version}: {error}") from error
    return GateReport(
        model_name,
        inputs.candidate.version,
        inputs.champion.version if inputs.champion else None,
        inputs.excluded_seen_by_champion,
        verdict,
    )


def plan_version(
    model_name: str,
    candidate_ref: str,
    gates: GatesConfig,
    against: str | None = "@champion",
    repo_root: str | Path = ".",
    n_bins: int = DEFAULT_N_BINS,
    power: float = 0.8,
    *,
    retrain_fresh_share: float = 0.0,
):
    """`calibflow gate plan`: how many test images the gates need to pass this version with
    `power`, simulated under its own estimated calibration (calibflow.gates.plan); without a
    champion to compare with, the comparison is against a retrain (`retrain_fresh_share`)."""
    from calibflow.gates.plan import plan_sample_size

    inputs = evaluation_set(model_name, candidate_ref, against, repo_root)
    try:
        return plan_sample_size(
            inputs.predictions,
            gates,
            inputs.comparison,
            n_bins=n_bins,
            power=power,
            simulations=gates.n_resamples,
            retrain_fresh_share=retrain_fresh_share,
        )
    except GateInputError as error:
        raise GateUndecided(f"candidate {inputs.candidate.version}: {error}") from error


@dataclass(frozen=True)
class ChampionPredictions:
    """The champion's side of the relative gates for a candidate that is not registered yet: both
    models' probabilities on the candidate's test rows the champion was not fitted on (and on its
    corruption suite's rows, when the shift increase gate reads them)."""

    version: str | None  # None: no champion yet
    comparison: tuple[Predictions, Predictions] | None
    shift_comparison: dict[str, tuple[Predictions, Predictions]] | None
    excluded_seen_by_champion: int


def champion_predictions(
    model_name: str,
    candidate: Predictions,
    *,
    test_rows: np.ndarray,
    shifted: ShiftedPredictions | None,
    data_dir: str,
    manifest_path: str,
    split_path: str,
    gates: GatesConfig,
) -> ChampionPredictions:
    """The flow's champion, fetched from the registry before any gate is computed: its predictions
    beside the candidate's (cached test logits through the fitted calibrator: the numbers its pyfunc
    serves, as `calibflow evaluate` checks), on the same evaluation set `calibflow gate` reads."""
    champion = registration.alias_record(model_name, registration.CHAMPION)
    if champion is None:
        return ChampionPredictions(None, None, None, 0)
    manifest = load_manifest(manifest_path)
    split = Split.load(split_path)
    # The candidate's classes are its data's class folders, as its checkpoint records them.
    classes = list_classes(data_dir)
    comparison, excluded = _comparison(
        model_name,
        champion,
        candidate.probabilities,
        classes,
        test_rows,
        manifest=manifest,
        split=split,
        data_dir=data_dir,
        required=False,
    )
    shift_comparison = None
    if shifted is not None and comparison is not None and gates.max_shift_ece_increase is not None:
        shift_comparison = _shift_comparison(model_name, champion, shifted, classes, manifest, split, data_dir)
    return ChampionPredictions(champion.version, comparison, shift_comparison, excluded)


def who() -> dict[str, str]:
    ci_job = next((f"{name}={os.environ[name]}" for name in CI_JOB_VARIABLES if os.environ.get(name)), "")
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return {"user": user, "ci_job": ci_job}


@dataclass(frozen=True)
class GateChange:
    """A gate that `--set` changed from params.yaml for one command."""

    gate: str  # the GatesConfig field, e.g. max_ece_increase
    configured: object  # params.yaml's value (None: the gate is off)
    used: object
    direction: str  # loosened | tightened | changed

    def text(self) -> str:
        return f"{self.gate} {_shown(self.configured)} -> {_shown(self.used)} ({self.direction})"


def _shown(value: object) -> str:
    return "off" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _direction(gate: str, configured: object, used: object) -> str:
    """Which way a changed threshold moved: a max_ raised or turned off, a min_ lowered or turned
    off, or a lower confidence lets more candidates through."""
    if used is None:
        return "loosened"
    if configured is None:
        return "tightened"
    if gate.startswith("max_"):
        return "loosened" if used > configured else "tightened"
    if gate.startswith("min_") or gate == "confidence":
        return "loosened" if used < configured else "tightened"
    return "changed"


def gate_changes(configured: GatesConfig, used: GatesConfig) -> tuple[GateChange, ...]:
    """The gates `used` sets otherwise than `configured` (n_resamples sizes `gate plan`'s simulation,
    not a gate)."""
    return tuple(
        GateChange(
            f.name,
            getattr(configured, f.name),
            getattr(used, f.name),
            _direction(f.name, getattr(configured, f.name), getattr(used, f.name)),
        )
        for f in fields(GatesConfig)
        if f.name != "n_resamples" and getattr(configured, f.name) != getattr(used, f.name)
    )


def gates_set(params_path: str | Path, overrides: Sequence[str]) -> tuple[GateChange, ...]:
    """The gates that `overrides` (a command's --set) change from the params file's."""
    return gate_changes(load_config(params_path).gates, load_config(params_path, list(overrides)).gates)


@dataclass(frozen=True)
class Promotion:
    model: str
    champion: str
    previous_champion: str | None
    forced: bool


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _retag_replaced(model_name: str, version: str, by: str, record: str) -> None:
    """A champion another version replaced: verdict/promoted says so, on its tags and description."""
    tags = {names.VERDICT_PROMOTED: names.replaced_by(by)}
    registration.set_version_tags(model_name, version, tags)
    recorded = {**resolve_ref(model_name, version).tags, **tags}
    registration.describe_verdict(
        model_name, version, f"REPLACED · {names.verdict_text(recorded) or tags[names.VERDICT_PROMOTED]}", [record]
    )


def promote(
    model_name: str,
    candidate_version: str,
    gated_against: str | None,
    report_path: str | Path | None,
    force_reason: str | None = None,
    *,
    gate: GateReport | None = None,
    changed_gates: Sequence[GateChange] = (),
) -> Promotion:
    """Move @champion to the candidate, compare-and-swap style: under the registry lock, and only
    if @champion is still the version the gate compared against (else PromotionConflict, and
    nothing moves). The old champion becomes @previous-champion; the new one is tagged with who
    promoted it, from what, and why, and with the verdict of `gate` (the report the decision read)
    and the gates `--set` changed for it (`changed_gates`), and both versions' verdict tags and
    descriptions say what they are now; the gate report is kept in an audit run."""
    actor = who()
    holder = f"{actor['user']} {actor['ci_job']} pid {os.getpid()}".strip()
    at = _now()
    with registration.promotion_lock(model_name, holder):
        current = registration.alias_version(model_name, registration.CHAMPION)
        if current == candidate_version:
            raise AlreadyChampion(
                f"version {candidate_version} already is @champion of {model_name}: nothing to "
                f"promote (gate another version, e.g. --candidate @challenger)"
            )
        if current != gated_against:
            raise errors.PromotionConflict(
                f"@champion of {model_name} is now {current}, not {gated_against} as when the gate ran: another "
                f"promotion won; gate version {candidate_version} again against the new champion"
            )
        verdict_tags = (
            tagging.run_verdict(gate.verdict, gate.champion, registration.CHAMPION).tags()
            if gate is not None
            else {names.VERDICT_PROMOTED: names.PROMOTED}
        )
        registration.set_version_tags(
            model_name,
            candidate_version,
            {
                "promoted_at": at,
                "promoted_by": actor["user"],
                "promoted_ci_job": actor["ci_job"],
                "promoted_from": current or "",
                PROMOTION_GATES_TAG: "; ".join(c.text() for c in changed_gates) or "none",
                **({"promotion_forced_reason": force_reason} if force_reason else {}),
                **verdict_tags,
            },
        )
        target: dict[str, str | None] = {registration.CHAMPION: candidate_version}
        if current:
            target[registration.PREVIOUS_CHAMPION] = current
        if registration.alias_version(model_name, registration.CHALLENGER) == candidate_version:
            target[registration.CHALLENGER] = None  # it is the champion now
        registration.apply_aliases(model_name, target)
    by = f"{actor['user']}" + (f" ({actor['ci_job']})" if actor["ci_job"] else "")
    record = [
        f"Promoted to `@champion` at {at} by {by}"
        + (f", replacing version {current}." if current else ".")
        + (f" **Forced** past a failed gate: {force_reason}" if force_reason else ""),
    ]
    if changed_gates:
        record += [
            "",
            "Gates set for this promotion (`calibflow promote --set`), not params.yaml's: "
            + "; ".join(c.text() for c in changed_gates),
        ]
    recorded = {**resolve_ref(model_name, candidate_version).tags}
    registration.describe_verdict(model_name, candidate_version, f"PROMOTED · {names.verdict_text(recorded)}", record)
    if current:
        _retag_replaced(
            model_name,
            current,
            candidate_version,
            f"Replaced as `@champion` by version {candidate_version} at {at} ({by}).",
        )
    if report_path:
        store.log_audit_run(
            AUDIT_EXPERIMENT,
            f"promote {model_name} v{candidate_version}",
            {
                "model": model_name,
                "candidate": candidate_version,
                "previous_champion": current or "",
                "decision": "forced" if force_reason else "promoted",
                "reason": force_reason or "",
                "gates_set": "; ".join(c.text() for c in changed_gates) or "none",
                **actor,
            },
            report_path,
        )
    return Promotion(model_name, candidate_version, current, forced=force_reason is not None)


def rollback(model_name: str) -> Promotion:
    """Move @champion back to the version it was promoted from (the chain of `promoted_from`
    tags, so repeated rollbacks walk further back)."""
    actor = who()
    with registration.promotion_lock(model_name, f"{actor['user']} rollback pid {os.getpid()}"):
        current = registration.alias_record(model_name, registration.CHAMPION)
        if current is None:
            raise NotFound(f"{model_name} has no @champion to roll back")
        previous = current.tags.get("promoted_from") or registration.alias_version(
            model_name, registration.PREVIOUS_CHAMPION
        )
        if not previous:
            raise NotFound(f"@champion (version {current.version}) of {model_name} has no previous champion")
        before_previous = resolve_ref(model_name, previous).tags.get("promoted_from") or None
        registration.set_version_tags(
            model_name,
            current.version,
            {"rolled_back_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rolled_back_by": actor["user"]},
        )
        registration.set_version_tags(model_name, previous, {names.VERDICT_PROMOTED: names.PROMOTED})
        registration.apply_aliases(
            model_name, {registration.CHAMPION: previous, registration.PREVIOUS_CHAMPION: before_previous}
        )
    at = _now()
    _retag_replaced(
        model_name,
        current.version,
        previous,
        f"Rolled back at {at} by {actor['user']}: version {previous} is `@champion` again.",
    )
    registration.describe_champion_again(
        model_name, previous, f"{actor['user']} rolled back version {current.version}."
    )
    return Promotion(model_name, previous, current.version, forced=False)
