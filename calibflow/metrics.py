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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import torch

from calibflow.config import DEFAULT_N_BINS

# Tensors (kept on their device), numpy arrays, or nested python sequences.
ArrayLike: TypeAlias = torch.Tensor | np.ndarray | Sequence[Any]


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


def probability_report(probs: ArrayLike, labels: ArrayLike, n_bins: int = DEFAULT_N_BINS) -> dict[str, float]:
    """``accuracy``, ``nll`` (:func:`probability_nll`), ``brier``, ``ece`` and ``mce`` of probabilities:
    what the flow logs for any calibrator, and what a registered model's predictions are checked
    against, so both sides compute the same numbers the same way."""
    p, y = _probs_and_labels(probs, labels)
    bins = reliability_bins(p, y, n_bins)  # one binning for ECE and MCE, as in calibration_report
    return {"accuracy": accuracy(p, y), "nll": probability_nll(p, y), "brier": brier_score(p, y),
            "ece": bins.ece, "mce": bins.mce}


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


# --------------------------------------------------------------------------------------------
# Adaptive, classwise and debiased calibration error
#
# Every binned metric below is computed from per-bin sums (count, sum of confidence, sum of
# correctness) of a *weighted* sample: ``counts[r, i]`` is how often sample i occurs in
# resample r. The point estimate is the special case of one resample with all counts 1, so the
# bootstrap and the plain metric share one code path and cannot drift apart.
# --------------------------------------------------------------------------------------------


