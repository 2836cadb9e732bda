"""Tests for calibflow.metrics: hand-computed ECE/MCE, exact bin-edge semantics, and peer checks
against torchmetrics (ECE/MCE) and scikit-learn (Brier, log loss, accuracy)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, brier_score_loss, log_loss
from torchmetrics.classification import MulticlassCalibrationError

from calibflow import metrics as M
from calibflow.metrics import binned, bootstrap

# Five samples, three classes, 5 bins with edges 0, .2, .4, .6, .8, 1 and (lo, hi] bins.
HAND_PROBS = [
    [0.60, 0.30, 0.10],  # y=0: conf .6 exactly on an edge -> bin 2 (.4, .6], correct
    [0.50, 0.30, 0.20],  # y=1: conf .5 -> bin 2, predicted 0: wrong
    [0.25, 0.40, 0.35],  # y=1: conf .4 exactly on an edge -> bin 1 (.2, .4], correct
    [0.90, 0.05, 0.05],  # y=0: conf .9 -> bin 4 (.8, 1], correct
    [0.10, 0.05, 0.85],  # y=0: conf .85 -> bin 4, predicted 2: wrong
]
HAND_LABELS = [0, 1, 1, 0, 0]


def _random_case(seed: int, n: int, k: int, scale: float = 2.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 logits and labels that agree with the argmax 60% of the time (a half-decent model)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g, dtype=torch.float64) * scale
    noise = torch.randint(0, k, (n,), generator=g)
    y = torch.where(torch.rand(n, generator=g, dtype=torch.float64) < 0.6, z.argmax(dim=1), noise)
    return z, y


# --------------------------------------------------------------------------------------------
# Bin semantics
# --------------------------------------------------------------------------------------------


def test_hand_computed_bins_ece_mce() -> None:
    bins = M.reliability_bins(HAND_PROBS, HAND_LABELS, n_bins=5)
    # bin 0 (0, .2]: empty; bin 1: {.4 correct}; bin 2: {.6 correct, .5 wrong}; bin 3 (.6, .8]: empty;
    # bin 4: {.9 correct, .85 wrong}
    np.testing.assert_array_equal(bins.counts, [0, 1, 2, 0, 2])
    np.testing.assert_allclose(bins.edges, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0], rtol=0, atol=1e-15)
    assert np.isnan(bins.accuracy[[0, 3]]).all() and np.isnan(bins.mean_confidence[[0, 3]]).all()
    np.testing.assert_allclose(bins.accuracy[[1, 2, 4]], [1.0, 0.5, 0.5], rtol=0, atol=1e-15)
    # mean confidence: bin 1 = .4, bin 2 = (.6 + .5)/2 = .55, bin 4 = (.9 + .85)/2 = .875
    np.testing.assert_allclose(bins.mean_confidence[[1, 2, 4]], [0.4, 0.55, 0.875], rtol=0, atol=1e-15)

    # gaps: |1 - .4| = .6, |.5 - .55| = .05, |.5 - .875| = .375
    # ECE = (1*.6 + 2*.05 + 2*.375) / 5 = 1.45 / 5 = .29 ; MCE = max(.6, .05, .375) = .6
    assert M.expected_calibration_error(HAND_PROBS, HAND_LABELS, n_bins=5) == pytest.approx(0.29, abs=1e-12)
    assert M.maximum_calibration_error(HAND_PROBS, HAND_LABELS, n_bins=5) == pytest.approx(0.6, abs=1e-12)
    # With [lo, hi) bins (torchmetrics' convention) conf .6 would join bin 3 and .4 bin 2, giving
    # ECE = (|1-.6| + |0-.5| + |1-.4| + 2*.375)/5 = (.4 + .5 + .6 + .75)/5 = .45: the edge rule matters.


def test_right_closed_bins_on_every_exact_edge() -> None:
    for n_bins in (5, 10, 15, 20):
        for k in range(1, n_bins + 1):
            edge = k / n_bins  # the float64 nearest k/n, as a user would write it
            assert int(M.bin_indices(torch.tensor([edge], dtype=torch.float64), n_bins)) == k - 1, (n_bins, k)
            if k < n_bins:
                above = math.nextafter(edge, 2.0)
                assert int(M.bin_indices(torch.tensor([above], dtype=torch.float64), n_bins)) == k, (n_bins, k)
    # 0.2 with 5 bins belongs to (0, .2]; 0 itself is clamped into the first bin; 1 into the last.
    idx = M.bin_indices(torch.tensor([0.2, 0.0, 1.0], dtype=torch.float64), 5)
    assert idx.tolist() == [0, 0, 4]


def test_bins_match_definition_on_random_confidences() -> None:
    # Oracle: the smallest b with conf <= (b+1)/n, by plain python float comparisons.
    rng = np.random.default_rng(0)
    conf = np.concatenate([rng.uniform(0, 1, 2000), np.arange(16) / 15])
    idx = M.bin_indices(conf, 15).numpy()
    expected = [next(b for b in range(15) if c <= (b + 1) / 15) for c in conf]
    np.testing.assert_array_equal(idx, expected)


def test_float32_confidence_on_an_edge_stays_on_it() -> None:
    # float32(0.6) = 0.6000000238 > 0.6 in float64; edges are rounded to the input dtype so the
    # float32 value still counts as "on the edge" and lands in (.4, .6].
    probs = torch.tensor([[0.6, 0.3, 0.1]], dtype=torch.float32)
    assert M.reliability_bins(probs, [0], n_bins=5).counts.tolist() == [0, 0, 1, 0, 0]


def test_reliability_bins_are_read_only_and_consistent() -> None:
    z, y = _random_case(seed=3, n=500, k=10)
    bins = M.reliability_bins(torch.softmax(z, 1), y, n_bins=15)
    assert bins.counts.sum() == 500 and bins.edges.shape == (16,)
    nonempty = bins.counts > 0
    lo, hi = bins.edges[:-1][nonempty], bins.edges[1:][nonempty]
    # a bin's mean confidence lies inside its own bin
    assert np.all(bins.mean_confidence[nonempty] > lo) and np.all(bins.mean_confidence[nonempty] <= hi)
    with pytest.raises(ValueError):
        bins.counts[0] = 7


# --------------------------------------------------------------------------------------------
# Peer checks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 10, 100])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_mce_match_torchmetrics(k: int, seed: int) -> None:
    # torchmetrics 1.9 bins with bucketize(right=True) - 1, i.e. [lo, hi) bins plus an extra bin
    # for conf == 1, on linspace edges, and casts confidences to float32. Random continuous
    # confidences never sit on an edge, so the bins agree and only float32 rounding (~1e-7) remains.
    z, y = _random_case(seed, n=3000, k=k)
    probs = torch.softmax(z, dim=1)
    for norm, ours in (("l1", M.expected_calibration_error), ("max", M.maximum_calibration_error)):
        peer = MulticlassCalibrationError(num_classes=k, n_bins=15, norm=norm)
        peer.update(probs, y)
        assert ours(probs, y, n_bins=15) == pytest.approx(peer.compute().item(), abs=1e-6), norm


@pytest.mark.parametrize("k", [2, 10, 100])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_brier_nll_accuracy_match_sklearn(k: int, seed: int) -> None:
    z, y = _random_case(seed, n=2000, k=k)
    probs = torch.softmax(z, dim=1).numpy()
    y_np = y.numpy()
    labels = np.arange(k)  # sklearn infers classes from y_true otherwise, and a class may be absent

    ours = M.brier_score(probs, y_np)
    # sklearn 1.9 brier_score_loss sums over classes like ours, but its default
    # scale_by_half="auto" halves the score when there are fewer than 3 columns (binary custom).
    unscaled = brier_score_loss(y_np, probs, labels=labels, scale_by_half=False)
    assert ours == pytest.approx(unscaled, rel=1e-9)
    default = brier_score_loss(y_np, probs, labels=labels)
    assert ours == pytest.approx(2 * default if k == 2 else default, rel=1e-9)

    for temperature in (1.0, 0.7, 2.5):
        scaled = torch.softmax(z / temperature, dim=1).numpy()
        peer = log_loss(y_np, scaled, labels=labels)
        assert M.negative_log_likelihood(z, y, temperature) == pytest.approx(peer, rel=1e-9)

    assert M.accuracy(probs, y_np) == pytest.approx(accuracy_score(y_np, probs.argmax(1)), rel=1e-12)
    assert M.accuracy(z, y) == M.accuracy(probs, y_np)  # softmax keeps the argmax


# --------------------------------------------------------------------------------------------
# Report, helpers, inputs
# --------------------------------------------------------------------------------------------


def test_nll_is_finite_for_saturated_softmax() -> None:
    # softmax(1000 * e_1) underflows to exact zeros; log(softmax) would give -inf for a wrong label.
    logits = torch.tensor([[1000.0, 0.0, 0.0]])
    nll = M.negative_log_likelihood(logits, [1])
    assert math.isfinite(nll) and nll == pytest.approx(1000.0, rel=1e-12)


def test_calibration_report_matches_peers() -> None:
    z, y = _random_case(seed=7, n=2000, k=10)
    temperature = 1.8
    report = M.calibration_report(z, y, temperature=temperature, n_bins=15)
    assert set(report) == {"accuracy", "nll", "brier", "ece", "mce"}
    assert all(type(v) is float for v in report.values())
    scaled = torch.softmax(z / temperature, dim=1)
    labels = np.arange(10)
    assert report["nll"] == pytest.approx(log_loss(y.numpy(), scaled.numpy(), labels=labels), rel=1e-9)
    assert report["brier"] == pytest.approx(brier_score_loss(y.numpy(), scaled.numpy(), labels=labels), rel=1e-9)
    peer = MulticlassCalibrationError(num_classes=10, n_bins=15, norm="l1")
    peer.update(scaled, y)
    assert report["ece"] == pytest.approx(peer.compute().item(), abs=1e-6)
    # temperature never changes predictions
    assert report["accuracy"] == M.calibration_report(z, y)["accuracy"]


def test_calibrated_probabilities_float64_simplex() -> None:
    z = torch.randn(50, 4, dtype=torch.float32) * 10
    p = M.calibrated_probabilities(z, 0.5)
    assert p.dtype == torch.float64
    torch.testing.assert_close(p.sum(dim=1), torch.ones(50, dtype=torch.float64))
    torch.testing.assert_close(p, torch.softmax(z.double() * 2.0, dim=1))
    with pytest.raises(ValueError, match="temperature"):
        M.calibrated_probabilities(z, 0.0)


def test_top_label() -> None:
    conf, pred = M.top_label(np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]]))
    assert pred.tolist() == [1, 0]
    assert conf.tolist() == [0.7, 0.5]


def test_numpy_and_torch_inputs_agree() -> None:
    z, y = _random_case(seed=11, n=400, k=5)
    p = torch.softmax(z, 1)
    assert M.expected_calibration_error(p.numpy(), y.numpy()) == M.expected_calibration_error(p, y)
    assert M.brier_score(p.numpy(), y.tolist()) == M.brier_score(p, y)


@pytest.mark.parametrize(
    ("probs", "labels", "match"),
    [
        ([[0.5, 0.5]], [2], r"\[0, 2\)"),
        ([[0.5, 0.5]], [-1], r"\[0, 2\)"),
        ([[0.5, 0.5]], [0, 1], "shape"),
        ([0.5, 0.5], [0], "2-D"),
        (np.zeros((0, 3)), np.zeros(0, dtype=int), "empty"),
        ([[0.5, 0.5]], [0.0], "integer"),
    ],
)
def test_invalid_inputs_raise(probs, labels, match) -> None:
    with pytest.raises(ValueError, match=match):
        M.expected_calibration_error(probs, labels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    z, y = _random_case(seed=5, n=1000, k=10)
    cpu = M.calibration_report(z, y, temperature=1.3)
    gpu = M.calibration_report(z.cuda(), y.cuda(), temperature=1.3)
    for key in cpu:
        assert gpu[key] == pytest.approx(cpu[key], rel=1e-9, abs=1e-12), key


# --------------------------------------------------------------------------------------------
# Adaptive (equal-mass) and classwise ECE
# --------------------------------------------------------------------------------------------


def _adaptive_ece_reference(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    """Plain numpy: stable sort by confidence, sorted position i goes to bin floor(i * B / N)."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    order = np.argsort(conf, kind="stable")
    n = conf.size
    bin_of_position = (np.arange(n) * n_bins) // n
    ece = 0.0
    for b in range(n_bins):
        members = order[bin_of_position == b]
        if members.size:
            ece += members.size / n * abs(correct[members].mean() - conf[members].mean())
    return ece


