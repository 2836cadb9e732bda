"""Decisions made with calibrated probabilities, each fitted on the calibration split and served
with the model (issue 13):

- binary (or one-vs-rest) threshold on the calibrated probability of a positive class: the
  Bayes threshold of a cost ratio, or the threshold that certifies a precision or recall target;
- abstention: the confidence threshold whose selective risk (error rate among the predictions
  kept) is certified below a target (the guarantee of Geifman & El-Yaniv 2017, "Selective
  classification for deep neural networks", on a fixed grid of kept counts);
- prediction sets with marginal coverage 1 - alpha: split conformal prediction with the LAC, APS
  or RAPS score (Sadinle et al. 2019; Romano et al. 2020; Angelopoulos et al. 2021).

"Certified" means a one-sided statement that holds with probability at least 1 - delta over the
draw of the calibration split, for images exchangeable with it (docs/decisions.md derives each
one; benchmarks/decision_guarantees.py checks them on real logits). numpy and scipy only: the
benchmarks call these thousands of times, and the served model calls `DecisionPolicy.decide`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

from calibflow.gates.statistics import clopper_pearson_lower, clopper_pearson_upper
from calibflow.errors import DecisionInfeasible, DecisionSettingsError

# The served output's schema: bump it when a field of `DecisionPolicy.decide` changes meaning.
DECISION_SCHEMA_VERSION = 1
CONFORMAL_SCORES = ("lac", "aps", "raps")
ABSTAIN = "abstain"  # the label served for an input below the abstention threshold
DECISION_TAG_PREFIX = "decision_"  # version tags of the served decisions' test-split numbers


@dataclass(frozen=True)
class ChosenThreshold:
    threshold: float  # act (predict positive, or keep the prediction) when the score is >= threshold
    rule: str  # cost | min_precision | min_recall | max_risk
    target: float  # the precision, recall or risk asked for; for cost, the threshold itself
    delta: float  # the target holds with probability >= 1 - delta over calibration splits (0: no claim)
    calibration_bound: float | None  # the certified bound at the threshold, on the calibration split
    n_calibration: int  # calibration images the rule read


def _check_level(name: str, value: float, low_open: float = 0.0, high_open: float = 1.0) -> None:
    if not (low_open < value < high_open) or not math.isfinite(value):
        raise ValueError(f"{name} = {value}: must be in ({low_open}, {high_open})")


def _as_scores(scores: Any, name: str) -> np.ndarray:
    array = np.asarray(scores, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise DecisionInfeasible(f"no {name} on the calibration split: a decision cannot be fitted on nothing")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} hold NaN or infinite values")
    return array


# ---------------------------------------------------------------------------------------------
# Thresholds
# ---------------------------------------------------------------------------------------------


def cost_threshold(cost_fp: float, cost_fn: float) -> ChosenThreshold:
    """Predict positive when P(positive) >= c_FP / (c_FP + c_FN): the threshold at which the
    expected cost of either answer is equal, so the Bayes decision for calibrated probabilities.
    It needs no data; how well it does depends on the calibration, which the gates bound."""
    for name, value in (("cost_fp", cost_fp), ("cost_fn", cost_fn)):
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} = {value}: costs must be positive numbers")
    threshold = cost_fp / (cost_fp + cost_fn)
    return ChosenThreshold(threshold, "cost", threshold, 0.0, None, 0)


# Kept counts tested for a selective threshold grow by this factor: a coarser grid pays less for
# the union bound, a finer one wastes fewer images. On synthetic calibrated models 1.5 had fewer
# infeasible fits than 1.1 or 1.25 at the same risk; on real CIFAR-10 logits 1.1 keeps more at
# n = 1,500 and fails more often at n = 300 (docs/decisions.md).
KEPT_COUNT_RATIO = 1.5


def fewest_certifying(max_risk: float, delta: float) -> int:
    """The fewest error-free images whose Clopper-Pearson upper bound at level 1 - delta is below
    max_risk: 1 - delta^(1/j) < max_risk. No rule can certify max_risk on fewer."""
    return math.floor(math.log(delta) / math.log(1.0 - max_risk)) + 1


def kept_counts(n: int, max_risk: float, delta: float, ratio: float = KEPT_COUNT_RATIO) -> list[int]:
    """The numbers of most-confident calibration images whose thresholds are tested: a geometric
    grid from the fewest that could ever pass (zero errors) up to n; empty when n is too few. It
    depends on n, the target and delta only, never on the data, so a union bound over it is exact."""
    tests, counts = 1, []
    for _ in range(64):  # the grid's size and its first count depend on each other; settles in a few rounds
        k = fewest_certifying(max_risk, delta / tests)
        if k > n:
            return []
        counts = []
        while k < n:
            counts.append(k)
            k = max(k + 1, math.ceil(k * ratio))
        counts.append(n)
        if len(counts) == tests:
            break
        tests = len(counts)
    return counts


def selective_threshold(confidence: Any, correct: Any, max_risk: float, delta: float) -> ChosenThreshold:
    """Lowest confidence threshold whose selective risk P(wrong | confidence >= threshold) is at
    most `max_risk` with probability >= 1 - delta (the guarantee of Geifman & El-Yaniv 2017).

    For each count j of a fixed geometric grid (`kept_counts`), the threshold sits just above the
    (j+1)-th highest calibration confidence u. Given u, the j images above it are independent
    draws from the images with confidence > u, so their error count is Binomial(j, risk(u)) and
    the Clopper-Pearson upper bound at delta / (grid size) is exact; the union bound over the grid
    covers every tested threshold at once, so whichever passing threshold is served, its bound
    holds. The lowest passing one keeps the most predictions. (SGR's bisection, Algorithm 1 of
    the paper, moves to higher thresholds when a test fails, which is the wrong way when it failed
    for lack of images; a fixed grid has no such trap.)"""
    _check_level("max_risk", max_risk)
    _check_level("delta", delta)
    conf = _as_scores(confidence, "confidences")
    wrong = ~np.asarray(correct, dtype=bool).reshape(-1)
    if wrong.size != conf.size:
        raise ValueError(f"{conf.size} confidences but {wrong.size} outcomes")
    n = conf.size
    order = np.argsort(-conf, kind="stable")
    descending, wrong_descending = conf[order], wrong[order]
    counts = kept_counts(n, max_risk, delta)
    level = 1.0 - delta / max(len(counts), 1)
    best: tuple[float, float] | None = None
    for j in counts:
        # Keep what lies strictly above u, the (j+1)-th highest confidence: with ties at u that is
        # fewer than j images, and the test counts exactly the images the threshold keeps.
        threshold = float(np.nextafter(descending[j], np.inf)) if j < n else 0.0
        kept = descending >= threshold
        bound = clopper_pearson_upper(int(np.sum(wrong_descending[kept])), int(np.sum(kept)), level)
        if bound < max_risk and (best is None or threshold < best[0]):
            best = (threshold, bound)
    if best is None:
        raise DecisionInfeasible(
            f"no confidence threshold certifies a selective risk <= {max_risk} at delta {delta} on {n} calibration "
            f"images (even a model that is never wrong needs at least {fewest_certifying(max_risk, delta)} of them, "
            f"and more when it errs). Raise decision.max_risk, give the calibration split more images, or train a better model"
        )
    return ChosenThreshold(best[0], "max_risk", max_risk, delta, best[1], n)


def min_precision_threshold(scores: Any, is_positive: Any, min_precision: float, delta: float) -> ChosenThreshold:
    """Lowest threshold on P(positive) whose precision P(positive | score >= threshold) is at
    least `min_precision` with probability >= 1 - delta. Precision is one minus the selective
    risk of answering "positive", so this is SGR with the negatives as the errors; the lowest
    certified threshold has the highest recall."""
    _check_level("min_precision", min_precision)
    positive = np.asarray(is_positive, dtype=bool).reshape(-1)
    try:
        chosen = selective_threshold(scores, positive, 1.0 - min_precision, delta)
    except DecisionInfeasible as error:
        raise DecisionInfeasible(
            f"no threshold certifies precision >= {min_precision} at delta {delta} on {positive.size} calibration "
            f"images ({int(positive.sum())} positive): lower decision.min_precision, give the calibration split more "
            f"images, or train a better model"
        ) from error
    return ChosenThreshold(
        chosen.threshold, "min_precision", min_precision, delta, 1.0 - chosen.calibration_bound, chosen.n_calibration
    )


def min_recall_threshold(scores: Any, is_positive: Any, min_recall: float, delta: float) -> ChosenThreshold:
    """Highest threshold on P(positive) whose recall P(score >= threshold | positive) is at least
    `min_recall` with probability >= 1 - delta.

    The threshold is the j-th smallest positive score s_(j). Its miss rate F(s_(j)-) is at most
    the j-th order statistic of n uniforms, Beta(j, n - j + 1), so P(miss > 1 - r) <=
    P(Binomial(n, 1 - r) <= j - 1); the largest j that keeps this <= delta is served (exact and
    distribution-free, conservative with ties)."""
    _check_level("min_recall", min_recall)
    _check_level("delta", delta)
    values = _as_scores(scores, "scores")
    positive = np.asarray(is_positive, dtype=bool).reshape(-1)
    if positive.size != values.size:
        raise ValueError(f"{values.size} scores but {positive.size} labels")
    positives = np.sort(values[positive])
    n = positives.size
    # P(Bin(n, 1 - r) <= j - 1) for j = 1..n; the largest j with it <= delta.
    tail = stats.binom.cdf(np.arange(n), n, 1.0 - min_recall)
    allowed = np.flatnonzero(tail <= delta)
    if n == 0 or allowed.size == 0:
        fewest = math.ceil(math.log(delta) / math.log(min_recall))
        raise DecisionInfeasible(
            f"{n} positive calibration images cannot certify recall >= {min_recall} at delta {delta} (at least "
            f"{fewest} are needed, or every image would have to be called positive): lower decision.min_recall or "
            f"give the calibration split more positive images"
        )
    j = int(allowed[-1]) + 1
    threshold = float(positives[j - 1])
    # The certified recall at this threshold: the largest r with P(Bin(n, 1 - r) <= j - 1) <= delta.
    recall_bound = 1.0 - float(stats.beta.ppf(1.0 - delta, j, n - j + 1)) if j <= n else 0.0
    return ChosenThreshold(threshold, "min_recall", min_recall, delta, recall_bound, int(values.size))


# ---------------------------------------------------------------------------------------------
# Conformal prediction sets
# ---------------------------------------------------------------------------------------------


def _check_probabilities(probabilities: Any) -> np.ndarray:
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probabilities must be (N, K) with K >= 2, got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("probabilities hold NaN or infinite values")
    return p


def all_label_scores(
    probabilities: Any, score: str = "lac", raps_lambda: float = 0.01, raps_k_reg: int = 1
) -> np.ndarray:
    """Nonconformity of every label of every image, (N, K): larger is stranger.

    lac: 1 - p_k. aps: the probability mass of the labels ranked at or above k (ties ranked by
    class index), not randomized, as in Angelopoulos & Bates' gentle introduction. raps: aps plus
    raps_lambda * max(0, rank_k - raps_k_reg), rank 1-based, which penalises long tails of
    unlikely labels (Angelopoulos et al. 2021)."""
    p = _check_probabilities(probabilities)
    if score == "lac":
        return 1.0 - p
    if score not in CONFORMAL_SCORES:
        raise ValueError(f"conformal score {score!r}: use one of {', '.join(CONFORMAL_SCORES)}")
    order = np.argsort(-p, axis=1, kind="stable")
    sorted_p = np.take_along_axis(p, order, axis=1)
    cumulative = np.cumsum(sorted_p, axis=1)
    if score == "raps":
        ranks = np.arange(1, p.shape[1] + 1)
        cumulative = cumulative + raps_lambda * np.maximum(0, ranks - raps_k_reg)[None, :]
    scores = np.empty_like(cumulative)
    np.put_along_axis(scores, order, cumulative, axis=1)
    return scores


def conformal_scores(
    probabilities: Any, labels: Any, score: str = "lac", raps_lambda: float = 0.01, raps_k_reg: int = 1
) -> np.ndarray:
    """Nonconformity of each image's true label."""
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    every = all_label_scores(probabilities, score, raps_lambda, raps_k_reg)
    if y.size != every.shape[0]:
        raise ValueError(f"{every.shape[0]} images but {y.size} labels")
    return every[np.arange(y.size), y]


