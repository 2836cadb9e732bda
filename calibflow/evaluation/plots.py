"""Calibration figures: reliability diagrams (before/after temperature scaling), confidence histograms
(overall and by true class) and, for binary tasks, the score distributions of positives and negatives.

Figures are written as PNG with matplotlib's Agg backend, so they render on headless CI machines
and inside flow workers without a display.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display on servers and workers

import matplotlib.lines  # noqa: E402
import matplotlib.patches  # noqa: E402
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


_SPARSE_ALPHA = 0.3
# A bin with fewer images than this has an accuracy too noisy to read against its confidence
# (one wrong image in five moves it by 0.2): it is drawn pale and named in the legend.
SPARSE_BIN_COUNT = 20


def _reliability_panel(ax: plt.Axes, ax_counts: plt.Axes, bins: ReliabilityBins, label: str) -> None:
    """Accuracy bars, red hatched gap to each bin's mean confidence, diagonal, and counts underneath.
    Bins holding fewer than SPARSE_BIN_COUNT images are pale: their accuracy is mostly noise."""
    lo, hi = bins.edges[:-1], bins.edges[1:]
    centres, width = (lo + hi) / 2, hi - lo
    nonempty = bins.counts > 0
    sparse = nonempty & (bins.counts < SPARSE_BIN_COUNT)
    dense = nonempty & ~sparse
    acc = np.where(nonempty, bins.accuracy, 0.0)
    conf = np.where(nonempty, bins.mean_confidence, 0.0)

    ax.bar(centres[dense], acc[dense], width=width[dense], color=_ACC_COLOR, edgecolor="black", linewidth=0.6)
    ax.bar(
        centres[sparse],
        acc[sparse],
        width=width[sparse],
        color=_ACC_COLOR,
        alpha=_SPARSE_ALPHA,
        edgecolor="gray",
        linewidth=0.6,
    )
    # Gap bar spans accuracy -> mean confidence: above the bar means over-confident bin, inside it
    # means under-confident. Hatched outline, no fill: a translucent fill over the blue bar would
    # blend into a purple the legend does not show. Pale, too, where the bin is sparse.
    for where, alpha in ((dense, 1.0), (sparse, _SPARSE_ALPHA)):
        ax.bar(
            centres[where],
            (conf - acc)[where],
            bottom=acc[where],
            width=width[where],
            facecolor="none",
            edgecolor=_GAP_COLOR,
            hatch="///",
            linewidth=0.8,
            alpha=alpha,
        )
    # The gap bar covers the accuracy bar in under-confident bins; redraw each bar's top so the
    # accuracy level stays readable there.
    ax.hlines(acc[nonempty], lo[nonempty], hi[nonempty], color="black", linewidth=1.4, zorder=4)
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1.2)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("auto")
    ax.set_ylabel("accuracy")
    ece = bins.ece
    ece_text = "n/a" if np.isnan(ece) else f"{ece:.4f}"
    ax.set_title(
        f"{label}\nECE = {ece_text}   (N = {bins.total}, {bins.n_bins} bins, "
        f"{int(sparse.sum())} of {int(nonempty.sum())} filled bins sparse)"
    )
    ax.tick_params(labelbottom=False)

    ax_counts.bar(
        centres[dense], bins.counts[dense], width=width[dense], color="gray", edgecolor="black", linewidth=0.4
    )
    ax_counts.bar(
        centres[sparse],
        bins.counts[sparse],
        width=width[sparse],
        color="gray",
        alpha=0.35,
        edgecolor="black",
        linewidth=0.4,
    )
    ax_counts.axhline(SPARSE_BIN_COUNT, color="gray", linestyle=":", linewidth=0.8)
    ax_counts.set_xlim(0, 1)
    ax_counts.set_xlabel("confidence (top-label)")
    ax_counts.set_ylabel("count (log)")
    if nonempty.any():
        # Log scale: a good model puts most samples in the top bin, which would flatten the rest.
        # The axis starts at 0.5 so that a bin of one image still has a visible bar.
        ax_counts.set_yscale("log")
        ax_counts.set_ylim(0.5, int(bins.counts.max()) * 8)
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
    panel_titles: tuple[str, str] = ("before temperature scaling", "after temperature scaling"),
) -> Path:
    """Side-by-side reliability diagrams before / after temperature scaling (Guo et al. 2017, fig. 1).

    Each panel shows per-bin accuracy bars, the gap to the bin's mean confidence (red hatched),
    the diagonal, ECE (``sum_b n_b/N |acc_b - conf_b|`` from the bins) in the title, and per-bin
    sample counts in a strip underneath. ``panel_titles`` names the two panels (e.g.
    ``("uncalibrated", "after vector scaling")`` for another calibrator). Writes a PNG to ``path``
    and returns it.
    """
    fig, axes = plt.subplots(
        2, 2, figsize=(11, 6.2), sharex="col", gridspec_kw={"height_ratios": [4, 1]}, layout="constrained"
    )
    _reliability_panel(axes[0, 0], axes[1, 0], before, panel_titles[0])
    _reliability_panel(axes[0, 1], axes[1, 1], after, panel_titles[1])
    # One legend for both panels, below them: inside a panel it would cover the bars it explains.
    handles = [
        matplotlib.patches.Patch(facecolor=_ACC_COLOR, edgecolor="black", label="accuracy"),
        matplotlib.patches.Patch(
            facecolor=_ACC_COLOR,
            alpha=_SPARSE_ALPHA,
            edgecolor="gray",
            label=f"accuracy of a bin of < {SPARSE_BIN_COUNT} images (noise)",
        ),
        matplotlib.patches.Patch(facecolor="none", edgecolor=_GAP_COLOR, hatch="///", label="gap to mean confidence"),
        matplotlib.lines.Line2D([], [], linestyle="--", color="gray", label="perfect calibration"),
        matplotlib.lines.Line2D([], [], linestyle=":", color="gray", label=f"{SPARSE_BIN_COUNT} images (counts)"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
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
    # Log counts: a good model puts nearly every image in the top bin, and on a linear axis the
    # wrong predictions spread over the others would not show at all. From 0.5: one image shows.
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.5)
    ax.set_ylabel("count (log)")
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


# --------------------------------------------------------------------------------------------
# Per-class and binary score figures
# --------------------------------------------------------------------------------------------


def _probs_labels_numpy(probs: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p = _to_numpy(probs).astype(np.float64)
    y = _to_numpy(labels).reshape(-1)
    if p.ndim != 2 or p.shape[0] != y.shape[0] or p.shape[0] == 0:
        raise ValueError(f"probs must be (N, K) and labels (N,) with N > 0; got {p.shape} and {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices; got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"labels must lie in [0, {p.shape[1]}); got min {y.min()}, max {y.max()}")
    return p, y.astype(np.int64)


def class_confidence_histograms(
    probs: ArrayLike,
    labels: ArrayLike,
    path: str | Path,
    class_names: list[str] | None = None,
    max_classes: int = 10,
    n_bins: int = 20,
    title: str = "",
) -> Path:
    """Top-label confidence histograms by true class, stacked into correct and wrong (small multiples).

    One panel per true class k: the top-label confidence of the samples labelled k, green where
    the prediction is right and red where it is wrong, with the class's accuracy (dashed) and mean
    confidence (dotted); the distance between the two lines is that class's over-/under-confidence,
    which a single global histogram averages away. With more than ``max_classes`` classes present,
    the ``max_classes`` with the largest ``|accuracy - mean confidence|`` are shown, worst first.
    Writes a PNG to ``path`` and returns it.
    """
    p, y = _probs_labels_numpy(probs, labels)
    k = p.shape[1]
    if class_names is not None and len(class_names) != k:
        raise ValueError(f"class_names has {len(class_names)} entries for {k} classes")
    if isinstance(max_classes, bool) or not isinstance(max_classes, int) or max_classes < 1:
        raise ValueError(f"max_classes must be a positive integer; got {max_classes!r}")
    names = [str(c) for c in class_names] if class_names is not None else [f"class {c}" for c in range(k)]
    conf = p.max(axis=1)
    correct = p.argmax(axis=1) == y

    present = np.flatnonzero(np.bincount(y, minlength=k) > 0)
    acc = np.array([correct[y == c].mean() for c in present])
    mean_conf = np.array([conf[y == c].mean() for c in present])
    gap = mean_conf - acc
    if present.size > max_classes:
        keep = np.argsort(-np.abs(gap), kind="stable")[:max_classes]
        subtitle = f"{max_classes} of {present.size} classes with the largest |accuracy - mean confidence|"
    else:
        keep = np.arange(present.size)
        absent = k - present.size
        subtitle = f"all {present.size} classes present" + (f" ({absent} of {k} absent)" if absent else "")

    n_panels = keep.size
    ncols = min(5, n_panels)
    nrows = -(-n_panels // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.3 * ncols, 2.7 * nrows + 0.9), squeeze=False, sharex=True, layout="constrained"
    )
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    for ax, j in zip(axes.flat, keep):
        c = int(present[j])
        members = y == c
        ax.hist(
            [conf[members & correct], conf[members & ~correct]],
            bins=edges,
            stacked=True,
            color=[_CORRECT_COLOR, _WRONG_COLOR],
            edgecolor="black",
            linewidth=0.3,
        )
        ax.axvline(acc[j], color="black", linestyle="--", linewidth=1.1)
        ax.axvline(mean_conf[j], color="gray", linestyle=":", linewidth=1.6)
        sign = "over" if gap[j] > 0 else "under"
        ax.set_title(
            f"{names[c]}  (n = {int(members.sum())})\n"
            f"acc {acc[j]:.2f}, conf {mean_conf[j]:.2f} ({sign} {abs(gap[j]):.2f})",
            fontsize=8.5,
        )
        ax.tick_params(labelsize=7)
        ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # counts
        ax.set_xlim(0, 1)
    for ax in list(axes.flat)[n_panels:]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("confidence (top-label)", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("count", fontsize=8)
    handles = [
        matplotlib.patches.Patch(facecolor=_CORRECT_COLOR, edgecolor="black", label="correct"),
        matplotlib.patches.Patch(facecolor=_WRONG_COLOR, edgecolor="black", label="wrong"),
        matplotlib.lines.Line2D([], [], color="black", linestyle="--", label="class accuracy"),
        matplotlib.lines.Line2D([], [], color="gray", linestyle=":", linewidth=1.6, label="mean confidence"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=4, fontsize=8, frameon=False)
    fig.suptitle((f"{title}\n" if title else "") + f"Confidence by true class: {subtitle}", fontsize=10)
    return _save(fig, path)


def _best_accuracy_threshold(score: np.ndarray, positive: np.ndarray) -> tuple[float, float]:
    """Threshold t maximising the accuracy of ``score > t`` on these samples, and that accuracy."""
    order = np.argsort(score, kind="stable")
    s, pos = score[order], positive[order].astype(np.int64)
    n = s.size
    # Cut after sorted position i (predict negative for s[:i+1]); only cuts between distinct scores count.
    neg_below = np.cumsum(1 - pos)
    pos_above = pos.sum() - np.cumsum(pos)
    acc = (neg_below + pos_above) / n
    valid = np.append(s[1:] > s[:-1], True)
    acc_all_pos = pos.sum() / n  # t below every score
    i = int(np.argmax(np.where(valid, acc, -1.0)))
    if acc_all_pos >= acc[i]:
        return float(s[0]) - 1e-12, float(acc_all_pos)
    t = float(s[i]) if i == n - 1 else float(0.5 * (s[i] + s[i + 1]))
    return t, float(acc[i])


def binary_score_distributions(
    probs: ArrayLike,
    labels: ArrayLike,
    path: str | Path,
    n_bins: int = 40,
    title: str = "",
) -> Path:
    """Distribution of the positive-class score ``p_1`` for positives and for negatives, on one axis (K = 2).

    The overlap of the two histograms is where a decision threshold trades false positives for
    false negatives; the default threshold 0.5 (dashed) and the threshold that maximises accuracy
    on these samples (dotted) are marked. ``probs`` is ``(N, 2)`` (or ``(N,)`` positive-class scores).
    Counts are on a log scale when one class outnumbers the other more than 5 to 1, so the minority
    class stays visible. Writes a PNG to ``path`` and returns it.
    """
    arr = _to_numpy(probs).astype(np.float64)
    if arr.ndim == 1:
        arr = np.stack([1.0 - arr, arr], axis=1)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(
            f"binary_score_distributions is for binary tasks: probs must be (N, 2) or (N,); got shape {arr.shape}"
        )
    p, y = _probs_labels_numpy(arr, labels)
    score, positive = p[:, 1], y == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())

    fig, ax = plt.subplots(figsize=(8, 4.6), layout="constrained")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    for mask, colour, label in (
        (~positive, "#3b6fb6", f"negatives (y = 0, n = {n_neg})"),
        (positive, "#e07b00", f"positives (y = 1, n = {n_pos})"),
    ):
        if mask.any():
            ax.hist(score[mask], bins=edges, color=colour, alpha=0.45, label=label)
            ax.hist(score[mask], bins=edges, histtype="step", color=colour, linewidth=1.4)
    acc_half = np.mean((score > 0.5) == positive)
    ax.axvline(0.5, color="black", linestyle="--", linewidth=1.1, label=f"threshold 0.5 (acc {acc_half:.3f})")
    if n_pos and n_neg:
        t, best = _best_accuracy_threshold(score, positive)
        ax.axvline(
            min(max(t, 0.0), 1.0),
            color="#2ca02c",
            linestyle=":",
            linewidth=2.0,
            label=f"best-accuracy threshold {t:.3f} (acc {best:.3f})",
        )
    # Headroom above the tallest bar keeps the legend off the histograms.
    bottom, top = ax.get_ylim()
    if min(n_pos, n_neg) > 0 and max(n_pos, n_neg) > 5 * min(n_pos, n_neg):
        ax.set_yscale("log")
        ax.set_ylim(0.7, top * 6)
        ax.set_ylabel("count (log)")
    else:
        ax.set_ylim(bottom, top * 1.35)
        ax.set_ylabel("count")
    ax.set_xlim(0, 1)
    ax.set_xlabel("positive-class score  p(y = 1)")
    ax.set_title(title or "Positive-class score by true class")
    ax.legend(loc="upper center", fontsize=8)
    return _save(fig, path)


def decision_score_histograms(
    scores: Mapping[str, ArrayLike],
    is_positive: ArrayLike,
    path: str | Path,
    threshold: float | None = None,
    positive_name: str = "positive",
    n_bins: int = 40,
    title: str = "",
) -> Path:
    """Class-conditional histograms of the positive-class probability, one panel per entry of
    ``scores`` (e.g. before and after calibration), with the served threshold marked in the
    calibrated panel. Counts on a log scale: the two classes' tails, where the threshold sits, are
    a few images each, and a linear axis shows only the peaks at 0 and 1."""
    positive = _to_numpy(is_positive).astype(bool).reshape(-1)
    names = list(scores)
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4.2), layout="constrained", squeeze=False)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    for ax, name in zip(axes[0], names):
        score = _to_numpy(scores[name]).astype(np.float64).reshape(-1)
        for mask, colour, label in (
            (~positive, "#3b6fb6", f"not {positive_name} (n = {int((~positive).sum())})"),
            (positive, "#e07b00", f"{positive_name} (n = {int(positive.sum())})"),
        ):
            if mask.any():
                ax.hist(score[mask], bins=edges, color=colour, alpha=0.45, label=label)
                ax.hist(score[mask], bins=edges, histtype="step", color=colour, linewidth=1.4)
        if threshold is not None and name == names[-1]:
            ax.axvline(
                threshold, color="black", linestyle="--", linewidth=1.2, label=f"served threshold {threshold:.3f}"
            )
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_xlim(0.0, 1.0)
        ax.set_xlabel(f"P({positive_name})")
        ax.set_ylabel("images (symlog)")
        ax.set_title(name)
        ax.legend(fontsize=8, loc="upper center")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def risk_coverage_curve(
    coverage: ArrayLike,
    risk: ArrayLike,
    path: str | Path,
    served: tuple[float, float] | None = None,
    max_risk: float | None = None,
    title: str = "",
) -> Path:
    """Selective risk (error rate of the kept predictions) against coverage (the share kept), the
    most confident first; the served threshold's point and the risk target marked."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
    ax.plot(_to_numpy(coverage), _to_numpy(risk), color=_ACC_COLOR, linewidth=1.6, label="keep the most confident")
    if max_risk is not None:
        ax.axhline(max_risk, color=_GAP_COLOR, linestyle="--", linewidth=1.1, label=f"risk target {max_risk:g}")
    if served is not None:
        ax.plot(
            [served[0]],
            [served[1]],
            marker="o",
            color="black",
            linestyle="none",
            label=f"served threshold: coverage {served[0]:.3f}, risk {served[1]:.3f}",
        )
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(bottom=0.0)
    ax.set_xlabel("coverage (share of predictions kept)")
    ax.set_ylabel("selective risk (error rate of the kept)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    if title:
        ax.set_title(title)
    return _save(fig, path)


def shift_curves(result: dict, path: str | Path, title: str = "") -> Path:
    """ECE and accuracy against corruption severity, one line per corruption (severity 0: the same
    test images uncorrupted), before and after calibration; `result` is shift.SuiteResult.to_json()."""
    suite = result["suite"]
    severities = [0, *suite["severities"]]
    fig, axes = plt.subplots(2, 2, figsize=(10.0, 7.0), sharex=True, sharey="row", layout="constrained")
    colors = plt.get_cmap("tab10")
    for column, when in enumerate(("before", "after")):
        for row, metric in enumerate(("ece", "accuracy")):
            ax = axes[row, column]
            for i, corruption in enumerate(suite["corruptions"]):
                values = [result["clean"][when][metric]] + [
                    result["cells"][f"{corruption}_s{s}"][when][metric] for s in suite["severities"]
                ]
                ax.plot(severities, values, marker="o", color=colors(i % 10), linewidth=1.4, label=corruption)
            mean = [result["clean"][when][metric]] + [
                float(np.mean([result["cells"][f"{c}_s{s}"][when][metric] for c in suite["corruptions"]]))
                for s in suite["severities"]
            ]
            ax.plot(severities, mean, color="black", linestyle="--", linewidth=1.8, label="mean")
            ax.set_ylabel("ECE (15 bins)" if metric == "ece" else "accuracy")
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title("before calibration (softmax)" if when == "before" else "after calibration")
            if row == 1:
                ax.set_xlabel("severity (0: uncorrupted)")
                ax.set_xticks(severities)
    axes[0, 0].set_ylim(bottom=0.0)
    axes[1, 0].set_ylim(0.0, 1.0)
    axes[0, 1].legend(fontsize=8, loc="upper left")
    fig.suptitle(title or f"corruption suite on {result['n_images']} test images")
    return _save(fig, path)


def ood_score_histograms(scores: Mapping[str, tuple[ArrayLike, ArrayLike]], path: str | Path, title: str = "") -> Path:
    """One panel per OOD score: its histogram on the test split (in-distribution) and on the
    out-of-distribution images. `scores`: name -> (in-distribution, out-of-distribution)."""
    fig, axes = plt.subplots(1, len(scores), figsize=(5.2 * len(scores), 4.0), layout="constrained", squeeze=False)
    for ax, (name, (inside, outside)) in zip(axes[0], scores.items()):
        inside, outside = _to_numpy(inside), _to_numpy(outside)
        low, high = float(min(inside.min(), outside.min())), float(max(inside.max(), outside.max()))
        edges = np.linspace(low, high if high > low else low + 1.0, 31)
        ax.hist(inside, bins=edges, alpha=0.6, color=_CORRECT_COLOR, density=True, label=f"test split ({len(inside)})")
        ax.hist(outside, bins=edges, alpha=0.6, color=_WRONG_COLOR, density=True, label=f"OOD ({len(outside)})")
        ax.set_xlabel(name)
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
