"""Bootstrap confidence intervals: part of calibflow.metrics (see its docstring)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import torch

from calibflow.metrics.binned import (
    _ELEMENT_BUDGET,
    _classwise_batched,
    _debiased_from_sums,
    _ece_from_sums,
    _mass_bin_sums,
    _mce_from_sums,
    _Sample,
    _width_bin_sums,
    adaptive_calibration_error,
    classwise_calibration_error,
    debiased_calibration_error,
)
from calibflow.metrics.inputs import ArrayLike, _as_2d_float
from calibflow.metrics.reliability import DEFAULT_N_BINS
from calibflow.metrics.scalar import (
    accuracy,
    brier_score,
    expected_calibration_error,
    maximum_calibration_error,
    probability_nll,
)

# --------------------------------------------------------------------------------------------
# Bootstrap confidence intervals
# --------------------------------------------------------------------------------------------

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
