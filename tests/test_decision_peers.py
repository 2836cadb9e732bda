"""calibflow.gates.decisions against a peer library and against known truths.

- LAC prediction sets equal crepes' (a conformal library on PyPI) on the same nonconformity
  scores ("hinge" = 1 - p_y) and alpha, ties and tiny calibration sets included;
- APS and RAPS, which crepes does not implement, equal a slow reference written here from the
  definition (Angelopoulos and Bates' non-randomized APS; RAPS adds lambda * max(0, rank - k_reg));
- the PAC threshold rules (min precision, min recall, SGR selective risk) and the test-split
  bounds are simulated on data whose P(y | score) is known, so the true precision, recall and risk
  of any threshold are exact integrals: their violation rates must not exceed delta beyond
  Monte-Carlo error (the Wilson interval's lower end must be <= delta).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import betainc

from calibflow.gates import decisions as D
from calibflow import errors

Z95 = 1.959963984540054


def wilson_low(k: int, n: int) -> float:
    p = k / n
    return ((p + Z95**2 / (2 * n)) - Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n))) / (1 + Z95**2 / n)


def dyadic_probabilities(n: int, classes: int, rng: np.random.Generator, grain: int = 64) -> np.ndarray:
    """Dirichlet-like rows in multiples of 1/grain summing to exactly 1: every cumulative sum is exact
    in float64 (so no rounding can separate two equal APS scores) and ties are frequent."""
    counts = rng.multinomial(grain, rng.dirichlet(np.full(classes, 0.5)), size=n)
    return counts / grain


# ---------------------------------------------------------------- LAC against crepes


@pytest.mark.parametrize("n_cal", [9, 10, 19, 37, 99, 100, 500])
@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2, 0.33])
@pytest.mark.parametrize("grain", [16, 0])  # 16: heavy ties; 0: continuous probabilities
def test_lac_sets_equal_crepes(n_cal, alpha, grain):
    crepes = pytest.importorskip("crepes")  # a test extra: the other tests here do not need it
    from crepes.extras import hinge

    rng = np.random.default_rng(1000 * n_cal + int(100 * alpha) + grain)
    classes, n_test = 5, 300
    if grain:
        probs = dyadic_probabilities(n_cal + n_test, classes, rng, grain)
    else:
        probs = rng.dirichlet(np.full(classes, 0.7), size=n_cal + n_test)
    labels = np.array([rng.choice(classes, p=p) for p in probs])
    cal, test = slice(0, n_cal), slice(n_cal, None)
    cal_scores = D.conformal_scores(probs[cal], labels[cal], score="lac")
    np.testing.assert_allclose(cal_scores, hinge(probs[cal], np.arange(classes), labels[cal]), rtol=0, atol=1e-15)

    peer = crepes.ConformalClassifier().fit(hinge(probs[cal], np.arange(classes), labels[cal]))
    p_values = peer.predict_p(hinge(probs[test]), smoothing=False)  # (#{cal >= s} + 1) / (n + 1)
    if (n_cal + 1) * alpha < 1:  # even the largest calibration score is too small a quantile
        with pytest.raises(errors.DecisionInfeasible):
            D.conformal_quantile(cal_scores, alpha)
        assert (p_values > alpha).all()  # the peer's sets are then every label
        return
    ours = D.prediction_sets(probs[test], D.conformal_quantile(cal_scores, alpha), score="lac")
    assert ours.shape == (n_test, classes) and ours.dtype == bool
    # split conformal (Vovk; Angelopoulos and Bates): keep a label iff its p-value exceeds alpha
    np.testing.assert_array_equal(ours, p_values > alpha)
    theirs = peer.predict_set(hinge(probs[test]), confidence=1 - alpha, smoothing=False).astype(bool)
    if abs((n_cal + 1) * alpha - round((n_cal + 1) * alpha)) > 1e-9:
        np.testing.assert_array_equal(ours, theirs)
    else:
        # crepes keeps p >= 1 - confidence: when (n + 1) alpha is an integer it keeps one more
        # order statistic than ceil((n + 1)(1 - alpha)), a slightly larger (still valid) set
        assert (theirs >= ours).all()


def test_lac_sets_equal_crepes_where_n_plus_one_times_alpha_is_whole():
    """(n + 1)(1 - alpha) is a whole number for decimal alphas at many n, and floating point can
    land a hair above it (150 * (1 - 0.18) = 123.00000000000001): ceil must not take one score too
    many. crepes' p-value (#{cal >= s} + 1) / (n + 1) compared with alpha is exact there (both sides
    round to the same double), so it is the referee."""
    from crepes import ConformalClassifier  # noqa: F401  (the peer; skip-free: it is a test extra)
    from crepes.extras import hinge

    rng = np.random.default_rng(5)
    checked = 0
    for alpha in (0.05, 0.1, 0.15, 0.18, 0.2, 0.3, 0.35, 0.45):
        for n_cal in range(19, 400):
            whole = (n_cal + 1) * alpha
            if abs(whole - round(whole)) > 1e-9 or checked > 400:
                continue
            checked += 1
            probs = rng.dirichlet(np.ones(4), size=n_cal + 50)
            labels = rng.integers(0, 4, n_cal + 50)
            cal_scores = hinge(probs[:n_cal], np.arange(4), labels[:n_cal])
            p_values = ConformalClassifier().fit(cal_scores).predict_p(hinge(probs[n_cal:]), smoothing=False)
            qhat = D.conformal_quantile(D.conformal_scores(probs[:n_cal], labels[:n_cal], score="lac"), alpha)
            ours = D.prediction_sets(probs[n_cal:], qhat, score="lac")
            assert np.array_equal(ours, p_values > alpha), (n_cal, alpha)
    assert checked > 50


def test_conformal_quantile_is_the_ceil_order_statistic_and_refuses_tiny_n():
    scores = np.array([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6])  # n = 9
    assert D.conformal_quantile(scores, 0.1) == 0.9  # ceil(10 * 0.9) = 9th smallest
    assert D.conformal_quantile(scores, 0.2) == 0.8  # ceil(10 * 0.8) = 8th
    assert D.conformal_quantile(scores, 0.25) == 0.8  # ceil(7.5) = 8th
    assert D.conformal_quantile(scores, 0.5) == 0.5  # 5th
    with pytest.raises(errors.DecisionInfeasible):
        D.conformal_quantile(scores[:8], 0.1)  # ceil(9 * 0.9) = 9 > 8


# ---------------------------------------------------------------- APS / RAPS against the definition


def reference_scores(probs: np.ndarray, score: str, lam: float, k_reg: int) -> np.ndarray:
    """Nonconformity of every label, by the definition, one row and one label at a time."""
    n, classes = probs.shape
    out = np.empty((n, classes))
    for i in range(n):
        order = sorted(range(classes), key=lambda k: (-probs[i, k], k))  # ties by class index
        for rank, k in enumerate(order, start=1):
            if score == "lac":
                out[i, k] = 1.0 - probs[i, k]
                continue
            aps = sum(probs[i, j] for j in order[:rank])
            out[i, k] = aps + (lam * max(0, rank - k_reg) if score == "raps" else 0.0)
    return out


@pytest.mark.parametrize(
    "score, lam, k_reg", [("aps", 0.0, 1), ("raps", 0.01, 1), ("raps", 0.1, 2), ("raps", 0.25, 0), ("lac", 0.0, 1)]
)
@pytest.mark.parametrize("n_cal, alpha", [(10, 0.1), (50, 0.2), (400, 0.1)])
def test_aps_raps_scores_and_sets_match_the_definition(score, lam, k_reg, n_cal, alpha):
    rng = np.random.default_rng(n_cal + 7 * k_reg)
    classes = 6
    probs = dyadic_probabilities(n_cal + 200, classes, rng, grain=32)
    probs[:5] = np.array([1, 1, 1, 1, 2, 2]) / 8  # exact ties: the class index breaks them
    labels = np.array([rng.choice(classes, p=p) for p in probs])
    ref = reference_scores(probs, score, lam, k_reg)
    kwargs = {} if score == "lac" else dict(raps_lambda=lam, raps_k_reg=k_reg)
    ours = D.conformal_scores(probs, labels, score=score, **kwargs)
    np.testing.assert_allclose(ours, ref[np.arange(len(labels)), labels], rtol=0, atol=1e-12)

    cal, test = slice(0, n_cal), slice(n_cal, None)
    ref_cal = np.sort(ref[cal][np.arange(n_cal), labels[cal]])
    k = math.ceil((n_cal + 1) * (1 - alpha))
    qhat = D.conformal_quantile(ours[cal], alpha)
    assert qhat == pytest.approx(ref_cal[k - 1], abs=1e-12)
    sets = D.prediction_sets(probs[test], qhat, score=score, **kwargs)
    # dyadic probabilities make every APS sum exact; RAPS adds lam * integer, exact up to one ulp,
    # so labels within 1e-9 of qhat are the only ones a rounding could flip
    clear = np.abs(ref[test] - qhat) > 1e-9
    np.testing.assert_array_equal(sets[clear], (ref[test] <= qhat)[clear])
    if score != "raps":
        np.testing.assert_array_equal(sets, ref[test] <= qhat)


def test_aps_set_is_the_greedy_prefix_and_contains_the_top_label():
    probs = np.array([[0.5, 0.25, 0.125, 0.125], [0.25, 0.25, 0.25, 0.25]])
    sets = D.prediction_sets(probs, 0.75, score="aps")
    # row 0: cumulative 0.5, 0.75, 0.875, 1.0 -> the first two; row 1 (ties by index): 0.25 .. 1.0
    np.testing.assert_array_equal(sets, [[True, True, False, False], [True, True, True, False]])


# ---------------------------------------------------------------- known-truth simulations

# Binary: the calibrated score s ~ Beta(A, B) and Y | s ~ Bernoulli(s). With F_{a,b} the Beta cdf,
#   P(s >= t) = 1 - F_{A,B}(t),   E[s; s >= t] = A/(A+B) (1 - F_{A+1,B}(t)),
# so precision(t) = E[s; s >= t] / P(s >= t) and recall(t) = 1 - F_{A+1,B}(t), exactly.
A, B = 2.0, 2.0


def true_precision(t: float) -> float:
    tail = 1.0 - betainc(A, B, t)
    return (A / (A + B)) * (1.0 - betainc(A + 1, B, t)) / tail if tail > 0 else 1.0


def true_recall(t: float) -> float:
    return 1.0 - betainc(A + 1, B, t)


def binary_sample(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    s = rng.beta(A, B, n)
    return s, rng.random(n) < s


# Selective: K = 10 classes, confidence c = 0.1 + 0.9 U with U ~ Beta(AS, BS), correct | c ~
# Bernoulli(c) (calibrated). risk(t) = 1 - E[c | c >= t], again from Beta integrals.
AS, BS, K = 5.0, 1.0, 10  # risk 15% at full coverage, 10% at t ~ 0.74 (coverage ~ 80%)


def true_selective_risk(t: float) -> float:
    u = min(max((t - 1 / K) / (1 - 1 / K), 0.0), 1.0)
    tail = 1.0 - betainc(AS, BS, u)
    if tail <= 0:
        return 0.0
    mean_u = (AS / (AS + BS)) * (1.0 - betainc(AS + 1, BS, u)) / tail
    return 1.0 - (1 / K + (1 - 1 / K) * mean_u)


def selective_sample(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    c = 1 / K + (1 - 1 / K) * rng.beta(AS, BS, n)
    return c, rng.random(n) < c


TRIALS, DELTA = 400, 0.05


def simulate(draw, fit, violated, rng: np.random.Generator) -> tuple[int, int]:
    """(violations, infeasible fits) over TRIALS samples `draw(rng)` of a known truth; `fit` returns
    the chosen threshold, `violated(chosen)` reads the truth at it."""
    violations = infeasible = 0
    for _ in range(TRIALS):
        try:
            chosen = fit(*draw(rng))
        except errors.DecisionInfeasible:
            infeasible += 1
            continue
        violations += bool(violated(chosen))
    return violations, infeasible


@pytest.mark.parametrize("n, most_infeasible", [(300, 0.9), (1000, 0.5)])
def test_min_precision_threshold_keeps_its_guarantee_on_a_known_truth(n, most_infeasible):
    def fit(s, y):
        chosen = D.min_precision_threshold(s, y, 0.75, DELTA)
        assert chosen.rule == "min_precision" and chosen.delta == DELTA
        return chosen

    violations, infeasible = simulate(
        lambda rng: binary_sample(n, rng),
        fit,
        lambda chosen: true_precision(chosen.threshold) < 0.75,
        np.random.default_rng(n),
    )
    # precision(t) = 0.75 at t ~ 0.61 (a third of the scores above it): a rule that never finds it
    # is useless; on 300 images a union bound over thresholds leaves it feasible on a minority only
    assert infeasible < most_infeasible * TRIALS, infeasible
    assert wilson_low(violations, TRIALS) <= DELTA, (violations, TRIALS)


@pytest.mark.parametrize("n", [150, 1000])
def test_min_recall_threshold_keeps_its_guarantee_on_a_known_truth(n):
    rng = np.random.default_rng(10 + n)
    violations = 0
    thresholds = []
    for _ in range(TRIALS):
        s, y = binary_sample(n, rng)
        chosen = D.min_recall_threshold(s, y, 0.9, DELTA)
        thresholds.append(chosen.threshold)
        violations += true_recall(chosen.threshold) < 0.9
    assert wilson_low(violations, TRIALS) <= DELTA, (violations, TRIALS)
    assert np.mean(thresholds) > 0.05  # not the trivial "everything is positive" answer


@pytest.mark.parametrize("n", [300, 2000])
def test_selective_threshold_keeps_its_guarantee_on_a_known_truth(n):
    def fit(c, correct):
        chosen = D.selective_threshold(c, correct, 0.1, DELTA)
        assert chosen.rule == "max_risk" and chosen.calibration_bound <= 0.1 + 1e-12
        return chosen

    violations, infeasible = simulate(
        lambda rng: selective_sample(n, rng),
        fit,
        lambda chosen: true_selective_risk(chosen.threshold) > 0.1,
        np.random.default_rng(20 + n),
    )
    assert infeasible < TRIALS / 2
    assert wilson_low(violations, TRIALS) <= DELTA, (violations, TRIALS)


def test_test_split_bounds_miss_at_most_five_percent_on_a_known_truth():
    """The gates' one-sided 95% bounds at a fixed threshold, on fresh test samples."""
    rng = np.random.default_rng(7)
    t, t_sel = 0.6, 0.7
    misses = {"precision": 0, "recall": 0, "risk": 0}
    for _ in range(TRIALS):
        s, y = binary_sample(300, rng)
        r = D.precision_recall_at(s, y, t, 0.95)
        pred = s >= t
        assert r["precision"] == pytest.approx((pred & y).sum() / pred.sum())
        assert r["recall"] == pytest.approx((pred & y).sum() / y.sum())
        misses["precision"] += r["precision_lower"] > true_precision(t)
        misses["recall"] += r["recall_lower"] > true_recall(t)
        c, correct = selective_sample(300, rng)
        q = D.selective_risk_at(c, correct, t_sel, 0.95)
        assert q["coverage"] == pytest.approx(np.mean(c >= t_sel))
        misses["risk"] += q["risk_upper"] < true_selective_risk(t_sel)
    for what, k in misses.items():
        assert wilson_low(k, TRIALS) <= 0.05, (what, k)
    # and the bounds are not vacuous: precision(0.6) ~ 0.77, the lower bound should be near it
    assert true_precision(t) - r["precision_lower"] < 0.15


def test_aps_sets_cover_a_known_truth_marginally():
    """P(y | x) known exactly: each set's true coverage is the sum of the true probabilities of
    its labels, so the marginal coverage over calibration draws has no test noise at all."""
    rng = np.random.default_rng(3)
    classes, n_cal, trials = 8, 100, 300
    coverages = []
    for _ in range(trials):
        probs = rng.dirichlet(np.full(classes, 0.4), size=n_cal + 400)
        labels = (rng.random(len(probs))[:, None] > np.cumsum(probs, axis=1)).sum(axis=1)
        labels = np.minimum(labels, classes - 1)
        qhat = D.conformal_quantile(D.conformal_scores(probs[:n_cal], labels[:n_cal], score="aps"), 0.1)
        sets = D.prediction_sets(probs[n_cal:], qhat, score="aps")
        coverages.append(float((sets * probs[n_cal:]).sum(axis=1).mean()))
    coverages = np.array(coverages)
    mean, half = coverages.mean(), Z95 * coverages.std(ddof=1) / math.sqrt(trials)
    assert mean + half >= 0.9, (mean, half)  # marginal validity: E[coverage] >= 1 - alpha
    assert mean < 0.9 + 1 / (n_cal + 1) + 0.02  # and not much more (ties are rare here)
