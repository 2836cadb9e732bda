"""Metrics and gates against soft targets (calibflow.metrics.soft, gates max_soft_nll and
max_soft_ece): what they equal on one-hot rows, on a model that reproduces its annotators, and the
level of the two gates simulated at a known true value."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from calibflow.config import GatesConfig, load_config
from calibflow.errors import ConfigError, GateInputError
from calibflow.gates.checks import Predictions, evaluate_gates
from calibflow.metrics import mean_entropy, probability_report, soft_report


def wilson_low(k: int, n: int, z: float = 1.959964) -> float:
    """Lower end of the 95% Wilson interval of a rate k / n."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    return centre - z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)


def dirichlet_rows(rng: np.random.Generator, n: int, k: int, concentration: float = 0.7) -> np.ndarray:
    return rng.dirichlet(np.full(k, concentration), size=n)


@pytest.mark.parametrize("k", [2, 10, 100])
def test_on_one_hot_targets_the_soft_metrics_are_the_hard_ones(k):
    rng = np.random.default_rng(k)
    probabilities = dirichlet_rows(rng, 3000, k)
    labels = rng.integers(0, k, 3000)
    soft = soft_report(probabilities, np.eye(k)[labels])
    hard = probability_report(probabilities, labels)
    assert soft["soft_nll"] == pytest.approx(hard["nll"], rel=1e-12)
    assert soft["soft_accuracy"] == pytest.approx(hard["accuracy"], abs=1e-12)
    assert soft["soft_ece"] == pytest.approx(hard["ece"], abs=1e-12)


def test_a_model_that_says_what_its_annotators_said_has_no_soft_calibration_error_and_the_least_nll():
    rng = np.random.default_rng(0)
    targets = dirichlet_rows(rng, 4000, 3)
    own = soft_report(targets, targets)
    assert own["soft_ece"] == pytest.approx(0.0, abs=1e-12)
    assert own["soft_nll"] == pytest.approx(mean_entropy(targets), rel=1e-9)
    # Sharper than its annotators: same top class, larger confidence. Its NLL rises above the
    # entropy floor and its soft ECE is the mean overconfidence, while against one-hot labels drawn
    # from the same rows it would be charged for every minority vote.
    sharp = targets**3 / (targets**3).sum(axis=1, keepdims=True)
    over = soft_report(sharp, targets)
    assert over["soft_nll"] > own["soft_nll"] + 0.05
    assert over["soft_accuracy"] == pytest.approx(own["soft_accuracy"])
    assert over["soft_ece"] == pytest.approx(float((sharp.max(1) - targets.max(1)).mean()), abs=1e-12)


def test_a_hand_computed_case():
    probabilities = np.array([[0.6, 0.4], [0.9, 0.1], [0.2, 0.8]])
    targets = np.array([[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]])
    report = soft_report(probabilities, targets, n_bins=10)
    nll = -(0.5 * math.log(0.6) + 0.5 * math.log(0.4) + math.log(0.9) + math.log(0.8)) / 3
    assert report["soft_nll"] == pytest.approx(nll, rel=1e-12)
    assert report["soft_accuracy"] == pytest.approx((0.5 + 1.0 + 1.0) / 3)
    # bins (0.5, 0.6]: 0.6 vs 0.5; (0.7, 0.8]: 0.8 vs 1; (0.8, 0.9]: 0.9 vs 1
    assert report["soft_ece"] == pytest.approx((0.1 + 0.2 + 0.1) / 3)


@pytest.mark.parametrize(
    "targets, said",
    [
        (np.array([[0.5, 0.5, 0.0]]), "same shape"),
        (np.array([[0.7, 0.7]]), "distributions"),
        (np.array([[1.2, -0.2]]), "distributions"),
    ],
)
def test_targets_that_are_not_distributions_of_the_same_classes_are_refused(targets, said):
    with pytest.raises(ValueError, match=said):
        soft_report(np.array([[0.6, 0.4]]), targets)


