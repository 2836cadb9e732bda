"""How many test images a verdict needs: the gates' power, by simulation.

`calibflow gate plan` asks: if this model were evaluated on n test images, how often would the
configured gates pass it? A test set of size n is simulated from the model's own estimated
calibration, every simulated set goes through `calibflow.gates.checks.evaluate_gates` (the one gate
implementation), and the answer is the smallest n whose pass rate reaches `power` (0.8).

The simulated model: rows of the candidate's test probabilities drawn with replacement, each
right with probability c_i - g_b, where g_b is its bin's calibration gap shrunk towards the
model's overall gap (James-Stein: the raw per-bin gaps of a few hundred images are mostly
noise, and planning with them would plan for a worse model than the one measured, while
shrinking them towards 0 would plan for a better one). A wrong row gets a
label drawn from its other classes in proportion to their probabilities. Against a champion, the
shared rows are drawn jointly with their observed labels (the empirical joint distribution,
which plans for the plug-in calibration error of the pair: on the pessimistic side).

Without a model (`plan_from_thresholds`), the simulated model sits halfway inside every
threshold: calibration error max_ece / 2 (over-confident everywhere), accuracy halfway between
min_accuracy and 1, confidences drawn so that mean confidence = accuracy + gap.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from calibflow.gates.statistics import EqualWidthBins
from calibflow.gates.checks import Predictions, evaluate_gates
from calibflow.metrics.reliability import DEFAULT_N_BINS

if TYPE_CHECKING:  # config sits above the gates: they read its records, never import it
    from calibflow.config import GatesConfig

SIZES = (100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000)


@dataclass(frozen=True)
class PlanRow:
    n: int
    pass_rate: float  # every configured gate at once
    gate_pass_rates: dict[str, float]


@dataclass(frozen=True)
class Plan:
    needed: int | None  # smallest simulated n whose pass rate reaches `power`; None: none up to the largest
    power: float
    simulations: int
    rows: tuple[PlanRow, ...]
    assumptions: str

    def describe(self) -> str:
        lines = [
            f"{'test images':>11}  {'all gates pass':>14}  "
            + "  ".join(f"{k:>17}" for k in self.rows[0].gate_pass_rates)
        ]
        for r in self.rows:
            lines.append(
                f"{r.n:>11,}  {r.pass_rate:>14.1%}  " + "  ".join(f"{v:>17.1%}" for v in r.gate_pass_rates.values())
            )
        if self.needed is None:
            verdict = (
                f"no size up to {self.rows[-1].n:,} test images reaches {self.power:.0%} power: the model as "
                f"estimated is too close to (or beyond) a threshold; the gate that fails most is the one to "
                f"look at"
            )
        else:
            verdict = (
                f"about {self.needed:,} test images give the configured gates {self.power:.0%} power to pass "
                f"this model ({self.simulations} simulated test sets a size)"
            )
        return "\n".join([self.assumptions, "", *lines, "", verdict])

    def to_json(self) -> dict:
        return {
            "needed": self.needed,
            "power": self.power,
            "simulations": self.simulations,
            "assumptions": self.assumptions,
            "rows": [{"n": r.n, "pass_rate": r.pass_rate, **r.gate_pass_rates} for r in self.rows],
        }


def _shrunk_gaps(conf: np.ndarray, correct: np.ndarray, bins: EqualWidthBins) -> np.ndarray:
    """Per-bin calibration gaps shrunk towards the model's overall gap (James-Stein, positive
    part): the overall gap (mean confidence - accuracy) is measured precisely, the per-bin
    deviations from it are mostly noise on a few hundred images; shrinking towards 0 instead
    would plan for a better-calibrated model than the one measured."""
    idx = bins.index(conf)
    count = np.bincount(idx, minlength=bins.n_bins)
    safe = np.maximum(count, 1)
    weight = count / count.sum()
    accuracy = np.bincount(idx, weights=correct, minlength=bins.n_bins) / safe
    gap = np.bincount(idx, weights=conf, minlength=bins.n_bins) / safe - accuracy
    overall = float(np.sum(weight * gap))
    noise = np.clip(accuracy * (1 - accuracy), 0.25 / safe, None) / safe  # variance of each bin's gap
    spread = float(np.sum(weight * (gap - overall) ** 2))
    keep = max(0.0, 1.0 - float(np.sum(weight * noise)) / spread) if spread > 0 else 0.0
    return overall + keep * (gap - overall)


def _relabel(probs: np.ndarray, correct: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The predicted class where `correct`, else another class in proportion to its probability."""
    predicted = probs.argmax(1)
    others = probs.copy()
    others[np.arange(len(probs)), predicted] = 0.0
    total = others.sum(1, keepdims=True)
    others = np.where(total > 0, others / np.where(total > 0, total, 1), 1.0 / max(probs.shape[1] - 1, 1))
    others[np.arange(len(probs)), predicted] = 0.0
    drawn = (others.cumsum(1) < rng.random((len(probs), 1))).sum(1).clip(0, probs.shape[1] - 1)
    drawn = np.where(drawn == predicted, (predicted + 1) % probs.shape[1], drawn)
    return np.where(correct, predicted, drawn)


