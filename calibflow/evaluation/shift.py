"""The corruption suite: the calibrated model on corrupted copies of the test split.

A suite is `shift.corruptions` x `shift.severities` (calibflow.evaluation.corruptions), each a cell, on
at most `shift.max_images` test images, each class its share of them (Suite.images). A run makes
the suite a chunk of images at a time, a few cells of it at once (cell_logits), and caches the
network's logits by content under `.calibflow/cache/shift/` (a chunk's test images' bytes, the
cell, the seed and the checkpoint's bytes), so a rerun on the same data and weights computes
nothing twice. What is measured per cell, before and after calibration: accuracy, ECE
(15 bins) and NLL, and their means over the cells (Ovadia et al. 2019 report the mean over
corruptions per severity; the mean over the whole suite is the number the shift gate reads).
"""

from __future__ import annotations

import hashlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal, Mapping

import numpy as np

from calibflow.evaluation.corruptions import CORRUPTION_VERSION, corrupt_batch
from calibflow.disk_cache import cached_array, load_array, store_array
from calibflow.names import CALIBRATED, UNCALIBRATED, shift_metric
from calibflow.progress import progress_bar

SUITE_TAG = "shift_suite"  # the registered version's suite (JSON), for `calibflow evaluate` and `calibflow gate`
METRICS = ("accuracy", "ece", "nll")


@dataclass(frozen=True)
class Suite:
    corruptions: tuple[str, ...]
    severities: tuple[int, ...]
    max_images: int
    seed: int
    # Which max_images test images a larger test split lends the suite: "stratified" (each class
    # its share, calibflow.data.splits.stratified_subset); "first" (the split's first rows, which
    # are in manifest order and so class by class) is how versions whose record names no
    # selection were measured, kept so `calibflow evaluate` reproduces them.
    selection: Literal["stratified", "first"] = "stratified"

    @property
    def cells(self) -> list[tuple[str, int]]:
        return [(c, s) for c in self.corruptions for s in self.severities]

    @staticmethod
    def key(corruption: str, severity: int) -> str:
        return f"{corruption}_s{severity}"

    @property
    def keys(self) -> list[str]:
        return [self.key(c, s) for c, s in self.cells]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Suite:
        raw = json.loads(text)
        return cls(
            tuple(raw["corruptions"]),
            tuple(int(s) for s in raw["severities"]),
            int(raw["max_images"]),
            int(raw["seed"]),
            raw.get("selection", "first"),
        )

    def images(self, rows: np.ndarray, manifest) -> np.ndarray:
        """The manifest rows (of `rows`, a split's, ascending) whose images the suite corrupts:
        all of them up to max_images, else a subset chosen by `selection`. `manifest`: a
        DataFrame with calibflow.data.manifest's columns."""
        rows = np.asarray(rows)
        if self.selection == "first":
            return rows[: self.max_images]
        from calibflow.data.splits import stratified_subset

        chosen = manifest.iloc[rows]
        picked = stratified_subset(
            chosen["label_index"].to_numpy(), chosen["sha256"].to_numpy(), self.max_images, self.seed
        )
        return rows[picked]


def suite_of(shift, seed: int) -> Suite | None:
    """The suite params.yaml's `shift:` section asks for, or None when it is empty."""
    if not shift.corruptions:
        return None
    return Suite(tuple(shift.corruptions), tuple(shift.severities), int(shift.max_images), int(seed))


