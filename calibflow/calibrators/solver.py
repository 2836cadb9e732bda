"""Solver: part of calibflow.calibrators (see its docstring)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy.optimize import minimize

from calibflow.errors import CalibrationError

# --------------------------------------------------------------------------------------------
# Solver
# --------------------------------------------------------------------------------------------

# The solver's result is accepted when scipy stops on its function tolerance or, after an
# "abnormal" line-search stop (it happens at the optimum, where rounding noise stalls the line
# search), when the largest projected gradient component of the mean NLL is below this.
_GRAD_ACCEPT = 1e-6


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