class _Sample:
    """Per-sample quantities of ``(probs, labels)`` from which metrics of reweighted samples follow."""

    def __init__(self, probs: ArrayLike, labels: ArrayLike, n_bins: int = DEFAULT_N_BINS) -> None:
        _check_n_bins(n_bins)
        self.p, self.y = _probs_and_labels(probs, labels)
        self.n, self.k = (int(s) for s in self.p.shape)
        self.n_bins = int(n_bins)
        self.device = self.p.device
        conf, pred = self.p.max(dim=1)
        self._conf_native = conf  # binned in its own dtype, as reliability_bins does
        self.conf = conf.to(torch.float64)
        self.correct = (pred == self.y).to(torch.float64)
        self._cache: dict[str, Any] = {}

    def ones(self) -> torch.Tensor:
        return torch.ones(1, self.n, dtype=torch.float64, device=self.device)

    def _cached(self, key: str, build: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def width_features(self) -> torch.Tensor:
        """``(N, 3B)``: one-hot equal-width bin times [conf, correct, 1]; ``counts @ F`` gives bin sums."""

        def build() -> torch.Tensor:
            idx = bin_indices(self._conf_native, self.n_bins)
            onehot = torch.nn.functional.one_hot(idx, self.n_bins).to(torch.float64)
            return torch.cat([onehot * self.conf[:, None], onehot * self.correct[:, None], onehot], dim=1)

        return self._cached("width", build)

    def mass_order(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stable confidence order, sorted conf and correctness, and the equal-mass position boundaries."""

        def build() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
            order = torch.sort(self.conf, stable=True).indices
            b = torch.arange(self.n_bins + 1, dtype=torch.int64, device=self.device)
            # Position p (0-based) of the sorted sample goes to bin floor(p * B / N); bin b thus
            # starts at position ceil(b * N / B). Integer arithmetic: exact for any N.
            bounds = ((b * self.n + self.n_bins - 1) // self.n_bins).to(torch.float64)
            return order, self.conf[order], self.correct[order], bounds

        return self._cached("mass", build)

    def per_sample(self, name: str) -> torch.Tensor:
        """``(N,)`` float64 per-sample loss whose mean is the metric (accuracy, Brier, NLL)."""

        def build() -> torch.Tensor:
            if name == "accuracy":
                return self.correct
            if name == "brier":
                p = self.p.to(torch.float64)
                onehot = torch.nn.functional.one_hot(self.y, self.k).to(torch.float64)
                return ((p - onehot) ** 2).sum(dim=1)
            if name == "nll":
                return _per_sample_nll(self.p, self.y)
            raise KeyError(name)

        return self._cached(f"per_sample:{name}", build)


def _width_bin_sums(s: _Sample, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Equal-width bins: ``(count, sum conf, sum correct)``, each ``(R, B)``, for weights ``counts (R, N)``."""
    sums = counts @ s.width_features()
    b = s.n_bins
    return sums[:, 2 * b :], sums[:, :b], sums[:, b : 2 * b]


def _mass_bin_sums(s: _Sample, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Equal-mass bins of each reweighted sample: ``(count, sum conf, sum correct)``, each ``(R, B)``.

    Each resample is sorted by confidence implicitly: the original sample is sorted once and a
    resample is its multiplicity vector in that order, so its sorted sequence is each sample
    repeated ``counts`` times. Bin b covers sorted positions ``[e_b, e_{b+1})`` with
    ``e_b = ceil(b N / B)``; a prefix sum over the first ``e`` positions is a cumulative sum up to
    the sample that straddles position ``e`` plus the part of its copies before ``e``. This costs
    a cumsum and a searchsorted per resample instead of a sort.
    """
    order, conf_sorted, correct_sorted, bounds = s.mass_order()
    cs = counts.index_select(1, order)
    r = cs.shape[0]
    zero = torch.zeros(r, 1, dtype=torch.float64, device=cs.device)
    count_cum = torch.cat([zero, cs.cumsum(dim=1)], dim=1)
    conf_cum = torch.cat([zero, (cs * conf_sorted).cumsum(dim=1)], dim=1)
    correct_cum = torch.cat([zero, (cs * correct_sorted).cumsum(dim=1)], dim=1)
    e = bounds.expand(r, -1).contiguous()
    # j = number of samples whose copies all lie before position e (count_cum[:, 1:] <= e).
    j = torch.searchsorted(count_cum[:, 1:].contiguous(), e, right=True)
    partial = e - count_cum.gather(1, j)  # copies of sample j that still fall before e
    at = j.clamp(max=s.n - 1)  # j == N only at e == N, where partial == 0
    conf_prefix = conf_cum.gather(1, j) + partial * conf_sorted[at]
    correct_prefix = correct_cum.gather(1, j) + partial * correct_sorted[at]
    return e.diff(dim=1), conf_prefix.diff(dim=1), correct_prefix.diff(dim=1)


def _ece_from_sums(count: torch.Tensor, conf: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    # sum_b (n_b/N)|acc_b - conf_b| = sum_b |sum correct - sum conf| / N: no division per bin.
    return (correct - conf).abs().sum(dim=1) / count.sum(dim=1)


def _mce_from_sums(count: torch.Tensor, conf: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    gap = (correct - conf).abs() / count.clamp(min=1.0)
    return torch.where(count > 0, gap, torch.full_like(gap, -math.inf)).amax(dim=1)


def _debiased_from_sums(
    count: torch.Tensor, conf: torch.Tensor, correct: torch.Tensor, norm: str
) -> torch.Tensor:
    n = count.sum(dim=1)
    nb = count.clamp(min=1.0)
    acc = correct / nb
    gap = acc - conf / nb
    if norm == "l2":
        # Kumar et al. 2019, section 5: E[(acc_b - conf_b)^2] = (true gap)^2 + Var(acc_b), and
        # acc_b (1 - acc_b) / (n_b - 1) is the unbiased estimate of Var(acc_b). A bin with fewer
        # than 2 samples has no variance estimate and, as in their reference code, adds 0.
        term = gap * gap - acc * (1.0 - acc) / (count - 1.0).clamp(min=1.0)
        term = torch.where(count >= 2, term, torch.zeros_like(term))
        squared = (count * term).sum(dim=1) / n
        return squared.clamp(min=0.0).sqrt()
    # l1: the plug-in |gap| minus its bias under a normal model of acc_b, the infinite-resample
    # limit of Kumar et al.'s normal_debiased_ce: bias = E|N(g, s^2)| - |g| evaluated at the
    # plug-in g, s^2 = acc (1 - acc) / n_b, with E|N(g, s^2)| the folded-normal mean.
    sd = (acc * (1.0 - acc) / nb).clamp(min=0.0).sqrt()
    safe_sd = torch.where(sd > 0, sd, torch.ones_like(sd))
    folded = torch.where(
        sd > 0,
        safe_sd * math.sqrt(2.0 / math.pi) * torch.exp(-0.5 * (gap / safe_sd) ** 2)
        + gap * torch.erf(gap / (safe_sd * math.sqrt(2.0))),
        gap.abs(),
    )
    plugin = (count * gap.abs()).sum(dim=1) / n
    return 2.0 * plugin - (count * folded).sum(dim=1) / n


def adaptive_calibration_error(probs: ArrayLike, labels: ArrayLike, n_bins: int = DEFAULT_N_BINS) -> float:
    """Top-label ECE with equal-mass (adaptive) bins: ``sum_b (n_b / N) |acc_b - conf_b|``.

    Samples are sorted by top-label confidence (stable: ties keep input order) and sorted position
    ``p`` (0-based) goes to bin ``floor(p * n_bins / N)``, so every bin holds ``floor`` or ``ceil``
    of ``N / n_bins`` samples (Nguyen & O'Connor 2015, "Posterior calibration and exploratory
    analysis for natural language processing models"; the "adaptive binning" of Nixon et al. 2019,
    "Measuring Calibration in Deep Learning"). Equal-mass bins avoid the near-empty high-variance
    bins that equal-width binning gives a confident model. Note: Nixon et al.'s *ACE* score
    additionally averages over all K classes' probabilities with unweighted bins; this is the
    top-label, count-weighted variant, directly comparable with :func:`expected_calibration_error`.
    """
    s = _Sample(probs, labels, n_bins)
    return float(_ece_from_sums(*_mass_bin_sums(s, s.ones()))[0])


def classwise_calibration_error(probs: ArrayLike, labels: ArrayLike, n_bins: int = DEFAULT_N_BINS) -> float:
    """Classwise ECE, ``(1/K) sum_k sum_b (|B_kb| / N) |freq_kb - conf_kb|`` (Kull et al. 2019).

    For each class k the probabilities ``p_ik`` of all N samples are put in equal-width
    ``(lo, hi]`` bins (the same bins as :func:`expected_calibration_error`); ``freq_kb`` is the
    fraction of samples in bin ``B_kb`` whose label is k and ``conf_kb`` their mean ``p_ik``
    (Kull et al. 2019, "Beyond temperature scaling: Obtaining well-calibrated multi-class
    probabilities with Dirichlet calibration", section 2). Unlike top-label ECE it sees the
    calibration of every class probability, not just the largest.
    """
    _check_n_bins(n_bins)
    p, y = _probs_and_labels(probs, labels)
    n, k = p.shape
    cells = bin_indices(p, n_bins) + n_bins * torch.arange(k, device=p.device)
    resid = torch.nn.functional.one_hot(y, k).to(torch.float64) - p.to(torch.float64)
    sums = torch.zeros(k * n_bins, dtype=torch.float64, device=p.device).index_add_(
        0, cells.reshape(-1), resid.reshape(-1)
    )
    return float(sums.abs().sum() / (n * k))


def _classwise_batched(s: _Sample, counts: torch.Tensor) -> torch.Tensor:
    """Classwise ECE of each reweighted sample: ``counts @ F`` with F the (N, K*B) residual cells."""
    b = s.n_bins
    total = torch.zeros(counts.shape[0], dtype=torch.float64, device=counts.device)
    # Dense F costs N*K*B memory; classes are taken in blocks so it stays near _ELEMENT_BUDGET.
    block = max(1, _ELEMENT_BUDGET // (s.n * b))
    for k0 in range(0, s.k, block):
        k1 = min(s.k, k0 + block)
        p = s.p[:, k0:k1]
        cells = bin_indices(p, b) + b * torch.arange(k1 - k0, device=s.device)
        resid = (s.y[:, None] == torch.arange(k0, k1, device=s.device)).to(torch.float64) - p.to(torch.float64)
        feats = torch.zeros(s.n, (k1 - k0) * b, dtype=torch.float64, device=s.device)
        feats.scatter_(1, cells, resid)
        total += (counts @ feats).abs().sum(dim=1)
    return total / (counts.sum(dim=1) * s.k)


_DEBIAS_NORMS = ("l2", "l1")
_BINNINGS = ("equal_mass", "equal_width")


def debiased_calibration_error(
    probs: ArrayLike,
    labels: ArrayLike,
    n_bins: int = DEFAULT_N_BINS,
    *,
    norm: str = "l2",
    binning: str = "equal_mass",
) -> float:
    """Debiased estimate of the binned top-label calibration error (Kumar, Liang & Ma 2019).

    Quantity estimated (``norm="l2"``, the default): the l2 calibration error of the binned
    top-label confidence,

        CE_2 = sqrt( sum_b P(B_b) (E[correct | B_b] - E[conf | B_b])^2 ),

    via the estimator of Kumar, Liang & Ma 2019 ("Verified Uncertainty Calibration", NeurIPS,
    section 5, their ``unbiased_l2_ce``):

        CE_2^2_hat = sum_b (n_b / N) [ (acc_b - conf_b)^2 - acc_b (1 - acc_b) / (n_b - 1) ],

    returned as ``sqrt(max(CE_2^2_hat, 0))``. The plug-in ``sum_b (n_b/N)(acc_b - conf_b)^2``
    is biased upward by ``sum_b (n_b/N) Var(acc_b)`` (label noise alone makes bins look
    miscalibrated); the subtracted term is the unbiased estimate of that variance, so the
    *squared* estimate is unbiased given the bins (up to the within-bin spread of the true
    accuracy, a term of order 1/n_b that vanishes for narrow bins). The square root and the
    clip at 0 leave a small bias of their own. Bins with fewer than 2 samples add 0 (as in the
    authors' code). Binning is equal-mass by default, as the paper recommends; ``equal_width`` uses
    the bins of :func:`expected_calibration_error`.

    Relation to the l1 ECE: over the same bins, ``ECE = sum_b w_b |gap_b| <= sqrt(sum_b w_b gap_b^2)
    = CE_2`` (Jensen), with equality when every bin has the same |gap|; so CE_2 is an upper bound of
    the population ECE of those bins, not the same number. Both are lower bounds of the calibration
    error of the unbinned model (binning averages gaps of opposite sign; Kumar et al., section 3).

    ``norm="l1"`` estimates the l1 binned ECE instead, with a bias correction: ``2 * plugin - E*``,
    where ``E*`` is the expected plug-in ECE when each bin's accuracy is redrawn from
    ``N(acc_b, acc_b (1 - acc_b) / n_b)``. This is the ``normal_debiased_ce`` of Kumar et al.'s code
    with its Monte-Carlo average replaced by the exact folded-normal mean (deterministic, no seed).
    It is a first-order bootstrap bias correction (Efron & Tibshirani 1993, section 10.6), not an
    unbiased estimator: at a true CE of 0 it removes about 40% of the plug-in bias (each bin's
    expected |gap| goes from 0.80 to about 0.47 noise s.d.), and when the true gaps are a few noise
    s.d. from 0 (where the plug-in l1 is almost unbiased) it over-corrects slightly. It may return
    a small negative number, left unclipped. Prefer the default l2 estimator for verification.
    """
    if norm not in _DEBIAS_NORMS:
        raise ValueError(f"norm must be one of {_DEBIAS_NORMS}; got {norm!r}")
    if binning not in _BINNINGS:
        raise ValueError(f"binning must be one of {_BINNINGS}; got {binning!r}")
    s = _Sample(probs, labels, n_bins)
    sums = (_mass_bin_sums if binning == "equal_mass" else _width_bin_sums)(s, s.ones())
    return float(_debiased_from_sums(*sums, norm=norm)[0])


# --------------------------------------------------------------------------------------------
# Bootstrap confidence intervals
# --------------------------------------------------------------------------------------------

# Float64 elements per (resamples x samples) work matrix: resamples are processed in blocks of
# about this size (32 MiB each), so memory stays flat in N and the number of resamples.
_ELEMENT_BUDGET = 1 << 22

MetricFn: TypeAlias = Callable[[torch.Tensor, torch.Tensor], float]

METRIC_NAMES: tuple[str, ...] = (
    "ece",
    "adaptive_ece",
    "classwise_ece",
    "mce",
    "brier",
    "nll",
    "accuracy",
    "debiased_ece",
)

_CI_METHODS = ("percentile", "basic")


def _batched_metric(name: str) -> Callable[[_Sample, torch.Tensor], torch.Tensor]:
    """Metric ``name`` of every reweighted sample: ``(sample, counts (R, N)) -> (R,)`` float64."""
    if name in ("accuracy", "brier", "nll"):
        return lambda s, c: (c @ s.per_sample(name)) / c.sum(dim=1)
    table: dict[str, Callable[[_Sample, torch.Tensor], torch.Tensor]] = {
        "ece": lambda s, c: _ece_from_sums(*_width_bin_sums(s, c)),
        "mce": lambda s, c: _mce_from_sums(*_width_bin_sums(s, c)),
        "adaptive_ece": lambda s, c: _ece_from_sums(*_mass_bin_sums(s, c)),
        "classwise_ece": _classwise_batched,
        "debiased_ece": lambda s, c: _debiased_from_sums(*_mass_bin_sums(s, c), norm="l2"),
    }
    return table[name]


def _point_metric(name: str, n_bins: int) -> MetricFn:
    table: dict[str, MetricFn] = {
        "ece": lambda p, y: expected_calibration_error(p, y, n_bins),
        "mce": lambda p, y: maximum_calibration_error(p, y, n_bins),
        "adaptive_ece": lambda p, y: adaptive_calibration_error(p, y, n_bins),
        "classwise_ece": lambda p, y: classwise_calibration_error(p, y, n_bins),
        "debiased_ece": lambda p, y: debiased_calibration_error(p, y, n_bins),
        "brier": brier_score,
        "nll": probability_nll,
        "accuracy": accuracy,
    }
    return table[name]


def bootstrap_indices(n: int, n_resamples: int, seed: int, device: Any = None) -> torch.Tensor:
    """``(n_resamples, n)`` int64 indices of bootstrap resamples: each row n draws from ``[0, n)`` with replacement.

    Drawn on the CPU from ``torch.Generator().manual_seed(seed)`` (row by row, in one stream) and
    then moved to ``device``, so a seed gives the same resamples on every device. Nonparametric
    bootstrap (Efron 1979; Efron & Tibshirani 1993).
    """
    _check_resample_args(n, n_resamples)
    return torch.cat(list(_index_blocks(n, n_resamples, seed, n_resamples, device)), dim=0)


def _check_resample_args(n: int, n_resamples: int) -> None:
    for name, v in (("n", n), ("n_resamples", n_resamples)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer; got {v!r}")


def _index_blocks(n: int, n_resamples: int, seed: int, rows: int, device: Any) -> Any:
    """Successive row blocks of :func:`bootstrap_indices`: one generator, consumed in row order.

    torch's CPU ``randint`` draws element by element from the generator, so blocks of any size
    concatenate to the single-call result (tested).
    """
    gen = torch.Generator().manual_seed(int(seed))
    for start in range(0, n_resamples, rows):
        block = torch.randint(0, n, (min(rows, n_resamples - start), n), generator=gen)
        yield block.to(device) if device is not None else block


def _counts(idx: torch.Tensor, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Multiplicity of each sample in each resample: ``(R, n)`` float64 from ``(R, n)`` indices.

    ``out`` (at least R rows) is reused between blocks: zeroing a warm buffer is cheaper than
    faulting in a fresh allocation of the same size.
    """
    r = idx.shape[0]
    if out is None or out.shape[0] < r:
        counts = torch.zeros(r, n, dtype=torch.float64, device=idx.device)
    else:
        counts = out[:r].zero_()
    ones = torch.ones(1, 1, dtype=torch.float64, device=idx.device).expand(idx.shape)
    return counts.scatter_add_(1, idx, ones)


_BatchedFn: TypeAlias = Callable[[_Sample, torch.Tensor], torch.Tensor]


def _resolve(metric: str | MetricFn, n_bins: int) -> tuple[MetricFn, _BatchedFn | None]:
    if isinstance(metric, str):
        if metric not in METRIC_NAMES:
            raise ValueError(
                f"unknown metric {metric!r}; use one of {METRIC_NAMES} or a callable(probs, labels) -> float"
            )
        return _point_metric(metric, n_bins), _batched_metric(metric)
    if callable(metric):
        return (lambda p, y: float(metric(p, y))), None
    raise TypeError(f"metric must be a name or a callable(probs, labels) -> float; got {type(metric).__name__}")


def _bootstrap_statistics(
    metric: str | MetricFn,
    probs_list: Sequence[ArrayLike],
    labels: ArrayLike,
    n_resamples: int,
    seed: int,
    n_bins: int,
) -> tuple[list[float], list[np.ndarray]]:
    """Point estimates and ``(n_resamples,)`` resampled values of ``metric`` for each probability set,
    every set evaluated on the same resamples (so differences are paired)."""
    point_fn, batched = _resolve(metric, n_bins)
    rows_each = [int(_as_2d_float(p, "probs").shape[0]) for p in probs_list]
    if len(set(rows_each)) > 1:
        raise ValueError(f"paired probabilities need the same number of rows; got {rows_each}")
    samples = [_Sample(p, labels, n_bins) for p in probs_list]
    n = samples[0].n
    _check_resample_args(n, n_resamples)
    device = samples[0].device
    estimates = [point_fn(s.p, s.y) for s in samples]
    values: list[list[np.ndarray]] = [[] for _ in samples]
    rows = max(1, _ELEMENT_BUDGET // n)
    buffer: torch.Tensor | None = None
    for idx in _index_blocks(n, n_resamples, seed, rows, device):
        if batched is not None:
            counts = buffer = _counts(idx, n, buffer)
            for out, s in zip(values, samples):
                out.append(batched(s, counts).cpu().numpy())
        else:
            for out, s in zip(values, samples):
                out.append(np.array([point_fn(s.p[r], s.y[r]) for r in idx], dtype=np.float64))
    return estimates, [np.concatenate(v) for v in values]


@dataclass(frozen=True)
class ConfidenceInterval:
    """A bootstrap confidence interval ``[low, high]`` around the full-sample ``estimate``."""

    estimate: float
    low: float
    high: float
    confidence: float
    n_resamples: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "estimate": self.estimate,
            "low": self.low,
            "high": self.high,
            "confidence": self.confidence,
            "n_resamples": self.n_resamples,
        }


def _interval(estimate: float, values: np.ndarray, confidence: float, method: str) -> ConfidenceInterval:
    alpha = 1.0 - confidence
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        lo_q = hi_q = float("nan")
    else:
        lo_q, hi_q = (float(q) for q in np.quantile(finite, [alpha / 2.0, 1.0 - alpha / 2.0]))
    if method == "basic":
        low, high = 2.0 * estimate - hi_q, 2.0 * estimate - lo_q
    else:
        low, high = lo_q, hi_q
    return ConfidenceInterval(
        estimate=float(estimate), low=low, high=high, confidence=float(confidence), n_resamples=int(values.size)
    )


def _check_ci_args(confidence: float, method: str) -> None:
    if not (0.0 < float(confidence) < 1.0):
        raise ValueError(f"confidence must lie in (0, 1); got {confidence!r}")
    if method not in _CI_METHODS:
        raise ValueError(f"method must be one of {_CI_METHODS}; got {method!r}")


def bootstrap_ci(
    metric: str | MetricFn,
    probs: ArrayLike,
    labels: ArrayLike,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    n_bins: int = DEFAULT_N_BINS,
    method: str = "percentile",
) -> ConfidenceInterval:
    """Nonparametric bootstrap confidence interval of a metric (Efron & Tibshirani 1993).

    ``metric`` is one of :data:`METRIC_NAMES` (``ece``, ``adaptive_ece``, ``classwise_ece``,
    ``mce``, ``debiased_ece`` use ``n_bins``; ``nll`` is :func:`probability_nll`) or a callable
    ``(probs, labels) -> float``. The estimate is the metric on the full sample; the resamples are
    the rows of ``bootstrap_indices(N, n_resamples, seed)``. ``method="percentile"`` returns the
    ``(1 - confidence)/2`` and ``(1 + confidence)/2`` quantiles of the resampled values (linear
    interpolation); ``"basic"`` reflects them around the estimate, ``[2 est - q_hi, 2 est - q_lo]``.

    Named metrics are evaluated for all resamples at once: a resample is its multiplicity vector,
    and per-bin sums are a matrix product (equal-width bins) or cumulative sums (equal-mass bins)
    of it, with no Python loop over resamples. A callable is called once per resample. Binning is
    redone inside every resample for the equal-mass metrics (it is part of the estimator).
    Non-finite resampled values (which a callable may return; the named metrics never do) are left
    out of the quantiles.
    """
    _check_ci_args(confidence, method)
    (estimate,), (values,) = _bootstrap_statistics(metric, [probs], labels, n_resamples, seed, n_bins)
    return _interval(estimate, values, confidence, method)


def paired_bootstrap_ci(
    metric: str | MetricFn,
    probs_a: ArrayLike,
    probs_b: ArrayLike,
    labels: ArrayLike,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    n_bins: int = DEFAULT_N_BINS,
    method: str = "percentile",
) -> ConfidenceInterval:
    """Paired bootstrap confidence interval of ``metric(probs_a) - metric(probs_b)`` on the same labels.

    Both prediction sets are evaluated on the *same* resampled rows, so the sample-to-sample
    variation they share cancels in the difference (a paired bootstrap; Efron & Tibshirani 1993,
    and e.g. Koehn 2004 for paired comparisons of systems). An interval excluding 0 says that the
    difference is not resampling noise. Same arguments as :func:`bootstrap_ci`.
    """
    _check_ci_args(confidence, method)
    (est_a, est_b), (vals_a, vals_b) = _bootstrap_statistics(
        metric, [probs_a, probs_b], labels, n_resamples, seed, n_bins
    )
    return _interval(est_a - est_b, vals_a - vals_b, confidence, method)
