"""The gate bounds against slow references, and their coverage by simulation against known truth."""

import itertools
import math

import numpy as np
import pytest
from scipy import optimize, stats

from calibflow.gates import statistics as gs
from calibflow.metrics import expected_calibration_error


def spread_binary(n, gap, rng):
    conf = 0.5 + 0.5 * rng.beta(5.0, 2.0, n)
    return conf, rng.random(n) < conf - gap


# ------------------------------------------------------------------ accuracy


@pytest.mark.parametrize("k,n", [(0, 20), (3, 200), (190, 200), (200, 200), (9_400, 10_000)])
def test_accuracy_lower_bound_is_the_exact_clopper_pearson_bound(k, n):
    correct = np.zeros(n, bool)
    correct[:k] = True
    reference = stats.binomtest(k, n).proportion_ci(confidence_level=0.90, method="exact").low  # one-sided 95%
    bound = gs.accuracy_lower_bound(correct, 0.95)
    assert bound.estimate == k / n
    assert bound.bound == pytest.approx(reference, abs=1e-12)


# ------------------------------------------------------------------ paired accuracy drop


@pytest.mark.parametrize(
    "n10,n01,n,delta",
    [
        (5, 2, 200, 0.01),
        (0, 0, 200, 0.01),
        (0, 7, 300, 0.02),
        (40, 35, 1000, -0.01),
        (3, 0, 50, 0.1),
        (0, 4, 100, -0.02),
    ],
)
def test_null_cell_probability_is_the_constrained_maximum_likelihood(n10, n01, n, delta):
    n00 = n - n10 - n01

    def negative_loglik(q):
        cells = [(n10, q + delta), (n01, q), (n00, 1 - 2 * q - delta)]
        return -sum(c * math.log(p) for c, p in cells if c) if all(p > 0 for c, p in cells if c) else math.inf

    lo, hi = max(0.0, -delta), (1 - delta) / 2
    reference = optimize.minimize_scalar(
        negative_loglik, bounds=(lo + 1e-12, hi - 1e-12), method="bounded", options={"xatol": 1e-12}
    ).x
    q = gs._paired_null_p01(n10, n01, n, delta)
    assert negative_loglik(q) <= negative_loglik(reference) + 1e-7
    assert q == pytest.approx(reference, abs=1e-5)


def test_accuracy_drop_bound_is_the_first_delta_the_score_test_rejects():
    rng = np.random.default_rng(0)
    champion = rng.random(400) < 0.9
    candidate = champion.copy()
    candidate[rng.choice(400, 12, replace=False)] ^= True
    bound = gs.accuracy_drop_upper_bound(champion, candidate, 0.95)
    n10, n01 = int(np.sum(champion & ~candidate)), int(np.sum(~champion & candidate))
    assert bound.estimate == (n10 - n01) / 400

    def score_passes(delta):  # the test written out once more, slowly
        q = gs._paired_null_p01(n10, n01, 400, delta)
        return delta - bound.estimate - 0.5 / 400 >= 1.6448536 * math.sqrt((2 * q + delta - delta**2) / 400)

    grid = np.arange(bound.estimate, 0.3, 1e-5)
    first = grid[np.argmax([score_passes(d) for d in grid])]
    assert bound.bound == pytest.approx(first, abs=2e-5)


def test_no_discordant_pairs_is_not_certainty():
    # 200 images, both models right or wrong together: a bootstrap's interval is [0, 0]; the true
    # drop could still be 0.01 (P(no one-way discordant pair | 0.01) = 0.99^200 = 13%).
    same = np.random.default_rng(1).random(200) < 0.9
    bound = gs.accuracy_drop_upper_bound(same, same, 0.95)
    assert bound.estimate == 0.0 and bound.bound > 0.01
    assert gs.accuracy_drop_upper_bound(np.ones(2000, bool), np.ones(2000, bool), 0.95).bound < 0.01


