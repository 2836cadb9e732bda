"""Tests for calibflow.evaluation.plots: each figure is written as a real, non-blank PNG of sensible size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from calibflow.metrics import ReliabilityBins, calibrated_probabilities, reliability_bins, top_label
from calibflow.evaluation.plots import (
    binary_score_distributions,
    class_confidence_histograms,
    confidence_histogram,
    reliability_diagram,
)


@pytest.fixture(scope="module")
def logits_labels() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3000, 10, generator=g, dtype=torch.float64) * 4
    y = torch.multinomial(torch.softmax(z / 2.5, dim=1), 1, generator=g).squeeze(1)
    return z, y


def _check_png(path: Path, min_size: tuple[int, int]) -> Image.Image:
    assert path.is_file()
    assert path.stat().st_size > 10_000  # a blank or truncated figure is a few KB at most
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG"
        assert img.width >= min_size[0] and img.height >= min_size[1]
        pixels = np.asarray(img.convert("L"), dtype=np.float64)
    # something was drawn: a fair share of the canvas is not background white
    assert (pixels < 250).mean() > 0.05
    return img


def test_reliability_diagram_writes_png(tmp_path: Path, logits_labels) -> None:
    z, y = logits_labels
    before = reliability_bins(calibrated_probabilities(z, 1.0), y)
    after = reliability_bins(calibrated_probabilities(z, 2.5), y)
    out = tmp_path / "nested" / "reliability.png"  # parent created on demand
    result = reliability_diagram(before, after, out, title="synthetic")
    assert result == out
    img = _check_png(out, min_size=(1000, 600))
    assert img.width > img.height  # two panels side by side


def test_reliability_diagram_handles_empty_bins(tmp_path: Path) -> None:
    # Only two of five bins populated, and an "after" with no samples at all (ECE undefined).
    sparse = reliability_bins([[0.9, 0.1], [0.55, 0.45]], [0, 1], n_bins=5)
    empty = ReliabilityBins(
        edges=np.linspace(0, 1, 6),
        counts=np.zeros(5, dtype=int),
        mean_confidence=np.full(5, np.nan),
        accuracy=np.full(5, np.nan),
    )
    _check_png(reliability_diagram(sparse, empty, tmp_path / "sparse.png"), min_size=(1000, 600))


def test_confidence_histogram_one_and_two_panels(tmp_path: Path, logits_labels) -> None:
    z, y = logits_labels
    panels = {}
    for name, temperature in (("before", 1.0), ("after", 2.5)):
        confidence, prediction = top_label(calibrated_probabilities(z, temperature))
        panels[name] = (confidence, prediction == y)
    two = _check_png(confidence_histogram(panels, tmp_path / "two.png", title="synthetic"), min_size=(1000, 400))
    # numpy inputs work as well as tensors
    conf, ok = panels["before"]
    one = _check_png(confidence_histogram({"test": (conf.numpy(), ok.numpy())}, tmp_path / "one.png"), (500, 400))
    assert two.width > 1.5 * one.width  # a panel per entry


def test_confidence_histogram_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="mapping"):
        confidence_histogram((np.array([0.9]), np.array([True])), tmp_path / "x.png")
    with pytest.raises(ValueError, match="differ in length"):
        confidence_histogram({"test": (np.array([0.9, 0.8]), np.array([True]))}, tmp_path / "y.png")


def test_class_confidence_histograms_small_multiples(tmp_path: Path, logits_labels) -> None:
    z, y = logits_labels
    probs = calibrated_probabilities(z, 1.0)
    names = [f"digit {c}" for c in range(10)]
    out = class_confidence_histograms(probs, y, tmp_path / "by_class.png", class_names=names)
    img = _check_png(out, min_size=(1200, 500))
    assert img.width > img.height  # a 5 x 2 grid of panels
    # a numpy input with many classes shows only max_classes panels: a smaller figure
    g = torch.Generator().manual_seed(1)
    z100 = torch.randn(3000, 100, generator=g, dtype=torch.float64) * 4
    y100 = torch.multinomial(torch.softmax(z100 / 2.5, dim=1), 1, generator=g).squeeze(1)
    few = class_confidence_histograms(torch.softmax(z100, 1).numpy(), y100.numpy(), tmp_path / "few.png", max_classes=4)
    with Image.open(few) as small:
        assert small.width < img.width and small.height < img.height


def test_class_confidence_histograms_rejects_bad_input(tmp_path: Path) -> None:
    probs = np.array([[0.9, 0.1], [0.2, 0.8]])
    with pytest.raises(ValueError, match="class_names"):
        class_confidence_histograms(probs, np.array([0, 1]), tmp_path / "x.png", class_names=["a"])
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        class_confidence_histograms(probs, np.array([0, 2]), tmp_path / "x.png")
    with pytest.raises(ValueError, match="max_classes"):
        class_confidence_histograms(probs, np.array([0, 1]), tmp_path / "x.png", max_classes=0)


def test_binary_score_distributions(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3000, 2, generator=g, dtype=torch.float64) * 2
    y = torch.multinomial(torch.softmax(z / 1.5, dim=1), 1, generator=g).squeeze(1)
    probs = torch.softmax(z, dim=1)
    _check_png(binary_score_distributions(probs, y, tmp_path / "scores.png"), min_size=(800, 450))
    # imbalanced (log scale) and 1-D positive-class scores
    keep = (y == 0) | (torch.rand(3000, generator=g) < 0.1)
    _check_png(binary_score_distributions(probs[keep, 1].numpy(), y[keep].numpy(), tmp_path / "imb.png"), (800, 450))
    with pytest.raises(ValueError, match="binary"):
        binary_score_distributions(np.full((4, 3), 1 / 3), np.array([0, 1, 2, 0]), tmp_path / "k3.png")


def test_best_accuracy_threshold() -> None:
    from calibflow.evaluation.plots import _best_accuracy_threshold

    score = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9])
    positive = np.array([False, False, True, False, True, True])
    t, acc = _best_accuracy_threshold(score, positive)
    # brute force over every cut
    best = max(np.mean((score > c) == positive) for c in np.concatenate([[0.0], score]))
    assert acc == pytest.approx(best) and np.mean((score > t) == positive) == pytest.approx(best)


def test_reliability_diagram_panel_titles_for_other_calibrators(tmp_path: Path, logits_labels) -> None:
    z, y = logits_labels
    bins = reliability_bins(calibrated_probabilities(z, 1.0), y)
    out = reliability_diagram(
        bins, bins, tmp_path / "vector.png", panel_titles=("uncalibrated", "after vector scaling")
    )
    _check_png(out, min_size=(1000, 600))