def absolute_only(**gates) -> GatesConfig:
    return replace(
        GatesConfig(),
        max_ece=1.0,
        min_accuracy=0.0,
        max_ece_increase=None,
        max_accuracy_drop=None,
        **gates,
    )


def model_on_its_limit(rng: np.random.Generator, n: int, gap: float) -> Predictions:
    """Three classes; the top class is 0 with confidence c ~ U(0.45, 0.95), and the annotators give
    it a share a ~ Beta with mean c - gap: every image over-confident by `gap`, so the true
    calibration error against the soft labels is `gap` in any binning."""
    confidence = rng.uniform(0.45, 0.95, n)
    probabilities = np.column_stack([confidence, (1 - confidence) / 2, (1 - confidence) / 2])
    mean = confidence - gap
    strength = 6.0
    agreement = rng.beta(mean * strength, (1 - mean) * strength)
    targets = np.column_stack([agreement, (1 - agreement) / 2, (1 - agreement) / 2])
    return Predictions(probabilities, np.zeros(n, dtype=int), targets)


@pytest.mark.parametrize("metric", ["smooth_ece", "ece"])
def test_the_soft_ece_gate_passes_a_model_on_its_limit_at_most_5_percent_of_the_time_and_a_calibrated_one_mostly(
    metric,
):
    rng = np.random.default_rng(7)
    gates = absolute_only(max_soft_ece=0.05, metric=metric)
    trials = 200
    passed = sum(
        evaluate_gates(model_on_its_limit(rng, 1000, 0.05), gates, report_estimates=False).check("max_soft_ece").passed
        for _ in range(trials)
    )
    assert wilson_low(passed, trials) <= 0.05, passed / trials
    calibrated = sum(
        evaluate_gates(model_on_its_limit(rng, 1000, 0.0), gates, report_estimates=False).check("max_soft_ece").passed
        for _ in range(50)
    )
    assert calibrated >= 40, calibrated  # a bound that keeps its level by refusing everything is no gate


def test_the_soft_nll_gate_passes_a_model_on_its_limit_at_most_5_percent_of_the_time():
    rng = np.random.default_rng(3)
    pool = 50_000
    probabilities = dirichlet_rows(rng, pool, 4, 2.0)
    targets = dirichlet_rows(rng, pool, 4, 0.5)
    truth = soft_report(probabilities, targets)["soft_nll"]  # the population's soft NLL
    labels = targets.argmax(axis=1)
    on_limit, above = absolute_only(max_soft_nll=truth), absolute_only(max_soft_nll=truth + 0.25)
    trials, passed, passed_above = 200, 0, 0
    for _ in range(trials):
        rows = rng.choice(pool, 1500, replace=False)
        sample = Predictions(probabilities[rows], labels[rows], targets[rows])
        passed += evaluate_gates(sample, on_limit, report_estimates=False).check("max_soft_nll").passed
        passed_above += evaluate_gates(sample, above, report_estimates=False).check("max_soft_nll").passed
    assert wilson_low(passed, trials) <= 0.05, passed / trials
    assert passed_above / trials >= 0.9, passed_above / trials


def test_a_soft_gate_needs_soft_labels_in_the_config_and_in_the_predictions():
    with pytest.raises(ConfigError, match="gates.max_soft_ece reads each test image's distribution.*data.soft_labels"):
        load_config(None, ["gates.max_soft_ece=0.05"])
    rng = np.random.default_rng(1)
    without = Predictions(dirichlet_rows(rng, 50, 3), rng.integers(0, 3, 50))
    with pytest.raises(GateInputError, match="no soft labels to gate against"):
        evaluate_gates(without, absolute_only(max_soft_nll=1.0))


