"""Post-hoc calibrators behind one interface, their cross-validated selection, and (de)serialisation.

Every calibrator maps a model's logits ``(N, K)`` to calibrated probabilities:

* ``fit(logits, labels) -> self`` on a held-out calibration split,
* ``transform(logits) -> (N, K)`` float64 probabilities on the logits' device, rows summing to 1,
* ``to_state() -> dict`` of plain JSON types (str, int, float, lists of them), including the
  method name, and the module-level :func:`calibrator_from_state` to rebuild it, so a registered
  model can ship its fitted calibrator as ``calibration.json``.

Methods (``CALIBRATION_METHODS``):

* ``temperature`` -- ``softmax(z / T)`` via :func:`calibflow.temperature.fit_temperature` (Guo et al. 2017)
* ``vector``      -- ``softmax(w * z + b)``, per-class scale and bias (Guo et al. 2017)
* ``matrix``      -- ``softmax(W z + b)`` with off-diagonal and intercept L2, ODIR (Kull et al. 2019)
* ``histogram``   -- one-vs-rest histogram binning of ``softmax(z)``, renormalised (Zadrozny & Elkan 2001)
* ``isotonic``    -- one-vs-rest isotonic regression of ``softmax(z)``, renormalised (Zadrozny & Elkan 2002)
* ``platt``       -- K = 2 only: ``sigmoid(a m + c)`` on the margin ``m = z_1 - z_0`` (Platt 1999)
* ``beta``        -- K = 2 only: ``sigmoid(a ln p - b ln(1 - p) + c)``, ``a, b >= 0`` (Kull et al. 2017)

The parametric maps (vector, matrix, platt, beta) are fitted by minimising the mean NLL in float64
with scipy's L-BFGS-B (bounds for beta's ``a, b >= 0``) and analytic gradients computed with torch
on the logits' device; vector and matrix start from the fitted temperature, which lies inside
their model family, so on the calibration split they never end with a higher NLL than it.

Threads: these fits are small (the calibration split), and on a machine whose cores are
oversubscribed every multi-threaded torch/BLAS region in them can wait a scheduler tick for a
descheduled sibling thread; a matrix-scaling fit measured 0.05 s on one thread and 6 s on two on a
loaded 2-core box. Where that happens, call them under ``torch.set_num_threads(1)`` (not done here:
the thread count is process-wide state that belongs to the caller).

Errors: bad calibration data (empty, shape mismatch, labels out of range, non-finite logits) and a
solver that does not converge raise :class:`calibflow.temperature.CalibrationError`; asking for an
unknown method, a binary-only method with K > 2, or transforming logits with the wrong number of
classes raises ``ValueError``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from scipy.optimize import minimize

from calibflow.temperature import CalibrationError, _validated, fit_temperature
from calibflow.config import DEFAULT_MAX_TEMPERATURE, DEFAULT_MIN_TEMPERATURE
from calibflow.metrics import ArrayLike, calibrated_probabilities, expected_calibration_error, probability_nll

STATE_VERSION = 1
CALIBRATION_METHODS: tuple[str, ...] = ("temperature", "vector", "matrix", "histogram", "isotonic", "platt", "beta")
BINARY_ONLY_METHODS: tuple[str, ...] = ("platt", "beta")
# Probabilities are clipped to [eps, 1 - eps] in the cross-validated NLL: histogram and isotonic
# calibrators can put exactly 0 on the true class, which would make the NLL infinite and the
# comparison meaningless. float64 machine epsilon (2.2e-16, i.e. at most 36.0 nats per sample)
# is scikit-learn's log_loss convention: a zero still costs far more than any honest probability.
CV_NLL_EPS = float(np.finfo(np.float64).eps)
# The solver's result is accepted when scipy stops on its function tolerance or, after an
# "abnormal" line-search stop (it happens at the optimum, where rounding noise stalls the line
# search), when the largest projected gradient component of the mean NLL is below this.
_GRAD_ACCEPT = 1e-6

C = TypeVar("C", bound="Calibrator")


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _fit_inputs(logits: ArrayLike, labels: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 logits and int64 labels on the logits' device, or CalibrationError (shared checks)."""
    if isinstance(logits, np.ndarray):
        logits = torch.as_tensor(logits)
    return _validated(logits, labels)