def conformal_quantile(calibration_scores: Any, alpha: float) -> float:
    """The ceil((n + 1)(1 - alpha))-th smallest calibration score: a test image's true label
    scores at most this with probability >= 1 - alpha (split conformal, Vovk et al. 2005;
    Lei et al. 2018), whatever the model, for images exchangeable with the calibration split."""
    _check_level("alpha", alpha)
    scores = np.sort(_as_scores(calibration_scores, "conformal scores"))
    n = scores.size
    # (n + 1)(1 - alpha) is often a whole number that floating point lands a hair above
    # (20 * 0.9 = 18.000000000000004 for some alphas): ceil would then take one score too many.
    rank = math.ceil((n + 1) * (1.0 - alpha) - 1e-9)
    if rank > n:
        raise DecisionInfeasible(
            f"conformal sets at alpha {alpha} need at least {math.ceil(1.0 / alpha) - 1} calibration images, the "
            f"split has {n}: raise decision.conformal_alpha or give the calibration split more images"
        )
    return float(scores[rank - 1])


def prediction_sets(
    probabilities: Any, qhat: float, score: str = "lac", raps_lambda: float = 0.01, raps_k_reg: int = 1
) -> np.ndarray:
    """(N, K) booleans: label k is in image i's set when its nonconformity is <= qhat. A set may be
    empty (every label stranger than the calibration split's quantile); that is kept, not padded,
    because padding would change the coverage the quantile was chosen for."""
    return all_label_scores(probabilities, score, raps_lambda, raps_k_reg) <= qhat


