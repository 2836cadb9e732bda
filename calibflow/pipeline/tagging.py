"""What a run records in MLflow, by name: the version tags, the test-split metrics, the calibration
fit, the gate verdict (names from calibflow.names), and whether the champion was built from the same
data, params and code.

One verdict everywhere: a run makes one RunVerdict (run_verdict) and every record of it is made
from that: the run's tags (gate_tags when the gates ran, RunVerdict.tags() again when the run ends,
with the alias the version holds then), the registered version's tags, the run's and the version's
description (run_summary.summary_markdown(final=...)), and reports/metrics.json's `verdict` section
(report_staging.publish_report(report, final)). `calibflow promote` and `rollback`
(calibflow.lifecycle.promotion) rewrite the version's tags and description the same way.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from calibflow.config import Config
from calibflow.gates.decisions import (
    DECISION_TAG_PREFIX,
)
from calibflow.gates.checks import ABSOLUTE_GATES, GateCheck, GateVerdict
from calibflow.disk_cache import file_sha256
from calibflow import names
from calibflow.names import (
    RUN_ARTIFACTS_TAG,
    CALIBRATED,
    CALIBRATION_METHOD,
    GATE_AGAINST,
    TEMPERATURE,
    UNCALIBRATED,
    calibration_metric,
    gate_metric,
    gate_tag,
    on_test,
    shift_metric,
)
from calibflow.pipeline.data_steps import ManifestRecord, SplitRecord
from calibflow.pipeline.model_steps import INIT_WEIGHTS_TAG, InitialWeights
from calibflow.pipeline.evaluation_steps import (
    CalibrationRecord,
    DecisionEvaluation,
    Evaluation,
    OODEvaluation,
    ShiftEvaluation,
)


def unchanged_build(
    version_tags: dict[str, str],
    *,
    data_hash: str,
    params_hash: str,
    git_commit: str,
    git_dirty: bool,
    code_tree: str | None = None,
    init_weights_sha256: str | None = None,
) -> bool:
    """True when the version was built from exactly this data, these params, these initial weights
    and this code, so retraining would spend compute to reproduce it (a dirty working tree never
    counts as the same code). The code is the same when the code runs read is (`code_tree`: a
    commit of reports or docs alone changes nothing a run reads), or, for a version registered
    without that digest, when the commit is. The initial weights are the same when the SHA-256 of
    the file the network started from is (`init_weights_sha256`, None: the seeded initialisation);
    a version without the tag started from none, or was registered before the digest was recorded,
    so a run that names a weights file never counts as its build: the file may have changed since."""
    recorded_tree = version_tags.get("code_tree")
    same_code = (
        recorded_tree == code_tree if recorded_tree and code_tree else version_tags.get("git_commit") == git_commit
    )
    return (
        not git_dirty
        and version_tags.get("data_hash") == data_hash
        and version_tags.get("params_hash") == params_hash
        and version_tags.get(INIT_WEIGHTS_TAG) == init_weights_sha256
        and same_code
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
    from calibflow.evaluation.ood import OOD_SELECTION, OOD_TAG

    if ood is None:
        return {}
    recorded = {"path": ood.path, "rev": ood.rev, "dvc_hash": ood.dvc_hash, "n_images": ood.n_images}
    if ood.files_digest:
        recorded["files_digest"] = ood.files_digest
    return {OOD_TAG: json.dumps({**recorded, "score": ood.score, "selection": OOD_SELECTION})}


def soft_label_tags(config: Config) -> dict[str, str]:
    """The soft labels' CSV and tolerance, for `calibflow evaluate` and `calibflow gate` to read again."""
    from calibflow.data.soft_labels import soft_labels_tag

    if config.data.soft_labels is None:
        return {}
    return soft_labels_tag(config.data.soft_labels, config.data.soft_label_tolerance)