def _transform_inputs(logits: ArrayLike, n_classes: int, method: str) -> torch.Tensor:
    z = logits.detach() if isinstance(logits, torch.Tensor) else torch.as_tensor(np.asarray(logits, dtype=np.float64))
    if z.ndim != 2 or z.shape[1] != n_classes:
        raise ValueError(
            f"{method} calibrator was fitted on {n_classes} classes; transform needs logits of shape "
            f"(N, {n_classes}), got {tuple(z.shape)}"
        )
    z = z.to(torch.float64)
    if not bool(torch.isfinite(z).all()):
        raise ValueError(f"{method} calibrator: logits contain NaN or infinite values")
    return z


def _check_binary(method: str, k: int) -> None:
    if k != 2:
        raise ValueError(
            f"calibration method {method!r} is for binary tasks (K = 2) only; the logits have K = {k}. "
            "Use 'temperature', 'vector', 'matrix', 'histogram' or 'isotonic' for multiclass models."
        )


def _initial_temperature(z: torch.Tensor, y: torch.Tensor) -> float:
    """The fitted temperature if it exists, else 1: a start inside the vector/matrix family."""
    try:
        return fit_temperature(z, y).temperature
    except CalibrationError:
        return 1.0


# --------------------------------------------------------------------------------------------
# Solver
# --------------------------------------------------------------------------------------------


def _minimise(
    objective: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    x0: np.ndarray,
    device: torch.device,
    method: str,
    bounds: Sequence[tuple[float | None, float | None]] | None = None,
    max_iter: int = 2000,
) -> np.ndarray:
    """Minimise a smooth convex objective with L-BFGS-B (scipy) and an analytic gradient.

    ``objective(x)`` takes the float64 parameter vector as a tensor on ``device`` and returns the
    objective and its gradient; only those two cross to the host per evaluation.
    """

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = objective(torch.as_tensor(x, dtype=torch.float64, device=device))
        return float(value), grad.detach().cpu().numpy().astype(np.float64)

    res = minimize(
        fun,
        np.asarray(x0, dtype=np.float64),
        jac=True,
        method="L-BFGS-B",
        bounds=bounds,
        # ftol = 64 eps on the relative decrease (scikit-learn's choice for Platt scaling) and a
        # projected-gradient tolerance far below what moves a probability: the mean NLL is O(1).
        options={"maxiter": max_iter, "maxfun": 4 * max_iter, "ftol": 64 * np.finfo(float).eps, "gtol": 1e-10},
    )
    x = np.asarray(res.x, dtype=np.float64)
    if not np.all(np.isfinite(x)) or not math.isfinite(float(res.fun)):
        raise CalibrationError(f"{method} calibration diverged (non-finite parameters or NLL): {res.message}")
    if not res.success:
        _, grad = fun(x)
        projected = grad.copy()
        if bounds is not None:
            for i, (lo, hi) in enumerate(bounds):
                if lo is not None and x[i] <= lo and grad[i] > 0:
                    projected[i] = 0.0
                if hi is not None and x[i] >= hi and grad[i] < 0:
                    projected[i] = 0.0
        if float(np.max(np.abs(projected))) > _GRAD_ACCEPT:
            raise CalibrationError(
                f"{method} calibration did not converge after {res.nit} L-BFGS iterations ({res.message}); "
                f"largest gradient component {float(np.max(np.abs(projected))):.3g}. The calibration data may "
                "be (nearly) separable, so the NLL has no finite minimiser: use 'temperature' or more data."
            )
    return x