# ---------------------------------------------------------------------------------------------
# Evaluation on a test split, with one-sided Clopper-Pearson bounds at `confidence`
# ---------------------------------------------------------------------------------------------


def precision_recall_at(scores: Any, is_positive: Any, threshold: float, confidence: float) -> dict[str, float]:
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    positive = np.asarray(is_positive, dtype=bool).reshape(-1)
    called = values >= threshold
    tp, n_called, n_positive = int(np.sum(called & positive)), int(np.sum(called)), int(np.sum(positive))
    return {
        "precision": tp / n_called if n_called else float("nan"),
        "precision_lower": clopper_pearson_lower(tp, n_called, confidence),
        "recall": tp / n_positive if n_positive else float("nan"),
        "recall_lower": clopper_pearson_lower(tp, n_positive, confidence),
        "positive_rate": n_called / values.size if values.size else float("nan"),
        "n_predicted_positive": n_called,
        "n_positive": n_positive,
    }


def selective_risk_at(confidence_scores: Any, correct: Any, threshold: float, confidence: float) -> dict[str, float]:
    conf = np.asarray(confidence_scores, dtype=np.float64).reshape(-1)
    wrong = ~np.asarray(correct, dtype=bool).reshape(-1)
    kept = conf >= threshold
    n_kept, errors = int(np.sum(kept)), int(np.sum(wrong & kept))
    return {
        "coverage": n_kept / conf.size if conf.size else float("nan"),
        "risk": errors / n_kept if n_kept else float("nan"),
        "risk_upper": clopper_pearson_upper(errors, n_kept, confidence),
        "n_accepted": n_kept,
    }


