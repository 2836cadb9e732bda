"""The two solves inside calibflow.calibrators.temperature.fit_temperature, checked against each other and
piece by piece: the warm-started Halley solve large splits get, with its curvature terms, blocked
passes and fallback, against the bracketed Newton solve."""

from __future__ import annotations

import math

import pytest
import torch

from calibflow.calibrators import temperature as C
from calibflow.calibrators.temperature import fit_temperature
from tests.test_temperature import _reference_temperature, _sample


def _count_full_passes(monkeypatch: pytest.MonkeyPatch, n_rows: int) -> list[int]:
    """Counts the objective's passes over all ``n_rows`` rows (a subsample's passes not included)."""
    calls = [0]
    blocks = C._Objective._blocks

    def counting_blocks(self, beta):
        calls[0] += self.z.shape[0] == n_rows
        return blocks(self, beta)

    monkeypatch.setattr(C._Objective, "_blocks", counting_blocks)
    return calls


@pytest.mark.slow
def test_both_solvers_agree_and_warm_start_saves_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    # A split as large as the benchmark's: the warm-started solve (the default from
    # WARM_START_MIN_ROWS rows) lands on the bracketed solve's root and NLLs in fewer full passes.
    n = 50_000
    z, y = _sample(seed=11, n=n, k=100, t_true=2.0)
    z = z.float()  # what a model emits
    passes = _count_full_passes(monkeypatch, n)
    monkeypatch.setattr(C, "WARM_START_MIN_ROWS", 10**12)
    bracketed = fit_temperature(z, y)
    bracketed_passes, passes[0] = passes[0], 0
    monkeypatch.setattr(C, "WARM_START_MIN_ROWS", 16_384)
    warm = fit_temperature(z, y)
    assert warm.temperature == pytest.approx(bracketed.temperature, rel=1e-10)
    assert warm.nll_after == pytest.approx(bracketed.nll_after, rel=1e-13)
    assert warm.nll_before == pytest.approx(bracketed.nll_before, rel=1e-13)
    # two Halley passes and NLL(T=1), against T=1, a bound check and >= 3 Newton steps
    assert passes[0] == 3 and bracketed_passes >= 5, (passes[0], bracketed_passes)


def test_curvature_terms_match_finite_differences() -> None:
    # g(t) = dNLL/dbeta at beta = exp(-t); Halley's step needs g' and g'' exactly.
    z, y = _sample(seed=21, n=4000, k=10, t_true=1.5)
    checked_z, checked_y, _, row_max = C._checked(z, y)
    objective = C._Objective(checked_z, checked_y, row_max)
    for t in (-0.5, 0.3, 1.2):
        nll, g, dg, d2g = objective.at_with_curvature(t)
        h = 1e-4
        plus, minus = objective.at(t + h), objective.at(t - h)
        assert (nll, g, dg) == pytest.approx(objective.at(t), rel=1e-12)
        assert dg == pytest.approx((plus[1] - minus[1]) / (2 * h), rel=1e-6)
        assert d2g == pytest.approx((plus[2] - minus[2]) / (2 * h), rel=1e-5)
        # and dNLL/dt = -beta * g
        assert -math.exp(-t) * g == pytest.approx((plus[0] - minus[0]) / (2 * h), rel=1e-6)


@pytest.mark.parametrize("block_elements", [10, 1000, 10**9])
def test_blocked_passes_do_not_depend_on_block_size(monkeypatch: pytest.MonkeyPatch, block_elements: int) -> None:
    z, y = _sample(seed=22, n=3001, k=10, t_true=0.8)  # 3001: the last block is a partial one
    reference = fit_temperature(z, y)
    monkeypatch.setattr(C, "BLOCK_ELEMENTS", block_elements)
    fit = fit_temperature(z, y)
    assert fit.temperature == pytest.approx(reference.temperature, rel=1e-12)
    assert fit.nll_after == pytest.approx(reference.nll_after, rel=1e-13)


def test_warm_start_falls_back_when_the_subsample_has_no_interior_optimum(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every subsampled row (the even ones) is separable, the others are informative: the subsample
    # fit hits the lower bound, and the full data still gets its interior optimum from scratch.
    z, y = _sample(seed=23, n=4000, k=10, t_true=1.5)
    z[::2] = torch.randn(2000, 10, dtype=torch.float64)
    y[::2] = z[::2].argmax(dim=1)
    z[torch.arange(0, 4000, 2), y[::2]] += 40.0
    monkeypatch.setattr(C, "WARM_START_MIN_ROWS", 0)
    monkeypatch.setattr(C, "WARM_START_ROWS", 2000)  # stride 2: exactly the separable rows
    checked_z, checked_y, _, row_max = C._checked(z, y)
    assert C._warm_start(checked_z, checked_y, row_max, math.log(0.05), math.log(20.0)) is None
    fit = fit_temperature(z, y)
    assert fit.temperature == pytest.approx(_reference_temperature(z.numpy(), y.numpy()), rel=1e-3)
