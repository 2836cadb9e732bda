"""Promotion gates: the checks a calibrated model must pass before it is registered.

The verdict lists every check with its value and threshold, so a failed run says exactly what
failed and by how much, in the console, in MLflow and in CD logs alike.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

from calibflow.config import GatesConfig


@dataclass(frozen=True)
class GateCheck:
    name: str
    metric: str
    value: float
    threshold: float
    comparison: str  # "<=" or ">="
    passed: bool

    def describe(self) -> str:
        verdict = "pass" if self.passed else "FAIL"
        return f"{self.name}: {self.metric} = {self.value:.4f} (must be {self.comparison} {self.threshold:.4f}) {verdict}"


@dataclass(frozen=True)
class GateVerdict:
    passed: bool
    checks: tuple[GateCheck, ...]

    def summary(self) -> str:
        head = "gates passed" if self.passed else "gates failed"
        failed = [c for c in self.checks if not c.passed]
        lines = [f"{head} ({len(self.checks) - len(failed)} of {len(self.checks)} checks pass):"]
        lines += [f" - {c.describe()}" for c in (failed or self.checks)]
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"passed": self.passed, "checks": [asdict(c) for c in self.checks]}


def check_gates(calibrated_metrics: Mapping[str, float], gates: GatesConfig) -> GateVerdict:
    """Read the test-split metrics after calibration against params.yaml's `gates:`."""
    ece, accuracy = calibrated_metrics["ece"], calibrated_metrics["accuracy"]
    checks = (
        GateCheck("max_ece", "ece (test, calibrated)", ece, gates.max_ece, "<=", ece <= gates.max_ece),
        GateCheck("min_accuracy", "accuracy (test)", accuracy, gates.min_accuracy, ">=", accuracy >= gates.min_accuracy),
    )
    return GateVerdict(passed=all(c.passed for c in checks), checks=checks)