def set_coverage(sets: Any, labels: Any, confidence: float) -> dict[str, Any]:
    members = np.asarray(sets, dtype=bool)
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    covered = members[np.arange(y.size), y]
    classwise = [float(covered[y == k].mean()) if np.any(y == k) else float("nan") for k in range(members.shape[1])]
    return {
        "coverage": float(covered.mean()),
        "coverage_lower": clopper_pearson_lower(int(covered.sum()), int(covered.size), confidence),
        "mean_size": float(members.sum(axis=1).mean()),
        "empty_rate": float(np.mean(members.sum(axis=1) == 0)),
        "classwise_coverage": classwise,
    }


def risk_coverage_curve(confidence_scores: Any, correct: Any) -> tuple[np.ndarray, np.ndarray]:
    """Coverage and selective risk when keeping the i most confident predictions, i = 1..n."""
    conf = np.asarray(confidence_scores, dtype=np.float64).reshape(-1)
    wrong = ~np.asarray(correct, dtype=bool).reshape(-1)
    order = np.argsort(-conf, kind="stable")
    kept = np.arange(1, conf.size + 1)
    return kept / conf.size, np.cumsum(wrong[order]) / kept


# ---------------------------------------------------------------------------------------------
# The fitted policy: what the served model decides
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConformalRule:
    alpha: float
    score: str
    qhat: float  # a label is in the set when its nonconformity is <= qhat
    raps_lambda: float
    raps_k_reg: int
    n_calibration: int

    def sets(self, probabilities: Any) -> np.ndarray:
        return prediction_sets(probabilities, self.qhat, self.score, self.raps_lambda, self.raps_k_reg)


