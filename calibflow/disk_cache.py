"""Results of pure, slow computations kept on disk, keyed by everything they depend on.

For checks whose answer is a function of settings and code alone (the gates' power simulation:
~6 s per run, issue 16), a rerun with the same settings reads the answer instead of recomputing
it. The key is a SHA-256 of the inputs (JSON, sorted keys) and of the source files the answer
comes from, so editing that code or a setting is a miss. A cache that cannot be read or written
(a read-only checkout, a half-written file from a killed run) is a miss, never an error: the
value is recomputed, and written atomically (a temporary file renamed into place).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

CACHE_SUBDIR = Path(".calibflow") / "cache"


def cache_dir(repo_root: str | Path) -> Path:
    return Path(repo_root) / CACHE_SUBDIR


def source_digest(paths: Iterable[str | Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def cached(directory: str | Path | None, namespace: str, key: dict[str, Any], compute: Callable[[], Any]) -> Any:
    """compute()'s JSON-serialisable value, read from directory/namespace when this key was
    computed before; directory None disables the cache."""
    if directory is None:
        return compute()
    name = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    path = Path(directory) / namespace / f"{name}.json"
    try:
        return json.loads(path.read_text())["value"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    value = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as handle:
            json.dump({"key": key, "value": value}, handle, default=str)
        os.replace(handle.name, path)
    except OSError:
        pass
    return value
