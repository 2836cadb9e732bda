"""Interface: part of calibflow.calibrators (see its docstring)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, TypeVar

import torch

from calibflow.calibrators.inputs import _check_binary, _fit_inputs, _transform_inputs
from calibflow.metrics import ArrayLike

# --------------------------------------------------------------------------------------------
# Interface
# --------------------------------------------------------------------------------------------

STATE_VERSION = 1
CALIBRATION_METHODS: tuple[str, ...] = ("temperature", "vector", "matrix", "histogram", "isotonic", "platt", "beta")
BINARY_ONLY_METHODS: tuple[str, ...] = ("platt", "beta")

C = TypeVar("C", bound="Calibrator")


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