@dataclass(frozen=True)
class DecisionPolicy:
    """The decisions fitted on the calibration split and served beside the probabilities. Columns
    of the probabilities are `classes` in order; an empty policy decides nothing but the label."""

    classes: tuple[str, ...]
    positive_class: str | None = None
    positive: ChosenThreshold | None = None  # predict positive when P(positive_class) >= threshold
    abstain: ChosenThreshold | None = None  # keep the top label when its probability >= threshold
    conformal: ConformalRule | None = None
    schema_version: int = DECISION_SCHEMA_VERSION

    @property
    def is_empty(self) -> bool:
        """No rule fitted: the policy decides the label only."""
        return self.positive is None and self.abstain is None and self.conformal is None

    @property
    def positive_index(self) -> int | None:
        return None if self.positive_class is None else self.classes.index(self.positive_class)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, state: dict[str, Any]) -> "DecisionPolicy":
        version = state.get("schema_version", DECISION_SCHEMA_VERSION)
        if version > DECISION_SCHEMA_VERSION:
            raise ValueError(
                f"decision policy schema {version} is newer than this calibflow's "
                f"({DECISION_SCHEMA_VERSION}): upgrade calibflow to serve this model"
            )
        return cls(
            classes=tuple(state["classes"]),
            positive_class=state.get("positive_class"),
            positive=ChosenThreshold(**state["positive"]) if state.get("positive") else None,
            abstain=ChosenThreshold(**state["abstain"]) if state.get("abstain") else None,
            conformal=ConformalRule(**state["conformal"]) if state.get("conformal") else None,
            schema_version=version,
        )

    def save(self, path: str) -> str:
        with open(path, "w") as handle:
            json.dump(self.to_json(), handle, indent=2)
        return path

    @classmethod
    def load(cls, path: str) -> "DecisionPolicy":
        with open(path) as handle:
            return cls.from_json(json.load(handle))

    def decide(self, probabilities: Any) -> dict[str, Any]:
        """Per image: `label` (the top class, or "abstain" below the abstention threshold),
        `confidence` (its calibrated probability); with the rules that are fitted, `abstained`,
        `positive` (P(positive_class) >= threshold) and `prediction_set` (class names)."""
        p = _check_probabilities(probabilities)
        if p.shape[1] != len(self.classes):
            raise ValueError(f"probabilities have {p.shape[1]} columns but the policy has {len(self.classes)} classes")
        top = p.argmax(axis=1)
        confidence = p[np.arange(len(p)), top]
        names = np.asarray(self.classes, dtype=object)
        out: dict[str, Any] = {"label": names[top], "confidence": confidence}
        if self.abstain is not None:
            abstained = confidence < self.abstain.threshold
            out["label"] = np.where(abstained, ABSTAIN, out["label"])
            out["abstained"] = abstained
        if self.positive is not None:
            out["positive"] = p[:, self.positive_index] >= self.positive.threshold
        if self.conformal is not None:
            members = self.conformal.sets(p)
            out["prediction_set"] = [list(names[row]) for row in members]
        return out


def _rule_sizes(decision, n: int) -> dict[str, int]:
    """The fewest calibration images each configured rule can work with, on a split of n."""
    needs = {}
    if decision.min_precision is not None:
        needs["decision.min_precision"] = fewest_certifying(1.0 - decision.min_precision, decision.delta)
    if decision.max_risk is not None:
        needs["decision.max_risk"] = fewest_certifying(decision.max_risk, decision.delta)
    if decision.conformal_alpha is not None:
        needs["decision.conformal_alpha"] = math.ceil(1.0 / decision.conformal_alpha) - 1
    return needs


