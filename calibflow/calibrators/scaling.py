"""Temperature, vector and matrix scaling: part of calibflow.calibrators (see its docstring)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from calibflow.calibrators.base import Calibrator
from calibflow.calibrators.inputs import _initial_temperature
from calibflow.calibrators.solver import _minimise, _softmax_nll_grad
from calibflow.metrics import ArrayLike, calibrated_probabilities
from calibflow.calibrators.temperature import DEFAULT_MAX_TEMPERATURE, DEFAULT_MIN_TEMPERATURE, fit_temperature

# --------------------------------------------------------------------------------------------
# Temperature, vector and matrix scaling
# --------------------------------------------------------------------------------------------


class TemperatureCalibrator(Calibrator):
    """Temperature scaling, ``q = softmax(z / T)`` (Guo et al. 2017, "On Calibration of Modern Neural
    Networks", section 4.2).

    A thin wrapper of :func:`calibflow.calibrators.temperature.fit_temperature` (exact safeguarded-Newton solve
    of the 1-D convex NLL in log T), so T, the search range and every error are the pipeline's own.
    """

    method = "temperature"

    def __init__(
        self, min_temperature: float = DEFAULT_MIN_TEMPERATURE, max_temperature: float = DEFAULT_MAX_TEMPERATURE
    ) -> None:
        super().__init__()
        self.min_temperature = float(min_temperature)
        self.max_temperature = float(max_temperature)
        self.temperature: float | None = None
        self.fit_result = None

    def fit(self, logits: ArrayLike, labels: ArrayLike, targets: ArrayLike | None = None) -> TemperatureCalibrator:
        """`targets`: soft labels (N, K), each row a distribution, to fit T against instead of the
        labels (fit_temperature)."""
        z, y = self._prepare_fit(logits, labels)
        self.fit_result = fit_temperature(z, y, self.min_temperature, self.max_temperature, targets=targets)
        self.temperature = self.fit_result.temperature
        self.n_classes = int(z.shape[1])
        return self

    def _transform(self, z: torch.Tensor) -> torch.Tensor:
        return calibrated_probabilities(z, self.temperature)

    def _params(self) -> dict[str, Any]:
        return {
            "temperature": float(self.temperature),
            "min_temperature": self.min_temperature,
            "max_temperature": self.max_temperature,
        }

    @classmethod
    def _from_params(cls, state: dict[str, Any]) -> TemperatureCalibrator:
        cal = cls(
            state.get("min_temperature", DEFAULT_MIN_TEMPERATURE), state.get("max_temperature", DEFAULT_MAX_TEMPERATURE)
        )
        cal.temperature = float(state["temperature"])
        return cal


class VectorScalingCalibrator(Calibrator):
    """Vector scaling, ``q = softmax(w * z + b)`` with per-class ``w, b`` (Guo et al. 2017, section 4.2).

    Fitted by minimising the mean NLL (no regularisation, as in Guo et al.) in float64 with
    L-BFGS-B and analytic gradients, from the fitted temperature (``w = 1/T``, ``b = 0``). The
    biases are centred after the fit (softmax ignores a common shift), so the state is unique.
    """

    method = "vector"

    def __init__(self) -> None:
        super().__init__()
        self.weights: torch.Tensor | None = None
        self.biases: torch.Tensor | None = None

    def fit(self, logits: ArrayLike, labels: ArrayLike) -> VectorScalingCalibrator:
        z, y = self._prepare_fit(logits, labels)
        k = z.shape[1]

        def objective(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            w, b = x[:k], x[k:]
            nll, g = _softmax_nll_grad(torch.addcmul(b, z, w), y)
            return nll, torch.cat([(g * z).sum(dim=0), g.sum(dim=0)])

        x0 = np.concatenate([np.full(k, 1.0 / _initial_temperature(z, y)), np.zeros(k)])
        x = _minimise(objective, x0, z.device, self.method)
        self.weights = torch.as_tensor(x[:k], dtype=torch.float64)
        self.biases = torch.as_tensor(x[k:] - x[k:].mean(), dtype=torch.float64)
        self.n_classes = k
        return self

    def _transform(self, z: torch.Tensor) -> torch.Tensor:
        return torch.softmax(z * self.weights.to(z.device) + self.biases.to(z.device), dim=1)

    def _params(self) -> dict[str, Any]:
        return {"weights": self.weights.tolist(), "biases": self.biases.tolist()}

    @classmethod
    def _from_params(cls, state: dict[str, Any]) -> VectorScalingCalibrator:
        cal = cls()
        cal.weights = torch.tensor(state["weights"], dtype=torch.float64)
        cal.biases = torch.tensor(state["biases"], dtype=torch.float64)
        return cal


def _gauge_deviations(w: torch.Tensor, b: torch.Tensor, off: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Off-diagonal entries of W minus their column mean (zero on the diagonal), and b minus its mean.

    softmax(W z + b) is unchanged by ``W -> W + 1 v^T, b -> b + c 1`` (the same ``v.z + c`` added to
    every class score). The ODIR penalty is not, so it alone pins that K + 1 dimensional gauge, with
    a curvature of only ``lambda / (K (K - 1))``: L-BFGS then crawls along those directions for
    hundreds of iterations. Minimising the penalty over the gauge in closed form
    (``v_j = -mean_{i != j} W_ij``, ``c = -mean(b)``) gives an objective that is exactly invariant
    along them, with the same minimum value and the same probabilities.
    """
    k = w.shape[0]
    col_mean = (w * off).sum(dim=0, keepdim=True) / max(k - 1, 1)
    return (w - col_mean) * off, b - b.mean()


class MatrixScalingCalibrator(Calibrator):
    """Matrix scaling, ``q = softmax(W z + b)``, with ODIR regularisation (Kull et al. 2019).

    Objective (Kull et al. 2019, "Beyond temperature scaling: Obtaining well-calibrated multi-class
    probabilities with Dirichlet calibration", section 4, ODIR = Off-Diagonal and Intercept
    Regularisation), applied to logits as in Guo et al.'s matrix scaling:

        mean NLL + lambda / (K (K - 1)) sum_{i != j} W_ij^2 + mu / K sum_j b_j^2

    with ``lambda = regularisation`` and ``mu = intercept_regularisation`` (default: the same).
    The diagonal is free, so temperature and vector scaling's scales cost nothing; the K^2 - K
    cross-class terms, which overfit with many classes, are shrunk towards 0. Fitted in float64
    with L-BFGS-B and analytic gradients from ``W = I / T``, ``b = 0``.
    """

    method = "matrix"

    def __init__(self, regularisation: float = 1e-2, intercept_regularisation: float | None = None) -> None:
        super().__init__()
        self.regularisation = float(regularisation)
        self.intercept_regularisation = float(
            regularisation if intercept_regularisation is None else intercept_regularisation
        )
        if not (self.regularisation >= 0.0 and self.intercept_regularisation >= 0.0):
            raise ValueError("regularisation strengths must be >= 0")
        self.weights: torch.Tensor | None = None
        self.biases: torch.Tensor | None = None

    def fit(self, logits: ArrayLike, labels: ArrayLike) -> MatrixScalingCalibrator:
        z, y = self._prepare_fit(logits, labels)
        k = z.shape[1]
        off = 1.0 - torch.eye(k, dtype=torch.float64, device=z.device)
        lam = self.regularisation / (k * (k - 1))
        mu = self.intercept_regularisation / k

        def objective(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            w, b = x[: k * k].reshape(k, k), x[k * k :]
            nll, g = _softmax_nll_grad(torch.addmm(b, z, w.T), y)
            w_dev, b_dev = _gauge_deviations(w, b, off)
            value = nll + lam * (w_dev * w_dev).sum() + mu * (b_dev * b_dev).sum()
            grad_w = g.T @ z + 2.0 * lam * w_dev
            grad_b = g.sum(dim=0) + 2.0 * mu * b_dev
            return value, torch.cat([grad_w.reshape(-1), grad_b])

        x0 = np.concatenate([np.eye(k).reshape(-1) / _initial_temperature(z, y), np.zeros(k)])
        x = torch.as_tensor(_minimise(objective, x0, z.device, self.method), dtype=torch.float64)
        w, b = x[: k * k].reshape(k, k), x[k * k :]
        # Move to the representative that the plain ODIR penalty prefers (see _gauge_deviations):
        # same probabilities, and exactly the minimiser of the objective in the docstring.
        col_mean = (w * off.cpu()).sum(dim=0, keepdim=True) / (k - 1)
        self.weights = w - col_mean  # subtracts col_mean_j from every row's W_.j, diagonal included
        self.biases = b - b.mean()
        self.n_classes = k
        return self

    def _transform(self, z: torch.Tensor) -> torch.Tensor:
        return torch.softmax(z @ self.weights.to(z.device).T + self.biases.to(z.device), dim=1)

    def _params(self) -> dict[str, Any]:
        return {
            "weights": self.weights.tolist(),
            "biases": self.biases.tolist(),
            "regularisation": self.regularisation,
            "intercept_regularisation": self.intercept_regularisation,
        }

    @classmethod
    def _from_params(cls, state: dict[str, Any]) -> MatrixScalingCalibrator:
        cal = cls(state.get("regularisation", 1e-2), state.get("intercept_regularisation"))
        cal.weights = torch.tensor(state["weights"], dtype=torch.float64)
        cal.biases = torch.tensor(state["biases"], dtype=torch.float64)
        return cal
