import numpy as np
import pytest

from calibflow.config import GatesConfig
from calibflow.gates.checks import Predictions, evaluate_gates
from calibflow.errors import GateInputError


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


GATES = GatesConfig(max_ece=0.05, min_accuracy=0.5, max_ece_increase=0.02, max_accuracy_drop=0.02)


def test_well_calibrated_model_on_many_images_passes():
    verdict = evaluate_gates(synthetic(20_000), GATES)
    assert verdict.passed and verdict.n_samples == 20_000
    assert [c.name for c in verdict.checks] == ["max_ece", "min_accuracy"]


def test_bounds_sit_beyond_the_estimate_and_the_verdict_reads_the_bound():
    verdict = evaluate_gates(synthetic(2_000, gap=0.03), GATES)
    for check in verdict.checks:
        assert (check.bound >= check.value) if check.comparison == "<=" else (check.bound <= check.value)
        assert check.passed == (
            check.bound <= check.threshold if check.comparison == "<=" else check.bound >= check.threshold
        )
        assert check.method


def test_point_estimate_under_the_threshold_but_upper_bound_over_it_fails():
    candidate = synthetic(300, gap=0.03, seed=1)
    probe = evaluate_gates(candidate, GATES).checks[0]
    threshold = (probe.value + probe.bound) / 2
    verdict = evaluate_gates(candidate, GatesConfig(max_ece=threshold, min_accuracy=0.5))
    ece = verdict.checks[0]
    assert ece.value < threshold < ece.bound and not ece.passed and not verdict.passed
    assert "max_ece" in verdict.summary() and "FAIL" in verdict.summary()


def test_relative_checks_compare_with_the_champion_on_the_same_images():
    champion = synthetic(3_000, gap=0.0, seed=2)
    same = evaluate_gates(champion, GATES, comparison=(champion, champion))
    increase = same.check("max_ece_increase")
    assert increase.value == 0.0 and 0.0 < increase.bound < 0.01 and same.passed

    worse = Predictions(synthetic(3_000, gap=0.1, seed=2).probabilities, champion.labels)
    verdict = evaluate_gates(worse, GATES, comparison=(worse, champion))
    assert not next(c for c in verdict.checks if c.name == "max_ece_increase").passed
    assert not verdict.passed


def test_absolute_passed_ignores_the_relative_checks():
    champion = synthetic(3_000, seed=3)
    worse = Predictions(synthetic(3_000, gap=0.04, seed=3).probabilities, champion.labels)
    verdict = evaluate_gates(
        worse, GatesConfig(max_ece=0.2, min_accuracy=0.5, max_ece_increase=0.0), comparison=(worse, champion)
    )
    assert verdict.absolute_passed and not verdict.passed


def test_relative_gates_may_read_fewer_images_than_the_absolute_ones():
    candidate = synthetic(2_000, seed=4)
    shared = Predictions(candidate.probabilities[:500], candidate.labels[:500])
    verdict = evaluate_gates(candidate, GATES, comparison=(shared, shared))
    assert verdict.n_samples == 2_000 and verdict.n_shared == 500


def test_champion_on_other_images_is_refused():
    with pytest.raises(GateInputError, match="same test images"):
        evaluate_gates(synthetic(100, seed=0), GATES, comparison=(synthetic(100, seed=0), synthetic(100, seed=1)))


def test_nan_probabilities_are_refused_with_the_row():
    candidate = synthetic(50)
    broken = candidate.probabilities.copy()
    broken[7, 0] = np.nan
    with pytest.raises(GateInputError, match=r"1 of 50 rows .* NaN .* row 7"):
        evaluate_gates(Predictions(broken, candidate.labels), GATES)


def test_logits_are_refused():
    candidate = synthetic(50)
    with pytest.raises(GateInputError, match="not logits"):
        evaluate_gates(Predictions(candidate.probabilities * 7 - 2, candidate.labels), GATES)


def test_empty_shared_split_is_refused():
    candidate = synthetic(200)
    empty = Predictions(candidate.probabilities[:0], candidate.labels[:0])
    with pytest.raises(GateInputError, match="no test images .* --against"):
        evaluate_gates(candidate, GATES, comparison=(empty, empty))


def test_a_champion_with_other_classes_is_not_comparable():
    candidate, champion = synthetic(300, k=3), synthetic(300, k=4)
    champion = Predictions(champion.probabilities, candidate.labels)
    with pytest.raises(GateInputError, match="not comparable"):
        evaluate_gates(candidate, GATES, comparison=(candidate, champion))


def test_every_gate_reports_its_key_and_method():
    champion = synthetic(3_000, seed=5)
    gates = GatesConfig(
        max_ece=0.05,
        min_accuracy=0.5,
        max_nll=1.0,
        max_ece_increase=0.02,
        max_accuracy_drop=0.02,
        max_brier_increase=0.02,
    )
    verdict = evaluate_gates(champion, gates, comparison=(champion, champion))
    assert [c.name for c in verdict.checks] == [
        "max_ece",
        "min_accuracy",
        "max_nll",
        "max_ece_increase",
        "max_accuracy_drop",
        "max_brier_increase",
    ]
    assert {c.method for c in verdict.checks} == {
        "intersection-union score",
        "clopper-pearson",
        "betting (Waudby-Smith & Ramdas), losses in [0, -log eps]",
        "betting on paired and cross-fitted values",
        "paired score (Tango)",
        "betting on the paired Brier difference",
    }
    # the champion against itself: every relative gate passes on 3,000 images
    assert all(verdict.check(name).passed for name in ("max_ece_increase", "max_brier_increase"))
    assert set(verdict.estimates) == {"ece_plugin", "ece_debiased_l2", "smooth_ece", "smooth_ece_sigma"}


def test_smooth_metric_gates_the_smooth_ece():
    candidate = synthetic(5_000, gap=0.0, seed=6)
    verdict = evaluate_gates(candidate, GatesConfig(max_ece=0.05, min_accuracy=0.5, metric="smooth_ece"))
    check = verdict.check("max_ece")
    assert check.metric.startswith("smooth ECE") and check.value == pytest.approx(verdict.estimates["smooth_ece"])
    assert check.passed


def test_a_failed_check_shows_the_relation_that_holds_not_the_one_required():
    from calibflow.gates.checks import GateCheck

    def check(comparison, passed):
        return GateCheck("g", "m", 0.5, 0.0143, 0.01, comparison, passed)

    assert (check("<=", True).relation, check("<=", False).relation) == ("<=", ">")
    assert (check(">=", True).relation, check(">=", False).relation) == (">=", "<")


def test_a_single_column_of_probabilities_is_refused_not_passed():
    """A one-column probability matrix is right by construction: it passed every gate."""
    from calibflow.errors import GateInputError, is_refusal

    with pytest.raises(GateInputError, match="single column") as one_column:
        evaluate_gates(Predictions(np.ones((500, 1)), np.zeros(500, dtype=int)), GATES)
    assert is_refusal(one_column.value)