def check_decision_settings(decision, classes: tuple[str, ...], calibration_class_counts: dict[str, int]) -> None:
    """Before training: what the params and the split's class counts already tell. The counts
    are the least a rule needs even for a perfect model; a real one may need more, which the fit
    says after training (DecisionInfeasible). Nothing to check when no rule is set."""
    if not decision.any_rule:
        return
    if decision.positive_class is not None and decision.positive_class not in classes:
        raise DecisionSettingsError(
            f"decision.positive_class = {decision.positive_class!r} is not a class of the data; "
            f"its classes are {list(classes)}"
        )
    n = sum(calibration_class_counts.values())
    for key, fewest in _rule_sizes(decision, n).items():
        if n < fewest:
            raise DecisionSettingsError(
                f"{key} needs at least {fewest} calibration images and the split has {n}: "
                f"relax {key}, raise split.calibration, or add images"
            )
    if decision.min_recall is not None:
        positives = calibration_class_counts.get(decision.positive_class, 0)
        fewest = math.ceil(math.log(decision.delta) / math.log(decision.min_recall))
        if positives < fewest:
            raise DecisionSettingsError(
                f"decision.min_recall = {decision.min_recall} needs at least {fewest} calibration images of "
                f"{decision.positive_class!r} and the split has {positives}: lower it, raise split.calibration, or "
                f"add images of that class"
            )


def fit_policy(probabilities: Any, labels: Any, classes: tuple[str, ...], decision) -> DecisionPolicy:
    """Fit every configured rule (a calibflow.config.DecisionConfig) on the calibrated
    probabilities of the calibration split. DecisionInfeasible when a certified rule cannot be
    met there."""
    p = _check_probabilities(probabilities)
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if p.shape[1] != len(classes):
        raise ValueError(f"probabilities have {p.shape[1]} columns for {len(classes)} classes")
    positive = abstain = conformal = None
    rule = decision.binary_rule
    if rule is not None:
        if decision.positive_class not in classes:
            raise DecisionSettingsError(
                f"decision.positive_class = {decision.positive_class!r} is not a class of "
                f"the data; its classes are {list(classes)}"
            )
        k = classes.index(decision.positive_class)
        scores, is_positive = p[:, k], y == k
        if rule == "cost":
            positive = cost_threshold(decision.cost_fp, decision.cost_fn)
        elif rule == "min_precision":
            positive = min_precision_threshold(scores, is_positive, decision.min_precision, decision.delta)
        else:
            positive = min_recall_threshold(scores, is_positive, decision.min_recall, decision.delta)
    if decision.max_risk is not None:
        top = p.argmax(axis=1)
        abstain = selective_threshold(p[np.arange(len(p)), top], top == y, decision.max_risk, decision.delta)
    if decision.conformal_alpha is not None:
        options = dict(score=decision.conformal_score, raps_lambda=decision.raps_lambda, raps_k_reg=decision.raps_k_reg)
        qhat = conformal_quantile(conformal_scores(p, y, **options), decision.conformal_alpha)
        conformal = ConformalRule(
            decision.conformal_alpha,
            decision.conformal_score,
            qhat,
            decision.raps_lambda,
            decision.raps_k_reg,
            int(len(y)),
        )
    return DecisionPolicy(tuple(classes), decision.positive_class if rule else None, positive, abstain, conformal)


def evaluate_policy(policy: DecisionPolicy, probabilities: Any, labels: Any, confidence: float) -> dict[str, Any]:
    """The policy's decisions on a labelled split, each rate with its one-sided Clopper-Pearson
    bound at `confidence` (flat keys, the form of metrics and tags)."""
    p = _check_probabilities(probabilities)
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    out: dict[str, Any] = {}
    if policy.positive is not None:
        k = policy.positive_index
        for key, value in precision_recall_at(p[:, k], y == k, policy.positive.threshold, confidence).items():
            out[f"positive_{key}"] = value
        out["positive_threshold"] = policy.positive.threshold
    top = p.argmax(axis=1)
    conf, correct = p[np.arange(len(p)), top], top == y
    if policy.abstain is not None:
        for key, value in selective_risk_at(conf, correct, policy.abstain.threshold, confidence).items():
            out[f"selective_{key}"] = value
        out["selective_threshold"] = policy.abstain.threshold
    if policy.conformal is not None:
        coverage = set_coverage(policy.conformal.sets(p), y, confidence)
        for key in ("coverage", "coverage_lower", "mean_size", "empty_rate"):
            out[f"set_{key}"] = coverage[key]
        for name, value in zip(policy.classes, coverage["classwise_coverage"]):
            out[f"set_coverage_class_{name}"] = value
        out["set_qhat"] = policy.conformal.qhat
    return out
