"""Registry, state, selection: part of calibflow.calibrators (see its docstring)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from calibflow.calibrators.base import CALIBRATION_METHODS, STATE_VERSION, Calibrator
from calibflow.calibrators.binary import BetaCalibrator, PlattCalibrator
from calibflow.calibrators.inputs import _check_binary, _fit_inputs
from calibflow.calibrators.nonparametric import HistogramBinningCalibrator, IsotonicCalibrator
from calibflow.calibrators.scaling import MatrixScalingCalibrator, TemperatureCalibrator, VectorScalingCalibrator
from calibflow.metrics import ArrayLike, expected_calibration_error, probability_nll
from calibflow.errors import CalibrationError

# --------------------------------------------------------------------------------------------
# Registry, state, selection
# --------------------------------------------------------------------------------------------

# Probabilities are clipped to [eps, 1 - eps] in the cross-validated NLL: histogram and isotonic
# calibrators can put exactly 0 on the true class, which would make the NLL infinite and the
# comparison meaningless. float64 machine epsilon (2.2e-16, i.e. at most 36.0 nats per sample)
# is scikit-learn's log_loss convention: a zero still costs far more than any honest probability.
CV_NLL_EPS = float(np.finfo(np.float64).eps)

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