def _softmax_nll_grad(s: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean NLL of ``softmax(s)`` and its gradient ``(softmax(s) - onehot(y)) / N`` in the scores ``s``."""
    n = s.shape[0]
    log_q = torch.log_softmax(s, dim=1)
    nll = -log_q.gather(1, y[:, None]).sum() / n
    # In place on log_q's buffer: each objective call walks (N, K) float64 arrays a few times,
    # and on large K that, not the solver, is the cost of a fit.
    grad = log_q.exp_()
    grad.scatter_add_(1, y[:, None], torch.full((n, 1), -1.0, dtype=grad.dtype, device=grad.device))
    return nll, grad.div_(n)


def _binary_nll_grad(s: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of ``sigmoid(s)`` against ``target`` in [0, 1], and its gradient in ``s``.

    ``-t log sigmoid(s) - (1 - t) log sigmoid(-s) = softplus(s) - t s``: stable for any ``s``.
    """
    n = s.shape[0]
    loss = (torch.nn.functional.softplus(s) - target * s).sum() / n
    return loss, (torch.sigmoid(s) - target) / n


def _binary_probabilities(s: torch.Tensor) -> torch.Tensor:
    """``[1 - sigmoid(s), sigmoid(s)]`` as a softmax of ``[0, s]``: rows sum to 1 in floating point."""
    return torch.softmax(torch.stack([torch.zeros_like(s), s], dim=1), dim=1)


# --------------------------------------------------------------------------------------------
# Interface
# --------------------------------------------------------------------------------------------


class Calibrator(ABC):
    """A post-hoc calibrator: ``fit`` on calibration logits, ``transform`` logits into probabilities."""

    method: ClassVar[str]
    binary_only: ClassVar[bool] = False

    def __init__(self) -> None:
        self.n_classes: int | None = None
        # Cross-validation rows when the method was chosen by fit_calibrator("auto"); not state.
        self.selection: list[dict[str, Any]] | None = None

    @abstractmethod
    def fit(self: C, logits: ArrayLike, labels: ArrayLike) -> C:
        """Fit on held-out calibration logits ``(N, K)`` and integer labels ``(N,)``; returns self."""

    @abstractmethod
    def _transform(self, z: torch.Tensor) -> torch.Tensor:
        """Probabilities from validated float64 logits."""

    @abstractmethod
    def _params(self) -> dict[str, Any]:
        """The fitted parameters and options as plain JSON types."""

    @classmethod
    @abstractmethod
    def _from_params(cls: type[C], state: dict[str, Any]) -> C:
        """Rebuild a fitted calibrator from :meth:`_params` output (plus ``n_classes``)."""

    @property
    def is_fitted(self) -> bool:
        return self.n_classes is not None

    def transform(self, logits: ArrayLike) -> torch.Tensor:
        """Calibrated probabilities ``(N, K)``, float64, on the logits' device; rows sum to 1."""
        if self.n_classes is None:
            raise ValueError(f"{self.method} calibrator is not fitted: call fit(logits, labels) first")
        return self._transform(_transform_inputs(logits, self.n_classes, self.method))

    def fit_transform(self, logits: ArrayLike, labels: ArrayLike) -> torch.Tensor:
        return self.fit(logits, labels).transform(logits)

    def to_state(self) -> dict[str, Any]:
        """JSON-serialisable state: ``method``, ``version``, ``n_classes`` and the method's parameters."""
        if self.n_classes is None:
            raise ValueError(f"{self.method} calibrator is not fitted; there is no state to save")
        return {"method": self.method, "version": STATE_VERSION, "n_classes": int(self.n_classes), **self._params()}

    def _prepare_fit(self, logits: ArrayLike, labels: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
        z, y = _fit_inputs(logits, labels)
        if self.binary_only:
            _check_binary(self.method, z.shape[1])
        return z, y

    def __repr__(self) -> str:
        status = f"K={self.n_classes}" if self.n_classes is not None else "unfitted"
        return f"{type(self).__name__}({status})"


# --------------------------------------------------------------------------------------------
# Temperature, vector and matrix scaling
# --------------------------------------------------------------------------------------------


class TemperatureCalibrator(Calibrator):
    """Temperature scaling, ``q = softmax(z / T)`` (Guo et al. 2017, "On Calibration of Modern Neural
    Networks", section 4.2).

    A thin wrapper of :func:`calibflow.temperature.fit_temperature` (exact safeguarded-Newton solve
    of the 1-D convex NLL in log T), so T, the search range and every error are the pipeline's own.
    """

    method = "temperature"

    def __init__(self, min_temperature: float = DEFAULT_MIN_TEMPERATURE,
                 max_temperature: float = DEFAULT_MAX_TEMPERATURE) -> None:
        super().__init__()
        self.min_temperature = float(min_temperature)
        self.max_temperature = float(max_temperature)
        self.temperature: float | None = None
        self.fit_result = None

    def fit(self, logits: ArrayLike, labels: ArrayLike) -> TemperatureCalibrator:
        z, y = self._prepare_fit(logits, labels)
        self.fit_result = fit_temperature(z, y, self.min_temperature, self.max_temperature)
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
        cal = cls(state.get("min_temperature", DEFAULT_MIN_TEMPERATURE),
                  state.get("max_temperature", DEFAULT_MAX_TEMPERATURE))
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


# --------------------------------------------------------------------------------------------
# Registry, state, selection
# --------------------------------------------------------------------------------------------

_CLASSES: dict[str, type[Calibrator]] = {
    cls.method: cls
    for cls in (
        TemperatureCalibrator,
        VectorScalingCalibrator,
        MatrixScalingCalibrator,
        HistogramBinningCalibrator,
        IsotonicCalibrator,
        PlattCalibrator,
        BetaCalibrator,
    )
}


def make_calibrator(method: str, **options: Any) -> Calibrator:
    """An unfitted calibrator for ``method`` (one of :data:`CALIBRATION_METHODS`) with its options."""
    if method not in _CLASSES:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {CALIBRATION_METHODS} or 'auto'")
    return _CLASSES[method](**options)


def calibrator_from_state(state: dict[str, Any]) -> Calibrator:
    """Rebuild a fitted calibrator from :meth:`Calibrator.to_state` output (e.g. a loaded calibration.json)."""
    if not isinstance(state, dict) or "method" not in state:
        raise ValueError("calibrator state must be a dict with a 'method' key (Calibrator.to_state() output)")
    method = state["method"]
    if method not in _CLASSES:
        raise ValueError(f"calibrator state names unknown method {method!r}; known: {CALIBRATION_METHODS}")
    version = int(state.get("version", STATE_VERSION))
    if version > STATE_VERSION:
        raise ValueError(f"calibrator state version {version} is newer than this calibflow ({STATE_VERSION})")
    try:
        cal = _CLASSES[method]._from_params(state)
        cal.n_classes = int(state["n_classes"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"calibrator state for {method!r} is incomplete or malformed: {exc!r}") from exc
    return cal


def binary_only(method: str) -> bool:
    """Does `method` calibrate two-class models only (platt, beta)?"""
    return method in _CLASSES and _CLASSES[method].binary_only


def default_methods(n_classes: int) -> tuple[str, ...]:
    """Candidate methods for ``select_calibrator``, simplest first: binary-only ones only for K = 2."""
    if n_classes == 2:
        return ("temperature", "platt", "beta", "vector", "matrix", "histogram", "isotonic")
    return ("temperature", "vector", "matrix", "histogram", "isotonic")


def stratified_folds(labels: ArrayLike, n_folds: int, seed: int = 0) -> list[np.ndarray]:
    """Indices of ``n_folds`` disjoint test folds, each class spread evenly over the folds.

    Each class's samples are shuffled (``numpy.random.default_rng(seed)``) and dealt to the folds
    in turn, starting where the previous class stopped, so fold sizes differ by at most one and a
    rare class is not piled into the first fold.
    """
    y = np.asarray(torch.as_tensor(labels).cpu().numpy()).reshape(-1)
    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) or not (2 <= n_folds <= y.size):
        raise ValueError(f"n_folds must be an integer in [2, N={y.size}]; got {n_folds!r}")
    rng = np.random.default_rng(seed)
    fold_of = np.empty(y.size, dtype=np.int64)
    start = 0
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        fold_of[members] = (start + np.arange(members.size)) % n_folds
        start += members.size
    return [np.flatnonzero(fold_of == f) for f in range(n_folds)]


def select_calibrator(
    logits: ArrayLike,
    labels: ArrayLike,
    methods: Sequence[str] | None = None,
    n_folds: int = 5,
    seed: int = 0,
    rule: str = "one_se",
    method_options: dict[str, dict[str, Any]] | None = None,
) -> tuple[str, list[dict[str, Any]]]:
    """Choose a calibration method by stratified K-fold cross-validated NLL on the calibration split.

    Each method is fitted on ``n_folds - 1`` folds and scored on the held-out fold by the mean NLL
    of its probabilities clipped to ``[CV_NLL_EPS, 1 - CV_NLL_EPS]`` (``CV_NLL_EPS`` = 2.2e-16, so
    histogram/isotonic zeros cost 36 nats instead of infinity) and by ECE (15 equal-width bins).
    ``methods`` defaults to :func:`default_methods` and is read simplest-first.

    ``rule="min"`` picks the lowest mean CV NLL. ``rule="one_se"`` (default) picks the first
    (simplest) method whose mean NLL is within one standard error of the best, the standard error
    taken over the per-fold *paired* differences to the best method (the one-standard-error rule of
    Breiman et al. 1984, "Classification and Regression Trees", section 3.4.3; Hastie, Tibshirani &
    Friedman, "The Elements of Statistical Learning", section 7.10): a richer map must beat a
    simpler one by more than the fold-to-fold noise before it is preferred.

    Returns ``(method, rows)``; each row has ``method``, ``cv_nll_mean``, ``cv_nll_std`` (across
    folds), ``cv_ece_mean``, ``folds`` (folds scored), ``fold_nll`` (list), ``selected`` and
    ``error`` (the message when fitting failed, else ``""``; such a method gets ``inf`` and is never
    picked). Raises CalibrationError when every method fails. ``method_options``: constructor
    options per method (e.g. temperature's search range), the same in every fold.
    """
    z, y = _fit_inputs(logits, labels)
    k = int(z.shape[1])
    candidates = tuple(default_methods(k) if methods is None else methods)
    if not candidates:
        raise ValueError("select_calibrator needs at least one method")
    for m in candidates:
        if m not in _CLASSES:
            raise ValueError(f"unknown calibration method {m!r}; choose from {CALIBRATION_METHODS}")
        if _CLASSES[m].binary_only:
            _check_binary(m, k)
    if rule not in ("one_se", "min"):
        raise ValueError(f"rule must be 'one_se' or 'min'; got {rule!r}")

    folds = stratified_folds(y, n_folds, seed)
    all_idx = np.arange(z.shape[0])
    fold_nll: dict[str, list[float]] = {}
    rows: list[dict[str, Any]] = []
    for m in candidates:
        nlls: list[float] = []
        eces: list[float] = []
        error = ""
        for test in folds:
            train = torch.as_tensor(np.setdiff1d(all_idx, test), device=z.device)
            test_t = torch.as_tensor(test, device=z.device)
            try:
                cal = make_calibrator(m, **(method_options or {}).get(m, {})).fit(z[train], y[train])
                q = cal.transform(z[test_t])
            except CalibrationError as exc:
                error = f"{type(exc).__name__}: {exc}"
                break
            nlls.append(probability_nll(q, y[test_t], eps=CV_NLL_EPS))
            eces.append(expected_calibration_error(q, y[test_t]))
        ok = not error
        fold_nll[m] = nlls if ok else []
        rows.append(
            {
                "method": m,
                "cv_nll_mean": float(np.mean(nlls)) if ok else float("inf"),
                "cv_nll_std": float(np.std(nlls, ddof=1)) if ok and len(nlls) > 1 else (0.0 if ok else float("inf")),
                "cv_ece_mean": float(np.mean(eces)) if ok else float("inf"),
                "folds": len(nlls) if ok else 0,
                "fold_nll": [float(v) for v in nlls] if ok else [],
                "selected": False,
                "error": error,
            }
        )
    scored = [r for r in rows if not r["error"]]
    if not scored:
        raise CalibrationError(
            "every calibration method failed in cross-validation: "
            + "; ".join(f"{r['method']}: {r['error']}" for r in rows)
        )
    best = min(scored, key=lambda r: r["cv_nll_mean"])
    chosen = best
    if rule == "one_se":
        base = np.asarray(fold_nll[best["method"]])
        for r in scored:  # simplest first
            diff = np.asarray(fold_nll[r["method"]]) - base
            se = float(np.std(diff, ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else 0.0
            if float(diff.mean()) <= se:
                chosen = r
                break
    chosen["selected"] = True
    return str(chosen["method"]), rows


def fit_calibrator(method: str, logits: ArrayLike, labels: ArrayLike, **options: Any) -> Calibrator:
    """Fit calibration ``method`` on ``(logits, labels)``; ``"auto"`` selects one by cross-validation first.

    For a named method, ``options`` go to its constructor (e.g. ``regularisation`` for ``matrix``,
    ``n_bins`` for ``histogram``). For ``"auto"``, ``options`` go to :func:`select_calibrator`
    (``methods``, ``n_folds``, ``seed``, ``rule``, ``method_options``), and temperature's
    ``min_temperature`` / ``max_temperature`` to temperature scaling wherever it is fitted; the
    chosen method is refitted on all the data with its options, and the comparison rows are kept
    on the result as ``.selection``.
    """
    if method == "auto":
        method_options = dict(options.pop("method_options", None) or {})
        temperature_range = {key: options.pop(key) for key in ("min_temperature", "max_temperature") if key in options}
        method_options["temperature"] = {**temperature_range, **method_options.get("temperature", {})}
        chosen, rows = select_calibrator(logits, labels, method_options=method_options, **options)
        cal = make_calibrator(chosen, **method_options.get(chosen, {})).fit(logits, labels)
        cal.selection = rows
        return cal
    return make_calibrator(method, **options).fit(logits, labels)
