"""Adaptive, classwise and debiased calibration error: part of calibflow.metrics (see its docstring)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from calibflow.metrics.inputs import ArrayLike, _probs_and_labels
from calibflow.metrics.reliability import DEFAULT_N_BINS, _check_n_bins, bin_indices
from calibflow.metrics.scalar import _per_sample_nll

# --------------------------------------------------------------------------------------------
# Adaptive, classwise and debiased calibration error
#
# Every binned metric below is computed from per-bin sums (count, sum of confidence, sum of
# correctness) of a *weighted* sample: ``counts[r, i]`` is how often sample i occurs in
# resample r. The point estimate is the special case of one resample with all counts 1, so the
# bootstrap and the plain metric share one code path and cannot drift apart.
# --------------------------------------------------------------------------------------------

# Float64 elements per (resamples x samples) work matrix: resamples are processed in blocks of
# about this size (32 MiB each), so memory stays flat in N and the number of resamples.
_ELEMENT_BUDGET = 1 << 22


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


def _debiased_from_sums(count: torch.Tensor, conf: torch.Tensor, correct: torch.Tensor, norm: str) -> torch.Tensor:
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