@pytest.mark.parametrize("k", [2, 10, 100])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adaptive_ece_matches_reference_and_netcal(k: int, seed: int) -> None:
    from netcal.metrics import ECE as NetcalECE

    z, y = _random_case(seed, n=3000, k=k)
    probs = torch.softmax(z, dim=1)
    ours = M.adaptive_calibration_error(probs, y, n_bins=15)
    assert ours == pytest.approx(_adaptive_ece_reference(probs.numpy(), y.numpy(), 15), abs=1e-12)

    # netcal 1.4's ECE(equal_intervals=False) puts bin edges at np.quantile(conf, b/B) (linear
    # interpolation) with [lo, hi) bins. Its quantile position (N-1) b/B never falls on a sample
    # when N is a multiple of B (as here, 3000 = 200 * 15), so each bin holds exactly the samples
    # our positional rule gives it. Definitional differences: (1) for 2-column input netcal scores
    # the positive-class probability against y, not the top-label confidence, so the top-label
    # problem is handed to it as (confidence, correct) pairs; (2) netcal's *ACE* class is a
    # different quantity (unweighted mean of bin gaps, Neumann et al. 2018), not Nixon et al.'s
    # adaptive ECE, so it is not compared.
    conf, pred = probs.max(dim=1)
    correct = (pred == y).numpy().astype(np.int64)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer = NetcalECE(bins=15, equal_intervals=False).measure(conf.numpy(), correct)
    assert ours == pytest.approx(float(peer), abs=1e-12)


