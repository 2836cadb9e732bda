"""Results of pure, slow computations kept on disk, keyed by everything they depend on.

For checks whose answer is a function of their inputs and code alone (the gates' power
simulation: ~7 s per run; a passed GX suite; the corruption suite's images and logits), a rerun
with the same inputs reads the answer instead of recomputing it (issues 11 and 16). Keys are
SHA-256 digests of the inputs and of the source files the answer comes from, so editing that code
or a setting is a miss. A cache that cannot be read or written (a read-only checkout, a
half-written file from a killed run) is a miss, never an error: the value is recomputed, and
written atomically (a temporary file renamed into place).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

CACHE_SUBDIR = Path(".calibflow") / "cache"


def cache_dir(repo_root: str | Path) -> Path:
    return Path(repo_root) / CACHE_SUBDIR


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_digest(paths: Iterable[str | Path]) -> str:
    """One digest of several files' contents (source files, a manifest and its split)."""
    return hashlib.sha256("\0".join(file_sha256(path) for path in paths).encode()).hexdigest()


def _json_path(directory: str | Path, namespace: str, key: dict[str, Any]) -> Path:
    name = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return Path(directory) / namespace / f"{name}.json"


def _write_atomically(path: Path, write: Callable[[str], None], suffix: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
        os.close(handle)
        try:
            write(partial)
            os.replace(partial, path)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    except OSError:
        pass  # a cache that cannot be written is a cache that misses next time


_MISSING = object()


def _load(directory: str | Path | None, namespace: str, key: dict[str, Any]) -> Any:
    if directory is None:
        return _MISSING
    try:
        return json.loads(_json_path(directory, namespace, key).read_text())["value"]
    except (OSError, ValueError, KeyError, TypeError):
        return _MISSING


def load(directory: str | Path | None, namespace: str, key: dict[str, Any]) -> Any | None:
    """The value stored for this key, or None (no directory, never stored, unreadable)."""
    value = _load(directory, namespace, key)
    return None if value is _MISSING else value


def store(directory: str | Path | None, namespace: str, key: dict[str, Any], value: Any) -> None:
    """Keep a JSON-serialisable value for this key; directory None keeps nothing."""
    if directory is None:
        return

    def write(partial: str) -> None:
        with open(partial, "w") as handle:
            json.dump({"key": key, "value": value}, handle, default=str)

    _write_atomically(_json_path(directory, namespace, key), write, ".tmp")


def cached(directory: str | Path | None, namespace: str, key: dict[str, Any], compute: Callable[[], Any]) -> Any:
    """compute()'s JSON-serialisable value (None included), read back when this key was computed
    before."""
    value = _load(directory, namespace, key)
    if value is _MISSING:
        value = compute()
        store(directory, namespace, key, value)
    return value


def cached_array(path: Path | None, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """An array kept as .npz at `path` (named by its caller from a content digest): read back when
    there and readable, else computed and kept; path None keeps nothing."""
    if path is not None:
        try:
            with np.load(path) as saved:
                return saved["array"]
        except (OSError, ValueError, KeyError):
            pass
    array = compute()
    if path is not None:
        _write_atomically(path, lambda partial: np.savez(partial, array=array), ".partial.npz")
    return array