@pytest.mark.parametrize("base", [0.0, 0.05])
def test_accuracy_drop_on_the_tolerance_passes_at_most_five_percent(base):
    rng, n, tolerance, trials = np.random.default_rng(2), 200, 0.01, 2000
    passes = 0
    for _ in range(trials):
        u = rng.random(n)
        champion = rng.random(n) < 0.9
        candidate = champion.copy()
        champion_only, candidate_only = u < base + tolerance, (u >= base + tolerance) & (u < 2 * base + tolerance)
        champion[champion_only], candidate[champion_only] = True, False
        champion[candidate_only], candidate[candidate_only] = False, True
        passes += gs.accuracy_drop_upper_bound(champion, candidate, 0.95).bound <= tolerance
    assert passes / trials <= 0.05 + 1.96 * math.sqrt(0.05 * 0.95 / trials)


# ------------------------------------------------------------------ betting bound of a bounded mean


def wilson_low(misses, trials, z=1.959964):
    """Lower end of the 95% Wilson interval of a rate: a miss rate is significantly above 5% only
    when this is."""
    p = misses / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    return centre - z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)


@pytest.mark.parametrize(
    "law",
    ["rare large", "two point", "uniform"],
)
def test_betting_bound_covers_every_bounded_law(law):
    # The laws where a studentized bound under-covers (rare large values) and plain ones: misses of
    # the true mean stay at most 5% (Wilson interval's lower end below 5%).
    rng, trials, n, misses = np.random.default_rng(31), 1500, 300, 0
    truth = {"rare large": 0.02, "two point": 0.0, "uniform": 0.0}[law]
    for _ in range(trials):
        if law == "rare large":
            x = np.where(rng.random(n) < 0.01, 2.0, 0.0)
        elif law == "two point":
            x = rng.choice([-1.0, 1.0], n)
        else:
            x = rng.uniform(-1, 1, n)
        misses += gs.betting_upper_bound(x, 0.95, low=-2.0, high=2.0) < truth
    assert wilson_low(misses, trials) <= 0.05, misses / trials


def test_betting_bound_of_zeros_is_near_the_least_any_valid_bound_gives():
    # n zeros in [-2, 2]: a law putting p on 2 shows no such value with probability (1 - p)^n, so no
    # valid 95% bound is below 2 (1 - 0.05^(1/n)); the betting bound is within 15% of it.
    least = 2 * (1 - 0.05 ** (1 / 720))
    bound = gs.betting_upper_bound(np.zeros(720), 0.95, low=-2.0, high=2.0)
    assert least <= bound <= 1.15 * least and bound < 0.01


def test_betting_bound_tightens_with_n_and_sits_near_the_normal_width():
    rng = np.random.default_rng(32)
    x = rng.normal(0.0, 0.3, 5000).clip(-2, 2)
    bound = gs.betting_upper_bound(x, 0.95, low=-2.0, high=2.0)
    normal = x.mean() + 1.645 * x.std() / math.sqrt(x.size)
    assert normal < bound < x.mean() + 1.6 * (normal - x.mean())
    assert gs.betting_upper_bound(x[:500], 0.95, low=-2.0, high=2.0) > bound


# ------------------------------------------------------------------ calibration error


def test_binned_estimate_is_calibflow_ece_and_the_largest_signed_functional():
    rng = np.random.default_rng(4)
    conf, correct = spread_binary(3000, 0.02, rng)
    probs = np.stack([conf, 1 - conf], 1)
    labels = np.where(correct, 0, 1)
    bins = gs.EqualWidthBins(15)
    bound = gs.calibration_error_upper_bound(conf, correct, bins, 0.95)
    assert bound.estimate == pytest.approx(expected_calibration_error(probs, labels, 15), abs=1e-12)

    few = gs.EqualWidthBins(5)  # every sign pattern of 5 bins, by brute force
    residual = conf - correct
    per_bin = few.project(conf, residual)
    largest = max(np.dot(s, per_bin) for s in itertools.product((-1.0, 1.0), repeat=5)) / conf.size
    assert gs.calibration_error_upper_bound(conf, correct, few, 0.95).estimate == pytest.approx(largest, abs=1e-12)


