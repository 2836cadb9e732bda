"""Tests for calibflow.calibrators.temperature.fit_temperature: recovery of a known T, agreement with a scipy
reference fit and with scikit-learn's and netcal's temperature scaling, and the error paths.

Every test runs twice (the autouse ``solver`` fixture): once with the warm-started Halley solve that
large splits get, forced onto these small ones, and once with the bracketed Newton solve alone.
tests/test_calibration_solvers.py checks the two solves against each other; speed is measured by
benchmarks/calibration_speed.py, not here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from calibflow.calibrators import temperature as C
from calibflow.calibrators.temperature import TemperatureFit, fit_temperature
from calibflow.errors import CalibrationError
from calibflow.metrics import negative_log_likelihood


@pytest.fixture(autouse=True, params=["warm-started", "bracketed"])
def solver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which solve fit_temperature uses: warm-started on every split, or bracketed on every split."""
    monkeypatch.setattr(C, "WARM_START_MIN_ROWS", 0 if request.param == "warm-started" else 10**12)
    return request.param


def _sample(seed: int, n: int, k: int, t_true: float, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits z ~ N(0, scale^2) and labels drawn from softmax(z / t_true): T = t_true is the truth."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g, dtype=torch.float64) * scale
    y = torch.multinomial(torch.softmax(z / t_true, dim=1), 1, generator=g).squeeze(1)
    return z, y


def _reference_temperature(z: np.ndarray, y: np.ndarray, lo: float = 0.05, hi: float = 20.0) -> float:
    """Independent float64 fit: bounded Brent on log T of the mean NLL, written with scipy only."""

    def nll(t: float) -> float:
        return float(-log_softmax(z / math.exp(t), axis=1)[np.arange(len(y)), y].mean())

    res = minimize_scalar(nll, bounds=(math.log(lo), math.log(hi)), method="bounded", options={"xatol": 1e-10})
    assert res.success
    return math.exp(res.x)


# --------------------------------------------------------------------------------------------
# Correctness
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t_true", [0.5, 1.5, 3.0])
def test_recovers_true_temperature(t_true: float) -> None:
    # N = 200k: the sampling s.d. of the fitted T is ~0.2% here (0.7-0.9% at N = 20k, which would
    # make a 1% tolerance a coin toss over seeds), so 1% is a >4 sigma check of the solver.
    z, y = _sample(seed=int(t_true * 10), n=200_000, k=10, t_true=t_true)
    fit = fit_temperature(z, y)
    assert isinstance(fit, TemperatureFit)
    assert fit.temperature == pytest.approx(t_true, rel=0.01)
    assert all(type(v) is float for v in (fit.temperature, fit.nll_before, fit.nll_after))
    assert isinstance(fit.iterations, int) and fit.iterations < 20


@pytest.mark.parametrize(("seed", "t_true", "k"), [(0, 0.7, 10), (1, 2.0, 10), (2, 1.2, 2), (3, 4.0, 100)])
def test_matches_scipy_reference_and_is_a_minimum(seed: int, t_true: float, k: int) -> None:
    z, y = _sample(seed, n=3000, k=k, t_true=t_true)
    fit = fit_temperature(z, y)
    ref = _reference_temperature(z.numpy(), y.numpy())
    assert fit.temperature == pytest.approx(ref, rel=1e-3)
    # post-calibration NLL: ours is the reference fit's, or lower (Brent stops at xatol)
    ref_nll = negative_log_likelihood(z, y, ref)
    assert fit.nll_after == pytest.approx(ref_nll, rel=1e-3) and fit.nll_after <= ref_nll + 1e-15

    # Reported NLLs are the metric's NLL at T=1 and at the fit, and the fit lowers it.
    assert fit.nll_before == pytest.approx(negative_log_likelihood(z, y, 1.0), rel=1e-12)
    assert fit.nll_after == pytest.approx(negative_log_likelihood(z, y, fit.temperature), rel=1e-12)
    assert fit.nll_after <= fit.nll_before
    # ... and it is a minimum: nudging T either way does not lower it.
    for factor in (0.999, 1.001, 0.9, 1.1):
        assert negative_log_likelihood(z, y, fit.temperature * factor) >= fit.nll_after - 1e-15


def test_matches_sklearn_calibrated_classifier_cv_temperature() -> None:
    # scikit-learn 1.9 fits temperature scaling inside CalibratedClassifierCV from an estimator's
    # decision_function; a pass-through classifier whose decision_function returns its input
    # (our logits), wrapped in FrozenEstimator (no refit, no CV), makes it a peer on fixed logits.
    # It minimises HalfMultinomialLoss (= mean NLL) over log(beta) in [-10, 10] with bounded
    # Brent, and stores beta = 1/T.
    from sklearn.base import BaseEstimator, ClassifierMixin
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.frozen import FrozenEstimator

    k = 10

    class PassThrough(ClassifierMixin, BaseEstimator):
        def fit(self, X, y):
            self.classes_ = np.arange(k)
            return self

        def decision_function(self, X):
            return np.asarray(X, dtype=np.float64)

        def predict(self, X):
            return np.asarray(X).argmax(axis=1)

    for seed, t_true in ((4, 0.8), (5, 2.5)):
        z, y = _sample(seed, n=3000, k=k, t_true=t_true)
        clf = PassThrough().fit(z.numpy(), y.numpy())
        cal = CalibratedClassifierCV(FrozenEstimator(clf), method="temperature").fit(z.numpy(), y.numpy())
        (calibrator,) = cal.calibrated_classifiers_[0].calibrators
        sklearn_t = 1.0 / float(calibrator.beta_)
        assert fit_temperature(z, y).temperature == pytest.approx(sklearn_t, rel=1e-3)


def test_matches_netcal_temperature_scaling() -> None:
    # netcal 1.4 takes *probabilities*, turns them back into logits with log(clip(p, eps, 1-eps))
    # (equal to z up to a per-row constant, which softmax ignores) and fits by scipy L-BFGS-B with
    # numerical gradients. Its `temperature` property returns the fitted *multiplier* of the logits,
    # i.e. 1/T, not T: with T_true = 2 it reports ~0.5.
    from netcal.scaling import TemperatureScaling

    z, y = _sample(seed=6, n=2000, k=10, t_true=2.0)
    ts = TemperatureScaling()
    ts.fit(torch.softmax(z, dim=1).numpy(), y.numpy())
    netcal_t = 1.0 / float(np.asarray(ts.temperature).reshape(-1)[0])
    fit = fit_temperature(z, y)
    assert fit.temperature == pytest.approx(netcal_t, rel=1e-3)
    # post-calibration NLL: netcal's calibrated probabilities score the same as ours
    netcal_nll = float(-np.log(ts.transform(torch.softmax(z, dim=1).numpy())[np.arange(len(y)), y.numpy()]).mean())
    assert fit.nll_after == pytest.approx(netcal_nll, rel=1e-3)


def test_shift_invariance_and_scale_equivariance() -> None:
    # softmax(z / T) ignores a per-row shift of z, and scaling z by c scales the optimum T by c.
    z, y = _sample(seed=8, n=5000, k=10, t_true=1.7)
    base = fit_temperature(z, y).temperature
    shifted = z + torch.randn(5000, 1, dtype=torch.float64) * 100
    assert fit_temperature(shifted, y).temperature == pytest.approx(base, rel=1e-8)
    assert fit_temperature(z * 3.0, y).temperature == pytest.approx(3.0 * base, rel=1e-8)


def test_numpy_torch_and_float32_inputs() -> None:
    z, y = _sample(seed=9, n=2000, k=10, t_true=1.3)
    z32 = z.float()
    from_torch = fit_temperature(z32, y).temperature
    assert fit_temperature(z32.numpy(), y.numpy()).temperature == from_torch
    assert fit_temperature(z32.tolist(), y.tolist()).temperature == pytest.approx(from_torch, rel=1e-12)
    # float32 rounding of the logits moves the optimum only at float32 precision
    assert fit_temperature(z, y).temperature == pytest.approx(from_torch, rel=1e-5)


def test_search_range_not_containing_one() -> None:
    # T = 1 outside [min, max]: the solver starts mid-range and still reports NLL(T=1).
    z, y = _sample(seed=10, n=3000, k=10, t_true=4.0)
    fit = fit_temperature(z, y, min_temperature=2.0, max_temperature=10.0)
    assert fit.temperature == pytest.approx(_reference_temperature(z.numpy(), y.numpy()), rel=1e-3)
    assert fit.nll_before == pytest.approx(negative_log_likelihood(z, y), rel=1e-12)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_separable_data_hits_lower_bound() -> None:
    g = torch.Generator().manual_seed(12)
    z = torch.randn(1000, 10, generator=g, dtype=torch.float64)
    y = z.argmax(dim=1)
    z[torch.arange(1000), y] += 50.0  # every prediction correct with a huge margin
    with pytest.raises(CalibrationError, match=r"T -> 0\.05.*lower end.*calibration\.min_temperature"):
        fit_temperature(z, y)


def test_separable_data_with_moderate_margin_hits_lower_bound() -> None:
    # Margin 5: softmax is not saturated at T = 1, so the solver really walks down to the bound.
    g = torch.Generator().manual_seed(13)
    z = torch.randn(1000, 10, generator=g, dtype=torch.float64)
    y = z.argmax(dim=1)
    z[torch.arange(1000), y] += 5.0
    with pytest.raises(CalibrationError, match="calibration.min_temperature"):
        fit_temperature(z, y)


def test_uninformative_logits_hit_upper_bound() -> None:
    g = torch.Generator().manual_seed(14)
    z = torch.randn(5000, 10, generator=g, dtype=torch.float64)
    y = (z.argmin(dim=1) + 0) % 10  # labels anti-correlated with the logits
    with pytest.raises(CalibrationError, match=r"T -> 20.*upper end.*calibration\.max_temperature"):
        fit_temperature(z, y)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_logits_raise(bad: float) -> None:
    z, y = _sample(seed=15, n=100, k=5, t_true=1.0)
    z[3, 2] = bad
    with pytest.raises(CalibrationError, match="NaN or infinite"):
        fit_temperature(z, y)


@pytest.mark.parametrize(
    ("logits", "labels", "match"),
    [
        (np.zeros((10, 3)), np.zeros(9, dtype=int), "does not match"),
        (np.zeros(10), np.zeros(10, dtype=int), "2-D"),
        (np.zeros((0, 3)), np.zeros(0, dtype=int), "empty"),
        (np.random.default_rng(0).normal(size=(10, 3)), np.full(10, 3), r"\[0, 3\)"),
        (np.random.default_rng(0).normal(size=(10, 3)), np.full(10, -1), r"\[0, 3\)"),
        (np.random.default_rng(0).normal(size=(10, 3)), np.zeros(10), "integer"),
        (np.random.default_rng(0).normal(size=(10, 1)), np.zeros(10, dtype=int), "at least 2 classes"),
        (np.ones((10, 3)), np.zeros(10, dtype=int), "constant"),
    ],
)
def test_bad_inputs_raise(logits, labels, match) -> None:
    with pytest.raises(CalibrationError, match=match):
        fit_temperature(logits, labels)


@pytest.mark.parametrize(("lo", "hi"), [(2.0, 1.0), (0.0, 5.0), (0.1, float("inf"))])
def test_bad_search_range_raises(lo: float, hi: float) -> None:
    z, y = _sample(seed=16, n=100, k=5, t_true=1.0)
    with pytest.raises(CalibrationError, match="min_temperature"):
        fit_temperature(z, y, min_temperature=lo, max_temperature=hi)


def test_optimum_just_inside_a_bound_is_an_error() -> None:
    # Place the search range so the optimum sits within 1e-6 (log T) of max_temperature.
    z, y = _sample(seed=17, n=3000, k=10, t_true=1.5)
    t_star = fit_temperature(z, y).temperature
    with pytest.raises(CalibrationError, match="upper end"):
        fit_temperature(z, y, min_temperature=0.05, max_temperature=t_star * (1 + 5e-7))
    with pytest.raises(CalibrationError, match="lower end"):
        fit_temperature(z, y, min_temperature=t_star * (1 - 5e-7), max_temperature=20.0)


def test_non_convergence_raises() -> None:
    z, y = _sample(seed=18, n=3000, k=10, t_true=2.5)
    with pytest.raises(CalibrationError, match="did not converge"):
        fit_temperature(z, y, max_iter=1)


def test_fit_that_does_not_lower_nll_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # Demand an NLL drop larger than the model can give: the guard must reject the fit.
    z, y = _sample(seed=19, n=3000, k=10, t_true=1.5)
    fit = fit_temperature(z, y)
    monkeypatch.setattr(C, "NLL_SLACK", -(fit.nll_before - fit.nll_after) - 1e-6)
    with pytest.raises(CalibrationError, match=r"> NLL\(T=1\)"):
        fit_temperature(z, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    z, y = _sample(seed=20, n=5000, k=10, t_true=1.5)
    assert fit_temperature(z.cuda(), y.cuda()).temperature == pytest.approx(fit_temperature(z, y).temperature, rel=1e-9)
