"""What `calibflow promote --set` records as changed from params.yaml (no registry needed: the
promotion itself is tests/test_promotion.py)."""

from __future__ import annotations

from calibflow.config import GatesConfig
from calibflow.lifecycle.promotion import gate_changes, gates_set


def test_each_changed_gate_is_named_with_both_values_and_which_way_it_moved():
    configured = GatesConfig(max_ece=0.07, min_accuracy=0.75, max_ece_increase=0.01, max_nll=None)
    used = GatesConfig(
        max_ece=0.05, min_accuracy=0.5, max_ece_increase=None, max_nll=2.0, confidence=0.9, n_resamples=400
    )
    assert [change.text() for change in gate_changes(configured, used)] == [
        "max_ece 0.07 -> 0.05 (tightened)",
        "min_accuracy 0.75 -> 0.5 (loosened)",
        "max_nll off -> 2 (tightened)",
        "max_ece_increase 0.01 -> off (loosened)",
        "confidence 0.95 -> 0.9 (loosened)",
    ]  # n_resamples sizes gate plan's simulation: not a gate
    assert gate_changes(configured, configured) == ()


def test_gates_set_reads_the_params_file_and_the_command_line(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("gates: {max_ece: 0.3, min_accuracy: 0.5}\n")
    changed = gates_set(params, ["gates.max_ece_increase=0.9", "gates.max_ece=0.3", "seed=4"])
    assert [c.text() for c in changed] == ["max_ece_increase 0.01 -> 0.9 (loosened)"]
    assert gates_set(params, []) == ()
