"""Input handling: part of calibflow.metrics (see its docstring)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

import numpy as np
import torch

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
        raise ValueError(f"labels must lie in [0, {k}) for {k} classes; got min {int(y.min())}, max {int(y.max())}")
    return y


def _probs_and_labels(probs: ArrayLike, labels: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    p = _as_2d_float(probs, "probs")
    y = _as_labels(labels, p.shape[0], p.shape[1], p.device)
    return p, y
