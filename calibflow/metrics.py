"""Calibration metrics on top-label confidence: reliability bins, ECE, MCE, Brier, NLL, accuracy.

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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import torch

# Tensors (kept on their device), numpy arrays, or nested python sequences.
ArrayLike: TypeAlias = torch.Tensor | np.ndarray | Sequence[Any]

DEFAULT_N_BINS = 15


# --------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------


def _as_float_tensor(x: ArrayLike) -> torch.Tensor:
    """Detached tensor; python sequences become float64 (torch's default float32 would round 0.6)."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        return torch.as_tensor(x)
    return torch.as_tensor(x, dtype=torch.float64)


def _as_2d_float(x: ArrayLike, name: str) -> torch.Tensor:
    """Tensor view of a ``(N, K)`` float input, detached, on its own device, dtype unchanged."""
    t = _as_float_tensor(x)
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, K); got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty (N=0); a metric over no samples is undefined")
    if t.shape[1] < 1:
        raise ValueError(f"{name} has no classes (K=0)")
    if not (t.is_floating_point()):
        t = t.to(torch.float64)
    return t


def _as_labels(labels: ArrayLike, n: int, k: int, device: torch.device) -> torch.Tensor:
    """``(N,)`` int64 labels on ``device``; rejects floats, wrong length and out-of-range values."""
    y = torch.as_tensor(labels).detach()
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        # A float label array usually means probabilities or one-hot rows were passed by mistake.
        raise ValueError(f"labels must be integer class indices; got dtype {y.dtype}")
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},) to match the predictions; got {tuple(y.shape)}")
    y = y.to(device=device, dtype=torch.int64)
    if n and (int(y.min()) < 0 or int(y.max()) >= k):
        raise ValueError(
            f"labels must lie in [0, {k}) for {k} classes; got min {int(y.min())}, max {int(y.max())}"
        )
    return y


def _probs_and_labels(probs: ArrayLike, labels: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    p = _as_2d_float(probs, "probs")
    y = _as_labels(labels, p.shape[0], p.shape[1], p.device)
    return p, y


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