def test_bins_match_calibflow_metrics_on_the_edges():
    from calibflow.metrics import bin_indices

    conf = np.array([0.0, 1 / 15, 0.2, 0.55, 14 / 15, 1.0, np.nextafter(0.2, 1)])
    assert gs.EqualWidthBins(15).index(conf).tolist() == bin_indices(conf, 15).tolist()


def test_smooth_kernel_is_relplots_smooth_ece_and_its_adjoint_is_exact():
    from relplot.metrics import smooth_ece

    rng = np.random.default_rng(5)
    conf, correct = spread_binary(2000, 0.03, rng)
    value, sigma = gs.smooth_ece(conf, correct)
    kernel = gs.SmoothKernel(sigma)
    assert kernel.error(conf, conf - correct) == pytest.approx(value, abs=1e-9)
    assert value == pytest.approx(smooth_ece(conf, correct.astype(float), sigma), abs=1e-12)
    x, signs = rng.normal(size=conf.size), rng.normal(size=kernel.t.size)
    assert np.dot(kernel.project(conf, x), signs) == pytest.approx(np.dot(x, kernel.adjoint(conf, signs)), rel=1e-10)


def test_smooth_ece_of_arrays_seen_just_before_is_relplots_answer_without_a_second_search(monkeypatch):
    """One gate evaluation asks for the same arrays' smooth ECE up to three times (the gate-power
    simulation hundreds of times over): the same bytes get relplot's answer once, anything else,
    a changed value, another length or the labels swapped in, gets its own search."""
    import relplot

    calls = []

    def counted(conf, correct, **kwargs):
        calls.append(conf.size)
        return smec(conf, correct, **kwargs)

    smec = relplot.smECE
    monkeypatch.setattr(relplot, "smECE", counted)
    monkeypatch.setattr(gs, "_SMOOTH_ECE_MEMO", type(gs._SMOOTH_ECE_MEMO)())
    conf, correct = spread_binary(500, 0.05, np.random.default_rng(11))
    first = gs.smooth_ece(conf, correct)
    assert first == tuple(float(x) for x in smec(conf, correct.astype(float), return_width=True))
    assert gs.smooth_ece(conf.copy(), correct.astype(np.float32)) == first and len(calls) == 1
    nudged = conf.copy()
    nudged[7] = np.nextafter(nudged[7], 0.0)
    for other_conf, other_correct in ((nudged, correct), (conf[:-1], correct[:-1]), (conf, 1 - correct)):
        assert gs.smooth_ece(other_conf, other_correct) == tuple(
            float(x) for x in smec(other_conf, np.asarray(other_correct, float), return_width=True)
        )
    assert len(calls) == 4


def test_smooth_ece_memo_is_keyed_by_relplots_settings_and_the_arrays_shape(monkeypatch):
    import relplot

    monkeypatch.setattr(gs, "_SMOOTH_ECE_MEMO", type(gs._SMOOTH_ECE_MEMO)())
    conf, correct = spread_binary(400, 0.05, np.random.default_rng(12))
    default = gs.smooth_ece(conf, correct)
    monkeypatch.setattr(relplot.config, "use_logit_scaling", True)
    assert gs.smooth_ece(conf, correct) == tuple(
        float(x) for x in relplot.smECE(conf, correct.astype(float), return_width=True)
    )
    assert gs.smooth_ece(conf, correct) != default
    monkeypatch.setattr(relplot.config, "use_logit_scaling", False)
    assert gs.smooth_ece(conf, correct) == default
    with pytest.raises(ValueError):  # what relplot says of a column, not the row's memo
        gs.smooth_ece(conf[:, None], correct)