def test_a_recalibration_refuses_a_soft_gate_before_reading_anything(tmp_path):
    from calibflow.errors import RecalibrationError
    from calibflow.lifecycle.recalibrate import recalibrate

    config = load_config(None, ["data.soft_labels=soft_labels.csv", "gates.max_soft_nll=1.0"])
    with pytest.raises(RecalibrationError, match=r"gates.max_soft_nll.*--set gates.max_soft_nll=null"):
        recalibrate("models:/nowhere@champion", str(tmp_path / "new"), config, tmp_path)


# --- temperature scaling fitted against the soft labels (calibration.targets: soft) -------------


def test_temperature_fitted_on_soft_labels_recovers_the_temperature_that_made_them():
    """Annotators whose distribution is softmax(z / 1.7) exactly: the cross-entropy to them is
    least, and equal to their entropy, at T = 1.7, whatever the labels say."""
    from calibflow.calibrators.temperature import fit_temperature

    rng = np.random.default_rng(5)
    logits = rng.normal(0, 3, (4000, 4))
    targets = np.exp(logits / 1.7) / np.exp(logits / 1.7).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(4, p=row) for row in targets])
    fitted = fit_temperature(logits, labels, targets=targets)
    assert fitted.temperature == pytest.approx(1.7, rel=1e-8)
    assert fitted.nll_after == pytest.approx(mean_entropy(targets), rel=1e-9)
    # against the labels drawn from those rows, the same logits fit another temperature
    assert fit_temperature(logits, labels).temperature != pytest.approx(1.7, rel=1e-3)


def test_temperature_fitted_on_one_hot_soft_labels_is_the_hard_fit():
    from calibflow.calibrators.temperature import fit_temperature

    rng = np.random.default_rng(6)
    logits = rng.normal(0, 4, (3000, 5))
    labels = np.where(rng.random(3000) < 0.7, logits.argmax(axis=1), rng.integers(0, 5, 3000))
    soft = fit_temperature(logits, labels, targets=np.eye(5)[labels])
    assert soft.temperature == pytest.approx(fit_temperature(logits, labels).temperature, rel=1e-9)


def test_soft_calibration_targets_that_cannot_be_fitted_are_refused_by_name():
    from calibflow.calibrators.temperature import fit_temperature
    from calibflow.errors import CalibrationError

    with pytest.raises(CalibrationError, match="targets must be distributions"):
        fit_temperature(np.array([[2.0, 0.0], [0.0, 1.0]]), np.array([0, 1]), targets=np.array([[0.7, 0.7], [0, 1]]))
    soft = ["data.soft_labels=soft_labels.csv", "calibration.targets=soft"]
    for extra, needed in [
        ([], None),
        (["calibration.method=vector"], "calibration.method: temperature"),
        (["model.ensemble=3"], "model.ensemble: 1"),
        (["calibration.shift_aware=true"], "calibration.shift_aware: false"),
    ]:
        if needed is None:
            assert load_config(None, soft).calibration.targets == "soft"
            continue
        with pytest.raises(ConfigError, match=f"calibration.targets = soft .*needs {needed}"):
            load_config(None, soft + extra)
    with pytest.raises(ConfigError, match="needs data.soft_labels"):
        load_config(None, ["calibration.targets=soft"])


def test_a_soft_nll_gate_at_or_below_the_test_labels_entropy_is_refused_before_training():
    from calibflow.pipeline.data_steps import check_soft_gate_floor

    halves = np.full((40, 2), 0.5)  # entropy log 2 = 0.6931 each: no model's soft NLL is lower
    for impossible in (0.5, math.log(2)):
        with pytest.raises(ConfigError, match=r"max_soft_nll = .* at or below 0\.6931.*40 images \(labels\.csv\)"):
            check_soft_gate_floor(impossible, halves, "labels.csv")
    check_soft_gate_floor(0.7, halves, "labels.csv")  # passable by a model that says 0.5, 0.5
    check_soft_gate_floor(None, halves, "labels.csv")  # no gate
    check_soft_gate_floor(0.01, np.eye(3)[[0, 1, 2, 0]], "labels.csv")  # one-hot rows: entropy 0