def _digest(*parts: bytes | str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()


def corrupted_images(
    images_nhwc: np.ndarray, suite: Suite, cache_dir: str | Path | None = None, progress: str | None = None
) -> dict[str, np.ndarray]:
    """Each cell's corrupted copy of uint8 images (N, H, W, C), cached by their bytes; `progress`:
    the label of a progress bar over the images of every cell (on a terminal only)."""
    images = np.ascontiguousarray(images_nhwc)
    content = _digest(str(images.shape), images.tobytes())
    out = {}
    with progress_bar(len(images) * len(suite.cells), progress or "", enabled=progress is not None) as bar:
        for corruption, severity in suite.cells:
            key = suite.key(corruption, severity)
            path = (
                Path(cache_dir) / "images" / f"{_digest(content, key, str(suite.seed), CORRUPTION_VERSION)}.npz"
                if cache_dir
                else None
            )
            out[key] = cached_array(path, lambda c=corruption, s=severity: corrupt_batch(images, c, s, suite.seed))
            bar.update(len(images))
    return out


def suite_logits(
    corrupted: Mapping[str, np.ndarray],
    logits_of: Callable[[np.ndarray], np.ndarray],
    model_digest: str,
    cache_dir: str | Path | None = None,
    progress: str | None = None,
) -> dict[str, np.ndarray]:
    """The network's logits on each cell's images, cached by the images' bytes and `model_digest`;
    `progress`: the label of a progress bar over the images of every cell (on a terminal only)."""
    out = {}
    total = sum(len(images) for images in corrupted.values())
    with progress_bar(total, progress or "", enabled=progress is not None) as bar:
        for key, images in corrupted.items():
            path = (
                Path(cache_dir) / "logits" / f"{_digest(model_digest, str(images.shape), images.tobytes())}.npz"
                if cache_dir
                else None
            )
            out[key] = cached_array(path, lambda images=images: np.asarray(logits_of(images)))
            bar.update(len(images))
    return out


def cell_logits(
    chunks: Iterable[np.ndarray],
    n_images: int,
    suite: Suite,
    logits_of: Callable[[np.ndarray], np.ndarray],
    model_digest: str,
    cache_dir: str | Path | None = None,
    progress: str | None = None,
    *,
    cells_at_once: int = 1,
) -> dict[str, np.ndarray]:
    """The network's logits on each cell's corrupted copy of uint8 images that arrive as chunks
    (n, H, W, C), `n_images` in all, concatenated in chunk order. Each chunk's cells are made, read
    and let go before the next chunk is taken, so memory is bounded by the chunk, not by the number
    of images (a chunk's logits do not depend on the others: each image is corrupted by its own
    seed and read in eval mode). The logits are cached per chunk by its images' bytes, the cell,
    the seed, CORRUPTION_VERSION and `model_digest`: a rerun on the same images and weights
    corrupts nothing. The corrupted images themselves are not stored (cheap to make again, and
    large).

    Cells are made and read on `cells_at_once` + 1 threads, each cell corrupted and then read by
    the network on one thread, at most `cells_at_once` of them in the network at a time: numpy,
    scipy, Pillow and hashlib release the GIL in their loops, as torch does in its forward pass,
    so the cores the forward passes leave free corrupt the next cells. `logits_of` must be safe to
    call from several threads at once: a network prepared for inference is (its weights already in
    the layout collect_logits reads with, so no call moves them; models.prepare_for_inference). The
    first cell that fails stops the others: a cell waiting for the network is let go unread. At
    most `cells_at_once` + 1 corrupted copies of a chunk are held at once (at 224 px, 75 MB each for
    cells of 500 RGB images), not one per cell."""
    if cells_at_once < 1:
        raise ValueError(f"cells_at_once = {cells_at_once}: must be 1 or more")
    parts: dict[str, list[np.ndarray]] = {key: [] for key in suite.keys}
    with (
        progress_bar(n_images * len(suite.cells), progress or "", enabled=progress is not None) as bar,
        ThreadPoolExecutor(max_workers=cells_at_once + 1, thread_name_prefix="suite-cell") as cells,
    ):
        reading = threading.Semaphore(cells_at_once)
        for chunk in chunks:
            for key, logits in _chunk_cell_logits(
                chunk, suite, logits_of, model_digest, cache_dir, bar, cells, reading
            ).items():
                parts[key].append(logits)
            del chunk  # let it go before the next one is decoded
    return {key: np.concatenate(found) for key, found in parts.items()}


def _chunk_cell_logits(
    images_nhwc: np.ndarray,
    suite: Suite,
    logits_of: Callable[[np.ndarray], np.ndarray],
    model_digest: str,
    cache_dir: str | Path | None,
    bar,
    cells: ThreadPoolExecutor,
    reading: threading.Semaphore,
) -> dict[str, np.ndarray]:
    """The logits of one chunk per cell: cached cells read back, the others each corrupted and
    read on a thread of `cells`, the network reading at most as many at once as `reading` lets."""
    images = np.ascontiguousarray(images_nhwc)
    content = _digest(str(images.shape), images.tobytes())

    def cache_path(key: str) -> Path | None:
        if not cache_dir:
            return None
        return (
            Path(cache_dir)
            / "cell_logits"
            / f"{_digest(model_digest, content, key, str(suite.seed), CORRUPTION_VERSION)}.npz"
        )

    stop = threading.Event()  # set once a cell failed (or the caller was interrupted): the rest are not read

    def made_and_read(corruption: str, severity: int) -> np.ndarray | None:
        in_network = False
        try:
            if stop.is_set():
                return None
            corrupted = corrupt_batch(images, corruption, severity, suite.seed)
            in_network = reading.acquire()
            if stop.is_set():
                return None
            logits = np.asarray(logits_of(corrupted))
        except BaseException:
            stop.set()  # before this thread lets the network go (below): no cell waiting for it is read after
            raise
        finally:
            if in_network:
                reading.release()
        del corrupted
        store_array(cache_path(suite.key(corruption, severity)), logits)
        return logits

    out = {key: load_array(cache_path(key)) for key in suite.keys}
    missing = [(c, s) for c, s in suite.cells if out[suite.key(c, s)] is None]
    bar.update(len(images) * (len(suite.cells) - len(missing)))
    pending = {cells.submit(made_and_read, c, s): suite.key(c, s) for c, s in missing}
    try:
        for cell in as_completed(pending):  # the first failure as soon as it happens
            out[pending[cell]] = cell.result()
            bar.update(len(images))
    finally:
        stop.set()  # after a failure, a cell waiting for the network is not read, and none not begun is made
        for cell in pending:
            cell.cancel()
    return out


def cell_report(probabilities: np.ndarray, labels: np.ndarray, n_bins: int) -> dict[str, float]:
    """accuracy, ECE and NLL of one cell, computed as for the test split (metrics.probability_report)."""
    from calibflow.metrics import probability_report

    report = probability_report(probabilities, labels, n_bins)
    return {name: report[name] for name in METRICS}


@dataclass(frozen=True)
class SuiteResult:
    suite: Suite
    n_images: int
    cells: dict[str, dict[str, dict[str, float]]]  # key -> "before" / "after" -> metric -> value
    clean: dict[str, dict[str, float]]  # the same images uncorrupted, before / after

    @property
    def mean(self) -> dict[str, dict[str, float]]:
        return {
            when: {m: float(np.mean([cell[when][m] for cell in self.cells.values()])) for m in METRICS}
            for when in ("before", "after")
        }

    def flat_metrics(self) -> dict[str, float]:
        """MLflow metric names (calibflow.names): shift/<stage>/<corruption>_s<severity>_<metric> and
        shift/<stage>/mean_<metric>, stage uncalibrated or calibrated."""
        stage = {"before": UNCALIBRATED, "after": CALIBRATED}
        flat = {
            shift_metric(key, stage[when], m): v
            for key, cell in self.cells.items()
            for when, ms in cell.items()
            for m, v in ms.items()
        }
        flat.update({shift_metric("mean", stage[when], m): v for when, ms in self.mean.items() for m, v in ms.items()})
        return flat

    def to_json(self) -> dict:
        return {
            "suite": json.loads(self.suite.to_json()),
            "n_images": self.n_images,
            "clean": self.clean,
            "cells": self.cells,
            "mean": self.mean,
        }


def evaluate_suite(
    suite: Suite,
    before: Mapping[str, np.ndarray],
    after: Mapping[str, np.ndarray],
    clean_before: np.ndarray,
    clean_after: np.ndarray,
    labels: np.ndarray,
    n_bins: int,
) -> SuiteResult:
    """Each cell's metrics from its probabilities before (plain softmax) and after calibration."""
    cells = {
        key: {"before": cell_report(before[key], labels, n_bins), "after": cell_report(after[key], labels, n_bins)}
        for key in suite.keys
    }
    clean = {"before": cell_report(clean_before, labels, n_bins), "after": cell_report(clean_after, labels, n_bins)}
    return SuiteResult(suite, int(len(labels)), cells, clean)
