"""Tests for calibflow.calibrators: every method improves over-confident logits, richer maps recover
class-dependent miscalibration, state round-trips exactly, cross-validated selection picks sensibly,
and Platt / beta / isotonic agree with scikit-learn and netcal."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from calibflow import calibrators as CB
from calibflow.calibrators.temperature import fit_temperature
from calibflow.errors import CalibrationError
from calibflow.metrics import expected_calibration_error, probability_nll


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Run these small fits (<= 10^5 logits) on one intra-op thread.

    At this size torch/BLAS threads only add synchronisation, and on a shared, oversubscribed CI
    machine every parallel region can wait a scheduler tick for a descheduled sibling thread:
    measured on the 2-core CI box at load 5, one matrix-scaling fit took 6 s with 2 threads and
    0.05 s with 1. The results are the same float64 computations (up to summation order).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _overconfident(seed: int, n: int, k: int, factor: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels drawn from softmax(z_true); the model reports 3 * z_true: a pure global temperature (T = 3)."""
    g = torch.Generator().manual_seed(seed)
    z_true = torch.randn(n, k, generator=g, dtype=torch.float64) * 1.5
    y = torch.multinomial(torch.softmax(z_true, dim=1), 1, generator=g).squeeze(1)
    return z_true * factor, y


def _class_dependent_truth(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class scale and bias: classes range from 3x over-confident to 2x under-confident."""
    g = torch.Generator().manual_seed(1234)
    w = torch.linspace(1.0 / 3.0, 2.0, k, dtype=torch.float64)[torch.randperm(k, generator=g)]
    b = torch.linspace(-1.0, 1.0, k, dtype=torch.float64)
    return w, b - b.mean()


def _class_dependent(seed: int, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reported logits z with w * z + b = z_true (labels ~ softmax(z_true)): vector scaling is exact."""
    w, b = _class_dependent_truth(k)
    g = torch.Generator().manual_seed(seed)
    z_true = torch.randn(n, k, generator=g, dtype=torch.float64) * 1.5
    y = torch.multinomial(torch.softmax(z_true, dim=1), 1, generator=g).squeeze(1)
    return (z_true - b) / w, y


def _nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return probability_nll(probs, labels, eps=CB.CV_NLL_EPS)


# --------------------------------------------------------------------------------------------
# Every method
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 10])
def test_every_method_lowers_nll_and_ece_on_overconfident_logits(k: int) -> None:
    z_cal, y_cal = _overconfident(seed=0, n=6000, k=k)
    z_test, y_test = _overconfident(seed=1, n=6000, k=k)
    raw = torch.softmax(z_test, dim=1)
    raw_nll, raw_ece = _nll(raw, y_test), expected_calibration_error(raw, y_test)
    for method in CB.default_methods(k):
        q = CB.fit_calibrator(method, z_cal, y_cal).transform(z_test)
        # raw NLL is ~0.67 (K=2) / ~2.5 (K=10) against ~0.45 / ~1.6 after calibration
        assert _nll(q, y_test) < raw_nll - 0.1, method
        assert expected_calibration_error(q, y_test) < 0.5 * raw_ece, method


