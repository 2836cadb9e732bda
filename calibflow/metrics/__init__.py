"""Calibration metrics: reliability bins, ECE (equal-width, equal-mass, classwise, debiased), MCE,
Brier, NLL, accuracy, and bootstrap confidence intervals for any of them.

Every function accepts numpy arrays or torch tensors (CPU or CUDA); work stays on the input's
device and is accumulated in float64, so a metric computed on 10^6 float32 predictions does not
drift with summation order. Results come back as python floats (or numpy arrays for the bins).

Conventions used throughout:

* ``probs`` is ``(N, K)`` with rows on the probability simplex; ``logits`` is ``(N, K)``.
* ``labels`` is ``(N,)`` of integer class indices in ``[0, K)``.
* Reliability bins are equal-width over the top-label confidence and left-open, right-closed:
  bin ``b`` (0-based) is ``(b/n_bins, (b+1)/n_bins]``, and a confidence of exactly 0 is put in
  bin 0. (torchmetrics uses ``[lo, hi)`` bins plus an extra bin for a confidence of exactly 1;
  the two agree unless a confidence sits exactly on an edge.)
"""

from __future__ import annotations

from calibflow.metrics.binned import adaptive_calibration_error, classwise_calibration_error, debiased_calibration_error
from calibflow.metrics.bootstrap import (
    METRIC_NAMES,
    ConfidenceInterval,
    MetricFn,
    bootstrap_ci,
    bootstrap_indices,
    paired_bootstrap_ci,
)
from calibflow.metrics.inputs import ArrayLike
from calibflow.metrics.reliability import DEFAULT_N_BINS, ReliabilityBins, bin_indices, reliability_bins, top_label
from calibflow.metrics.scalar import (
    accuracy,
    brier_score,
    calibrated_probabilities,
    calibration_report,
    expected_calibration_error,
    maximum_calibration_error,
    negative_log_likelihood,
    probability_nll,
    probability_report,
)
from calibflow.metrics.soft import (
    mean_entropy,
    soft_correctness,
    soft_expected_calibration_error,
    soft_nll_values,
    soft_report,
)

__all__ = [
    "soft_report",
    "soft_nll_values",
    "soft_correctness",
    "soft_expected_calibration_error",
    "mean_entropy",
    "ArrayLike",
    "DEFAULT_N_BINS",
    "top_label",
    "bin_indices",
    "ReliabilityBins",
    "reliability_bins",
    "expected_calibration_error",
    "maximum_calibration_error",
    "brier_score",
    "negative_log_likelihood",
    "accuracy",
    "calibrated_probabilities",
    "calibration_report",
    "probability_report",
    "probability_nll",
    "adaptive_calibration_error",
    "classwise_calibration_error",
    "debiased_calibration_error",
    "MetricFn",
    "METRIC_NAMES",
    "bootstrap_indices",
    "ConfidenceInterval",
    "bootstrap_ci",
    "paired_bootstrap_ci",
]