def version_tags(
    data,
    manifest: ManifestRecord,
    split: SplitRecord,
    config: Config,
    git_commit: str,
    *,
    code_tree: str,
    fit: CalibrationRecord,
    evaluation: Evaluation,
    decided: DecisionEvaluation | None = None,
    shifted: ShiftEvaluation | None = None,
    ood: OODEvaluation | None = None,
    run_artifacts: Mapping[str, str] | None = None,
    initial: InitialWeights | None = None,
) -> dict[str, str]:
    """What a registered version carries: its lineage (with `initial`, the digest of the weights
    file the network started from), the numbers its gate read (floats as repr, so they survive the
    round trip through a string tag exactly) and the digests of `run_artifacts` ({artifact path:
    local file}), the run's files that later commands read back."""
    return {
        **(initial.tags() if initial else {}),
        **run_artifact_tags(run_artifacts or {}),
        **decision_tags(decided, config.gates.confidence),
        **shift_tags(shifted),
        **ood_tags(ood),
        **soft_label_tags(config),
        "data_hash": data.dvc_hash,
        "data_path": data.path,
        "data_rev": data.rev,
        "git_commit": git_commit,
        "code_tree": code_tree,
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
    """The calibration split's NLL (against the soft labels: soft_nll, with calibration.targets soft)
    before and after the fit, and T for temperature scaling."""
    metrics = {
        calibration_metric(UNCALIBRATED, fit.objective): fit.nll_before,
        calibration_metric(CALIBRATED, fit.objective): fit.nll_after,
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


def check_text(check: GateCheck) -> str:
    """A check as a reviewer reads it: "max_ece_increase 0.0143 > 0.01" (its bound, the relation
    that holds, the threshold)."""
    return f"{check.name} {check.bound:.4f} {check.relation} {check.threshold:g}"


def failed_checks(verdict: GateVerdict) -> tuple[str, ...]:
    return tuple(check_text(c) for c in verdict.checks if not c.passed)


@dataclass(frozen=True)
class RunVerdict:
    """The verdict in three parts (calibflow.names' vocabulary): the absolute gates, the gates
    against the champion, and whether the version is @champion. The run's tags, its description,
    reports/metrics.json and the registered version's tags and description are all made from one
    of these."""

    absolute: str  # names.PASSED | names.FAILED
    champion: str  # names.PASSED | FAILED | NO_CHAMPION | NOT_COMPARED
    promoted: str  # names.PROMOTED | AT_CHALLENGER | NOT_REGISTERED | names.replaced_by(...)
    against: str | None = None  # the champion version compared with
    failed: tuple[str, ...] = ()  # check_text() of each failed check

    def tags(self) -> dict[str, str]:
        return {
            names.VERDICT_ABSOLUTE: self.absolute,
            names.VERDICT_CHAMPION: self.champion,
            names.VERDICT_PROMOTED: self.promoted,
            names.VERDICT_FAILED: "; ".join(self.failed) or names.NONE_FAILED,
            GATE_AGAINST: f"version {self.against}" if self.against else "none: no @champion to compare with",
        }

    def to_json(self) -> dict[str, str]:
        """reports/metrics.json's `verdict` section: the same words under the same names."""
        tags = self.tags()
        return {key: tags[tag] for tag, key in names.VERDICT_JSON_KEYS.items()}

    def text(self) -> str:
        return names.verdict_text(self.tags()) or ""

    def as_promoted(self, promoted: str) -> RunVerdict:
        return replace(self, promoted=promoted)


def promoted_value(alias: str | None) -> str:
    """verdict/promoted of a version that holds `alias` (None: nothing was registered)."""
    if alias is None:
        return names.NOT_REGISTERED
    return names.PROMOTED if alias == "champion" else names.AT_CHALLENGER


def run_verdict(verdict: GateVerdict, champion: str | None, alias: str | None = None) -> RunVerdict:
    """The three-part verdict of a gate run: `champion` the version the relative gates compared
    with (None: there was none), `alias` the one the version holds now (None: not registered)."""
    relative = [c for c in verdict.checks if c.name not in ABSOLUTE_GATES]
    if relative:
        against = names.PASSED if all(c.passed for c in relative) else names.FAILED
    else:
        against = names.NOT_COMPARED if champion else names.NO_CHAMPION
    return RunVerdict(
        absolute=names.PASSED if verdict.absolute_passed else names.FAILED,
        champion=against,
        promoted=promoted_value(alias),
        against=champion,
        failed=failed_checks(verdict),
    )


def gate_tags(verdict: GateVerdict, champion: str | None) -> dict[str, str]:
    """A run tag per check, e.g. gate/max_ece = "passed: smooth ECE 0.0110, 95% upper 0.0235 <= 0.05",
    and the three-part verdict as it stands when the gates have run: nothing registered yet (the
    run's end sets verdict/promoted again when it registers the version)."""
    tags = run_verdict(verdict, champion).tags()
    for check in verdict.checks:
        tags[gate_tag(check.name)] = (
            f"{'passed' if check.passed else 'FAILED'}: {check.metric} {check.value:.4f}, "
            f"{_bound_text(check, verdict.confidence)}"
        )
    return tags
