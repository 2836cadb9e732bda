import numpy as np
import pytest

from calibflow.config import GatesConfig
from calibflow.gates import Predictions, evaluate_gates


def synthetic(n, gap=0.0, seed=0, k=3):
    """Top-label confidence c ~ U(0.6, 1) with correctness drawn as Bernoulli(c - gap): true ECE = gap."""
    rng = np.random.default_rng(seed)
    confidence = rng.uniform(0.6, 1.0, n)
    labels = rng.integers(0, k, n)
    correct = rng.random(n) < np.clip(confidence - gap, 0, 1)
    predicted = np.where(correct, labels, (labels + 1) % k)
    probs = np.full((n, k), 0.0)
    probs[np.arange(n), predicted] = confidence
    for other in range(1, k):
        probs[np.arange(n), (predicted + other) % k] = (1 - confidence) / (k - 1)
    return Predictions(probs, labels)


GATES = GatesConfig(max_ece=0.05, min_accuracy=0.5, max_ece_increase=0.02, max_accuracy_drop=0.02, n_resamples=500)


def test_well_calibrated_model_on_many_images_passes():
    verdict = evaluate_gates(synthetic(20_000), GATES)
    assert verdict.passed and verdict.n_samples == 20_000
    assert [c.name for c in verdict.checks] == ["max_ece", "min_accuracy"]


def test_bounds_bracket_the_estimate_and_the_verdict_reads_the_bound():
    verdict = evaluate_gates(synthetic(2_000, gap=0.03), GATES)
    for check in verdict.checks:
        assert check.low <= check.value <= check.high
        assert check.bound == (check.high if check.comparison == "<=" else check.low)
        assert check.passed == (check.bound <= check.threshold if check.comparison == "<=" else
                                check.bound >= check.threshold)


def test_point_estimate_under_the_threshold_but_upper_bound_over_it_fails():
    candidate = synthetic(300, gap=0.03, seed=1)
    probe = evaluate_gates(candidate, GATES).checks[0]
    threshold = (probe.value + probe.bound) / 2
    verdict = evaluate_gates(candidate, GatesConfig(max_ece=threshold, min_accuracy=0.5, n_resamples=500))
    ece = verdict.checks[0]
    assert ece.value < threshold < ece.bound and not ece.passed and not verdict.passed
    assert "max_ece" in verdict.summary() and "FAIL" in verdict.summary()


def test_relative_checks_compare_with_the_champion_on_the_same_images():
    champion = synthetic(3_000, gap=0.0, seed=2)
    same = evaluate_gates(champion, GATES, comparison=(champion, champion))
    increase = next(c for c in same.checks if c.name == "max_ece_increase")
    assert increase.value == increase.low == increase.high == 0.0 and same.passed

    worse = Predictions(synthetic(3_000, gap=0.1, seed=2).probabilities, champion.labels)
    verdict = evaluate_gates(worse, GATES, comparison=(worse, champion))
    assert not next(c for c in verdict.checks if c.name == "max_ece_increase").passed
    assert not verdict.passed


def test_absolute_passed_ignores_the_relative_checks():
    champion = synthetic(3_000, seed=3)
    worse = Predictions(synthetic(3_000, gap=0.04, seed=3).probabilities, champion.labels)
    verdict = evaluate_gates(worse, GatesConfig(max_ece=0.2, min_accuracy=0.5, max_ece_increase=0.0,
                                                n_resamples=500), comparison=(worse, champion))
    assert verdict.absolute_passed and not verdict.passed


def test_relative_gates_may_read_fewer_images_than_the_absolute_ones():
    candidate = synthetic(2_000, seed=4)
    shared = Predictions(candidate.probabilities[:500], candidate.labels[:500])
    verdict = evaluate_gates(candidate, GATES, comparison=(shared, shared))
    assert verdict.n_samples == 2_000 and verdict.n_shared == 500


def test_champion_on_other_images_is_refused():
    with pytest.raises(ValueError, match="same test images"):
        evaluate_gates(synthetic(100, seed=0), GATES, comparison=(synthetic(100, seed=0), synthetic(100, seed=1)))