class _Simulator:
    def __init__(self, candidate: Predictions, comparison: tuple[Predictions, Predictions] | None, n_bins: int):
        self.probs = np.asarray(candidate.probabilities, np.float64)
        conf = self.probs.max(1)
        correct = self.probs.argmax(1) == np.asarray(candidate.labels)
        bins = EqualWidthBins(n_bins)
        self.right_probability = np.clip(conf - _shrunk_gaps(conf, correct, bins)[bins.index(conf)], 0.0, 1.0)
        self.comparison = comparison

    def draw(self, n: int, rng: np.random.Generator):
        rows = rng.integers(0, len(self.probs), n)
        probs = self.probs[rows]
        labels = _relabel(probs, rng.random(n) < self.right_probability[rows], rng)
        pair = None
        if self.comparison is not None:
            mine, champion = self.comparison
            shared = rng.integers(0, len(mine.labels), n)
            labels_shared = np.asarray(mine.labels)[shared]
            pair = (
                Predictions(np.asarray(mine.probabilities)[shared], labels_shared),
                Predictions(np.asarray(champion.probabilities)[shared], labels_shared),
            )
        return Predictions(probs, labels), pair


def _plannable(gates: GatesConfig) -> GatesConfig:
    """The gates a simulated test set can be put through: the decision gates read thresholds fitted
    on the calibration split (calibflow.gates.decisions), which a resampled test split does not have, and
    the shift and OOD gates read corrupted copies and OOD images, which it does not have either."""
    return replace(
        gates,
        max_selective_risk=None,
        min_conformal_coverage=None,
        max_shift_ece=None,
        max_shift_ece_increase=None,
        max_ood_fpr95=None,
    )


def _simulate(
    simulator, gates: GatesConfig, *, n_bins: int, power: float, simulations: int, seed: int, sizes, assumptions: str
) -> Plan:
    gates = _plannable(gates)
    if not 0.0 < power < 1.0:
        raise ValueError(f"power = {power}: must be in (0, 1), e.g. 0.8")
    if simulations < 1:
        raise ValueError(f"simulations = {simulations}: must be at least 1")
    rng = np.random.default_rng(seed)

    def at(n: int) -> PlanRow:
        passes, per_gate = 0, {}
        for trial in range(simulations):
            candidate, pair = simulator.draw(n, rng)
            verdict = evaluate_gates(candidate, gates, pair, n_bins=n_bins, seed=trial, report_estimates=False)
            passes += verdict.passed
            for check in verdict.checks:
                per_gate[check.name] = per_gate.get(check.name, 0) + check.passed
        return PlanRow(n, passes / simulations, {k: v / simulations for k, v in per_gate.items()})

    rows, needed = [], None
    for n in sizes:
        rows.append(at(n))
        if rows[-1].pass_rate >= power:
            needed = n
            break
    if needed is not None and len(rows) > 1:  # narrow the last step of the grid to within 15%
        low = rows[-2].n
        while needed / low > 1.15:
            middle = int(round(np.sqrt(low * needed)))
            row = at(middle)
            rows.append(row)
            low, needed = (low, middle) if row.pass_rate >= power else (middle, needed)
        rows.sort(key=lambda r: r.n)
    return Plan(needed, power, simulations, tuple(rows), assumptions)


def plan_sample_size(
    candidate: Predictions,
    gates: GatesConfig,
    comparison: tuple[Predictions, Predictions] | None = None,
    *,
    n_bins: int = DEFAULT_N_BINS,
    power: float = 0.8,
    simulations: int = 200,
    seed: int = 0,
    sizes=SIZES,
) -> Plan:
    """Smallest n at which the configured gates pass this model with `power`, by simulation under
    its estimated calibration (module docstring)."""
    what = (
        f"simulated from the candidate's {len(candidate.labels):,} test predictions, per-bin calibration gaps "
        f"shrunk towards the overall gap"
        + (
            f"; champion comparison on {len(comparison[0].labels):,} shared images, resampled jointly"
            if comparison
            else ""
        )
    )
    simulator = _Simulator(candidate, comparison, n_bins)
    return _simulate(
        simulator, gates, n_bins=n_bins, power=power, simulations=simulations, seed=seed, sizes=sizes, assumptions=what
    )


