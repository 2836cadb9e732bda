"""Accuracy of a served model on new images without their labels, and drift of its confidence.

Two estimators from calibrated probabilities, both checked by simulation against known truth in
tests/test_monitoring.py (and, on CIFAR-10 under corruptions, by benchmarks when a model exists):

- **CBPE** (confidence-based performance estimation, as NannyML does for tabular models): when
  the probabilities are calibrated on the new images, the expected accuracy is the mean top-label
  probability, and the number of correct predictions is a sum of independent Bernoulli(p_i), so the
  realised accuracy has variance sum p_i (1 - p_i) / n^2. It inherits every calibration error: under
  shift a model that stays over-confident is over-estimated by as much.
- **ATC** (average thresholded confidence, Garg et al. 2022, "Leveraging unlabeled data to predict
  out-of-distribution performance"): on labeled reference images (the test split) find the
  threshold t whose share of scores above it equals the reference accuracy; on new images, the
  share of scores above t estimates the accuracy. The score is the negative entropy (ATC-NE, the
  paper's better variant) or the top probability (ATC-MC). It corrects part of an over-confidence
  that shift adds, where CBPE cannot.

Both intervals cover sampling noise only (the images at hand), not the estimator's bias under
shift; the README reports the bias measured on corrupted copies with known labels.

Drift of the confidence distribution: a two-sample Kolmogorov-Smirnov test of the new images' top
probabilities against the reference's (scipy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

SCORES = ("negative_entropy", "max_probability")


@dataclass(frozen=True)
class AccuracyEstimate:
    method: str
    estimate: float
    lower: float  # two-sided interval at `level`, sampling noise only
    upper: float
    level: float

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "estimate": self.estimate,
            "lower": self.lower,
            "upper": self.upper,
            "level": self.level,
        }


def _checked(probabilities: np.ndarray, what: str) -> np.ndarray:
    p = np.asarray(probabilities, np.float64)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] < 2:
        raise ValueError(f"{what}: expected probabilities shaped (N >= 1, K >= 2), got {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0) or not np.allclose(p.sum(axis=1), 1.0, atol=1e-6):
        raise ValueError(f"{what}: rows must be finite, non-negative and sum to 1 (calibrated probabilities)")
    return p


def confidence_score(probabilities: np.ndarray, score: str = "negative_entropy") -> np.ndarray:
    p = np.asarray(probabilities, np.float64)
    if score == "max_probability":
        return p.max(axis=1)
    if score == "negative_entropy":
        return np.sum(p * np.log(np.clip(p, 1e-300, None)), axis=1)
    raise ValueError(f"score {score!r}: use one of {', '.join(SCORES)}")


def cbpe_accuracy(probabilities: np.ndarray, level: float = 0.95) -> AccuracyEstimate:
    """Mean top-label probability, with a normal interval of the realised accuracy (Poisson-binomial)."""
    top = _checked(probabilities, "cbpe_accuracy").max(axis=1)
    n = len(top)
    estimate = float(top.mean())
    sd = float(np.sqrt(np.sum(top * (1.0 - top))) / n)
    z = stats.norm.ppf(0.5 + level / 2.0)
    return AccuracyEstimate("cbpe", estimate, max(0.0, estimate - z * sd), min(1.0, estimate + z * sd), level)


def atc_threshold(
    reference_probabilities: np.ndarray, reference_labels: np.ndarray, score: str = "negative_entropy"
) -> float:
    """The threshold t with mean(score > t) = accuracy on the labeled reference images."""
    p = _checked(reference_probabilities, "atc_threshold")
    labels = np.asarray(reference_labels)
    if labels.shape != (len(p),):
        raise ValueError(f"atc_threshold: {len(p)} probability rows but labels shaped {labels.shape}")
    accuracy = float(np.mean(p.argmax(axis=1) == labels))
    s = np.sort(confidence_score(p, score))
    # share above t is accuracy: t is the (1 - accuracy) quantile of the reference scores
    k = int(round((1.0 - accuracy) * len(s)))
    if k <= 0:
        return float(s[0]) - 1e-12
    if k >= len(s):
        return float(s[-1])
    return float(s[k - 1])


def atc_accuracy(
    probabilities: np.ndarray, threshold: float, score: str = "negative_entropy", level: float = 0.95
) -> AccuracyEstimate:
    """Share of new images whose score is above the reference threshold, with a Wilson interval."""
    s = confidence_score(_checked(probabilities, "atc_accuracy"), score)
    above = int(np.sum(s > threshold))
    interval = stats.binomtest(above, len(s)).proportion_ci(level, method="wilson")
    return AccuracyEstimate(
        f"atc_{'ne' if score == 'negative_entropy' else 'mc'}",
        above / len(s),
        float(interval.low),
        float(interval.high),
        level,
    )


@dataclass(frozen=True)
class ConfidenceDrift:
    statistic: float  # Kolmogorov-Smirnov distance between the two top-probability distributions
    p_value: float
    drifted: bool  # p_value < alpha
    reference_mean: float
    current_mean: float

    def to_json(self) -> dict:
        return dict(self.__dict__)


def confidence_drift(
    reference_probabilities: np.ndarray, probabilities: np.ndarray, alpha: float = 0.05
) -> ConfidenceDrift:
    reference = _checked(reference_probabilities, "confidence_drift reference").max(axis=1)
    current = _checked(probabilities, "confidence_drift").max(axis=1)
    test = stats.ks_2samp(reference, current)
    return ConfidenceDrift(
        float(test.statistic),
        float(test.pvalue),
        bool(test.pvalue < alpha),
        float(reference.mean()),
        float(current.mean()),
    )
