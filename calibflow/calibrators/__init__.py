"""Post-hoc calibrators behind one interface, their cross-validated selection, and (de)serialisation.

Every calibrator maps a model's logits ``(N, K)`` to calibrated probabilities:

* ``fit(logits, labels) -> self`` on a held-out calibration split,
* ``transform(logits) -> (N, K)`` float64 probabilities on the logits' device, rows summing to 1,
* ``to_state() -> dict`` of plain JSON types (str, int, float, lists of them), including the
  method name, and the module-level :func:`calibrator_from_state` to rebuild it, so a registered
  model can ship its fitted calibrator as ``calibration.json``.

Methods (``CALIBRATION_METHODS``):

* ``temperature`` -- ``softmax(z / T)`` via :func:`calibflow.calibrators.temperature.fit_temperature` (Guo et al. 2017)
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
solver that does not converge raise :class:`calibflow.errors.CalibrationError`; asking for an
unknown method, a binary-only method with K > 2, or transforming logits with the wrong number of
classes raises ``ValueError``.
"""

from __future__ import annotations

from calibflow.calibrators.base import BINARY_ONLY_METHODS, CALIBRATION_METHODS, STATE_VERSION, C, Calibrator
from calibflow.calibrators.binary import BetaCalibrator, PlattCalibrator
from calibflow.calibrators.nonparametric import HistogramBinningCalibrator, IsotonicCalibrator
from calibflow.calibrators.scaling import MatrixScalingCalibrator, TemperatureCalibrator, VectorScalingCalibrator
from calibflow.calibrators.selection import (
    CV_NLL_EPS,
    binary_only,
    calibrator_from_state,
    default_methods,
    fit_calibrator,
    make_calibrator,
    select_calibrator,
    stratified_folds,
)

__all__ = [
    "STATE_VERSION",
    "CALIBRATION_METHODS",
    "BINARY_ONLY_METHODS",
    "C",
    "Calibrator",
    "CV_NLL_EPS",
    "TemperatureCalibrator",
    "VectorScalingCalibrator",
    "MatrixScalingCalibrator",
    "PlattCalibrator",
    "BetaCalibrator",
    "HistogramBinningCalibrator",
    "IsotonicCalibrator",
    "make_calibrator",
    "calibrator_from_state",
    "binary_only",
    "default_methods",
    "stratified_folds",
    "select_calibrator",
    "fit_calibrator",
]