def test_a_kernel_computes_each_arrays_mass_once_and_never_anothers():
    """SmoothKernel.mass is a convolution over the whole grid that the champion comparison asks of
    the same confidences once per block: kept per array, and each array its own."""
    rng = np.random.default_rng(13)
    a, b = rng.uniform(0.3, 1.0, 300), rng.uniform(0.3, 1.0, 300)
    nudged = a.copy()
    nudged[0] = np.nextafter(nudged[0], 1.0)
    kernel = gs.SmoothKernel(0.05)
    for conf in (a, b, a, nudged, a.astype(np.float32), a[:200], a):
        assert kernel.mass(conf) == gs.SmoothKernel(0.05).mass(conf)
    assert len(kernel._masses) == 5  # a, b, nudged, float32, the slice: each computed once

    # a champion that is partly a fresh model: its weights use its own mass, as a fresh profile's do
    correct_a, correct_b = rng.random(300) < a, rng.random(300) < b
    shared = gs.calibration_error_increase_upper_bound(a, correct_a, b, correct_b, kernel, 0.95, seed=3)
    fresh = gs.calibration_error_increase_upper_bound(a, correct_a, b, correct_b, gs.SmoothKernel(0.05), 0.95, seed=3)
    assert shared == fresh


@pytest.mark.parametrize("profile", [gs.EqualWidthBins(15), gs.SmoothKernel(0.05)], ids=["bins", "smooth"])
def test_weights_reproduce_the_estimate(profile):
    conf, correct = spread_binary(1500, 0.04, np.random.default_rng(6))
    residual = conf - correct
    signs = gs._signs(profile.project(conf, residual))
    assert np.mean(profile.weights(conf, signs) * residual) == pytest.approx(profile.error(conf, residual), abs=1e-12)


def test_calibration_bound_is_above_the_estimate_and_shrinks_with_n():
    rng = np.random.default_rng(7)
    widths = []
    for n in (300, 3000, 30000):
        conf, correct = spread_binary(n, 0.01, rng)
        bound = gs.calibration_error_upper_bound(conf, correct, gs.EqualWidthBins(15), 0.95)
        assert bound.bound > bound.estimate
        widths.append(bound.bound - bound.estimate)
    assert widths[0] > widths[1] > widths[2]


def test_confident_model_with_few_errors_is_not_promoted_on_the_threshold():
    # 200 images, mean confidence 0.98, accuracy 0.95: about 10 errors, ECE exactly 0.03. The
    # percentile bootstrap passed this 9% of the time; the bound must keep it near 5% or below.
    rng, trials, passes = np.random.default_rng(8), 600, 0
    for _ in range(trials):
        conf = 1 - rng.beta(2.0, 98.0, 200)
        correct = rng.random(200) < conf - 0.03
        passes += gs.calibration_error_upper_bound(conf, correct, gs.EqualWidthBins(15), 0.95).bound <= 0.03
    assert passes / trials <= 0.05


def test_increase_bound_parts():
    rng = np.random.default_rng(9)
    conf, correct = spread_binary(4000, 0.0, rng)
    bins = gs.EqualWidthBins(15)
    same, parts = gs.calibration_error_increase_upper_bound(conf, correct, conf, correct, bins, 0.95)
    # identical models: every paired value is 0, but 4,000 images cannot rule out unseen
    # disagreements worth up to 2 each (|m| = 1 for both models): the bound is that rate's, no less
    least = 2 * (1 - 0.05 ** (1 / 4000))
    assert same.estimate == 0.0 and parts["share_paired"] == 1.0
    assert least <= same.bound <= 1.15 * least
    worse = np.clip(conf + 0.05, 0, 1)
    bound, parts = gs.calibration_error_increase_upper_bound(worse, correct, conf, correct, bins, 0.95)
    ece_a, ece_b = bins.error(worse, worse - correct), bins.error(conf, conf - correct)
    assert bound.estimate == pytest.approx(ece_a - ece_b)
    assert bound.bound > 0.03


def test_increase_bound_passes_a_recalibrated_champion():
    # The candidate is its over-confident champion (true ECE 0.05) recalibrated: same predictions,
    # calibrated confidences. The increase is -0.05; the cross-fitted value carries the bound.
    rng, n, passes, trials, shares = np.random.default_rng(19), 2000, 0, 30, []
    for trial in range(trials):
        conf = 0.5 + 0.45 * rng.beta(5.0, 2.0, n)
        correct = rng.random(n) < conf
        bound, parts = gs.calibration_error_increase_upper_bound(
            conf, correct, conf + 0.05, correct, gs.EqualWidthBins(15), 0.95, seed=trial
        )
        passes += bound.bound <= 0.01
        shares.append(parts["share_paired"])
    assert passes / trials >= 0.5 and np.mean(shares) < 0.5


