"""Non-parametric one-vs-rest: histogram binning and isotonic regression: part of calibflow.calibrators (see its docstring)."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import numpy as np
import torch

from calibflow.calibrators.base import C, Calibrator
from calibflow.metrics import ArrayLike

# --------------------------------------------------------------------------------------------
# Non-parametric one-vs-rest: histogram binning and isotonic regression
# --------------------------------------------------------------------------------------------


class _OneVsRestCalibrator(Calibrator):
    """Calibrates each class probability ``p_k = softmax(z)_k`` on its own, then renormalises.

    For K = 2 only ``p_1`` is calibrated and ``q_0 = 1 - q_1`` (as scikit-learn does), which needs no
    renormalisation. A class with no positive (or no negative) calibration example has nothing to
    fit (a one-vs-rest map would be the constant 0, or 1): it keeps its uncalibrated ``p_k``
    (listed in ``identity_classes``). A row whose calibrated values all are 0 falls back to the
    uncalibrated softmax row, the only defensible distribution there.
    """

    def __init__(self) -> None:
        super().__init__()
        self.identity_classes: list[int] = []

    @abstractmethod
    def _fit_class(self, score: np.ndarray, target: np.ndarray) -> None:
        """Fit the map of one class and append its parameters."""

    @abstractmethod
    def _apply(self, p: torch.Tensor, classes: list[int]) -> torch.Tensor:
        """Calibrated ``(N, len(classes))`` values for the given (non-identity) classes."""

    @abstractmethod
    def _reset(self) -> None:
        """Forget parameters from a previous fit."""

    def _calibrated_classes(self) -> list[int]:
        return [1] if self.n_classes == 2 else list(range(self.n_classes))

    def fit(self: C, logits: ArrayLike, labels: ArrayLike) -> C:
        z, y = self._prepare_fit(logits, labels)
        k = int(z.shape[1])
        p = torch.softmax(z, dim=1).cpu().numpy()
        y_np = y.cpu().numpy()
        self._reset()
        self.identity_classes = []
        self.n_classes = k
        for c in self._calibrated_classes():
            target = (y_np == c).astype(np.float64)
            if target.min() == target.max():
                self.identity_classes.append(c)
                self._fit_class(np.zeros(0), np.zeros(0))  # placeholder keeps per-class lists aligned
            else:
                self._fit_class(p[:, c], target)
        return self

    def _transform(self, z: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(z, dim=1)
        classes = self._calibrated_classes()
        fitted = [c for c in classes if c not in self.identity_classes]
        q = p.clone()
        if fitted:
            q[:, fitted] = self._apply(p, fitted).clamp(0.0, 1.0)
        if self.n_classes == 2:
            return torch.stack([1.0 - q[:, 1], q[:, 1]], dim=1)
        total = q.sum(dim=1, keepdim=True)
        ok = total > 0
        return torch.where(ok, q / torch.where(ok, total, torch.ones_like(total)), p)

    def _slot(self, c: int) -> int:
        """Position of class ``c`` in the per-class parameter lists."""
        return self._calibrated_classes().index(c)


class HistogramBinningCalibrator(_OneVsRestCalibrator):
    """Histogram binning, one-vs-rest on ``softmax(z)`` (Zadrozny & Elkan 2001, "Obtaining calibrated
    probability estimates from decision trees and naive Bayesian classifiers", ICML).

    For each class k the calibration scores ``p_k`` are cut into ``n_bins`` bins and a score is
    mapped to the fraction of positives (label k) among the calibration samples of its bin.
    ``binning="equal_mass"`` (default, as in Zadrozny & Elkan: bins of equal sample count; edges at
    midpoints between neighbouring sorted scores) or ``"equal_width"``; bins are ``(lo, hi]``. An
    empty bin maps to its centre. Values are renormalised over classes (see the base class).
    """

    method = "histogram"

    def __init__(self, n_bins: int = 15, binning: str = "equal_mass") -> None:
        super().__init__()
        if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
            raise ValueError(f"n_bins must be a positive integer; got {n_bins!r}")
        if binning not in ("equal_mass", "equal_width"):
            raise ValueError(f"binning must be 'equal_mass' or 'equal_width'; got {binning!r}")
        self.n_bins = int(n_bins)
        self.binning = binning
        self.edges: list[list[float]] = []
        self.values: list[list[float]] = []

    def _reset(self) -> None:
        self.edges, self.values = [], []

    def _fit_class(self, score: np.ndarray, target: np.ndarray) -> None:
        if score.size == 0:
            self.edges.append([])
            self.values.append([])
            return
        b = self.n_bins
        if self.binning == "equal_width":
            edges = np.arange(b + 1, dtype=np.float64) / b
        else:
            s = np.sort(score)
            n = s.size
            pos = np.clip((np.arange(1, b) * n + b - 1) // b, 1, n - 1)  # first sorted position of bin 1..b-1
            edges = np.concatenate([[0.0], 0.5 * (s[pos - 1] + s[pos]), [1.0]])
        idx = np.searchsorted(edges[1:-1], score, side="left")  # (lo, hi] bins
        counts = np.bincount(idx, minlength=b)
        positives = np.bincount(idx, weights=target, minlength=b)
        centres = 0.5 * (edges[:-1] + edges[1:])
        with np.errstate(invalid="ignore", divide="ignore"):
            values = np.where(counts > 0, positives / np.maximum(counts, 1), centres)
        self.edges.append(edges.tolist())
        self.values.append(values.tolist())

    def _apply(self, p: torch.Tensor, classes: list[int]) -> torch.Tensor:
        out = torch.empty(p.shape[0], len(classes), dtype=torch.float64, device=p.device)
        for j, c in enumerate(classes):
            slot = self._slot(c)
            edges = torch.tensor(self.edges[slot], dtype=torch.float64, device=p.device)
            values = torch.tensor(self.values[slot], dtype=torch.float64, device=p.device)
            idx = torch.searchsorted(edges[1:-1].contiguous(), p[:, c].contiguous(), right=False)
            out[:, j] = values[idx]
        return out

    def _params(self) -> dict[str, Any]:
        return {
            "n_bins": self.n_bins,
            "binning": self.binning,
            "edges": self.edges,
            "values": self.values,
            "identity_classes": list(self.identity_classes),
        }

    @classmethod
    def _from_params(cls, state: dict[str, Any]) -> HistogramBinningCalibrator:
        cal = cls(int(state["n_bins"]), str(state["binning"]))
        cal.edges = [[float(v) for v in row] for row in state["edges"]]
        cal.values = [[float(v) for v in row] for row in state["values"]]
        cal.identity_classes = [int(c) for c in state["identity_classes"]]
        return cal


class IsotonicCalibrator(_OneVsRestCalibrator):
    """Isotonic regression, one-vs-rest on ``softmax(z)`` (Zadrozny & Elkan 2002, "Transforming
    classifier scores into accurate multiclass probability estimates", KDD).

    For each class k a non-decreasing map of ``p_k`` to [0, 1] is fitted by scikit-learn's
    ``IsotonicRegression`` (pool-adjacent-violators, least squares against the 0/1 targets); the
    fitted breakpoints are stored and applied by linear interpolation, clipped to the end values
    outside the calibration range, which is what ``IsotonicRegression.predict`` does, here in torch
    on the logits' device. Values are renormalised over classes (see the base class).
    """

    method = "isotonic"

    def __init__(self) -> None:
        super().__init__()
        self.x: list[list[float]] = []
        self.y: list[list[float]] = []

    def _reset(self) -> None:
        self.x, self.y = [], []

    def _fit_class(self, score: np.ndarray, target: np.ndarray) -> None:
        if score.size == 0:
            self.x.append([])
            self.y.append([])
            return
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(score, target)
        self.x.append(np.asarray(iso.X_thresholds_, dtype=np.float64).tolist())
        self.y.append(np.asarray(iso.y_thresholds_, dtype=np.float64).tolist())

    def _apply(self, p: torch.Tensor, classes: list[int]) -> torch.Tensor:
        out = torch.empty(p.shape[0], len(classes), dtype=torch.float64, device=p.device)
        for j, c in enumerate(classes):
            slot = self._slot(c)
            xs = torch.tensor(self.x[slot], dtype=torch.float64, device=p.device)
            ys = torch.tensor(self.y[slot], dtype=torch.float64, device=p.device)
            out[:, j] = _interp(p[:, c], xs, ys)
        return out

    def _params(self) -> dict[str, Any]:
        return {"x": self.x, "y": self.y, "identity_classes": list(self.identity_classes)}

    @classmethod
    def _from_params(cls, state: dict[str, Any]) -> IsotonicCalibrator:
        cal = cls()
        cal.x = [[float(v) for v in row] for row in state["x"]]
        cal.y = [[float(v) for v in row] for row in state["y"]]
        cal.identity_classes = [int(c) for c in state["identity_classes"]]
        return cal


def _interp(x: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation through ``(xs, ys)`` (xs increasing), constant outside: ``np.interp``."""
    if xs.numel() == 1:
        return ys.expand_as(x).clone()
    xc = x.clamp(float(xs[0]), float(xs[-1]))
    i = (torch.searchsorted(xs, xc.contiguous(), right=True) - 1).clamp(0, xs.numel() - 2)
    x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
    w = (xc - x0) / (x1 - x0)
    return y0 + w * (y1 - y0)
