"""The dataset manifest: one row per file of an ImageFolder dataset (`<root>/<class>/<file>`).

The manifest is what data validation looks at and what the splits are cut from, so it records,
for every file, where it is, which class folder it sits in, whether it really decodes as an image
(a truncated PNG does not), its size and mode, and a content hash (duplicates and train/test
leakage are found by hash, not by name). Every non-hidden regular file under a class folder is
listed, images or not: a stray `notes.txt` in a class folder is a data error for validation to
report, not something to skip silently.

Nothing here imports Prefect or MLflow; it is plain pandas and Pillow.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image, ImageFile, UnidentifiedImageError
from calibflow.data.images import transparency_problem, upright
from calibflow.errors import ManifestError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

# Column order of a manifest, and the dtype each column has after build_manifest/load_manifest.
MANIFEST_COLUMNS: tuple[str, ...] = (
    "path",
    "label",
    "label_index",
    "width",
    "height",
    "mode",
    "channels",
    "size",
    "sha256",
    "decodable",
    "error",
)
_INT_COLUMNS = ("label_index", "width", "height", "channels")
_BOOL_COLUMNS = ("decodable",)
_STR_COLUMNS = ("path", "label", "mode", "size", "sha256", "error")

_MIN_FILES_PER_WORKER = 256
_PILOT_FILES = 256
_THREADS_PAY_OFF_S = 250e-6  # per-file decode time above which a thread pool is used


def _default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(16, cpus))


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True when the file name has one of IMAGE_SUFFIXES (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def list_classes(root: str | os.PathLike[str]) -> list[str]:
    """Sorted names of the class folders (non-hidden immediate subdirectories) of `root`."""
    root = Path(root)
    if not root.exists():
        raise ManifestError(
            f"dataset root {str(root)!r} does not exist: expected an ImageFolder directory "
            "<root>/<class>/<image>. Fix: point data.path at the dataset (or run `dvc pull` to "
            "fetch it)."
        )
    if not root.is_dir():
        raise ManifestError(
            f"dataset root {str(root)!r} is a file, not a directory: expected an ImageFolder "
            "directory <root>/<class>/<image>. Fix: point data.path at the dataset directory."
        )
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not _is_hidden(entry.name))
    if not classes:
        stray = sum(1 for entry in os.scandir(root) if entry.is_file() and not _is_hidden(entry.name))
        found = (
            f"found {stray} file(s) directly in the root and no class folders" if stray else ("found no class folders")
        )
        raise ManifestError(
            f"{str(root)!r} is not an ImageFolder: expected <root>/<class>/<image> with one "
            f"subdirectory per class, {found}. Fix: put each class's images in its own "
            "subdirectory named after the class."
        )
    return classes


def _walk(root: str, rel_dir: str, folders: list[str]) -> Iterator[str]:
    """Posix paths, relative to root, of every non-hidden regular file under root/rel_dir
    (recursively, following symlinks), skipping hidden files and folders; the non-hidden folders
    met on the way are appended to `folders`."""
    with os.scandir(os.path.join(root, rel_dir)) as entries:
        found = sorted((entry.name, entry.is_dir(), entry.is_file()) for entry in entries if not _is_hidden(entry.name))
    for name, is_dir, is_file in found:
        rel = f"{rel_dir}/{name}" if rel_dir else name
        if is_dir:
            folders.append(rel)
            yield from _walk(root, rel, folders)
        elif is_file:
            yield rel


def list_files(root: str | os.PathLike[str]) -> tuple[list[str], list[str]]:
    """(files, folders): posix paths, relative to `root`, of every non-hidden regular file and
    folder under it, hidden names skipped at every depth. The files are everything a reader of
    the dataset may open: build_manifest reads those inside class folders (the first path
    component), a flat folder of images (OOD data) those directly in root. Data versioning checks
    this same listing against DVC's record, so the two cannot drift apart."""
    folders: list[str] = []
    files = list(_walk(os.fspath(root), "", folders))
    return files, folders


def _describe_file(root: str, rel: str, label: str, label_index: int) -> dict[str, Any]:
    """One manifest row: content hash, and whether/how Pillow fully decodes the file."""
    row: dict[str, Any] = {
        "path": rel,
        "label": label,
        "label_index": label_index,
        "width": -1,
        "height": -1,
        "mode": "",
        "channels": -1,
        "size": "",
        "sha256": "",
        "decodable": False,
        "error": "",
    }
    try:
        with open(os.path.join(root, rel), "rb") as fh:
            data = fh.read()
    except OSError as exc:
        row["error"] = f"{type(exc).__name__}: cannot read file: {exc.strerror or exc}"
        return row
    row["sha256"] = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as im:
            # open() only parses the header; load() decodes the pixels, so a truncated or
            # corrupt body raises here (with ImageFile.LOAD_TRUNCATED_IMAGES False).
            im.load()
            width, height = upright(im).size  # as decoding reads it: a camera's rotation applied
            mode = im.mode
            channels = len(im.getbands())
            transparent = transparency_problem(im)
    except UnidentifiedImageError:
        # Pillow's own message names the in-memory buffer, which differs on every run.
        why = "empty file" if not data else "not a format Pillow can read"
        suffix = Path(rel).suffix
        if not suffix:
            why += "; the name has no image suffix"
        elif suffix.lower() not in IMAGE_SUFFIXES:
            why += f"; {suffix!r} is not an image suffix"
        row["error"] = f"UnidentifiedImageError: cannot identify image file ({why})"
        return row
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "not decodable"
        row["error"] = f"{type(exc).__name__}: {exc}"
        return row
    if transparent:
        row["error"] = f"TransparentImage: {transparent}"
        return row
    row.update(
        width=int(width),
        height=int(height),
        mode=mode,
        channels=int(channels),
        size=f"{width}x{height}",
        decodable=True,
    )
    return row