def test_increase_bound_on_the_tolerance_with_a_calibrated_champion():
    # The case the old paired bootstrap passed 91% of the time at n = 10,000 (issue 10).
    rng, n, tolerance, trials, passes = np.random.default_rng(10), 2000, 0.01, 300, 0
    for trial in range(trials):
        conf = 0.5 + 0.45 * rng.beta(5.0, 2.0, n)
        correct = rng.random(n) < conf
        bound, _ = gs.calibration_error_increase_upper_bound(
            conf + tolerance, correct, conf, correct, gs.EqualWidthBins(15), 0.95, seed=trial
        )
        passes += bound.bound <= tolerance
    assert passes / trials <= 0.05 + 1.96 * math.sqrt(0.05 * 0.95 / trials)


def test_first_crossing_finds_the_first_of_several():
    assert gs._first_crossing(lambda x: 0.3 <= x <= 0.4 or x >= 0.8, 0.0, 1.0) == pytest.approx(0.3, abs=1e-6)
    assert gs._first_crossing(lambda x: False, 0.0, 1.0) == 1.0


def confident_losses(n, rng, gap=0.02, k=10, extreme=0.0):
    """Losses of a confident K-class model; a share `extreme` of its errors put 1e-12 on the true class."""
    conf = 1.0 - rng.beta(2.0, 98.0, n)
    correct = rng.random(n) < conf - gap
    wrong_loss = np.where(rng.random(n) < extreme, -np.log(1e-12), -np.log((1 - conf) / (k - 1)))
    return np.where(correct, -np.log(conf), wrong_loss)


@pytest.mark.parametrize("n,extreme", [(1000, 0.0), (300, 0.25), (500, 0.1)])
def test_nll_bound_covers_a_mean_made_of_rare_large_losses(n, extreme):
    # ~40 errors in 1,000 at ~6 nats each, and the heavy tails of issue 23 (a quarter or a tenth of
    # the errors at 27.6 nats), where the Hall-t bound of the excess loss missed 6.3-9.5%
    rng = np.random.default_rng(11)
    truth = confident_losses(4_000_000, rng, extreme=extreme).mean()  # the expected NLL, to ~1e-3
    trials, misses = 800, 0
    for seed in range(trials):
        misses += gs.nll_upper_bound(confident_losses(n, rng, extreme=extreme), 0.95, 36.04, seed).bound < truth
    assert wilson_low(misses, trials) <= 0.05, misses / trials


def test_nll_bound_without_errors_is_near_the_mean():
    loss = -np.log(np.full(300, 0.99))
    bound = gs.nll_upper_bound(loss, 0.95, 36.04)
    assert bound.estimate == pytest.approx(-np.log(0.99))
    # the unseen rate of losses up to 36 nats is charged: above the mean, far below the largest loss
    assert -np.log(0.99) < bound.bound < 0.5


@pytest.mark.parametrize("n", [200, 1000])
def test_increase_bound_with_rare_disagreements_on_the_tolerance(n):
    # A confident candidate wrong wherever its calibrated champion is, and on 1% more images: the
    # increase is exactly 0.01. A sample missing those images has no spread at all; the
    # studentized bound passed this 25% (n = 200) and 11.5% (n = 1,000) of the time.
    rng, tolerance, trials, passes = np.random.default_rng(12), 0.01, 300, 0
    for trial in range(trials):
        conf = 1 - rng.beta(2.0, 98.0, n)
        champion = rng.random(n) < conf
        candidate = champion & (rng.random(n) >= tolerance / conf)
        bound, _ = gs.calibration_error_increase_upper_bound(
            conf, candidate, conf, champion, gs.EqualWidthBins(15), 0.95, seed=trial
        )
        passes += bound.bound <= tolerance
    assert passes / trials <= 0.05
