from calibflow.config import GatesConfig
from calibflow.gates import check_gates


def test_passing_model_passes_every_check():
    verdict = check_gates({"ece": 0.02, "accuracy": 0.95}, GatesConfig(max_ece=0.05, min_accuracy=0.9))
    assert verdict.passed
    assert all(check.passed for check in verdict.checks)


def test_each_failure_is_listed_with_value_and_threshold():
    verdict = check_gates({"ece": 0.08, "accuracy": 0.85}, GatesConfig(max_ece=0.05, min_accuracy=0.9))
    assert not verdict.passed
    summary = verdict.summary()
    assert "max_ece" in summary and "0.0800" in summary and "0.0500" in summary
    assert "min_accuracy" in summary and "0.8500" in summary
    assert summary.count("FAIL") == 2


def test_thresholds_are_inclusive():
    verdict = check_gates({"ece": 0.05, "accuracy": 0.9}, GatesConfig(max_ece=0.05, min_accuracy=0.9))
    assert verdict.passed


def test_one_failed_check_fails_the_verdict():
    verdict = check_gates({"ece": 0.051, "accuracy": 0.99}, GatesConfig(max_ece=0.05, min_accuracy=0.9))
    assert not verdict.passed
    assert [c.name for c in verdict.checks if not c.passed] == ["max_ece"]
    assert verdict.to_json()["passed"] is False
