"""Top label and reliability bins: part of calibflow.metrics (see its docstring)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from calibflow.metrics.inputs import ArrayLike, _as_2d_float, _as_float_tensor, _probs_and_labels

# Equal-width reliability bins of ECE and MCE: Guo et al. 2017's 15 (params.yaml's evaluation.n_bins).
DEFAULT_N_BINS = 15

# --------------------------------------------------------------------------------------------
# Top label and reliability bins
# --------------------------------------------------------------------------------------------


def top_label(probs: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-label confidence ``max_k p_k`` and prediction ``argmax_k p_k`` for each row.

    The confidence keeps the input's floating dtype (so a float32 confidence that equals a float32
    bin edge is still on that edge when binned); ties go to the lowest class index.
    """
    p = _as_2d_float(probs, "probs")
    confidence, prediction = p.max(dim=1)
    return confidence, prediction


def _bin_edges(n_bins: int, dtype: torch.dtype = torch.float64, device: Any = None) -> torch.Tensor:
    # k / n_bins computed as one correctly rounded division per edge: torch.linspace(0, 1, n+1)
    # is off by one ulp at some edges (e.g. 3/10 -> 0.30000000000000004, 11/20 -> 0.5499999...),
    # which would move a confidence of exactly 0.55 into the wrong bin.
    edges = torch.arange(n_bins + 1, dtype=torch.float64, device=device) / n_bins
    return edges.to(dtype)


def bin_indices(confidence: ArrayLike, n_bins: int = DEFAULT_N_BINS) -> torch.Tensor:
    """0-based reliability-bin index of each confidence: ``ceil(conf * n_bins) - 1`` in ``[0, n_bins-1]``.

    Bins are ``(lo, hi]``. ``torch.bucketize(x, edges, right=False)`` returns ``i`` with
    ``edges[i-1] < x <= edges[i]``, which is exactly right-closed binning, so ``i - 1`` is the bin;
    a confidence of exactly 0 gives ``i = 0`` and is clamped into bin 0. The edges are rounded to
    the confidence's own dtype so that e.g. ``float32(0.2)`` with 5 bins is on the edge and lands
    in bin 0, as ``0.2`` does in float64.
    """
    _check_n_bins(n_bins)
    conf = _as_float_tensor(confidence)
    if not conf.is_floating_point():
        conf = conf.to(torch.float64)
    edges = _bin_edges(n_bins, dtype=conf.dtype, device=conf.device)
    idx = torch.bucketize(conf, edges, right=False) - 1
    return idx.clamp_(0, n_bins - 1)


def _check_n_bins(n_bins: int) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer; got {n_bins!r}")


@dataclass(frozen=True)
class ReliabilityBins:
    """Equal-width reliability bins over top-label confidence (Guo et al. 2017, section 2).

    ``edges`` has ``n_bins + 1`` entries; ``counts``, ``mean_confidence`` and ``accuracy`` have one
    entry per bin, with NaN means for empty bins. Arrays are read-only copies.
    """

    edges: np.ndarray
    counts: np.ndarray
    mean_confidence: np.ndarray
    accuracy: np.ndarray

    def __post_init__(self) -> None:
        edges = np.array(self.edges, dtype=np.float64)
        counts = np.array(self.counts, dtype=np.int64)
        conf = np.array(self.mean_confidence, dtype=np.float64)
        acc = np.array(self.accuracy, dtype=np.float64)
        n_bins = counts.shape[0] if counts.ndim == 1 else -1
        if n_bins < 1 or edges.shape != (n_bins + 1,) or conf.shape != (n_bins,) or acc.shape != (n_bins,):
            raise ValueError(
                "ReliabilityBins needs edges of length n_bins+1 and counts, mean_confidence, accuracy "
                f"of length n_bins; got {edges.shape}, {counts.shape}, {conf.shape}, {acc.shape}"
            )
        for name, arr in (("edges", edges), ("counts", counts), ("mean_confidence", conf), ("accuracy", acc)):
            arr.flags.writeable = False
            # frozen dataclass: the normalised copies replace the caller's arrays
            object.__setattr__(self, name, arr)

    @property
    def n_bins(self) -> int:
        return int(self.counts.shape[0])

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def gaps(self) -> np.ndarray:
        """``|accuracy_b - mean_confidence_b|`` per bin (NaN for empty bins)."""
        return np.abs(self.accuracy - self.mean_confidence)

    @property
    def ece(self) -> float:
        """Expected calibration error: ``sum_b (n_b / N) |acc_b - conf_b|`` over non-empty bins."""
        nonempty = self.counts > 0
        if not nonempty.any():
            return float("nan")
        return float(np.sum(self.counts[nonempty] * self.gaps[nonempty]) / self.total)

    @property
    def mce(self) -> float:
        """Maximum calibration error: ``max_b |acc_b - conf_b|`` over non-empty bins."""
        nonempty = self.counts > 0
        if not nonempty.any():
            return float("nan")
        return float(np.max(self.gaps[nonempty]))


def reliability_bins(probs: ArrayLike, labels: ArrayLike, n_bins: int = DEFAULT_N_BINS) -> ReliabilityBins:
    """Reliability bins of the top-label confidence (Guo et al. 2017; Naeini et al. 2015).

    For bin ``B_b = (b/n_bins, (b+1)/n_bins]``: ``counts[b] = |B_b|``,
    ``mean_confidence[b] = mean_{i in B_b} conf_i`` and ``accuracy[b] = mean_{i in B_b} [pred_i == y_i]``;
    both means are NaN for an empty bin. Sums are accumulated in float64 on the input's device.
    """
    _check_n_bins(n_bins)
    p, y = _probs_and_labels(probs, labels)
    confidence, prediction = p.max(dim=1)
    idx = bin_indices(confidence, n_bins)
    correct = (prediction == y).to(torch.float64)
    conf64 = confidence.to(torch.float64)

    zeros = torch.zeros(n_bins, dtype=torch.float64, device=p.device)
    counts = torch.bincount(idx, minlength=n_bins)
    conf_sum = zeros.clone().index_add_(0, idx, conf64)
    correct_sum = zeros.clone().index_add_(0, idx, correct)

    counts_np = counts.cpu().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(counts_np > 0, conf_sum.cpu().numpy() / counts_np, np.nan)
        acc = np.where(counts_np > 0, correct_sum.cpu().numpy() / counts_np, np.nan)
    return ReliabilityBins(
        edges=_bin_edges(n_bins).numpy(),
        counts=counts_np,
        mean_confidence=mean_conf,
        accuracy=acc,
    )
