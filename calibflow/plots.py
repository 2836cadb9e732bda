"""Calibration figures: reliability diagrams (before/after temperature scaling) and confidence histograms.

Figures are written as PNG with matplotlib's Agg backend, so they render on headless CI machines
and inside flow workers without a display.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display on servers and workers

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from calibflow.metrics import ArrayLike, ReliabilityBins  # noqa: E402

_ACC_COLOR = "#3b6fb6"
_GAP_COLOR = "#d62728"
_CORRECT_COLOR = "#2ca02c"
_WRONG_COLOR = "#d62728"
_DPI = 120


def _to_numpy(x: ArrayLike) -> np.ndarray:
    return torch.as_tensor(x).detach().cpu().numpy()


def _save(fig: plt.Figure, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=_DPI)
    # Close explicitly: pyplot keeps every figure alive otherwise, and flows draw many.
    plt.close(fig)
    return out


def _reliability_panel(ax: plt.Axes, ax_counts: plt.Axes, bins: ReliabilityBins, label: str) -> None:
    """Accuracy bars, red hatched gap to each bin's mean confidence, diagonal, and counts underneath."""
    lo, hi = bins.edges[:-1], bins.edges[1:]
    centres, width = (lo + hi) / 2, hi - lo
    nonempty = bins.counts > 0
    acc = np.where(nonempty, bins.accuracy, 0.0)
    conf = np.where(nonempty, bins.mean_confidence, 0.0)

    ax.bar(centres, acc, width=width, color=_ACC_COLOR, edgecolor="black", linewidth=0.6, label="accuracy")
    # Gap bar spans accuracy -> mean confidence: above the bar means over-confident bin, inside it
    # means under-confident.
    ax.bar(
        centres[nonempty],
        (conf - acc)[nonempty],
        bottom=acc[nonempty],
        width=width[nonempty],
        color=_GAP_COLOR,
        alpha=0.35,
        edgecolor=_GAP_COLOR,
        hatch="//",
        linewidth=0.6,
        label="gap to confidence",
    )
    # The gap bar covers the accuracy bar in under-confident bins; redraw each bar's top so the
    # accuracy level stays readable there.
    ax.hlines(acc[nonempty], lo[nonempty], hi[nonempty], color="black", linewidth=1.4, zorder=4)
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1.2, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("auto")
    ax.set_ylabel("accuracy")
    ece = bins.ece
    ece_text = "n/a" if np.isnan(ece) else f"{ece:.4f}"
    ax.set_title(f"{label}\nECE = {ece_text}   (N = {bins.total}, {bins.n_bins} bins)")
    ax.legend(loc="upper left", fontsize=8, frameon=True)
    ax.tick_params(labelbottom=False)

    ax_counts.bar(centres, bins.counts, width=width, color="gray", edgecolor="black", linewidth=0.4)
    ax_counts.set_xlim(0, 1)
    ax_counts.set_xlabel("confidence (top-label)")
    ax_counts.set_ylabel("count (log)")
    if nonempty.any():
        # Log scale: a good model puts most samples in the top bin, which would flatten the rest.
        ax_counts.set_yscale("log")
        ax_counts.set_ylim(0.8, int(bins.counts.max()) * 8)
        ax_counts.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for x, n in zip(centres[nonempty], bins.counts[nonempty]):
        ax_counts.annotate(
            str(int(n)), (x, n), xytext=(0, 1), textcoords="offset points", ha="center", va="bottom", fontsize=6
        )


def reliability_diagram(
    before: ReliabilityBins,
    after: ReliabilityBins,
    path: str | Path,
    title: str = "",
) -> Path:
    """Side-by-side reliability diagrams before / after temperature scaling (Guo et al. 2017, fig. 1).

    Each panel shows per-bin accuracy bars, the gap to the bin's mean confidence (red hatched),
    the diagonal, ECE (``sum_b n_b/N |acc_b - conf_b|`` from the bins) in the title, and per-bin
    sample counts in a strip underneath. Writes a PNG to ``path`` and returns it.
    """
    fig, axes = plt.subplots(
        2, 2, figsize=(11, 6.2), sharex="col", gridspec_kw={"height_ratios": [4, 1]}, layout="constrained"
    )
    _reliability_panel(axes[0, 0], axes[1, 0], before, "before temperature scaling")
    _reliability_panel(axes[0, 1], axes[1, 1], after, "after temperature scaling")
    if title:
        fig.suptitle(title, fontsize=12)
    return _save(fig, path)


def _histogram_panel(ax: plt.Axes, confidence: ArrayLike, correct: ArrayLike, label: str, n_bins: int) -> None:
    conf = _to_numpy(confidence).astype(np.float64).reshape(-1)
    ok = _to_numpy(correct).astype(bool).reshape(-1)
    if conf.shape != ok.shape:
        raise ValueError(f"panel {label!r}: confidence {conf.shape} and correct {ok.shape} differ in length")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ax.hist(
        [conf[ok], conf[~ok]],
        bins=edges,
        stacked=True,
        color=[_CORRECT_COLOR, _WRONG_COLOR],
        edgecolor="black",
        linewidth=0.4,
        label=[f"correct ({int(ok.sum())})", f"wrong ({int((~ok).sum())})"],
    )
    # Guo et al. draw these two lines: their distance is the average over-/under-confidence.
    if conf.size:
        ax.axvline(float(ok.mean()), color="black", linestyle="--", linewidth=1.2, label=f"accuracy {ok.mean():.3f}")
        ax.axvline(
            float(conf.mean()), color="gray", linestyle=":", linewidth=1.5, label=f"mean confidence {conf.mean():.3f}"
        )
    ax.set_xlim(0, 1)
    ax.set_xlabel("confidence (top-label)")
    ax.set_ylabel("count")
    ax.set_title(label)
    ax.legend(loc="upper left", fontsize=8)


def confidence_histogram(
    panels: Mapping[str, tuple[ArrayLike, ArrayLike]],
    path: str | Path,
    title: str = "",
    n_bins: int = 20,
) -> Path:
    """Histogram of top-label confidence, stacked into correct and wrong predictions, one panel per entry.

    ``panels`` maps a panel title to ``(confidence, correct)`` arrays, e.g.
    ``{"before": (conf_1, ok_1), "after": (conf_T, ok_T)}``; a single panel is ``{"test": (conf, ok)}``.
    Dashed lines mark accuracy and mean confidence. Writes a PNG to ``path`` and returns it.
    """
    if not isinstance(panels, Mapping) or not panels:
        raise TypeError(
            "panels must be a non-empty mapping {panel title: (confidence, correct)}, "
            f"e.g. {{'test': (conf, correct)}}; got {type(panels).__name__}"
        )
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False, sharey=True, layout="constrained"
    )
    for ax, (label, (confidence, correct)) in zip(axes[0], panels.items()):
        _histogram_panel(ax, confidence, correct, str(label), n_bins)
    if title:
        fig.suptitle(title, fontsize=12)
    return _save(fig, path)
