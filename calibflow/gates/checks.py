"""Promotion gates: decisions with stated confidence, not point estimates.

Every gate passes only when a one-sided confidence bound at `gates.confidence` clears its
threshold, and each bound is built so that a model whose true value sits exactly on the
threshold passes at most 1 - confidence of the time, including where a bootstrap of a plug-in
estimate does not (a confident model with few errors, a champion better calibrated than the
candidate, two models that disagree on few images). The bounds are in
`calibflow.gates.statistics`; what each one certifies, and under which assumptions, is in
docs/gates.md, and benchmarks/gate_soundness.py measures it by simulation against known truth.

| gate | passes when | bound |
| --- | --- | --- |
| max_ece | calibration error (gates.metric) <= threshold | intersection-union score bound |
| min_accuracy | accuracy >= threshold | Clopper-Pearson |
| max_nll | NLL <= threshold | betting bound of the mean loss (losses at most -log eps) |
| max_soft_nll | cross-entropy against the soft labels <= threshold (opt-in, data.soft_labels) | betting bound, as max_nll |
| max_soft_ece | calibration error against the soft labels (gates.metric) <= threshold (opt-in) | intersection-union score bound, as max_ece |
| max_ece_increase | error(candidate) - error(champion) <= tolerance | betting on paired and cross-fitted values |
| max_accuracy_drop | accuracy(champion) - accuracy(candidate) <= tolerance | paired score (Tango) |
| max_brier_increase | Brier(candidate) - Brier(champion) <= tolerance (opt-in) | betting on the paired difference |
| max_selective_risk | error rate of the predictions kept by the served abstention threshold <= threshold | Clopper-Pearson |
| min_conformal_coverage | share of served prediction sets that hold the true class >= threshold | Clopper-Pearson |
| max_shift_ece | mean over the corruption suite's cells of the calibration error <= threshold | mean of per-cell bounds, Bonferroni |
| max_shift_ece_increase | that mean, candidate - champion, on shared corrupted images <= tolerance | mean of per-cell bounds, Bonferroni |
| max_ood_fpr95 | share of OOD images kept at the 95%-TPR threshold <= threshold | order statistic + Clopper-Pearson |

This module is the one gate implementation: the flow's gate step, `calibflow gate`,
`calibflow gate plan` and the benchmark all call `evaluate_gates`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from calibflow.gates import statistics as gs
from calibflow.metrics.reliability import DEFAULT_N_BINS
from calibflow.gates.decisions import DecisionPolicy, evaluate_policy
from calibflow.errors import GateInputError

if TYPE_CHECKING:  # config sits above the gates: they read its records, never import it
    from calibflow.config import GatesConfig

METRICS = ("ece", "smooth_ece")


@dataclass(frozen=True)
class Predictions:
    """Calibrated probabilities (N, K) of one model on the pinned test images, and their labels;
    with data.soft_labels, each image's distribution over the classes too (N, K), which the soft
    gates read."""

    probabilities: np.ndarray
    labels: np.ndarray
    targets: np.ndarray | None = None


@dataclass(frozen=True)
class ShiftedPredictions:
    """A candidate's calibrated probabilities on each cell of its corruption suite (shift.Suite),
    on the test images it picks (manifest `rows`, Suite.images)."""

    suite: object  # calibflow.evaluation.shift.Suite
    rows: np.ndarray
    probabilities: dict[str, np.ndarray]

    def predictions(self, manifest) -> dict[str, Predictions]:
        labels = manifest["label_index"].to_numpy()[self.rows]
        return {key: Predictions(p, labels) for key, p in self.probabilities.items()}


@dataclass(frozen=True)
class GateCheck:
    name: str  # the params.yaml key
    metric: str  # what was measured
    value: float  # point estimate (information)
    bound: float  # the one-sided confidence bound the verdict reads
    threshold: float
    comparison: str  # "<=" (bound is an upper bound) or ">=" (a lower bound)
    passed: bool
    method: str = ""  # how the bound was made (docs/gates.md)

    @property
    def relation(self) -> str:
        """How the bound stands to the threshold: the required comparison when it holds, its
        negation when it does not ("0.0143 > 0.01", never "0.0143 <= 0.01" on a failed check)."""
        return shown_relation(self.comparison, self.passed)

    def describe(self, confidence: float) -> str:
        side = "upper" if self.comparison == "<=" else "lower"
        verdict = "pass" if self.passed else "FAIL"
        return (
            f"{self.name}: {self.metric} = {self.value:.4f}, {confidence:.0%} {side} bound "
            f"{self.bound:.4f} {self.relation} {self.threshold:.4f} {verdict}"
        )


def shown_relation(comparison: str, passed: bool) -> str:
    return comparison if passed else {"<=": ">", ">=": "<"}[comparison]


@dataclass(frozen=True)
class GateVerdict:
    passed: bool
    checks: tuple[GateCheck, ...]
    confidence: float = 0.95
    n_samples: int = 0  # test images of the absolute gates
    n_shared: int = 0  # test images neither model was fitted on: the relative gates'
    estimates: dict[str, float] = field(default_factory=dict)  # information, not gated

    @property
    def absolute_passed(self) -> bool:
        return all(c.passed for c in self.checks if c.name in ABSOLUTE_GATES)

    def check(self, name: str) -> GateCheck:
        return next(c for c in self.checks if c.name == name)

    def summary(self) -> str:
        failed = [c for c in self.checks if not c.passed]
        head = "gates passed" if self.passed else "gates failed"
        shared = f", {self.n_shared} shared with the champion" if self.n_shared else ""
        lines = [
            f"{head} ({len(self.checks) - len(failed)} of {len(self.checks)} checks pass, "
            f"{self.n_samples} test images{shared}, one-sided {self.confidence:.0%} bounds):"
        ]
        lines += [f" - {c.describe(self.confidence)}" for c in (failed or self.checks)]
        if self.estimates:
            lines.append(" - estimates: " + ", ".join(f"{k} {v:.4f}" for k, v in self.estimates.items()))
        return "\n".join(lines)

    def table(self) -> str:
        rows = [f"{'check':<18} {'value':>8} {'bound':>8} {'threshold':>12}  {'verdict':<7}  method"]
        for c in self.checks:
            rows.append(
                f"{c.name:<18} {c.value:>8.4f} {c.bound:>8.4f} {c.relation:>3} {c.threshold:>8.4f}  "
                f"{'pass' if c.passed else 'FAIL':<7}  {c.method}"
            )
        return "\n".join(rows)

    def to_json(self) -> dict:
        return {
            "passed": self.passed,
            "confidence": self.confidence,
            "n_samples": self.n_samples,
            "n_shared": self.n_shared,
            "estimates": dict(self.estimates),
            "checks": [asdict(c) for c in self.checks],
        }


ABSOLUTE_GATES = (
    "max_ece",
    "min_accuracy",
    "max_nll",
    "max_soft_nll",
    "max_soft_ece",
    "max_selective_risk",
    "min_conformal_coverage",
    "max_shift_ece",
    "max_ood_fpr95",
)


@dataclass(frozen=True)
class OODScores:
    """An OOD score (higher: more in-distribution, e.g. MSP or minus the energy) on the test split
    and on the out-of-distribution images."""

    inside: np.ndarray
    outside: np.ndarray
    name: str = "score"


@dataclass(frozen=True)
class _TopLabel:
    confidence: np.ndarray  # (N,) top-label probability
    correct: np.ndarray  # (N,) bool
    true_class_probability: np.ndarray  # (N,) for the NLL


def _top_label(predictions: Predictions, who: str) -> _TopLabel:
    probs = np.asarray(predictions.probabilities, dtype=np.float64)
    labels = np.asarray(predictions.labels)
    if probs.ndim != 2 or labels.ndim != 1 or probs.shape[0] != labels.shape[0]:
        raise GateInputError(
            f"{who}: probabilities must be (N, K) and labels (N,); got {probs.shape} and {labels.shape}"
        )
    if probs.shape[0] == 0:
        raise GateInputError(
            f"{who}: no test images to gate on; the test split (or the images shared with the "
            f"champion) is empty: add images to the dataset or compare --against another version"
        )
    bad = ~np.isfinite(probs).all(axis=1)
    if bad.any():
        raise GateInputError(
            f"{who}: {int(bad.sum())} of {len(bad)} rows of probabilities are NaN or infinite "
            f"(first at row {int(np.argmax(bad))}); the model or its calibrator is broken: refit it"
        )
    if (probs < 0).any() or (probs > 1).any() or np.abs(probs.sum(axis=1) - 1.0).max() > 1e-3:
        raise GateInputError(
            f"{who}: probabilities must lie in [0, 1] and each row sum to 1 (largest deviation "
            f"{np.abs(probs.sum(axis=1) - 1.0).max():.3g}); pass calibrated probabilities, not logits"
        )
    if probs.shape[1] < 2:
        raise GateInputError(
            f"{who}: probabilities of {probs.shape[1]} class: a single column is right by construction and "
            f"every gate would pass it; a classifier needs two classes or more"
        )
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise GateInputError(f"{who}: labels must be integers in [0, {probs.shape[1]})")
    predicted = probs.argmax(axis=1)
    rows = np.arange(len(labels))
    return _TopLabel(probs[rows, predicted], predicted == labels, probs[rows, labels])


NLL_EPS = np.finfo(np.float64).eps  # calibflow.metrics.probability_nll's clip for float64


def _nll_values(probability: np.ndarray) -> np.ndarray:
    return -np.log(np.clip(probability, NLL_EPS, 1.0 - NLL_EPS))


def _profile(metric: str, n_bins: int, bandwidth: float | None = None) -> gs.ResidualProfile:
    """The calibration measure `gates.metric` names (smooth ECE at `bandwidth`)."""
    if metric == "ece":
        return gs.EqualWidthBins(n_bins)
    if metric == "smooth_ece":
        return gs.SmoothKernel(bandwidth)
    raise GateInputError(f"gates.metric = {metric!r}: use one of {', '.join(METRICS)}")


def _check(name: str, metric: str, bound: gs.Bound, threshold: float, comparison: str) -> GateCheck:
    passed = bound.bound <= threshold if comparison == "<=" else bound.bound >= threshold
    return GateCheck(name, metric, bound.estimate, bound.bound, threshold, comparison, bool(passed), bound.method)


def evaluate_gates(
    candidate: Predictions,
    gates: GatesConfig,
    comparison: tuple[Predictions, Predictions] | None = None,
    *,
    n_bins: int = DEFAULT_N_BINS,
    seed: int = 0,
    report_estimates: bool = True,
    decisions: DecisionPolicy | None = None,
    shift: Mapping[str, Predictions] | None = None,
    shift_comparison: Mapping[str, tuple[Predictions, Predictions]] | None = None,
    ood: OODScores | None = None,
) -> GateVerdict:
    """Every gate of params.yaml. The absolute gates read `candidate` (its whole test split); the
    relative ones read `comparison` = (candidate, champion) on the test images neither model was
    fitted on, which must be the same images (equal labels) with the same class order.

    `seed` only fixes the cross-fitting halves of the champion comparison. `report_estimates`
    adds the plug-in, debiased and smooth ECE of the candidate as information (not gated); the
    simulations of benchmarks/gate_soundness.py turn it off for speed, nothing else changes.
    `decisions` is the candidate's fitted decision policy, which the decision gates read.
    `shift` are the candidate's predictions on each cell of the corruption suite and
    `shift_comparison` (candidate, champion) on the cells' shared images, which the shift gates
    read; `ood` the scores the OOD gate reads."""
    metric = getattr(gates, "metric", "ece")
    top = _top_label(candidate, "candidate")
    confidence = gates.confidence
    # relplot's smooth ECE costs 10-60 ms: computed once, for the gate and for the report
    smooth = gs.smooth_ece(top.confidence, top.correct) if metric == "smooth_ece" or report_estimates else None
    profile = _profile(metric, n_bins, smooth[1] if smooth else None)
    checks = [
        _check(
            "max_ece",
            profile.name,
            gs.calibration_error_upper_bound(top.confidence, top.correct, profile, confidence),
            gates.max_ece,
            "<=",
        ),
        _check("min_accuracy", "accuracy", gs.accuracy_lower_bound(top.correct, confidence), gates.min_accuracy, ">="),
    ]
    if gates.max_nll is not None:
        nll = gs.nll_upper_bound(
            _nll_values(top.true_class_probability), confidence, max_loss=-float(np.log(NLL_EPS)), seed=seed
        )
        checks.append(_check("max_nll", "NLL", nll, gates.max_nll, "<="))
    checks += _soft_checks(candidate, gates, metric, n_bins, seed)
    checks += _decision_checks(candidate, decisions, gates)
    checks += _shift_checks(shift, gates, metric, n_bins)
    if gates.max_ood_fpr95 is not None:
        if ood is None:
            raise GateInputError("gates.max_ood_fpr95 is set but there are no OOD scores to gate: set ood.path")
        checks.append(
            _check(
                "max_ood_fpr95",
                f"FPR at 95% TPR ({ood.name})",
                gs.fpr_at_tpr_upper_bound(ood.inside, ood.outside, 0.95, confidence),
                gates.max_ood_fpr95,
                "<=",
            )
        )
    n_shared = 0
    if comparison is not None:
        mine, champion = comparison
        ours, theirs = _top_label(mine, "candidate (shared images)"), _top_label(champion, "champion")
        if not np.array_equal(np.asarray(champion.labels), np.asarray(mine.labels)):
            raise GateInputError("the champion must be evaluated on the same test images as the candidate")
        if np.shape(champion.probabilities)[1] != np.shape(mine.probabilities)[1]:
            raise GateInputError("not comparable: the candidate and the champion have a different number of classes")
        n_shared = int(len(mine.labels))
        if gates.max_ece_increase is not None:
            # smooth ECE of both models at one kernel: the smaller of their own bandwidths
            bandwidth = (
                min(gs.smooth_ece(t.confidence, t.correct)[1] for t in (ours, theirs))
                if metric == "smooth_ece"
                else None
            )
            shared_profile = _profile(metric, n_bins, bandwidth)
            increase, _ = gs.calibration_error_increase_upper_bound(
                ours.confidence, ours.correct, theirs.confidence, theirs.correct, shared_profile, confidence, seed
            )
            checks.append(
                _check(
                    "max_ece_increase",
                    f"{shared_profile.name}: candidate - champion",
                    increase,
                    gates.max_ece_increase,
                    "<=",
                )
            )
        if gates.max_accuracy_drop is not None:
            drop = gs.accuracy_drop_upper_bound(theirs.correct, ours.correct, confidence)
            checks.append(
                _check("max_accuracy_drop", "accuracy: champion - candidate", drop, gates.max_accuracy_drop, "<=")
            )
        if gates.max_brier_increase is not None:
            brier = gs.brier_increase_upper_bound(
                mine.probabilities, champion.probabilities, mine.labels, confidence, seed
            )
            checks.append(
                _check("max_brier_increase", "Brier score: candidate - champion", brier, gates.max_brier_increase, "<=")
            )
        if gates.max_shift_ece_increase is not None:
            checks.append(_shift_increase_check(shift_comparison, gates, metric, n_bins, seed))
    estimates = _estimates(candidate, top, n_bins, smooth) if report_estimates else {}
    return GateVerdict(
        passed=all(c.passed for c in checks),
        checks=tuple(checks),
        confidence=confidence,
        n_samples=int(len(top.correct)),
        n_shared=n_shared,
        estimates=estimates,
    )


def _soft_checks(candidate: Predictions, gates: GatesConfig, metric: str, n_bins: int, seed: int) -> list[GateCheck]:
    """max_soft_nll and max_soft_ece: max_nll's and max_ece's bounds, with the image's distribution
    over the classes in place of its one label (calibflow.metrics.soft). Each image's cross-entropy
    lies in [0, -log eps] as its NLL does; its agreement q[argmax p] lies in [0, 1], and a value in
    [0, 1] with mean pi varies at most as much as a 0/1 one (pi (1 - pi)), the variance the score
    bound assumes, so both bounds keep their level (tests/test_soft_metrics.py simulates it)."""
    wanted = gates.soft_gates()
    if not wanted:
        return []
    if candidate.targets is None:
        raise GateInputError(
            f"gates.{wanted[0]} is set but the test images have no soft labels to gate against (a version "
            f"trained without data.soft_labels, or registered before calibflow recorded them): train with "
            f"data.soft_labels (docs/soft_labels.md), or unset the gate"
        )
    from calibflow.metrics.soft import soft_correctness, soft_nll_values

    probabilities = np.asarray(candidate.probabilities, np.float64)
    checks = []
    if gates.max_soft_nll is not None:
        values = soft_nll_values(probabilities, candidate.targets, eps=NLL_EPS).numpy()
        bound = gs.nll_upper_bound(values, gates.confidence, max_loss=-float(np.log(NLL_EPS)), seed=seed)
        checks.append(_check("max_soft_nll", "NLL against the soft labels", bound, gates.max_soft_nll, "<="))
    if gates.max_soft_ece is not None:
        confidence, agreement = (t.numpy() for t in soft_correctness(probabilities, candidate.targets))
        smooth = gs.smooth_ece(confidence, agreement) if metric == "smooth_ece" else None
        profile = _profile(metric, n_bins, smooth[1] if smooth else None)
        bound = gs.calibration_error_upper_bound(confidence, agreement, profile, gates.confidence)
        checks.append(
            _check("max_soft_ece", f"{profile.name} against the soft labels", bound, gates.max_soft_ece, "<=")
        )
    return checks


def _cell_level(confidence: float, cells: int) -> float:
    """Each of `cells` bounds at this level holds, all at once, with probability >= confidence
    (Bonferroni), whatever their dependence: the cells share their images."""
    return 1.0 - (1.0 - confidence) / cells


def _shift_checks(
    shift: Mapping[str, Predictions] | None, gates: GatesConfig, metric: str, n_bins: int
) -> list[GateCheck]:
    """max_shift_ece: the mean over cells of each cell's upper bound. When every cell's bound holds
    (probability >= confidence), their mean bounds the mean of the cells' true errors."""
    if gates.max_shift_ece is None:
        return []
    if not shift:
        raise GateInputError(
            "gates.max_shift_ece is set but the model has no corruption suite to gate: set "
            "shift.corruptions and shift.severities"
        )
    level = _cell_level(gates.confidence, len(shift))
    bounds = []
    for key, predictions in shift.items():
        top = _top_label(predictions, f"corruption {key}")
        smooth = gs.smooth_ece(top.confidence, top.correct) if metric == "smooth_ece" else None
        profile = _profile(metric, n_bins, smooth[1] if smooth else None)
        bounds.append(gs.calibration_error_upper_bound(top.confidence, top.correct, profile, level))
    mean = gs.Bound(
        float(np.mean([b.estimate for b in bounds])),
        float(np.mean([b.bound for b in bounds])),
        f"mean of {len(bounds)} cell bounds at {level:.4f} (Bonferroni)",
    )
    return [
        _check(
            "max_shift_ece",
            f"{profile.name}, mean over {len(bounds)} corruption cells",
            mean,
            gates.max_shift_ece,
            "<=",
        )
    ]


