"""Tests for calibflow.metrics: hand-computed ECE/MCE, exact bin-edge semantics, and peer checks
against torchmetrics (ECE/MCE) and scikit-learn (Brier, log loss, accuracy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, brier_score_loss, log_loss
from torchmetrics.classification import MulticlassCalibrationError

from calibflow import metrics as M

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
