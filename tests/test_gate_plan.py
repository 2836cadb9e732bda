"""`calibflow gate plan`: the planned size is checked by simulating at it from the true model."""

import numpy as np
import pytest

from calibflow.config import GatesConfig
from calibflow.gates.plan import plan_from_thresholds, plan_sample_size, smallest_passable
from calibflow.gates.checks import Predictions, evaluate_gates

GATES = GatesConfig(max_ece=0.03, min_accuracy=0.8, max_ece_increase=None, max_accuracy_drop=None)


def true_model(n, rng, gap=0.01):
    """Spread confidences, right with probability c - gap: a known reliability curve."""
    conf = 0.5 + 0.5 * rng.beta(5.0, 2.0, n)
    right = rng.random(n) < conf - gap
    probs = np.stack([conf, 1 - conf], 1)
    return Predictions(probs, np.where(right, 0, 1))


def pass_rate(n, trials, rng, gates=GATES):
    return np.mean([evaluate_gates(true_model(n, rng), gates, report_estimates=False).passed for _ in range(trials)])


@pytest.mark.slow
def test_planned_size_gives_the_planned_power_on_the_true_model():
    rng = np.random.default_rng(0)
    measured = true_model(4000, rng)  # what the candidate's test split showed
    plan = plan_sample_size(measured, GATES, simulations=150, seed=1)
    assert plan.needed is not None and 1_000 < plan.needed < 20_000
    # fresh test sets from the *true* model, not the plan's estimate of it
    at_plan = pass_rate(plan.needed, 200, rng)
    assert 0.65 <= at_plan <= 0.97
    assert pass_rate(plan.needed // 4, 200, rng) < at_plan - 0.25


def test_a_model_beyond_a_threshold_gets_no_size():
    measured = true_model(3000, np.random.default_rng(2), gap=0.06)  # ECE 0.06 > 0.03: no n will do
    plan = plan_sample_size(measured, GATES, simulations=40, seed=0, sizes=(1_000, 10_000, 50_000))
    assert plan.needed is None and "no size up to 50,000" in plan.describe()


@pytest.mark.slow
def test_thresholds_only_plan_for_the_default_gates_fits_the_default_digits_test_split():
    plan = plan_from_thresholds(GatesConfig(), n_classes=10, simulations=100)
    # More than the 267 test images of the former default split (the flow warned), no more than
    # the 720 of today's (the flow does not).
    assert plan.needed is not None and 267 < plan.needed <= 720
    assert "halfway inside the thresholds" in plan.assumptions
    assert {"max_ece", "min_accuracy"} == set(plan.rows[0].gate_pass_rates)


def test_smallest_passable_says_when_no_model_could_pass():
    assert smallest_passable(GatesConfig(), 267, 10)
    assert not smallest_passable(GatesConfig(max_ece=0.005, min_accuracy=0.999), 267, 10)


def test_power_out_of_range_is_refused():
    with pytest.raises(ValueError, match="power"):
        plan_sample_size(true_model(100, np.random.default_rng(3)), GATES, power=1.0)
    with pytest.raises(ValueError, match="power"):
        plan_from_thresholds(GATES, power=2.0)


@pytest.mark.slow
def test_the_flow_warns_on_a_test_split_too_small_for_the_gates():
    from calibflow.gates.plan import small_test_split_warning

    warning = small_test_split_warning(267, 10, GatesConfig())  # the default gates, on too few images
    assert warning is not None and "267 images" in warning and "gate plan" in warning
    assert small_test_split_warning(720, 10, GatesConfig()) is None  # the default digits test split
    assert small_test_split_warning(20_000, 10, GatesConfig()) is None
    impossible = small_test_split_warning(100, 10, GatesConfig(max_ece=0.005, min_accuracy=0.999))
    assert impossible is not None and "no model can pass" in impossible


@pytest.mark.slow
def test_the_gate_power_warning_is_read_back_for_the_same_settings_and_recomputed_for_others(tmp_path, monkeypatch):
    from calibflow.gates import plan as gate_plan

    calls = []
    compute = gate_plan._small_test_split_warning
    monkeypatch.setattr(gate_plan, "_small_test_split_warning", lambda *a: calls.append(a) or compute(*a))
    first = gate_plan.small_test_split_warning(267, 10, GatesConfig(), cache_directory=tmp_path)
    again = gate_plan.small_test_split_warning(267, 10, GatesConfig(), cache_directory=tmp_path)
    assert first is not None and again == first and len(calls) == 1
    assert gate_plan.small_test_split_warning(20_000, 10, GatesConfig(), cache_directory=tmp_path) is None
    assert gate_plan.small_test_split_warning(267, 10, GatesConfig(max_ece=0.04), cache_directory=tmp_path) != first
    assert len(calls) == 3  # another size, another threshold: each computed
    for stored in (tmp_path / "gate_power").glob("*.json"):  # a half-written file is a miss, not an error
        stored.write_text('{"value": ')
    assert gate_plan.small_test_split_warning(267, 10, GatesConfig(), cache_directory=tmp_path) == first
    assert len(calls) == 4


@pytest.mark.slow
def test_the_gate_power_cache_key_covers_the_gate_code(tmp_path, monkeypatch):
    from calibflow import disk_cache
    from calibflow.gates import plan as gate_plan

    gate_plan.small_test_split_warning(267, 10, GatesConfig(), cache_directory=tmp_path)
    monkeypatch.setattr(disk_cache, "files_digest", lambda paths: "edited gate code")
    calls = []
    compute = gate_plan._small_test_split_warning
    monkeypatch.setattr(gate_plan, "_small_test_split_warning", lambda *a: calls.append(a) or compute(*a))
    gate_plan.small_test_split_warning(267, 10, GatesConfig(), cache_directory=tmp_path)
    assert len(calls) == 1