def _shift_increase_check(
    shift_comparison: Mapping[str, tuple[Predictions, Predictions]] | None,
    gates: GatesConfig,
    metric: str,
    n_bins: int,
    seed: int,
) -> GateCheck:
    """max_shift_ece_increase: the mean over cells of each cell's bound of error(candidate) -
    error(champion) on the same corrupted images, each at the Bonferroni level."""
    if not shift_comparison:
        raise GateInputError(
            "gates.max_shift_ece_increase is set but there are no corrupted images shared with the "
            "champion to compare on: set shift.corruptions and shift.severities"
        )
    level = _cell_level(gates.confidence, len(shift_comparison))
    bounds = []
    for key, (mine, champion) in shift_comparison.items():
        ours, theirs = _top_label(mine, f"candidate, corruption {key}"), _top_label(champion, f"champion, {key}")
        if not np.array_equal(np.asarray(champion.labels), np.asarray(mine.labels)):
            raise GateInputError(
                f"corruption {key}: the champion must be evaluated on the same images as the candidate"
            )
        bandwidth = (
            min(gs.smooth_ece(t.confidence, t.correct)[1] for t in (ours, theirs)) if metric == "smooth_ece" else None
        )
        profile = _profile(metric, n_bins, bandwidth)
        bound, _ = gs.calibration_error_increase_upper_bound(
            ours.confidence, ours.correct, theirs.confidence, theirs.correct, profile, level, seed
        )
        bounds.append(bound)
    mean = gs.Bound(
        float(np.mean([b.estimate for b in bounds])),
        float(np.mean([b.bound for b in bounds])),
        f"mean of {len(bounds)} cell bounds at {level:.4f} (Bonferroni)",
    )
    return _check(
        "max_shift_ece_increase",
        f"{profile.name} under shift: candidate - champion",
        mean,
        gates.max_shift_ece_increase,
        "<=",
    )