def test_adaptive_ece_bins_are_equal_mass() -> None:
    # 10 samples, 3 bins: positions 0-3, 4-6, 7-9 (sizes 4, 3, 3) by floor(i * 3 / 10).
    conf = np.linspace(0.5, 0.95, 10)
    probs = np.stack([conf, 1 - conf], axis=1)
    labels = np.array([0, 1, 0, 1, 0, 0, 1, 0, 0, 0])
    expected = (
        4 / 10 * abs(2 / 4 - conf[:4].mean())
        + 3 / 10 * abs(2 / 3 - conf[4:7].mean())
        + 3 / 10 * abs(1.0 - conf[7:].mean())
    )
    assert M.adaptive_calibration_error(probs, labels, n_bins=3) == pytest.approx(expected, abs=1e-15)


def _classwise_reference(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    """Loops over classes and (lo, hi] bins, the definition of Kull et al. 2019 written out."""
    n, k = probs.shape
    total = 0.0
    for c in range(k):
        p = probs[:, c]
        hit = (labels == c).astype(np.float64)
        for b in range(n_bins):
            lo, hi = b / n_bins, (b + 1) / n_bins
            members = (p > lo) & (p <= hi) if b > 0 else (p <= hi)
            if members.any():
                total += members.sum() / n * abs(hit[members].mean() - p[members].mean())
    return total / k


@pytest.mark.parametrize("k", [2, 10, 100])
@pytest.mark.parametrize("seed", [0, 1])
def test_classwise_ece_matches_loop_reference(k: int, seed: int) -> None:
    z, y = _random_case(seed, n=2000, k=k)
    probs = torch.softmax(z, dim=1)
    expected = _classwise_reference(probs.numpy(), y.numpy(), 15)
    assert M.classwise_calibration_error(probs, y, n_bins=15) == pytest.approx(expected, abs=1e-12)


def test_probability_nll_matches_sklearn_log_loss() -> None:
    z, y = _random_case(seed=21, n=2000, k=10)
    probs = torch.softmax(z, dim=1)
    assert M.probability_nll(probs, y) == pytest.approx(
        log_loss(y.numpy(), probs.numpy(), labels=np.arange(10)), rel=1e-12
    )
    assert M.probability_nll(probs, y) == pytest.approx(M.negative_log_likelihood(z, y), rel=1e-9)
    # a zero on the true class costs -log(eps), not infinity
    assert M.probability_nll([[1.0, 0.0]], [1]) == pytest.approx(-math.log(np.finfo(np.float64).eps))


# --------------------------------------------------------------------------------------------
# Debiased calibration error
# --------------------------------------------------------------------------------------------


def _kumar_l2_reference(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    """Kumar et al.'s unbiased_l2_ce, transcribed, on our equal-mass top-label bins."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    order = np.argsort(conf, kind="stable")
    n = conf.size
    bin_of_position = (np.arange(n) * n_bins) // n
    total = 0.0
    for b in range(n_bins):
        m = order[bin_of_position == b]
        if m.size < 2:
            continue
        acc = correct[m].mean()
        total += m.size / n * ((acc - conf[m].mean()) ** 2 - acc * (1 - acc) / (m.size - 1))
    return max(total, 0.0) ** 0.5


def test_debiased_matches_transcribed_reference() -> None:
    for seed, k in ((0, 10), (1, 2), (2, 100)):
        z, y = _random_case(seed, n=1500, k=k)
        probs = torch.softmax(z, dim=1)
        assert M.debiased_calibration_error(probs, y) == pytest.approx(
            _kumar_l2_reference(probs.numpy(), y.numpy(), 15), abs=1e-12
        )


def _calibrated_sample(seed: int, n: int, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels drawn from the predicted distribution itself: P(correct | conf) = conf, true CE = 0."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(n, k, generator=g, dtype=torch.float64) * 2.0, dim=1)
    return probs, torch.multinomial(probs, 1, generator=g).squeeze(1)


def _constant_gap_sample(seed: int, n: int, gap: float) -> tuple[np.ndarray, np.ndarray]:
    """Binary top-label sample with accuracy exactly ``conf - gap`` at every confidence: CE = gap."""
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.6, 0.98, n)
    correct = rng.uniform(size=n) < conf - gap
    return np.stack([conf, 1 - conf], axis=1), np.where(correct, 0, 1)


def _plugin_l2(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    order = np.argsort(conf, kind="stable")
    pos_bin = (np.arange(conf.size) * n_bins) // conf.size
    sq = sum(
        (m.size / conf.size) * (correct[m].mean() - conf[m].mean()) ** 2
        for m in (order[pos_bin == b] for b in range(n_bins))
    )
    return float(sq) ** 0.5


def test_debiased_is_near_zero_on_perfectly_calibrated_predictions() -> None:
    # True calibration error 0. Label noise alone gives the plug-in estimates a positive bias of
    # order sqrt(B / N); the debiased estimators remove most of it.
    plugin_ece, plugin_l2, debiased_l2, debiased_l1 = [], [], [], []
    for seed in range(20):
        probs, y = _calibrated_sample(seed, n=2000)
        plugin_ece.append(M.adaptive_calibration_error(probs, y))
        plugin_l2.append(_plugin_l2(probs.numpy(), y.numpy()))
        debiased_l2.append(M.debiased_calibration_error(probs, y))
        debiased_l1.append(M.debiased_calibration_error(probs, y, norm="l1"))
    assert np.mean(plugin_ece) > 0.02 and np.mean(plugin_l2) > 0.025  # the bias is real
    assert np.mean(debiased_l2) < 0.5 * np.mean(plugin_l2)
    # The l1 correction is first order: at CE = 0 each bin's plug-in |gap| averages 0.80 sd, the
    # correction takes it to about 0.47 sd (folded-normal algebra), i.e. ~40% less bias, not none.
    assert np.mean(np.abs(debiased_l1)) < 0.75 * np.mean(plugin_ece)


def test_debiased_is_closer_to_a_known_calibration_error() -> None:
    # Every bin's true gap is 0.05, so the binned l1 and l2 calibration errors are both 0.05.
    gap = 0.05
    plugin, debiased = [], []
    for seed in range(30):
        probs, y = _constant_gap_sample(seed, n=1500, gap=gap)
        plugin.append(_plugin_l2(probs, y))
        debiased.append(M.debiased_calibration_error(probs, y))
    plugin, debiased = np.array(plugin), np.array(debiased)
    # Kumar et al.'s claim is about the square: the plug-in CE^2 is biased up by sum_b w_b Var(acc_b)
    # (~0.0013 here, half of CE^2 = 0.0025 itself); the debiased CE^2 is unbiased.
    assert abs(np.mean(debiased**2) - gap**2) < 0.25 * abs(np.mean(plugin**2) - gap**2)
    assert np.mean(np.abs(debiased - gap)) < np.mean(np.abs(plugin - gap))
    # (Not asserted: with every gap this far from 0 the plug-in l1 ECE is nearly unbiased and the
    # norm="l1" first-order correction slightly over-corrects; it pays off near CE = 0, above.)


def test_debiased_l2_bounds_l1_and_equal_width_option() -> None:
    z, y = _random_case(seed=4, n=5000, k=10)
    probs = torch.softmax(z, dim=1)
    # Strongly miscalibrated (gaps >> noise): the corrections are small and l1 <= l2 (Jensen).
    l2 = M.debiased_calibration_error(probs, y)
    l1 = M.debiased_calibration_error(probs, y, norm="l1")
    assert l1 <= l2 + 1e-3
    assert l1 == pytest.approx(M.adaptive_calibration_error(probs, y), abs=5e-3)
    assert M.debiased_calibration_error(probs, y, binning="equal_width") == pytest.approx(l2, abs=0.02)
    with pytest.raises(ValueError, match="norm"):
        M.debiased_calibration_error(probs, y, norm="l3")
    with pytest.raises(ValueError, match="binning"):
        M.debiased_calibration_error(probs, y, binning="quantile")


# --------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------


def test_bootstrap_indices_shape_range_determinism_and_blocks() -> None:
    idx = M.bootstrap_indices(50, 40, seed=3)
    assert idx.shape == (40, 50) and idx.dtype == torch.int64
    assert int(idx.min()) >= 0 and int(idx.max()) < 50
    assert torch.equal(idx, M.bootstrap_indices(50, 40, seed=3))
    assert not torch.equal(idx, M.bootstrap_indices(50, 40, seed=4))
    # the CI code draws the same resamples block by block, whatever the block size
    for rows in (1, 7, 40):
        assert torch.equal(torch.cat(list(bootstrap._index_blocks(50, 40, 3, rows, None))), idx)
    with pytest.raises(ValueError, match="n_resamples"):
        M.bootstrap_indices(10, 0, seed=0)


@pytest.mark.parametrize("k", [2, 10])
def test_vectorised_resamples_equal_a_loop_over_resamples(k: int) -> None:
    # The batched (multiplicity-vector) evaluation of every named metric equals the public metric
    # applied to the explicitly resampled rows.
    z, y = _random_case(seed=k, n=700, k=k)
    probs = torch.softmax(z, dim=1)
    idx = M.bootstrap_indices(700, 6, seed=1)
    sample = binned._Sample(probs, y, 15)
    counts = bootstrap._counts(idx, 700)
    for name in M.METRIC_NAMES:
        point = bootstrap._point_metric(name, 15)
        looped = np.array([point(probs[r], y[r]) for r in idx])
        batched = bootstrap._batched_metric(name)(sample, counts).numpy()
        np.testing.assert_allclose(batched, looped, rtol=0, atol=1e-12, err_msg=name)


def test_bootstrap_ci_named_equals_callable() -> None:
    # Same seed, same resamples: the vectorised path and the per-resample callable path agree.
    z, y = _random_case(seed=5, n=1500, k=10)
    probs = torch.softmax(z, dim=1)
    for name, fn in (("ece", M.expected_calibration_error), ("adaptive_ece", M.adaptive_calibration_error)):
        named = M.bootstrap_ci(name, probs, y, n_resamples=60, seed=2)
        called = M.bootstrap_ci(lambda p, t: fn(p, t), probs, y, n_resamples=60, seed=2)  # noqa: B023 (called here)
        assert named.estimate == pytest.approx(called.estimate, abs=1e-12)
        assert named.low == pytest.approx(called.low, abs=1e-12)
        assert named.high == pytest.approx(called.high, abs=1e-12)
        assert named.n_resamples == 60 and named.confidence == 0.95


def _population(seed: int = 0, n: int = 200_000, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Over-confident predictions (labels drawn at temperature 2) so ECE is far from 0."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g, dtype=torch.float64) * 3.0
    y = torch.multinomial(torch.softmax(z / 2.0, dim=1), 1, generator=g).squeeze(1)
    return torch.softmax(z, dim=1), y


@pytest.mark.slow
def test_bootstrap_ci_contains_population_value() -> None:
    probs, y = _population()
    g = torch.Generator().manual_seed(1)
    rows = torch.randperm(probs.shape[0], generator=g)[:20_000]
    for name in ("ece", "adaptive_ece", "mce", "brier", "nll", "accuracy", "debiased_ece", "classwise_ece"):
        if name == "mce":
            continue  # a max over bins: its sample value is biased and the percentile CI is not valid for it
        truth = bootstrap._point_metric(name, 15)(probs, y)
        ci = M.bootstrap_ci(name, probs[rows], y[rows], n_resamples=400, confidence=0.99, seed=0)
        assert ci.low <= ci.estimate <= ci.high, name
        assert ci.low <= truth <= ci.high, (name, truth, ci)


def test_bootstrap_ci_coverage_over_repeated_samples() -> None:
    # 95% intervals from 40 independent samples of 1,000 should cover the population accuracy and
    # Brier score about 38 times; fewer than 33 (a <0.2% event for a correct 95% interval) fails.
    probs, y = _population(seed=2, n=100_000)
    truth = {"accuracy": M.accuracy(probs, y), "brier": M.brier_score(probs, y)}
    covered = {name: 0 for name in truth}
    g = torch.Generator().manual_seed(3)
    for i in range(40):
        rows = torch.randint(0, probs.shape[0], (1000,), generator=g)
        for name, value in truth.items():
            ci = M.bootstrap_ci(name, probs[rows], y[rows], n_resamples=300, seed=i)
            covered[name] += ci.low <= value <= ci.high
    assert all(c >= 33 for c in covered.values()), covered


def test_bootstrap_ci_narrows_as_n_grows() -> None:
    probs, y = _population(seed=4, n=32_000)
    widths = []
    for n in (2_000, 8_000, 32_000):
        ci = M.bootstrap_ci("ece", probs[:n], y[:n], n_resamples=300, seed=0)
        widths.append(ci.high - ci.low)
    # width ~ 1/sqrt(n): each 4x more data roughly halves it
    assert widths[1] < 0.7 * widths[0] and widths[2] < 0.7 * widths[1], widths


def test_paired_ci_of_a_metric_against_itself_is_exactly_zero() -> None:
    z, y = _random_case(seed=6, n=1000, k=10)
    probs = torch.softmax(z, dim=1)
    for name in M.METRIC_NAMES:
        ci = M.paired_bootstrap_ci(name, probs, probs.clone(), y, n_resamples=100)
        assert (ci.estimate, ci.low, ci.high) == (0.0, 0.0, 0.0), name


def test_paired_ci_detects_a_real_improvement_and_is_tighter_than_unpaired() -> None:
    probs, y = _population(seed=7, n=5000)
    logits = torch.log(probs)
    fixed = torch.softmax(logits / 2.0, dim=1)  # the true temperature: calibrated
    paired = M.paired_bootstrap_ci("nll", probs, fixed, y, n_resamples=500, seed=0)
    assert paired.low > 0  # over-confident is worse on every resample range
    assert paired.estimate == pytest.approx(M.probability_nll(probs, y) - M.probability_nll(fixed, y), abs=1e-12)
    a = M.bootstrap_ci("nll", probs, y, n_resamples=500, seed=0)
    b = M.bootstrap_ci("nll", fixed, y, n_resamples=500, seed=0)
    # shared sample-to-sample variation cancels in the paired difference
    assert paired.high - paired.low < (a.high - a.low) + (b.high - b.low)


def test_basic_interval_reflects_percentile_interval() -> None:
    z, y = _random_case(seed=8, n=1000, k=10)
    probs = torch.softmax(z, dim=1)
    pct = M.bootstrap_ci("brier", probs, y, n_resamples=200, seed=1)
    basic = M.bootstrap_ci("brier", probs, y, n_resamples=200, seed=1, method="basic")
    assert basic.low == pytest.approx(2 * pct.estimate - pct.high, abs=1e-15)
    assert basic.high == pytest.approx(2 * pct.estimate - pct.low, abs=1e-15)


def test_bootstrap_ci_rejects_bad_arguments() -> None:
    probs, y = torch.softmax(torch.randn(20, 3, dtype=torch.float64), 1), torch.zeros(20, dtype=torch.int64)
    with pytest.raises(ValueError, match="unknown metric"):
        M.bootstrap_ci("auroc", probs, y)
    with pytest.raises(ValueError, match="confidence"):
        M.bootstrap_ci("ece", probs, y, confidence=95)
    with pytest.raises(ValueError, match="method"):
        M.bootstrap_ci("ece", probs, y, method="bca")
    with pytest.raises(ValueError, match="same number of rows"):
        M.paired_bootstrap_ci("ece", probs, probs[:10], y)


def test_bootstrap_ece_is_fast() -> None:
    # 1,000 resamples of ECE on 10,000 x 10, all at once: typically ~0.15 s on 2 CPU cores.
    probs, y = _population(seed=9, n=10_000)
    M.bootstrap_ci("ece", probs, y, n_resamples=50)  # warm-up
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        M.bootstrap_ci("ece", probs, y, n_resamples=1000)
        timings.append(time.perf_counter() - start)
    assert min(timings) < 1.0, timings


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bootstrap_cuda_matches_cpu() -> None:
    z, y = _random_case(seed=10, n=3000, k=10)
    probs = torch.softmax(z, dim=1)
    for name in M.METRIC_NAMES:
        cpu = M.bootstrap_ci(name, probs, y, n_resamples=200)
        gpu = M.bootstrap_ci(name, probs.cuda(), y.cuda(), n_resamples=200)
        assert gpu.low == pytest.approx(cpu.low, abs=1e-9) and gpu.high == pytest.approx(cpu.high, abs=1e-9), name
