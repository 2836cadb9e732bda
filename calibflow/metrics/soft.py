"""Metrics against soft targets: each image's distribution over the classes (data.soft_labels, the
annotators' votes), not one class. Part of calibflow.metrics (see its docstring).

With targets q (N, K) whose rows sum to 1 and probabilities p (N, K):

* ``soft_nll``: the cross-entropy ``-(1/N) sum_i sum_k q_ik log clip(p_ik, eps, 1 - eps)``, the log
  loss of the annotators' distribution under the model (Peterson et al. 2019 score CIFAR-10H this
  way). It is the NLL when every row is one-hot, and at least the mean entropy of q, which only a
  model that reproduces q reaches.
* ``soft_accuracy``: ``(1/N) sum_i q_i[argmax p_i]``, the chance that an annotator drawn at random
  agrees with the model's top class (the accuracy when every row is one-hot).
* ``soft_ece``: the top-label calibration error with the annotators in place of the label:
  ``sum_b (n_b / N) |mean conf - mean q_i[argmax p_i]|`` over equal-width bins of the top-label
  confidence. A model that says 0.6 on images the annotators split 60/40 has a soft ECE of 0 there,
  where its ECE against the folder's label charges it for every 40% vote.

The gates read the same per-image values (calibflow.gates.checks: max_soft_nll, max_soft_ece).
"""

from __future__ import annotations

import torch

from calibflow.metrics.inputs import ArrayLike, _as_2d_float
from calibflow.metrics.reliability import DEFAULT_N_BINS, bin_indices

# How far a target row's sum may stray from 1 (calibflow.data.soft_labels normalises them in float32)
TARGET_SUM_TOLERANCE = 1e-4


def _probs_and_targets(probs: ArrayLike, targets: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    p = _as_2d_float(probs, "probs").to(torch.float64)
    q = _as_2d_float(targets, "targets").to(device=p.device, dtype=torch.float64)
    if p.shape != q.shape:
        raise ValueError(f"probs {tuple(p.shape)} and targets {tuple(q.shape)} must have the same shape (N, K)")
    if (q < 0).any() or (q.sum(dim=1) - 1).abs().max() > TARGET_SUM_TOLERANCE:
        raise ValueError("targets must be distributions: non-negative rows that sum to 1")
    return p, q


def soft_nll_values(probs: ArrayLike, targets: ArrayLike, eps: float | None = None) -> torch.Tensor:
    """Each image's cross-entropy ``-sum_k q_k log clip(p_k, eps, 1 - eps)`` (float64, N): in [0,
    -log eps], with eps the probabilities' machine epsilon as in calibflow.metrics.probability_nll."""
    p, q = _probs_and_targets(probs, targets)
    e = torch.finfo(_as_2d_float(probs, "probs").dtype).eps if eps is None else float(eps)
    return -(q * torch.log(p.clamp(e, 1.0 - e))).sum(dim=1)


def soft_correctness(probs: ArrayLike, targets: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-label confidence, the targets' probability of the top class), float64 (N,) each: what
    soft_ece and the max_soft_ece gate compare."""
    p, q = _probs_and_targets(probs, targets)
    confidence, prediction = p.max(dim=1)
    return confidence, q.gather(1, prediction[:, None]).squeeze(1)


def soft_expected_calibration_error(probs: ArrayLike, targets: ArrayLike, n_bins: int = DEFAULT_N_BINS) -> float:
    """Equal-width binned top-label ECE with the targets' probability of the predicted class in
    place of 0/1 correctness (the bins of calibflow.metrics.reliability_bins)."""
    confidence, agreement = soft_correctness(probs, targets)
    index = bin_indices(confidence, n_bins)
    gap = torch.zeros(n_bins, dtype=torch.float64, device=confidence.device)
    gap.index_add_(0, index, confidence - agreement)
    return float(gap.abs().sum() / confidence.numel())


def soft_report(probs: ArrayLike, targets: ArrayLike, n_bins: int = DEFAULT_N_BINS) -> dict[str, float]:
    """``soft_nll``, ``soft_accuracy`` and ``soft_ece`` of probabilities against soft targets: what
    the flow logs beside the hard-label metrics and `calibflow evaluate` recomputes."""
    _, agreement = soft_correctness(probs, targets)
    return {
        "soft_nll": float(soft_nll_values(probs, targets).mean()),
        "soft_accuracy": float(agreement.mean()),
        "soft_ece": soft_expected_calibration_error(probs, targets, n_bins),
    }


def mean_entropy(targets: ArrayLike) -> float:
    """Mean entropy of the target rows (nats): the least soft_nll any model can reach on them."""
    q = _as_2d_float(targets, "targets").to(torch.float64)
    return float(-(torch.where(q > 0, q * torch.log(q), torch.zeros_like(q))).sum(dim=1).mean())