def _decision_checks(candidate: Predictions, policy: DecisionPolicy | None, gates: GatesConfig) -> list[GateCheck]:
    """The decision gates, at the thresholds the model serves: a certified rule was fitted on the
    calibration split; these check it again on the test split, with a bound, not a point value."""
    wanted = [name for name in ("max_selective_risk", "min_conformal_coverage") if getattr(gates, name) is not None]
    if not wanted:
        return []
    needs = {"max_selective_risk": "abstain", "min_conformal_coverage": "conformal"}
    missing = [name for name in wanted if policy is None or getattr(policy, needs[name]) is None]
    if missing:
        raise GateInputError(
            f"gates.{missing[0]} is set but the model has no fitted "
            f"{'abstention threshold (decision.max_risk)' if needs[missing[0]] == 'abstain' else 'prediction sets (decision.conformal_alpha)'}"
            f" to gate"
        )
    measured = evaluate_policy(policy, candidate.probabilities, candidate.labels, gates.confidence)
    checks = []
    if gates.max_selective_risk is not None:
        risk = measured["selective_risk"]
        checks.append(
            _check(
                "max_selective_risk",
                f"selective risk at coverage {measured['selective_coverage']:.3f}",
                gs.Bound(0.0 if np.isnan(risk) else risk, measured["selective_risk_upper"], "clopper-pearson"),
                gates.max_selective_risk,
                "<=",
            )
        )
    if gates.min_conformal_coverage is not None:
        checks.append(
            _check(
                "min_conformal_coverage",
                f"set coverage (mean size {measured['set_mean_size']:.2f})",
                gs.Bound(measured["set_coverage"], measured["set_coverage_lower"], "clopper-pearson"),
                gates.min_conformal_coverage,
                ">=",
            )
        )
    return checks


def _estimates(
    candidate: Predictions, top: _TopLabel, n_bins: int, smooth_and_sigma: tuple[float, float]
) -> dict[str, float]:
    from calibflow.metrics import debiased_calibration_error

    smooth, sigma = smooth_and_sigma
    return {
        "ece_plugin": gs.EqualWidthBins(n_bins).error(top.confidence, top.confidence - top.correct),
        "ece_debiased_l2": debiased_calibration_error(candidate.probabilities, candidate.labels, n_bins),
        "smooth_ece": smooth,
        "smooth_ece_sigma": sigma,
    }
