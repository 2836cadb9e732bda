"""What a reviewer reads about a registered version without running anything: its page's verdict
and lineage (registration.version_description), the lineage tags, `calibflow evaluate`'s verdict
line, `calibflow status`'s rounded numbers."""

from __future__ import annotations

import json

from calibflow import names
from calibflow.gates.checks import GateCheck, GateVerdict
from calibflow.pipeline import tagging
from calibflow.tracking import registration
from cli.registry import evaluate_verdict


def verdict(*, ece_increase_passed: bool) -> GateVerdict:
    return GateVerdict(
        passed=ece_increase_passed,
        checks=(
            GateCheck("max_ece", "smooth ECE", 0.011, 0.0235, 0.05, "<=", True),
            GateCheck("min_accuracy", "accuracy", 0.98, 0.962, 0.9, ">=", True),
            GateCheck("max_ece_increase", "ECE difference", 0.0, 0.0143, 0.01, "<=", ece_increase_passed),
        ),
        n_samples=720,
        n_shared=720,
    )


BASE_TAGS = {
    "data_hash": "17d3f0.dir",
    "data_path": "data/digits",
    "data_rev": "a" * 40,
    "git_commit": "b" * 40,
    "params_hash": "0123456789abcdef",
    "seed": "0",
    "split_digest": "d1g35t",
    "test/calibrated/ece": "0.012345678901",
    "test/calibrated/accuracy": "0.8319444444444445",
    "calibration/temperature": "0.9560123",
    "calibration/method": "temperature",
}


def version_tags(gates: GateVerdict, alias: str | None = "challenger") -> dict[str, str]:
    return {
        **BASE_TAGS,
        **registration.lineage_tags(
            split_sizes={"test": 720, "train": 539, "val": 90, "calibration": 448},
            params={"model.arch": "small_cnn", "train.epochs": 30, "train.lr": 0.05, "gates.max_ece": 0.05},
            verdict_tags=tagging.run_verdict(gates, "2", alias).tags(),
        ),
    }


def test_lineage_tags_hold_split_sizes_key_params_and_the_three_part_verdict():
    tags = version_tags(verdict(ece_increase_passed=False))
    assert json.loads(tags["split_sizes"]) == {"train": 539, "val": 90, "calibration": 448, "test": 720}
    assert list(json.loads(tags["split_sizes"])) == ["train", "val", "calibration", "test"]  # split order
    assert tags["params/model.arch"] == "small_cnn" and tags["params/train.epochs"] == "30"
    assert "params/gates.max_ece" not in tags  # the gates are in the verdict, every param on the run
    assert tags[names.VERDICT_ABSOLUTE] == names.PASSED and tags[names.VERDICT_CHAMPION] == names.FAILED
    assert tags[names.VERDICT_PROMOTED] == names.AT_CHALLENGER
    assert tags[names.VERDICT_FAILED] == "max_ece_increase 0.0143 > 0.01"


def test_recorded_verdict_is_the_one_line_every_other_place_says():
    for passed in (True, False):
        tags = version_tags(verdict(ece_increase_passed=passed))
        assert registration.recorded_verdict(tags) == names.verdict_text(tags)
    failed = registration.recorded_verdict(version_tags(verdict(ece_increase_passed=False)))
    assert "max_ece_increase 0.0143 > 0.01" in failed and "version 2" in failed
    assert "0.0143" not in registration.recorded_verdict(version_tags(verdict(ece_increase_passed=True)))
    assert registration.recorded_verdict(BASE_TAGS) is None


def test_recorded_verdict_of_an_older_run_reads_its_check_tags_with_the_relation_that_holds():
    """A run tagged before the three-part verdict, when a failed check read '<= 0.01'."""
    old = {
        "gate/verdict": "failed",
        "gate/absolute": "passed",
        "gate/against": "version 1",
        "gate/max_ece": "passed: smooth ECE 0.0110, 95% upper 0.0235 <= 0.05",
        "gate/max_ece_increase": "FAILED: ECE difference 0.0000, 95% upper 0.0143 <= 0.01",
        "gate/min_accuracy": "FAILED: accuracy 0.8000, 95% lower 0.7700 < 0.9",
    }
    text = registration.recorded_verdict(old)
    assert text.startswith(names.verdict_text(old))
    assert text.endswith("max_ece_increase 0.0143 > 0.01; min_accuracy 0.7700 < 0.9")


def test_version_description_leads_with_the_verdict_then_the_lineage():
    tags = version_tags(verdict(ece_increase_passed=False))
    text = registration.version_description(
        "calibflow-digits", "3", tags, alias="challenger", run_id="r1", summary="## calibflow run: registered"
    )
    lines = text.splitlines()
    assert lines[0] == f"**calibflow-digits version 3** (@challenger): {names.verdict_text(tags)}"
    for expected in (
        "DVC hash `17d3f0.dir`",
        f"git revision `{'a' * 40}`",
        f"git commit `{'b' * 40}`",
        "hash `0123456789abcdef`, seed 0",
        "model.arch small_cnn",
        "train.epochs 30",
        "train 539 · val 90 · calibration 448 · test 720",
        "ECE 0.0123, accuracy 0.8319; calibration temperature, T 0.9560",
        "`r1`",
    ):
        assert expected in text, expected
    assert lines[-1] == "## calibflow run: registered"  # the run's summary below


def test_version_description_of_a_version_without_the_new_tags_still_says_what_it_has():
    text = registration.version_description("m", "1", BASE_TAGS)
    assert text.splitlines()[0] == "**m version 1**: verdict not recorded on this version"
    assert "sizes not recorded" in text and "DVC hash `17d3f0.dir`" in text


def test_shown_number_rounds_rates_and_keeps_what_is_not_a_number():
    assert registration.shown_number("0.8319444444444445") == "0.8319"
    assert registration.shown_number("1") == "1.0000"
    assert registration.shown_number("") == ""
    assert registration.shown_number(None) == ""
    assert registration.shown_number("n/a") == "n/a"


def test_evaluate_verdict_line_says_reproduced_and_the_recorded_gates():
    line = evaluate_verdict(
        "models:/m@champion", "3", [], "gates failed: max_ece_increase 0.0143 > 0.01 (absolute gates passed)"
    )
    assert line == (
        "calibflow evaluate: models:/m@champion is version 3: metrics reproduced; at registration, "
        "gates failed: max_ece_increase 0.0143 > 0.01 (absolute gates passed)"
    )
    assert "metrics DIFFER" in evaluate_verdict("models:/m/1", "1", ["ece 0.1 != logged 0.2"], None)
    assert evaluate_verdict("models:/m/1", "1", [], None).endswith("no gate verdict was recorded for it")