@pytest.mark.parametrize("k", [2, 4])
def test_probabilities_are_finite_nonnegative_float64_rows_summing_to_one(k: int) -> None:
    z_cal, y_cal = _overconfident(seed=2, n=1500, k=k)
    z_test, _ = _overconfident(seed=3, n=500, k=k)
    # extreme rows: saturated softmax in float64, and float32 input
    z_test = torch.cat([z_test, torch.tensor([[800.0] + [-800.0] * (k - 1), [-800.0] * (k - 1) + [800.0]])])
    for method in CB.default_methods(k):
        cal = CB.fit_calibrator(method, z_cal, y_cal)
        for logits in (z_test, z_test.float(), z_test.numpy()):
            q = cal.transform(logits)
            assert q.dtype == torch.float64 and q.shape == (z_test.shape[0], k), method
            assert bool(torch.isfinite(q).all()) and bool((q >= 0).all()), method
            torch.testing.assert_close(q.sum(dim=1), torch.ones(q.shape[0], dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [2, 4])
def test_state_round_trip_gives_identical_probabilities(k: int) -> None:
    z_cal, y_cal = _class_dependent(seed=4, n=1500, k=k)
    z_test, _ = _class_dependent(seed=5, n=400, k=k)
    for method in CB.default_methods(k):
        cal = CB.fit_calibrator(method, z_cal, y_cal)
        text = json.dumps(cal.to_state(), allow_nan=False)  # strict JSON: no NaN/inf
        state = json.loads(text)
        assert state["method"] == method and state["n_classes"] == k and state["version"] == CB.STATE_VERSION
        _assert_plain_json(state)
        restored = CB.calibrator_from_state(state)
        assert type(restored) is type(cal)
        assert torch.equal(restored.transform(z_test), cal.transform(z_test)), method


def _assert_plain_json(value: object) -> None:
    if isinstance(value, dict):
        assert all(isinstance(key, str) for key in value)
        for item in value.values():
            _assert_plain_json(item)
    elif isinstance(value, list):
        for item in value:
            _assert_plain_json(item)
    else:
        assert type(value) in (str, int, float), type(value)


# --------------------------------------------------------------------------------------------
# Parametric maps
# --------------------------------------------------------------------------------------------


def test_temperature_wraps_fit_temperature_exactly() -> None:
    z, y = _overconfident(seed=6, n=3000, k=10)
    cal = CB.fit_calibrator("temperature", z, y)
    fit = fit_temperature(z, y)
    assert cal.temperature == fit.temperature and cal.fit_result == fit
    assert torch.equal(cal.transform(z), torch.softmax(z / fit.temperature, dim=1))
    # same errors, same messages
    g = torch.Generator().manual_seed(7)
    sep = torch.randn(500, 5, generator=g, dtype=torch.float64)
    y_sep = sep.argmax(dim=1)
    sep[torch.arange(500), y_sep] += 50.0
    with pytest.raises(CalibrationError) as ours:
        CB.fit_calibrator("temperature", sep, y_sep)
    with pytest.raises(CalibrationError) as theirs:
        fit_temperature(sep, y_sep)
    assert str(ours.value) == str(theirs.value)
    with pytest.raises(CalibrationError, match="empty"):
        CB.fit_calibrator("vector", np.zeros((0, 3)), np.zeros(0, dtype=int))


def test_vector_and_matrix_recover_class_dependent_miscalibration() -> None:
    k = 6
    z_cal, y_cal = _class_dependent(seed=8, n=10_000, k=k)
    z_test, y_test = _class_dependent(seed=9, n=10_000, k=k)
    nll = {
        m: _nll(CB.fit_calibrator(m, z_cal, y_cal).transform(z_test), y_test)
        for m in ("temperature", "vector", "matrix")
    }
    # one global T cannot undo per-class scales between 1/3 and 2: vector and matrix do clearly better
    assert nll["vector"] < nll["temperature"] - 0.03, nll
    assert nll["matrix"] < nll["temperature"] - 0.03, nll
    # and vector scaling recovers the generating map (biases up to the softmax-invariant shift)
    w_true, b_true = _class_dependent_truth(k)
    vec = CB.fit_calibrator("vector", z_cal, y_cal)
    np.testing.assert_allclose(vec.weights.numpy(), w_true.numpy(), rtol=0.1)
    np.testing.assert_allclose(vec.biases.numpy(), b_true.numpy(), atol=0.1)


def test_vector_and_matrix_never_end_above_temperature_on_the_calibration_split() -> None:
    # Both start from the fitted temperature, a member of their families (ODIR leaves the diagonal free).
    z, y = _overconfident(seed=10, n=2000, k=5)
    base = fit_temperature(z, y).nll_after
    for method in ("vector", "matrix"):
        q = CB.fit_calibrator(method, z, y).transform(z)
        assert _nll(q, y) <= base + 1e-12, method


def test_matrix_recovers_cross_class_mixing_and_regularisation_shrinks_it() -> None:
    # Truth: z_true = M z with off-diagonal mixing, which no diagonal map can represent.
    k = 4
    g = torch.Generator().manual_seed(11)
    mixing = torch.eye(k, dtype=torch.float64) + 0.5 * (torch.rand(k, k, generator=g, dtype=torch.float64) - 0.5)
    z = torch.randn(4000, k, generator=g, dtype=torch.float64) * 1.5
    y = torch.multinomial(torch.softmax(z @ mixing.T, dim=1), 1, generator=g).squeeze(1)
    off = 1.0 - torch.eye(k, dtype=torch.float64)

    def off_diagonal_spread(w: torch.Tensor) -> float:
        # W is identified only up to adding a vector to every row; the within-column spread of the
        # off-diagonal entries is what the probabilities (and the ODIR penalty) see.
        centred = (w - (w * off).sum(0, keepdim=True) / (k - 1)) * off
        return float(centred.abs().sum())

    weak = CB.fit_calibrator("matrix", z, y, regularisation=1e-4)
    strong = CB.fit_calibrator("matrix", z, y, regularisation=10.0)
    assert off_diagonal_spread(weak.weights) == pytest.approx(off_diagonal_spread(mixing), rel=0.3)
    assert off_diagonal_spread(strong.weights) < 0.2 * off_diagonal_spread(weak.weights)
    assert CB.calibrator_from_state(strong.to_state()).regularisation == 10.0


class _BinaryPassThrough:
    """A fitted scikit-learn binary classifier whose decision_function is our logit margin."""

    @staticmethod
    def make():
        from sklearn.base import BaseEstimator, ClassifierMixin

        class PassThrough(ClassifierMixin, BaseEstimator):
            def fit(self, X, y):
                self.classes_ = np.arange(2)
                return self

            def decision_function(self, X):
                X = np.asarray(X, dtype=np.float64)
                return X[:, 1] - X[:, 0]

            def predict(self, X):
                return np.asarray(X).argmax(axis=1)

        return PassThrough


def _binary_case(seed: int, n: int = 3000) -> tuple[torch.Tensor, torch.Tensor]:
    # over-confident and shifted: both the slope and the intercept have work to do
    z, y = _overconfident(seed, n, 2)
    return z + torch.tensor([0.0, 0.7], dtype=torch.float64), y


def test_platt_matches_sklearn_sigmoid_calibration() -> None:
    # scikit-learn's CalibratedClassifierCV(method="sigmoid") minimises the same objective (cross-
    # entropy against Platt's smoothed targets) with L-BFGS-B at gtol 1e-6 on the *summed* loss.
    # Both solutions sit within ~1e-9 of the unique optimum of a strictly convex 2-parameter
    # problem, so 1e-6 relative on the parameters and 1e-7 on probabilities leave a wide margin
    # (observed: ~1e-8) while still catching any difference in the objective or the targets.
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.frozen import FrozenEstimator

    PassThrough = _BinaryPassThrough.make()
    for seed in (12, 13):
        z, y = _binary_case(seed)
        ours = CB.fit_calibrator("platt", z, y)
        clf = PassThrough().fit(z.numpy(), y.numpy())
        peer = CalibratedClassifierCV(FrozenEstimator(clf), method="sigmoid").fit(z.numpy(), y.numpy())
        (sig,) = peer.calibrated_classifiers_[0].calibrators
        # scikit-learn stores P(y=1) = 1 / (1 + exp(a f + b)): the opposite sign convention
        assert ours.slope == pytest.approx(-sig.a_, rel=1e-6)
        assert ours.intercept == pytest.approx(-sig.b_, rel=1e-6)
        np.testing.assert_allclose(ours.transform(z)[:, 1].numpy(), peer.predict_proba(z.numpy())[:, 1], atol=1e-7)


def test_platt_without_smoothing_is_logistic_regression() -> None:
    from sklearn.linear_model import LogisticRegression

    z, y = _binary_case(14)
    ours = CB.fit_calibrator("platt", z, y, smooth_targets=False)
    margin = (z[:, 1] - z[:, 0]).numpy()[:, None]
    lr = LogisticRegression(penalty=None, tol=1e-12, max_iter=10_000).fit(margin, y.numpy())
    assert ours.slope == pytest.approx(float(lr.coef_[0, 0]), rel=1e-6)
    assert ours.intercept == pytest.approx(float(lr.intercept_[0]), rel=1e-6)


def _beta_features(z: torch.Tensor) -> np.ndarray:
    p = torch.softmax(z, dim=1)[:, 1].numpy()
    return np.stack([np.log(p), -np.log1p(-p)], axis=1)


def test_beta_matches_logistic_regression_and_netcal() -> None:
    from netcal.scaling import BetaCalibration
    from sklearn.linear_model import LogisticRegression

    z, y = _binary_case(15)
    ours = CB.fit_calibrator("beta", z, y)
    # unconstrained optimum already has a, b > 0 here: plain maximum-likelihood logistic regression
    lr = LogisticRegression(penalty=None, tol=1e-12, max_iter=10_000).fit(_beta_features(z), y.numpy())
    np.testing.assert_allclose([ours.a, ours.b], lr.coef_[0], rtol=1e-6)
    assert ours.c == pytest.approx(float(lr.intercept_[0]), rel=1e-6)
    # netcal 1.4 fits the same model from p = softmax(z)_1 with numerically differentiated
    # L-BFGS-B at scipy's default tolerances: its parameters are good to ~1e-5, so 1e-4 on the
    # probabilities (observed ~3e-6).
    p1 = torch.softmax(z, dim=1)[:, 1].numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer = BetaCalibration(method="mle")
        peer.fit(p1, y.numpy())
        peer_q = np.asarray(peer.transform(p1), dtype=np.float64).reshape(-1)
    np.testing.assert_allclose(ours.transform(z)[:, 1].numpy(), peer_q, atol=1e-4)


def test_beta_constrains_a_and_b_to_be_nonnegative() -> None:
    # Labels generated with a = -0.8 < 0 (a non-monotone map): the paper forbids it, and its recipe
    # (drop the offending feature and refit) gives a = 0 and a 1-feature logistic fit on -ln(1-p).
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(16)
    m = torch.randn(4000, generator=g, dtype=torch.float64) * 2.0
    z = torch.stack([torch.zeros_like(m), m], dim=1)
    f = _beta_features(z)
    logit = -0.8 * f[:, 0] + 1.2 * f[:, 1] - 0.3
    y = torch.as_tensor(np.random.default_rng(16).uniform(size=4000) < 1 / (1 + np.exp(-logit))).long()
    free = LogisticRegression(penalty=None, tol=1e-12, max_iter=10_000).fit(f, y.numpy())
    assert free.coef_[0, 0] < 0  # the unconstrained fit would break monotonicity
    ours = CB.fit_calibrator("beta", z, y)
    assert ours.a == 0.0 and ours.b > 0
    one = LogisticRegression(penalty=None, tol=1e-12, max_iter=10_000).fit(f[:, 1:], y.numpy())
    assert ours.b == pytest.approx(float(one.coef_[0, 0]), rel=1e-5)
    assert ours.c == pytest.approx(float(one.intercept_[0]), rel=1e-5)


def test_binary_only_methods_reject_multiclass() -> None:
    z, y = _overconfident(seed=17, n=300, k=3)
    for method in CB.BINARY_ONLY_METHODS:
        with pytest.raises(ValueError, match=r"binary tasks \(K = 2\) only.*K = 3"):
            CB.fit_calibrator(method, z, y)
        with pytest.raises(ValueError, match="binary"):
            CB.select_calibrator(z, y, methods=("temperature", method))


# --------------------------------------------------------------------------------------------
# One-vs-rest maps
# --------------------------------------------------------------------------------------------


def test_isotonic_binary_equals_sklearn_isotonic_regression() -> None:
    from sklearn.isotonic import IsotonicRegression

    z_cal, y_cal = _binary_case(18)
    z_test, _ = _binary_case(19, n=1000)
    ours = CB.fit_calibrator("isotonic", z_cal, y_cal)
    p_cal, p_test = torch.softmax(z_cal, 1)[:, 1].numpy(), torch.softmax(z_test, 1)[:, 1].numpy()
    peer = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(p_cal, y_cal.numpy())
    np.testing.assert_allclose(ours.transform(z_test)[:, 1].numpy(), peer.predict(p_test), rtol=0, atol=1e-12)


def test_histogram_binary_values_are_bin_frequencies() -> None:
    z, y = _binary_case(20, n=3000)
    cal = CB.fit_calibrator("histogram", z, y, n_bins=10)
    p1 = torch.softmax(z, 1)[:, 1].numpy()
    edges = np.asarray(cal.edges[0])
    idx = np.searchsorted(edges[1:-1], p1, side="left")
    counts = np.bincount(idx, minlength=10)
    assert counts.max() - counts.min() <= 1  # equal mass
    q1 = cal.transform(z)[:, 1].numpy()
    for b in range(10):
        members = idx == b
        np.testing.assert_allclose(q1[members], y.numpy()[members].mean(), rtol=0, atol=1e-15)


@pytest.mark.parametrize("method", ["histogram", "isotonic"])
def test_class_absent_from_calibration_labels_keeps_its_probability(method: str) -> None:
    z, y = _overconfident(seed=21, n=2000, k=4)
    keep = y != 2
    cal = CB.fit_calibrator(method, z[keep], y[keep])
    assert cal.identity_classes == [2]
    q = cal.transform(z)
    assert bool(torch.isfinite(q).all()) and bool((q >= 0).all())
    torch.testing.assert_close(q.sum(1), torch.ones(2000, dtype=torch.float64), rtol=0, atol=1e-12)
    assert bool((q[:, 2] > 0).all())  # not collapsed to 0: class 2 can still be predicted
    restored = CB.calibrator_from_state(json.loads(json.dumps(cal.to_state())))
    assert torch.equal(restored.transform(z), q)


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------


def test_auto_picks_temperature_for_a_global_temperature() -> None:
    z, y = _overconfident(seed=22, n=3000, k=5)
    chosen, rows = CB.select_calibrator(z, y, n_folds=5, seed=0)
    assert chosen == "temperature", rows
    assert [r["method"] for r in rows] == list(CB.default_methods(5))
    assert sum(r["selected"] for r in rows) == 1
    for r in rows:
        assert set(r) >= {"method", "cv_nll_mean", "cv_nll_std", "cv_ece_mean", "folds"}
        assert r["folds"] == 5 and len(r["fold_nll"]) == 5 and r["error"] == ""
    json.dumps(rows)


@pytest.mark.slow
def test_auto_picks_a_richer_map_for_class_dependent_miscalibration() -> None:
    z, y = _class_dependent(seed=23, n=3000, k=5)
    chosen, rows = CB.select_calibrator(z, y, n_folds=5, seed=0)
    assert chosen in ("vector", "matrix"), rows
    by = {r["method"]: r for r in rows}
    assert by[chosen]["cv_nll_mean"] < by["temperature"]["cv_nll_mean"] - 0.02


def test_fit_calibrator_auto_refits_the_chosen_method_on_all_data() -> None:
    z, y = _class_dependent(seed=24, n=2000, k=4)
    cal = CB.fit_calibrator("auto", z, y, n_folds=4, methods=("temperature", "vector"))
    assert cal.method == "vector" and cal.selection is not None
    direct = CB.fit_calibrator("vector", z, y)
    assert torch.equal(cal.transform(z), direct.transform(z))


def test_select_records_a_failing_method_and_picks_among_the_rest() -> None:
    # separable data: temperature hits its lower bound in every fold; histogram still works
    g = torch.Generator().manual_seed(25)
    z = torch.randn(600, 3, generator=g, dtype=torch.float64)
    y = z.argmax(dim=1)
    z[torch.arange(600), y] += 50.0
    chosen, rows = CB.select_calibrator(z, y, methods=("temperature", "histogram"), n_folds=3)
    by = {r["method"]: r for r in rows}
    assert "lower end" in by["temperature"]["error"] and by["temperature"]["cv_nll_mean"] == float("inf")
    assert chosen == "histogram"
    with pytest.raises(CalibrationError, match="every calibration method failed"):
        CB.select_calibrator(z, y, methods=("temperature",), n_folds=3)


def test_stratified_folds_partition_and_balance_classes() -> None:
    y = np.array([0] * 50 + [1] * 23 + [2] * 7)
    folds = CB.stratified_folds(y, 5, seed=1)
    assert sorted(np.concatenate(folds).tolist()) == list(range(80))
    for c, size in ((0, 50), (1, 23), (2, 7)):
        per_fold = [int((y[f] == c).sum()) for f in folds]
        assert max(per_fold) - min(per_fold) <= 1 and sum(per_fold) == size
    assert max(map(len, folds)) - min(map(len, folds)) <= 1


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_interface_errors() -> None:
    z, y = _overconfident(seed=26, n=300, k=3)
    with pytest.raises(ValueError, match="unknown calibration method"):
        CB.fit_calibrator("dirichlet", z, y)
    with pytest.raises(ValueError, match="not fitted"):
        CB.make_calibrator("vector").transform(z)
    cal = CB.fit_calibrator("vector", z, y)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        cal.transform(torch.zeros(5, 4))
    with pytest.raises(ValueError, match="NaN or infinite"):
        cal.transform(torch.full((2, 3), float("nan")))
    state = cal.to_state()
    with pytest.raises(ValueError, match="unknown method"):
        CB.calibrator_from_state({**state, "method": "dirichlet"})
    with pytest.raises(ValueError, match="malformed"):
        CB.calibrator_from_state({k: v for k, v in state.items() if k != "weights"})
    with pytest.raises(ValueError, match="newer"):
        CB.calibrator_from_state({**state, "version": CB.STATE_VERSION + 1})
    with pytest.raises(ValueError, match="'method' key"):
        CB.calibrator_from_state({"weights": []})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    z, y = _class_dependent(seed=27, n=2000, k=4)
    for method in CB.default_methods(4):
        cpu = CB.fit_calibrator(method, z, y)
        gpu = CB.fit_calibrator(method, z.cuda(), y.cuda())
        q = gpu.transform(z.cuda())
        assert q.device.type == "cuda"
        torch.testing.assert_close(q.cpu(), cpu.transform(z), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_auto_honours_the_temperature_search_range_in_its_folds_and_its_refit() -> None:
    # overconfident by 3: the optimum T is about 3, outside [0.05, 2], so temperature scaling can
    # only fail there (an optimum on the boundary); auto must search the configured range, not its own
    z, y = _overconfident(seed=3, n=2000, k=4)
    unbounded = CB.fit_calibrator("auto", z, y)
    assert not next(r for r in unbounded.selection if r["method"] == "temperature")["error"]
    bounded = CB.fit_calibrator("auto", z, y, min_temperature=0.05, max_temperature=2.0)
    temperature_row = next(r for r in bounded.selection if r["method"] == "temperature")
    assert "boundary" in temperature_row["error"] or "range" in temperature_row["error"], temperature_row["error"]
    assert bounded.method != "temperature"
    wide = CB.fit_calibrator("auto", z, y, min_temperature=0.5, max_temperature=10.0, methods=("temperature",))
    assert wide.method == "temperature" and (wide.min_temperature, wide.max_temperature) == (0.5, 10.0)
