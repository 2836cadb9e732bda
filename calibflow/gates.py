"""Promotion gates: decisions with stated confidence, not point estimates.

ECE estimated from a few hundred test images is noisy and biased upward (Kumar, Liang & Ma, 2019,
"Verified Uncertainty Calibration"), so a gate that compares a raw estimate with a threshold
promotes or rejects by luck. Every check here reads a one-sided bootstrap confidence bound at
`gates.confidence`:

- absolute gates: the *upper* bound of ECE (and NLL) must be below the threshold, the *lower*
  bound of accuracy above it;
- relative gates (against the champion, on the same test images): the upper bound of the paired
  bootstrap difference (candidate ECE - champion ECE; champion accuracy - candidate accuracy)
  must be below the allowed increase or drop.

A one-sided bound at level c is an end of the two-sided (2c - 1) percentile interval. The
debiased ECE estimate is reported beside the plug-in one (information; the gate reads the
plug-in upper bound, which the bias only makes more conservative: see
benchmarks/gate_soundness.py for the measured false-promotion and false-rejection rates).

This module is the one gate implementation: the flow's gate step and `calibflow gate` both call
`evaluate_gates`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from calibflow.config import GatesConfig
from calibflow.metrics import (bootstrap_ci, debiased_calibration_error, expected_calibration_error,
                               paired_bootstrap_ci)


@dataclass(frozen=True)
class Predictions:
    """Calibrated probabilities (N, K) of one model on the pinned test images, and their labels."""

    probabilities: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class GateCheck:
    name: str  # the params.yaml key
    metric: str  # what was measured
    value: float  # point estimate
    low: float  # two-sided (2c - 1) interval; the verdict reads `bound`, one of its ends
    high: float
    bound: float
    threshold: float
    comparison: str  # "<=" (bound is the upper end) or ">=" (bound is the lower end)
    passed: bool

    def describe(self, confidence: float) -> str:
        side = "upper" if self.comparison == "<=" else "lower"
        verdict = "pass" if self.passed else "FAIL"
        return (f"{self.name}: {self.metric} = {self.value:.4f}, {confidence:.0%} {side} bound {self.bound:.4f} "
                f"(must be {self.comparison} {self.threshold:.4f}) {verdict}")


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

    def summary(self) -> str:
        failed = [c for c in self.checks if not c.passed]
        head = "gates passed" if self.passed else "gates failed"
        shared = f", {self.n_shared} shared with the champion" if self.n_shared else ""
        lines = [f"{head} ({len(self.checks) - len(failed)} of {len(self.checks)} checks pass, "
                 f"{self.n_samples} test images{shared}, one-sided {self.confidence:.0%} bounds):"]
        lines += [f" - {c.describe(self.confidence)}" for c in (failed or self.checks)]
        if self.estimates:
            lines.append(" - estimates: " + ", ".join(f"{k} {v:.4f}" for k, v in self.estimates.items()))
        return "\n".join(lines)

    def table(self) -> str:
        rows = [f"{'check':<18} {'value':>8} {'interval':>19} {'bound':>8} {'threshold':>12}  verdict"]
        for c in self.checks:
            rows.append(f"{c.name:<18} {c.value:>8.4f} [{c.low:>7.4f}, {c.high:>7.4f}] {c.bound:>8.4f} "
                        f"{c.comparison:>3} {c.threshold:>8.4f}  {'pass' if c.passed else 'FAIL'}")
        return "\n".join(rows)

    def to_json(self) -> dict:
        return {"passed": self.passed, "confidence": self.confidence, "n_samples": self.n_samples,
                "n_shared": self.n_shared,
                "estimates": dict(self.estimates), "checks": [asdict(c) for c in self.checks]}


ABSOLUTE_GATES = ("max_ece", "min_accuracy", "max_nll")


def _upper_check(name: str, metric: str, interval, threshold: float) -> GateCheck:
    return GateCheck(name, metric, interval.estimate, interval.low, interval.high, interval.high, threshold, "<=",
                     bool(interval.high <= threshold))


def evaluate_gates(candidate: Predictions, gates: GatesConfig,
                   comparison: tuple[Predictions, Predictions] | None = None, n_bins: int = 15,
                   seed: int = 0) -> GateVerdict:
    """Every gate of params.yaml. The absolute gates read `candidate` (its whole test split); the
    relative ones read `comparison` = (candidate, champion) on the test images neither model was
    fitted on, which must be the same images (equal labels)."""
    probs, labels = candidate.probabilities, candidate.labels
    if len(labels) == 0:
        raise ValueError("no test images to gate on")
    two_sided = 2.0 * gates.confidence - 1.0
    common = dict(n_resamples=gates.n_resamples, confidence=two_sided, seed=seed, n_bins=n_bins)

    ece = bootstrap_ci("ece", probs, labels, **common)
    accuracy = bootstrap_ci("accuracy", probs, labels, **common)
    checks = [
        _upper_check("max_ece", "ECE (test, calibrated)", ece, gates.max_ece),
        GateCheck("min_accuracy", "accuracy (test)", accuracy.estimate, accuracy.low, accuracy.high, accuracy.low,
                  gates.min_accuracy, ">=", bool(accuracy.low >= gates.min_accuracy)),
    ]
    if gates.max_nll is not None:
        checks.append(_upper_check("max_nll", "NLL (test, calibrated)", bootstrap_ci("nll", probs, labels, **common),
                                   gates.max_nll))
    if comparison is not None:
        mine, champion = comparison
        if not np.array_equal(champion.labels, mine.labels):
            raise ValueError("the champion must be evaluated on the same test images as the candidate")
        if gates.max_ece_increase is not None:
            increase = paired_bootstrap_ci("ece", mine.probabilities, champion.probabilities, mine.labels, **common)
            checks.append(_upper_check("max_ece_increase", "ECE candidate - champion", increase,
                                       gates.max_ece_increase))
        if gates.max_accuracy_drop is not None:
            drop = paired_bootstrap_ci("accuracy", champion.probabilities, mine.probabilities, mine.labels, **common)
            checks.append(_upper_check("max_accuracy_drop", "accuracy champion - candidate", drop,
                                       gates.max_accuracy_drop))
    estimates = {"ece_plugin": expected_calibration_error(probs, labels, n_bins),
                 "ece_debiased_l2": debiased_calibration_error(probs, labels, n_bins)}
    return GateVerdict(passed=all(c.passed for c in checks), checks=tuple(checks), confidence=gates.confidence,
                       n_samples=int(len(labels)), estimates=estimates,
                       n_shared=int(len(comparison[0].labels)) if comparison else 0)