def _typed_frame(rows: list[dict[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS)) if isinstance(rows, list) else rows
    for col in _INT_COLUMNS:
        df[col] = df[col].astype("int64")
    for col in _BOOL_COLUMNS:
        df[col] = df[col].astype("bool")
    for col in _STR_COLUMNS:
        df[col] = df[col].astype("str")
    return df


def build_manifest(root: str | os.PathLike[str], workers: int | None = None) -> pd.DataFrame:
    """One row per non-hidden file under each class folder of `root`, sorted by (label, path).

    Columns (see MANIFEST_COLUMNS): path (posix, relative to root), label, label_index (position
    of the label in list_classes), width, height, mode, channels, size ("WxH"), sha256 (of the
    file bytes), decodable (Pillow opened it and fully decoded the pixels), error (empty when
    decodable, else why not). Width/height/channels are -1 and mode/size "" when undecodable.

    `workers`: threads that read, hash and decode files. None (default) decides by measuring: the
    first files are decoded on this thread, and only if they are slow enough for the GIL-free
    decoder work to dominate (larger images) is the rest spread over one thread per usable CPU
    (at most 16); tiny images run fastest on one thread. 1 forces one thread; N>1 forces N.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise ManifestError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (some code in this process set it), so "
            "truncated images would decode as if whole and pass validation. Fix: set it back to "
            "False before building the manifest."
        )
    classes = list_classes(root)
    root_str = os.fspath(root)
    index_of = {label: index for index, label in enumerate(classes)}
    jobs: list[tuple[str, str, int]] = []
    for rel in list_files(root)[0]:
        label = rel.split("/", 1)[0]
        if label != rel and label in index_of:  # files directly in root are no class's
            jobs.append((label, rel, index_of[label]))
    jobs.sort(key=lambda job: (job[2], job[1]))

    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")

    def describe(chunk: list[tuple[str, str, int]]) -> list[dict[str, Any]]:
        return [_describe_file(root_str, rel, label, index) for label, rel, index in chunk]

    rows: list[dict[str, Any]] = []
    if workers is None:
        # Decode a pilot batch on this thread and time it. Small images (MNIST-like PNGs) cost
        # tens of microseconds of mostly GIL-holding Python each, and threads then only add
        # contention (measured: 2 threads ran 2x slower than 1); larger images spend their time
        # in decoders that release the GIL, and threads pay off.
        # The median per-file time ignores one-off costs (the first decode of a format).
        pilot = jobs[:_PILOT_FILES]
        jobs = jobs[len(pilot) :]
        seconds = []
        for label, rel, index in pilot:
            start = time.perf_counter()
            rows.append(_describe_file(root_str, rel, label, index))
            seconds.append(time.perf_counter() - start)
        per_file = statistics.median(seconds) if seconds else 0.0
        workers = _default_workers() if per_file >= _THREADS_PAY_OFF_S else 1
        logger.debug("manifest: %.0f us per file in the pilot, %d thread(s)", per_file * 1e6, workers)
    workers = min(workers, max(1, len(jobs) // _MIN_FILES_PER_WORKER))
    if workers == 1:
        rows += describe(jobs)
    else:
        # A few large chunks per thread rather than one task per file.
        size = -(-len(jobs) // (workers * 4))
        chunks = [jobs[start : start + size] for start in range(0, len(jobs), size)]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="manifest") as pool:
            for part in pool.map(describe, chunks):
                rows += part
    return _typed_frame(rows)


def save_manifest(df: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write the manifest as CSV (UTF-8, no index); load_manifest reads it back identically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False, encoding="utf-8", lineterminator="\n")


def load_manifest(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a manifest CSV written by save_manifest, with the dtypes build_manifest gives.

    Empty strings stay empty strings (not NaN); extra columns (e.g. `split`) are kept as str.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {str(path)!r} does not exist. Fix: build it first.")
    df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8")
    missing = [col for col in MANIFEST_COLUMNS if col not in df.columns]
    if missing:
        raise ManifestError(
            f"manifest {str(path)!r} lacks column(s) {missing}; it was not written by "
            "save_manifest. Fix: rebuild it with build_manifest."
        )
    bad_bool = sorted(set(df["decodable"]) - {"True", "False"})
    if bad_bool:
        raise ManifestError(f"manifest {str(path)!r}: column 'decodable' holds {bad_bool[:5]}, expected True/False.")
    df["decodable"] = df["decodable"] == "True"
    try:
        return _typed_frame(df)
    except ValueError as exc:
        raise ManifestError(f"manifest {str(path)!r} has a malformed column: {exc}") from exc


def manifest_fingerprint(df: pd.DataFrame) -> str:
    """16 hex chars of sha256 over the (path, label, sha256) columns, row by row, in order."""
    digest = hashlib.sha256()
    for path, label, sha in zip(df["path"], df["label"], df["sha256"], strict=True):
        digest.update(f"{path}\0{label}\0{sha}\n".encode())
    return digest.hexdigest()[:16]


def class_counts(df: pd.DataFrame) -> dict[str, int]:
    """Number of manifest rows per label, labels in sorted order."""
    counts = df["label"].value_counts(sort=False)
    return {str(label): int(counts[label]) for label in sorted(counts.index)}