class _ThresholdModel:
    """A model halfway inside every threshold (module docstring)."""

    def __init__(self, gates: GatesConfig, n_classes: int):
        self.gap = gates.max_ece / 2.0
        self.accuracy = (gates.min_accuracy + 1.0) / 2.0
        self.k = n_classes
        mean_confidence = min(self.accuracy + self.gap, 1.0 - 1e-3)
        # 1 - c ~ Beta(2, beta) with mean 1 - mean_confidence
        self.beta = 2.0 * mean_confidence / (1.0 - mean_confidence)

    def draw(self, n: int, rng: np.random.Generator):
        conf = np.clip(1.0 - rng.beta(2.0, self.beta, n), 1.0 / self.k + 1e-6, 1.0)
        right = rng.random(n) < np.clip(conf - self.gap, 0.0, 1.0)
        probs = np.repeat(((1.0 - conf) / (self.k - 1))[:, None], self.k, axis=1)
        predicted = rng.integers(0, self.k, n)
        probs[np.arange(n), predicted] = conf
        labels = np.where(right, predicted, (predicted + rng.integers(1, self.k, n)) % self.k)
        return Predictions(probs, labels), None


def plan_from_thresholds(
    gates: GatesConfig,
    n_classes: int = 10,
    n_bins: int = DEFAULT_N_BINS,
    power: float = 0.8,
    simulations: int = 200,
    seed: int = 0,
    sizes=SIZES,
) -> Plan:
    """Smallest n at which a model halfway inside every threshold passes the absolute gates."""
    if n_classes < 2:
        raise ValueError(f"n_classes = {n_classes}: a classifier has at least 2 classes")
    model = _ThresholdModel(gates, n_classes)
    absolute = replace(_plannable(gates), max_ece_increase=None, max_accuracy_drop=None)
    what = (
        f"a {n_classes}-class model halfway inside the thresholds: calibration error {model.gap:.4f} "
        f"(max_ece / 2), accuracy {model.accuracy:.4f} (halfway from min_accuracy to 1); the gates against a "
        f"champion need a champion and are left out"
    )
    return _simulate(
        model, absolute, n_bins=n_bins, power=power, simulations=simulations, seed=seed, sizes=sizes, assumptions=what
    )


def smallest_passable(gates: GatesConfig, n_test: int, n_classes: int, n_bins: int = DEFAULT_N_BINS) -> bool:
    """Could any model pass the absolute gates on n_test images? A perfect one (always right, with
    confidence 1) is the easiest case there is."""
    probs = np.zeros((n_test, n_classes))
    probs[:, 0] = 1.0
    perfect = Predictions(probs, np.zeros(n_test, dtype=int))
    absolute = replace(_plannable(gates), max_ece_increase=None, max_accuracy_drop=None)
    return evaluate_gates(perfect, absolute, n_bins=n_bins, report_estimates=False).passed


def small_test_split_warning(
    n_test: int,
    n_classes: int,
    gates: GatesConfig,
    n_bins: int = DEFAULT_N_BINS,
    power: float = 0.8,
    simulations: int = 100,
    cache_directory: str | Path | None = None,
) -> str | None:
    """A warning, before anything trains, when the test split is too small for the gates: None
    when a model halfway inside every threshold passes them with `power` on n_test images.

    The answer depends on the settings and the gate code alone (the simulation is seeded), and
    takes seconds: with `cache_directory`, a rerun with the same settings reads it from there."""
    from importlib.metadata import version

    from calibflow import disk_cache
    from calibflow.gates import statistics as gate_statistics
    from calibflow.gates import checks as gates_module

    key = {
        "n_test": n_test,
        "n_classes": n_classes,
        "gates": asdict(gates),
        "n_bins": n_bins,
        "power": power,
        "simulations": simulations,
        "numpy": np.__version__,
        "relplot": version("relplot"),
        "code": disk_cache.files_digest([__file__, gates_module.__file__, gate_statistics.__file__]),
    }
    return disk_cache.cached(
        cache_directory,
        "gate_power",
        key,
        lambda: _small_test_split_warning(n_test, n_classes, gates, n_bins, power, simulations),
    )


def _small_test_split_warning(
    n_test: int, n_classes: int, gates: GatesConfig, n_bins: int, power: float, simulations: int
) -> str | None:
    advice = "add test images (more data, or a larger split.test) or loosen the gates; `calibflow gate plan` says more"
    if not smallest_passable(gates, n_test, n_classes, n_bins):
        return (
            f"no model can pass the gates on the {n_test} images of the test split: even a perfect one (always "
            f"right, with confidence 1) fails them; {advice}"
        )
    here = plan_from_thresholds(gates, n_classes, n_bins, power, simulations, sizes=(n_test,))
    if here.needed is not None:
        return None
    needed = plan_from_thresholds(gates, n_classes, n_bins, power, simulations).needed
    wanted = f"about {needed:,}" if needed else f"more than {SIZES[-1]:,}"
    return (
        f"the test split has {n_test} images: a model halfway inside every threshold (calibration error "
        f"{gates.max_ece / 2:.3f}, accuracy {(gates.min_accuracy + 1) / 2:.3f}) passes the gates only "
        f"{here.rows[0].pass_rate:.0%} of the time on that many, and needs {wanted} for {power:.0%}; expect good "
        f"models to be rejected: {advice}"
    )
