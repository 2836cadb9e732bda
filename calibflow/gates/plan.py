"""How many test images a verdict needs: the power of every configured gate, by simulation.

`calibflow gate plan` asks: if this model were evaluated on n test images, how often would the
configured gates pass it? Test sets of size n are simulated, every one goes through
`calibflow.gates.checks.evaluate_gates` (the one gate implementation: a change to a bound changes
the plan), and the answer is the smallest n whose pass rate reaches `power` (0.8).

Which gates: max_ece, min_accuracy, max_nll and the champion comparison (max_ece_increase,
max_accuracy_drop, max_brier_increase). The decision, shift and OOD gates are listed as not planned: they read
thresholds fitted on the calibration split, corrupted copies and OOD images, which a simulated test
split does not have.

The model at hand (`plan_sample_size`): rows of its test probabilities drawn with replacement,
each right with probability c_i - g_b, where g_b is its bin's calibration gap shrunk towards the
model's overall gap (James-Stein: the raw per-bin gaps of a few hundred images are mostly noise,
and planning with them would plan for a worse model than the one measured, while shrinking them
towards 0 would plan for a better one). A wrong row's label is drawn from its other classes in
proportion to their probabilities (what max_nll reads). Each simulated split first draws one of
REPLICATES bootstrap replicates of the measured split and re-estimates the gaps on it, so the
power is averaged over what the measured split leaves unknown about the model (assurance): a
point estimate from a lucky split plans too few images.

A model described by numbers (`plan_from_thresholds`, `ModelShape`): top-label confidences with
1 - c ~ Beta(2, b), mean confidence = accuracy + gap, each right with probability c - gap
(over-confident by the same gap everywhere), the rest of the probability spread evenly over the
other classes. By default it sits halfway inside every threshold: gap max_ece / 2, accuracy
halfway between min_accuracy and 1. The figure holds for that shape only.

The champion comparison. Against a distinct champion, the shared images are drawn jointly with
their observed labels (the empirical joint distribution, which plans for the plug-in calibration
errors of the pair: on the pessimistic side). Without one (the model at hand is the champion, or
there is none yet), the plan is for the next candidate: a retrain of equal quality, compared
with the model at hand on the same images. `retrain_fresh_share` says how alike: on that share
of images the retrain's prediction is an independent draw from the same model (equal true
calibration and accuracy), elsewhere it is the model's own; 0 (the default) is an identical
retrain, what a deterministic rerun on unchanged data gives, and 1 an independent model of equal
quality. The output says which.

When the planned n exceeds the test split, the plan says what to change: the images to add, or,
for each gate that fails most, the threshold its bound stays within on `power` of the simulated
test splits of the size at hand.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from calibflow.gates.checks import Predictions, evaluate_gates
from calibflow.gates.statistics import EqualWidthBins
from calibflow.metrics.reliability import DEFAULT_N_BINS

if TYPE_CHECKING:  # config sits above the gates: they read its records, never import it
    from calibflow.config import GatesConfig

SIZES = (100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000)
# Bootstrap replicates of the model at hand's test split that a plan averages its power over.
REPLICATES = 50
RELATIVE_GATES = ("max_ece_increase", "max_accuracy_drop", "max_brier_increase")
# gate: why a simulated test split cannot be put through it
NOT_PLANNED = {
    "max_selective_risk": "reads the abstention threshold fitted on the calibration split",
    "min_conformal_coverage": "reads the prediction sets fitted on the calibration split",
    "max_shift_ece": "reads the corrupted copies of the test split",
    "max_shift_ece_increase": "reads the corrupted copies of the test split",
    "max_ood_fpr95": "reads the OOD images",
    "max_soft_nll": "reads the soft labels of the test images",
    "max_soft_ece": "reads the soft labels of the test images",
}


@dataclass(frozen=True)
class ModelShape:
    """A model described by numbers, for a plan without a model at hand. None: halfway inside the
    thresholds (accuracy halfway between min_accuracy and 1, calibration gap max_ece / 2)."""

    n_classes: int = 10
    accuracy: float | None = None
    calibration_gap: float | None = None  # mean confidence - accuracy, the same at every confidence

    def resolved(self, gates: GatesConfig) -> ModelShape:
        """Given numbers checked, the halfway defaults filled in (a gap that would leave no room
        below full confidence is halved again: thresholds any model passes, e.g. max_ece 1)."""
        if self.n_classes < 2:
            raise ValueError(f"n_classes = {self.n_classes}: a classifier has at least 2 classes")
        if self.accuracy is not None and not 1.0 / self.n_classes < self.accuracy < 1.0:
            raise ValueError(f"accuracy = {self.accuracy}: must be above chance (1/{self.n_classes}) and below 1")
        accuracy = (gates.min_accuracy + 1.0) / 2.0 if self.accuracy is None else self.accuracy
        if self.calibration_gap is not None and not 0.0 <= self.calibration_gap < 1.0 - accuracy:
            raise ValueError(
                f"calibration gap = {self.calibration_gap}: must be in [0, 1 - accuracy = {1 - accuracy:.4g}), "
                f"e.g. 0.02"
            )
        gap = min(gates.max_ece / 2.0, (1.0 - accuracy) / 2.0) if self.calibration_gap is None else self.calibration_gap
        return ModelShape(self.n_classes, accuracy, gap)


@dataclass(frozen=True)
class GateDraws:
    """One gate over the simulated test sets of one size: what "loosen X to Y" reads."""

    comparison: str  # "<=" or ">="
    threshold: float
    bounds: np.ndarray
    passed: np.ndarray

    def passing(self, share: float) -> float:
        """The threshold, never tighter than the configured one, that the bound clears on `share` of sets."""
        if self.comparison == "<=":
            return max(self.threshold, float(np.quantile(self.bounds, share)))
        return min(self.threshold, float(np.quantile(self.bounds, 1.0 - share)))

    def passes_at(self, threshold: float) -> np.ndarray:
        return self.bounds <= threshold if self.comparison == "<=" else self.bounds >= threshold


@dataclass(frozen=True)
class PlanRow:
    n: int
    pass_rate: float  # every planned gate at once
    gate_pass_rates: dict[str, float]
    draws: dict[str, GateDraws] = field(default_factory=dict, repr=False, compare=False)

    def loosened(self, power: float) -> dict[str, float]:
        """The fewest gates, weakest first, and the thresholds they would need for every gate to
        pass at once on `power` of this size's simulated sets; {} when none need loosening."""
        if self.pass_rate >= power or not self.draws:
            return {}
        order = sorted(self.draws, key=lambda g: self.gate_pass_rates[g])
        for m in range(1, len(order) + 1):
            moved, kept = order[:m], order[m:]
            others = np.logical_and.reduce([self.draws[g].passed for g in kept]) if kept else True
            if np.mean(others) < power:
                continue
            low, high = 0.0, 1.0  # the smallest share whose loosened thresholds reach the power
            for _ in range(30):
                share = (low + high) / 2
                joint = (
                    np.logical_and.reduce([self.draws[g].passes_at(self.draws[g].passing(share)) for g in moved])
                    & others
                )
                low, high = (low, share) if np.mean(joint) >= power else (share, high)
            wanted = {g: self.draws[g].passing(high) for g in moved}
            return {g: t for g, t in wanted.items() if t != self.draws[g].threshold}
        return {}


