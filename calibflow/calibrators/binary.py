"""Binary: Platt and beta calibration: part of calibflow.calibrators (see its docstring)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from calibflow.calibrators.base import Calibrator
from calibflow.calibrators.solver import _binary_nll_grad, _binary_probabilities, _minimise
from calibflow.metrics import ArrayLike

# --------------------------------------------------------------------------------------------
# Binary: Platt and beta calibration
# --------------------------------------------------------------------------------------------


class PlattCalibrator(Calibrator):
    """Platt scaling for K = 2: ``P(y = 1) = sigmoid(a m + c)`` on the logit margin ``m = z_1 - z_0``
    (Platt 1999, "Probabilistic outputs for support vector machines and comparisons to regularized
    likelihood methods").

    Minimises the mean cross-entropy against Platt's smoothed targets ``(N+ + 1)/(N+ + 2)`` for
    positives and ``1/(N- + 2)`` for negatives (his guard against overfitting a few points; the same
    targets as scikit-learn's ``CalibratedClassifierCV(method="sigmoid")``); ``smooth_targets=False``
    gives the plain maximum-likelihood logistic fit. Solver: L-BFGS-B, analytic gradient, float64.
    """

    method = "platt"
    binary_only = True

    def __init__(self, smooth_targets: bool = True) -> None:
        super().__init__()
        self.smooth_targets = bool(smooth_targets)
        self.slope: float | None = None
        self.intercept: float | None = None

    def fit(self, logits: ArrayLike, labels: ArrayLike) -> PlattCalibrator:
        z, y = self._prepare_fit(logits, labels)
        m = z[:, 1] - z[:, 0]
        t = y.to(torch.float64)
        if self.smooth_targets:
            n_pos = float(t.sum())
            n_neg = float(t.numel()) - n_pos
            t = torch.where(y == 1, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0)).to(torch.float64)

        def objective(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            loss, g = _binary_nll_grad(x[0] * m + x[1], t)
            return loss, torch.stack([(g * m).sum(), g.sum()])

        x = _minimise(objective, np.array([1.0, 0.0]), z.device, self.method)
        self.slope, self.intercept = float(x[0]), float(x[1])
        self.n_classes = 2
        return self

    def _transform(self, z: torch.Tensor) -> torch.Tensor:
        return _binary_probabilities(self.slope * (z[:, 1] - z[:, 0]) + self.intercept)

    def _params(self) -> dict[str, Any]:
        return {"slope": self.slope, "intercept": self.intercept, "smooth_targets": int(self.smooth_targets)}

    @classmethod
    def _from_params(cls, state: dict[str, Any]) -> PlattCalibrator:
        cal = cls(bool(state.get("smooth_targets", 1)))
        cal.slope, cal.intercept = float(state["slope"]), float(state["intercept"])
        return cal


class BetaCalibrator(Calibrator):
    """Beta calibration for K = 2: ``P(y = 1) = sigmoid(a ln p - b ln(1 - p) + c)`` with ``a, b >= 0``,
    where ``p = softmax(z)_1`` (Kull, Silva Filho & Flach 2017, "Beta calibration: a well-founded and
    easily implemented improvement on logistic calibration for binary classifiers", AISTATS).

    Logistic regression on the features ``[ln p, -ln(1 - p)]`` by maximum likelihood with the
    paper's constraint ``a, b >= 0`` (so the map is monotone), solved as one box-constrained
    problem with L-BFGS-B and analytic gradients in float64; the paper's recipe (refit without a
    feature whose coefficient came out negative) reaches the same constrained optimum. The
    features are computed from the logit margin ``m`` as ``log_sigmoid(m)`` and ``softplus(m)``,
    so saturated probabilities (p = 0 or 1 in floating point) stay finite. ``a = b`` reduces to
    Platt scaling on ``m``; ``a = b = 1, c = 0`` is the identity.
    """

    method = "beta"
    binary_only = True

    def __init__(self) -> None:
        super().__init__()
        self.a: float | None = None
        self.b: float | None = None
        self.c: float | None = None

    @staticmethod
    def _features(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = z[:, 1] - z[:, 0]
        return torch.nn.functional.logsigmoid(m), torch.nn.functional.softplus(m)

    def fit(self, logits: ArrayLike, labels: ArrayLike) -> BetaCalibrator:
        z, y = self._prepare_fit(logits, labels)
        f1, f2 = self._features(z)
        t = y.to(torch.float64)

        def objective(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            loss, g = _binary_nll_grad(x[0] * f1 + x[1] * f2 + x[2], t)
            return loss, torch.stack([(g * f1).sum(), (g * f2).sum(), g.sum()])

        x = _minimise(
            objective, np.array([1.0, 1.0, 0.0]), z.device, self.method, bounds=[(0.0, None), (0.0, None), (None, None)]
        )
        self.a, self.b, self.c = (float(v) for v in x)
        self.n_classes = 2
        return self

    def _transform(self, z: torch.Tensor) -> torch.Tensor:
        f1, f2 = self._features(z)
        return _binary_probabilities(self.a * f1 + self.b * f2 + self.c)

    def _params(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "c": self.c}

    @classmethod
    def _from_params(cls, state: dict[str, Any]) -> BetaCalibrator:
        cal = cls()
        cal.a, cal.b, cal.c = float(state["a"]), float(state["b"]), float(state["c"])
        return cal
