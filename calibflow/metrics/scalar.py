"""Scalar metrics: part of calibflow.metrics (see its docstring)."""

from __future__ import annotations

import numpy as np
import torch

from calibflow.metrics.inputs import ArrayLike, _as_2d_float, _as_labels, _probs_and_labels
from calibflow.metrics.reliability import DEFAULT_N_BINS, reliability_bins

# --------------------------------------------------------------------------------------------
# Scalar metrics
# --------------------------------------------------------------------------------------------


def expected_calibration_error(probs: ArrayLike, labels: ArrayLike, n_bins: int = DEFAULT_N_BINS) -> float:
    """Expected calibration error, ``ECE = sum_b (n_b / N) |acc_b - conf_b|``.

    Top-label, equal-width ``(lo, hi]`` bins (Naeini et al. 2015; Guo et al. 2017, eq. 3).
    """
    return reliability_bins(probs, labels, n_bins).ece


def maximum_calibration_error(probs: ArrayLike, labels: ArrayLike, n_bins: int = DEFAULT_N_BINS) -> float:
    """Maximum calibration error, ``MCE = max_b |acc_b - conf_b|`` over non-empty bins.

    Same bins as ECE (Naeini et al. 2015; Guo et al. 2017, eq. 5).
    """
    return reliability_bins(probs, labels, n_bins).mce


def brier_score(probs: ArrayLike, labels: ArrayLike) -> float:
    """Multiclass Brier score, ``(1/N) sum_i sum_k (p_ik - [y_i == k])^2``, in ``[0, 2]`` (Brier 1950).

    This is the original, unhalved definition: for K = 2 it is twice the usual binary Brier score
    (and twice scikit-learn's ``brier_score_loss`` with its default ``scale_by_half="auto"``).
    """
    p, y = _probs_and_labels(probs, labels)
    p = p.to(torch.float64)
    onehot = torch.nn.functional.one_hot(y, num_classes=p.shape[1]).to(torch.float64)
    return float(((p - onehot) ** 2).sum(dim=1).mean())


def negative_log_likelihood(logits: ArrayLike, labels: ArrayLike, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood ``-(1/N) sum_i log softmax(z_i / T)_{y_i}`` (natural log).

    Computed as ``log_softmax`` in float64 so a saturated softmax never produces ``log(0)``.
    """
    z = _as_2d_float(logits, "logits")
    y = _as_labels(labels, z.shape[0], z.shape[1], z.device)
    log_p = torch.log_softmax(z.to(torch.float64) / _check_temperature(temperature), dim=1)
    return float(-log_p.gather(1, y[:, None]).mean())


def accuracy(probs_or_logits: ArrayLike, labels: ArrayLike) -> float:
    """Top-1 accuracy, ``(1/N) sum_i [argmax_k s_ik == y_i]``; softmax is monotone, so logits work too."""
    s = _as_2d_float(probs_or_logits, "probs_or_logits")
    y = _as_labels(labels, s.shape[0], s.shape[1], s.device)
    return float((s.argmax(dim=1) == y).to(torch.float64).mean())


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not np.isfinite(t) or t <= 0.0:
        raise ValueError(f"temperature must be finite and > 0; got {temperature!r}")
    return t


def calibrated_probabilities(logits: ArrayLike, temperature: float) -> torch.Tensor:
    """Temperature-scaled probabilities ``softmax(z / T)`` in float64 on the logits' device."""
    z = _as_2d_float(logits, "logits")
    return torch.softmax(z.to(torch.float64) / _check_temperature(temperature), dim=1)


def calibration_report(
    logits: ArrayLike,
    labels: ArrayLike,
    temperature: float = 1.0,
    n_bins: int = DEFAULT_N_BINS,
) -> dict[str, float]:
    """``accuracy``, ``nll``, ``brier``, ``ece`` and ``mce`` of ``softmax(logits / T)`` (float64).

    All values are python floats; ECE and MCE share one set of ``n_bins`` reliability bins.
    """
    probs = calibrated_probabilities(logits, temperature)
    bins = reliability_bins(probs, labels, n_bins)
    return {
        "accuracy": accuracy(probs, labels),
        "nll": negative_log_likelihood(logits, labels, temperature),
        "brier": brier_score(probs, labels),
        "ece": bins.ece,
        "mce": bins.mce,
    }


def probability_report(probs: ArrayLike, labels: ArrayLike, n_bins: int = DEFAULT_N_BINS) -> dict[str, float]:
    """``accuracy``, ``nll`` (:func:`probability_nll`), ``brier``, ``ece`` and ``mce`` of probabilities:
    what the flow logs for any calibrator, and what a registered model's predictions are checked
    against, so both sides compute the same numbers the same way."""
    p, y = _probs_and_labels(probs, labels)
    bins = reliability_bins(p, y, n_bins)  # one binning for ECE and MCE, as in calibration_report
    return {
        "accuracy": accuracy(p, y),
        "nll": probability_nll(p, y),
        "brier": brier_score(p, y),
        "ece": bins.ece,
        "mce": bins.mce,
    }


def probability_nll(probs: ArrayLike, labels: ArrayLike, eps: float | None = None) -> float:
    """Mean negative log-likelihood of probabilities, ``-(1/N) sum_i log clip(p_iy_i, eps, 1 - eps)``.

    The log loss (Good 1952, "Rational decisions") of inputs that are probabilities rather than
    logits (histogram/isotonic calibrators can emit exact zeros, float32 softmax underflows to 0).
    ``eps`` defaults to the machine epsilon of the probabilities' dtype (2.2e-16 for float64,
    1.2e-7 for float32), scikit-learn's ``log_loss`` convention, so a zero probability on the true
    class costs ``-log(eps)`` (36.0 nats in float64) instead of infinity. Accumulated in float64.
    """
    p, y = _probs_and_labels(probs, labels)
    return float(_per_sample_nll(p, y, eps).mean())


def _per_sample_nll(p: torch.Tensor, y: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    e = torch.finfo(p.dtype).eps if eps is None else float(eps)
    if not (0.0 < e < 0.5):
        raise ValueError(f"eps must lie in (0, 0.5); got {eps!r}")
    p_true = p.gather(1, y[:, None]).squeeze(1).to(torch.float64)
    return -torch.log(p_true.clamp(e, 1.0 - e))
