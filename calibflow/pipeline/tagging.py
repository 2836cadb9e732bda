"""What a run records in MLflow, by name: the version tags, the test-split metrics, the calibration
fit, the gate verdict (names from calibflow.names), and whether the champion was built from the same
data, params and code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np

from calibflow.config import Config
from calibflow.gates.decisions import (
    DECISION_TAG_PREFIX,
)
from calibflow.gates.checks import GateVerdict
from calibflow.disk_cache import file_sha256
from calibflow.names import (
    RUN_ARTIFACTS_TAG,
    CALIBRATED,
    CALIBRATION_METHOD,
    GATE_ABSOLUTE,
    GATE_AGAINST,
    GATE_VERDICT,
    TEMPERATURE,
    UNCALIBRATED,
    calibration_metric,
    gate_metric,
    gate_tag,
    on_test,
    shift_metric,
)
from calibflow.pipeline.data_steps import ManifestRecord, SplitRecord
from calibflow.pipeline.evaluation_steps import (
    CalibrationRecord,
    DecisionEvaluation,
    Evaluation,
    OODEvaluation,
    ShiftEvaluation,
)


def unchanged_build(
    champion_tags: dict[str, str], data_hash: str, params_hash: str, git_commit: str, git_dirty: bool
) -> bool:
    """True when the champion was built from exactly this data, these params and this code, so
    retraining would spend compute to reproduce it (a dirty working tree never counts as the same
    code)."""
    return (
        not git_dirty
        and champion_tags.get("data_hash") == data_hash
        and champion_tags.get("params_hash") == params_hash
        and champion_tags.get("git_commit") == git_commit
    )


def decision_tags(decided: DecisionEvaluation | None, confidence: float) -> dict[str, str]:
    """The served decisions' test-split numbers as version tags, for `calibflow evaluate` to
    recompute: the rates and bounds, not the per-class coverages (evaluate_policy's keys)."""
    if decided is None or not decided.metrics:
        return {}
    tags = {
        f"{DECISION_TAG_PREFIX}{name}": repr(float(value))
        for name, value in decided.metrics.items()
        if "_class_" not in name
    }
    tags[f"{DECISION_TAG_PREFIX}confidence"] = repr(confidence)
    return tags


def shift_tags(shifted: ShiftEvaluation | None) -> dict[str, str]:
    """The suite a version was measured on (for `calibflow evaluate` and `calibflow gate` to rebuild
    it) and its means after calibration."""
    from calibflow.evaluation.shift import SUITE_TAG

    if shifted is None:
        return {}
    return {
        SUITE_TAG: shifted.suite_json,
        **{shift_metric("mean", CALIBRATED, name): repr(value) for name, value in shifted.mean["after"].items()},
    }


def ood_tags(ood: OODEvaluation | None) -> dict[str, str]:
    """The OOD folder a version was measured on, for `calibflow gate` to score again."""
    from calibflow.evaluation.ood import OOD_TAG

    if ood is None:
        return {}
    return {
        OOD_TAG: json.dumps(
            {"path": ood.path, "rev": ood.rev, "dvc_hash": ood.dvc_hash, "n_images": ood.n_images, "score": ood.score}
        )
    }


def version_tags(
    data,
    manifest: ManifestRecord,
    split: SplitRecord,
    config: Config,
    git_commit: str,
    *,
    fit: CalibrationRecord,
    evaluation: Evaluation,
    decided: DecisionEvaluation | None = None,
    shifted: ShiftEvaluation | None = None,
    ood: OODEvaluation | None = None,
    run_artifacts: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """What a registered version carries: its lineage, the numbers its gate read (floats as repr,
    so they survive the round trip through a string tag exactly) and the digests of `run_artifacts`
    ({artifact path: local file}), the run's files that later commands read back."""
    return {
        **run_artifact_tags(run_artifacts or {}),
        **decision_tags(decided, config.gates.confidence),
        **shift_tags(shifted),
        **ood_tags(ood),
        "data_hash": data.dvc_hash,
        "data_path": data.path,
        "data_rev": data.rev,
        "git_commit": git_commit,
        "params_hash": config.params_hash,
        "seed": str(config.seed),
        "split_digest": split.digest,
        "manifest_fingerprint": manifest.fingerprint,
        "n_bins": str(config.evaluation.n_bins),
        CALIBRATION_METHOD: fit.method,
        TEMPERATURE: repr(fit.temperature) if fit.temperature else "",
        **{name: repr(value) for name, value in test_metrics(evaluation).items()},
    }


def run_artifact_tags(run_artifacts: Mapping[str, str]) -> dict[str, str]:
    """RUN_ARTIFACTS_TAG: the sha256 of each file the run logged under its artifact path."""
    digests = {artifact: file_sha256(local) for artifact, local in sorted(run_artifacts.items())}
    return {RUN_ARTIFACTS_TAG: json.dumps(digests, sort_keys=True)} if digests else {}


STAGE_OF = {"before": UNCALIBRATED, "after": CALIBRATED}  # Evaluation's fields -> calibflow.names' stages


def test_metrics(evaluation: Evaluation) -> dict[str, float]:
    """The test split's metrics before and after calibration under their calibflow.names paths
    (test/uncalibrated/ece, test/calibrated/ece, ...): metric, version tag and metrics.json key."""
    return {
        on_test(STAGE_OF[when], name): float(value)
        for when, values in (("before", evaluation.before), ("after", evaluation.after))
        for name, value in values.items()
    }


def fit_metrics(fit: CalibrationRecord) -> dict[str, float]:
    """The calibration split's NLL before and after the fit, and T for temperature scaling."""
    metrics = {
        calibration_metric(UNCALIBRATED, "nll"): fit.nll_before,
        calibration_metric(CALIBRATED, "nll"): fit.nll_after,
    }
    if fit.temperature:
        metrics[TEMPERATURE] = fit.temperature
    return metrics


def gate_metrics(verdict: GateVerdict) -> dict[str, float]:
    """gate/<check>/value, bound and threshold of every check, so that the run's charts show how far
    each bound is from its threshold (a bound that could not be computed is left out)."""
    metrics = {}
    for check in verdict.checks:
        for part, value in (("value", check.value), ("bound", check.bound), ("threshold", check.threshold)):
            if np.isfinite(value):
                metrics[gate_metric(check.name, part)] = float(value)
    return metrics


def _bound_text(check, confidence: float) -> str:
    side = "upper" if check.comparison == "<=" else "lower"
    return f"{confidence:.0%} {side} {check.bound:.4f} {check.relation} {check.threshold:g}"


def gate_tags(verdict: GateVerdict, champion: str | None) -> dict[str, str]:
    """A run tag per check, e.g. gate/max_ece = "passed: smooth ECE 0.0110, 95% upper 0.0235 <= 0.05",
    the overall verdicts, and the champion the relative gates compared with (or why none)."""
    tags = {
        GATE_VERDICT: "passed" if verdict.passed else "failed",
        GATE_ABSOLUTE: "passed" if verdict.absolute_passed else "failed",
        GATE_AGAINST: f"version {champion}" if champion else "none: no @champion to compare with",
    }
    for check in verdict.checks:
        tags[gate_tag(check.name)] = (
            f"{'passed' if check.passed else 'FAILED'}: {check.metric} {check.value:.4f}, "
            f"{_bound_text(check, verdict.confidence)}"
        )
    return tags
