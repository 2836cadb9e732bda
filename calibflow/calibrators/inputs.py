"""Inputs: part of calibflow.calibrators (see its docstring)."""

from __future__ import annotations

import numpy as np
import torch

from calibflow.metrics import ArrayLike
from calibflow.calibrators.temperature import _validated, fit_temperature
from calibflow.errors import CalibrationError

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