@dataclass(frozen=True)
class Plan:
    needed: int | None  # smallest simulated n whose pass rate reaches `power`; None: none up to the largest
    power: float
    simulations: int
    rows: tuple[PlanRow, ...]
    assumptions: str
    test_images: int | None = None  # the test split at hand, when there is one
    not_planned: dict[str, str] = field(default_factory=dict)  # configured gate: why it is left out
    comparison: str = ""  # how the champion comparison was simulated ("" when it is off)

    @property
    def gates(self) -> tuple[str, ...]:
        return tuple(self.rows[0].gate_pass_rates)

    def advice(self) -> str | None:
        """What to change when the test split at hand is too small: None when it is large enough."""
        if self.test_images is None or (self.needed is not None and self.needed <= self.test_images):
            return None
        here = next(r for r in self.rows if r.n == self.test_images)
        loosen = " and ".join(f"gates.{g} to {t:.4g}" for g, t in here.loosened(self.power).items())
        add = (
            f"add about {self.needed - self.test_images:,} test images (to about {self.needed:,}: more data, "
            f"or a larger split.test)"
            if self.needed is not None
            else f"no test split up to {self.rows[-1].n:,} images will do"
        )
        return (
            f"the test split has {self.test_images:,} images and the gates pass this model on "
            f"{here.pass_rate:.0%} of such splits: {add}"
            + (f"; or loosen {loosen} ({self.power:.0%} of such splits pass then)" if loosen else "")
        )

    def describe(self) -> str:
        lines = [f"{'test images':>11}  {'all gates pass':>14}  " + "  ".join(f"{k:>17}" for k in self.gates)]
        for r in self.rows:
            lines.append(
                f"{r.n:>11,}  {r.pass_rate:>14.1%}  " + "  ".join(f"{v:>17.1%}" for v in r.gate_pass_rates.values())
            )
        gates = ", ".join(self.gates)
        if self.needed is None:
            verdict = (
                f"no size up to {self.rows[-1].n:,} test images reaches {self.power:.0%} power: the model as "
                f"estimated is too close to (or beyond) a threshold; the gate that fails most is the one to "
                f"look at"
            )
        else:
            verdict = (
                f"about {self.needed:,} test images give the configured gates ({gates}) {self.power:.0%} power "
                f"to pass this model ({self.simulations} simulated test sets a size)"
            )
        head = [self.assumptions]
        if self.comparison:
            head.append(f"champion comparison: {self.comparison}")
        head += [f"not planned: {g} ({why})" for g, why in self.not_planned.items()]
        advice = self.advice()
        return "\n".join([*head, "", *lines, "", verdict, *([advice] if advice else [])])

    def to_json(self) -> dict:
        return {
            "needed": self.needed,
            "power": self.power,
            "simulations": self.simulations,
            "assumptions": self.assumptions,
            "comparison": self.comparison,
            "test_images": self.test_images,
            "not_planned": dict(self.not_planned),
            "advice": self.advice(),
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


class _ResampledModel:
    """The model at hand: its test rows resampled, labels drawn from its estimated calibration.

    With `replicates`, each simulated test split first draws one of that many bootstrap
    replicates of the test split, re-estimated (the calibration gaps, hence the accuracy): the
    plan's power is then averaged over what the measured split leaves unknown about the model
    (assurance), rather than taken at its point estimate, which a lucky split overstates."""

    def __init__(self, candidate: Predictions, n_bins: int, replicates: int = 0, seed: int = 0):
        probs = np.asarray(candidate.probabilities, np.float64)
        labels = np.asarray(candidate.labels)
        self.probs = probs
        self.estimates = [self._estimate(np.arange(len(labels)), probs, labels, n_bins)]
        rng = np.random.default_rng([seed, 7])
        self.estimates += [
            self._estimate(rng.integers(0, len(labels), len(labels)), probs, labels, n_bins) for _ in range(replicates)
        ]
        self.point_only = replicates == 0

    @staticmethod
    def _estimate(rows: np.ndarray, probs: np.ndarray, labels: np.ndarray, n_bins: int):
        conf = probs[rows].max(1)
        correct = probs[rows].argmax(1) == labels[rows]
        bins = EqualWidthBins(n_bins)
        return rows, np.clip(conf - _shrunk_gaps(conf, correct, bins)[bins.index(conf)], 0.0, 1.0)

    def replicate(self, rng: np.random.Generator) -> _ResampledModel:
        """One replicate, fixed: a retrain of equal quality is drawn from the same model as its champion."""
        fixed = object.__new__(_ResampledModel)
        fixed.probs, fixed.point_only = self.probs, True
        fixed.estimates = [self.estimates[0 if self.point_only else 1 + rng.integers(len(self.estimates) - 1)]]
        return fixed

    def draw(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        pool, right_probability = self.estimates[0 if self.point_only else 1 + rng.integers(len(self.estimates) - 1)]
        picked = rng.integers(0, len(pool), n)
        probs = self.probs[pool[picked]]
        return probs, _relabel(probs, rng.random(n) < right_probability[picked], rng)


class _ShapeModel:
    """A model described by a ModelShape (module docstring)."""

    def __init__(self, shape: ModelShape):
        self.gap, self.accuracy, self.k = shape.calibration_gap, shape.accuracy, shape.n_classes
        mean_confidence = min(self.accuracy + self.gap, 1.0 - 1e-4)
        # 1 - c ~ Beta(2, beta) with mean 1 - mean_confidence
        self.beta = 2.0 * mean_confidence / (1.0 - mean_confidence)

    def draw(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        conf = np.clip(1.0 - rng.beta(2.0, self.beta, n), 1.0 / self.k + 1e-6, 1.0)
        right = rng.random(n) < np.clip(conf - self.gap, 0.0, 1.0)
        probs = np.repeat(((1.0 - conf) / (self.k - 1))[:, None], self.k, axis=1)
        predicted = rng.integers(0, self.k, n)
        probs[np.arange(n), predicted] = conf
        labels = np.where(right, predicted, (predicted + rng.integers(1, self.k, n)) % self.k)
        return probs, labels


def retrain_of(
    probs: np.ndarray, labels: np.ndarray, model, fresh_share: float, rng: np.random.Generator
) -> np.ndarray:
    """A retrain's probabilities on the images (probs, labels) of `model`: on `fresh_share` of
    them an independent draw from `model`, its classes permuted so that its own label lands on
    this image's label (its confidence, correctness and true-class probability kept); elsewhere
    the same prediction."""
    twin = probs.copy()
    fresh = np.flatnonzero(rng.random(len(labels)) < fresh_share)
    if len(fresh):
        drawn, drawn_labels = model.draw(len(fresh), rng)
        target = labels[fresh]
        rows = np.arange(len(fresh))
        moved = drawn[rows, drawn_labels].copy()
        drawn[rows, drawn_labels] = drawn[rows, target]
        drawn[rows, target] = moved
        twin[fresh] = drawn
    return twin


class _Source:
    """Simulated test sets: (candidate, comparison) as evaluate_gates reads them."""

    def __init__(self, model, *, compare: bool, fresh_share: float, champion_pair=None):
        self.model, self.compare, self.fresh_share, self.champion_pair = model, compare, fresh_share, champion_pair

    def draw(self, n: int, rng: np.random.Generator):
        model = self.model.replicate(rng) if hasattr(self.model, "replicate") else self.model
        probs, labels = model.draw(n, rng)
        if not self.compare:
            return Predictions(probs, labels), None
        if self.champion_pair is not None:
            mine, champion = self.champion_pair
            shared = rng.integers(0, len(mine.labels), n)
            labels_shared = np.asarray(mine.labels)[shared]
            pair = (
                Predictions(np.asarray(mine.probabilities)[shared], labels_shared),
                Predictions(np.asarray(champion.probabilities)[shared], labels_shared),
            )
            return Predictions(probs, labels), pair
        # the next candidate is the retrain; the model at hand is its champion
        candidate = Predictions(retrain_of(probs, labels, model, self.fresh_share, rng), labels)
        return candidate, (candidate, Predictions(probs, labels))


def retrain_assumption(fresh_share: float) -> str:
    if fresh_share == 0.0:
        return (
            "the next candidate is an identical retrain of this model (the same predictions, what a "
            "deterministic rerun on unchanged data gives), on the same images"
        )
    if fresh_share == 1.0:
        return "the next candidate is an independent model of equal quality, on the same images"
    return (
        f"the next candidate is a retrain of equal quality whose predictions are independent of this "
        f"model's on {fresh_share:.0%} of the images and the same elsewhere, on the same images"
    )


def _plannable(gates: GatesConfig) -> tuple[GatesConfig, dict[str, str]]:
    """The gates a simulated test set can be put through, and the configured ones it cannot (why)."""
    left_out = {name: why for name, why in NOT_PLANNED.items() if getattr(gates, name) is not None}
    return replace(gates, **{name: None for name in NOT_PLANNED}), left_out


def _compares(gates: GatesConfig) -> bool:
    return any(getattr(gates, name, None) is not None for name in RELATIVE_GATES)


def _check_settings(power: float, simulations: int, fresh_share: float) -> None:
    if not 0.0 < power < 1.0:
        raise ValueError(f"power = {power}: must be in (0, 1), e.g. 0.8")
    if simulations < 1:
        raise ValueError(f"simulations = {simulations}: must be at least 1")
    if not 0.0 <= fresh_share <= 1.0:
        raise ValueError(f"retrain_fresh_share = {fresh_share}: must be in [0, 1] (0: an identical retrain)")


def _simulate(
    source: _Source,
    gates: GatesConfig,
    *,
    n_bins: int,
    power: float,
    simulations: int,
    seed: int,
    sizes,
    test_images: int | None = None,
) -> tuple[int | None, tuple[PlanRow, ...]]:
    rng = np.random.default_rng(seed)

    def at(n: int) -> PlanRow:
        passes, checks = 0, []
        for trial in range(simulations):
            candidate, pair = source.draw(n, rng)
            verdict = evaluate_gates(candidate, gates, pair, n_bins=n_bins, seed=trial, report_estimates=False)
            passes += verdict.passed
            checks.append(verdict.checks)
        draws = {
            first.name: GateDraws(
                first.comparison,
                first.threshold,
                np.array([c[i].bound for c in checks]),
                np.array([c[i].passed for c in checks]),
            )
            for i, first in enumerate(checks[0])
        }
        return PlanRow(n, passes / simulations, {k: float(d.passed.mean()) for k, d in draws.items()}, draws)

    grid = sorted(set(sizes) | ({test_images} if test_images else set()))
    rows, needed = [], None
    for n in grid:
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
        # The pass rate grows with n; a simulated rate is noisy, and taking the first size whose
        # noisy rate reaches the power picks lucky ones. Read the monotone (isotonic) fit instead.
        fitted = _isotonic([r.pass_rate for r in rows])
        needed = next((r.n for r, rate in zip(rows, fitted, strict=True) if rate >= power), rows[-1].n)
    return needed, tuple(rows)


def _isotonic(values: list[float]) -> list[float]:
    """The non-decreasing sequence closest to `values` in squared error (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in values:
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, c2), (m1, c1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2])
    return [m for m, c in blocks for _ in range(int(c))]


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
    retrain_fresh_share: float = 0.0,
    replicates: int = REPLICATES,
) -> Plan:
    """Smallest n at which every configured gate passes this model with `power`, by simulation
    under its estimated calibration; the champion comparison against `comparison`'s champion, or
    without one against a retrain of this model (module docstring)."""
    _check_settings(power, simulations, retrain_fresh_share)
    planned, left_out = _plannable(gates)
    compare = _compares(planned)
    if replicates < 0:
        raise ValueError(f"replicates = {replicates}: must be 0 (the point estimate) or more")
    model = _ResampledModel(candidate, n_bins, replicates, seed)
    n_test = len(candidate.labels)
    what = (
        f"this model as measured: its {n_test:,} test predictions resampled, per-bin calibration gaps shrunk "
        f"towards the overall gap, wrong labels drawn in proportion to the other classes' probabilities"
        + (
            f"; power averaged over {replicates} bootstrap replicates of the test split (what {n_test:,} images "
            f"leave unknown about the model)"
            if replicates
            else ""
        )
    )
    if not compare:
        how = ""
    elif comparison is not None:
        how = (
            f"against the champion on {len(comparison[0].labels):,} shared images, the pair resampled jointly "
            f"with its observed labels (the plug-in calibration errors of both: on the pessimistic side)"
        )
    else:
        how = retrain_assumption(retrain_fresh_share)
    source = _Source(model, compare=compare, fresh_share=retrain_fresh_share, champion_pair=comparison)
    needed, rows = _simulate(
        source,
        planned,
        n_bins=n_bins,
        power=power,
        simulations=simulations,
        seed=seed,
        sizes=sizes,
        test_images=n_test,
    )
    return Plan(needed, power, simulations, rows, what, n_test, left_out, how)


def plan_from_thresholds(
    gates: GatesConfig,
    n_classes: int = 10,
    n_bins: int = DEFAULT_N_BINS,
    power: float = 0.8,
    simulations: int = 200,
    seed: int = 0,
    sizes=SIZES,
    *,
    accuracy: float | None = None,
    calibration_gap: float | None = None,
    retrain_fresh_share: float = 0.0,
    test_images: int | None = None,
) -> Plan:
    """Smallest n at which a model of the given shape (by default halfway inside every threshold)
    passes every configured gate with `power`, the champion comparison against a retrain of it."""
    _check_settings(power, simulations, retrain_fresh_share)
    shape = ModelShape(n_classes, accuracy, calibration_gap).resolved(gates)
    planned, left_out = _plannable(gates)
    compare = _compares(planned)
    chosen = "" if accuracy is None and calibration_gap is None else "given: "
    what = (
        f"a {n_classes}-class model of one shape ({chosen}accuracy {shape.accuracy:.4f}"
        f"{' (halfway from min_accuracy to 1)' if accuracy is None else ''}, calibration gap "
        f"{shape.calibration_gap:.4f}{' (max_ece / 2)' if calibration_gap is None else ''} at every confidence, "
        f"1 - confidence ~ Beta(2, b)); the figure holds for this shape only: `--model NAME --candidate REF` "
        f"plans for a registered model's own predictions"
    )
    source = _Source(_ShapeModel(shape), compare=compare, fresh_share=retrain_fresh_share)
    needed, rows = _simulate(
        source,
        planned,
        n_bins=n_bins,
        power=power,
        simulations=simulations,
        seed=seed,
        sizes=sizes,
        test_images=test_images,
    )
    how = retrain_assumption(retrain_fresh_share) if compare else ""
    return Plan(needed, power, simulations, rows, what, test_images, left_out, how)


def smallest_passable(gates: GatesConfig, n_test: int, n_classes: int, n_bins: int = DEFAULT_N_BINS) -> bool:
    """Could any model pass the absolute gates on n_test images? A perfect one (always right, with
    confidence 1) is the easiest case there is."""
    probs = np.zeros((n_test, n_classes))
    probs[:, 0] = 1.0
    perfect = Predictions(probs, np.zeros(n_test, dtype=int))
    absolute = replace(_plannable(gates)[0], **{name: None for name in RELATIVE_GATES if hasattr(gates, name)})
    return evaluate_gates(perfect, absolute, n_bins=n_bins, report_estimates=False).passed


def small_test_split_warning(
    n_test: int,
    n_classes: int,
    gates: GatesConfig,
    n_bins: int = DEFAULT_N_BINS,
    power: float = 0.8,
    simulations: int = 100,
    cache_directory: str | Path | None = None,
    *,
    retrain_fresh_share: float = 0.0,
) -> str | None:
    """A warning, before anything trains, when the test split is too small for the gates: None
    when a model halfway inside every threshold passes them with `power` on n_test images, the
    champion comparison against an identical retrain of it (`retrain_fresh_share`) included.

    The answer depends on the settings and the gate code alone (the simulation is seeded), and
    takes seconds: with `cache_directory`, a rerun with the same settings reads it from there."""
    from importlib.metadata import version

    from calibflow import disk_cache
    from calibflow.gates import checks as gates_module
    from calibflow.gates import statistics as gate_statistics

    key = {
        "n_test": n_test,
        "n_classes": n_classes,
        "gates": asdict(gates),
        "n_bins": n_bins,
        "power": power,
        "simulations": simulations,
        "retrain_fresh_share": retrain_fresh_share,
        "numpy": np.__version__,
        "relplot": version("relplot"),
        "code": disk_cache.files_digest([__file__, gates_module.__file__, gate_statistics.__file__]),
    }
    return disk_cache.cached(
        cache_directory,
        "gate_power",
        key,
        lambda: _small_test_split_warning(n_test, n_classes, gates, n_bins, power, simulations, retrain_fresh_share),
    )


def _small_test_split_warning(
    n_test: int,
    n_classes: int,
    gates: GatesConfig,
    n_bins: int,
    power: float,
    simulations: int,
    retrain_fresh_share: float = 0.0,
) -> str | None:
    more = "`calibflow gate plan` says more"
    if not smallest_passable(gates, n_test, n_classes, n_bins):
        return (
            f"no model can pass the gates on the {n_test} images of the test split: even a perfect one (always "
            f"right, with confidence 1) fails them; add test images (more data, or a larger split.test) or "
            f"loosen the gates; {more}"
        )
    settings = dict(retrain_fresh_share=retrain_fresh_share, test_images=n_test)
    here = plan_from_thresholds(gates, n_classes, n_bins, power, simulations, sizes=(n_test,), **settings)
    if here.needed is not None:  # enough: the rest of the grid is not needed to say so
        return None
    plan = plan_from_thresholds(gates, n_classes, n_bins, power, simulations, **settings)
    advice = plan.advice()
    if advice is None:
        return None
    against = "; the champion comparison: " + retrain_assumption(retrain_fresh_share) if plan.comparison else ""
    return (
        f"a model halfway inside every threshold (calibration error {gates.max_ece / 2:.3f}, accuracy "
        f"{(gates.min_accuracy + 1) / 2:.3f}{against}): {advice}. Expect good models to be rejected; {more}"
    )
