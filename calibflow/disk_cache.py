"""Results of pure, slow computations kept on disk, keyed by everything they depend on.

For checks whose answer is a function of their inputs and code alone (the gates' power
simulation: ~7 s per run; a passed GX suite; the corruption suite's images and logits), a rerun
with the same inputs reads the answer instead of recomputing it (issues 11 and 16). Keys are
SHA-256 digests of the inputs and of the source files the answer comes from, so editing that code
or a setting is a miss. A cache that cannot be read or written (a read-only checkout, a
half-written file from a killed run) is a miss, never an error: the value is recomputed, and
written atomically (a temporary file renamed into place).

Every entry is signed (HMAC-SHA256) with a key kept outside the cache: CALIBFLOW_CACHE_KEY when set
(CI, where caches are restored from shared storage), else a random key made once in the user's
~/.cache/calibflow/cache.key (mode 0600). An entry whose signature does not verify (written by
anyone without the key: a restored or copied cache, a hand-made file) is a miss: the value is
recomputed, never read. A checkout that cannot make or read the key caches nothing.

The cache lives in the checkout's .calibflow/cache, or in CALIBFLOW_CACHE_DIR when set: one
folder several checkouts share (a CD job's restored cache, every fresh clone of a test session),
safe because every key names all its inputs and code.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import tempfile
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

CACHE_SUBDIR = Path(".calibflow") / "cache"


KEY_VARIABLE = "CALIBFLOW_CACHE_KEY"
KEY_FILE = Path("~/.cache/calibflow/cache.key")
DIR_VARIABLE = "CALIBFLOW_CACHE_DIR"


def cache_dir(repo_root: str | Path) -> Path:
    shared = os.environ.get(DIR_VARIABLE)
    return Path(shared).expanduser() if shared else Path(repo_root) / CACHE_SUBDIR


@cache
def signing_key() -> bytes | None:
    """The key entries are signed with; None when there is none to be had (nothing is cached)."""
    from_environment = os.environ.get(KEY_VARIABLE)
    if from_environment:
        return from_environment.encode()
    path = KEY_FILE.expanduser()
    try:
        key = path.read_bytes()
        if key:
            return key
    except FileNotFoundError:
        pass
    except OSError:
        return None
    # Written whole under another name and linked into place, so that a process or thread that
    # finds the key file never reads it half written (an empty key would sign every entry alike).
    made = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, made = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(handle, "wb") as out:
            out.write(secrets.token_hex(32).encode())
        try:
            os.link(made, path)
        except FileExistsError:
            # another process or thread made it first: read theirs, unless it is an empty file a
            # process killed while writing it left behind (before keys were linked into place)
            if path.stat().st_size == 0:
                os.replace(made, path)
                made = None
        except OSError:
            # a file system without hard links: replaced whole; two processes racing here may each
            # keep their own key, which costs the other's entries a miss, never a wrong hit
            os.replace(made, path)
            made = None
    except OSError:
        return None
    finally:
        if made is not None:
            Path(made).unlink(missing_ok=True)
    try:
        return path.read_bytes() or None
    except OSError:
        return None


def _signature(payload: bytes) -> str | None:
    key = signing_key()
    return None if key is None else hmac.new(key, payload, hashlib.sha256).hexdigest()


def _verified(payload: bytes, signature: object) -> bool:
    expected = _signature(payload)
    return expected is not None and isinstance(signature, str) and hmac.compare_digest(expected, signature)


def _canonical(key: dict[str, Any], value: Any) -> bytes:
    return json.dumps({"key": key, "value": value}, sort_keys=True, default=str).encode()


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
        entry = json.loads(_json_path(directory, namespace, key).read_text())
        value = entry["value"]
        # The key as this caller computed it, not as the file says: an entry moved under another name misses.
        if not _verified(_canonical(key, value), entry.get("signature")):
            return _MISSING
        return value
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return _MISSING


def load(directory: str | Path | None, namespace: str, key: dict[str, Any]) -> Any | None:
    """The value stored for this key, or None (no directory, never stored, unreadable)."""
    value = _load(directory, namespace, key)
    return None if value is _MISSING else value


def store(directory: str | Path | None, namespace: str, key: dict[str, Any], value: Any) -> None:
    """Keep a JSON-serialisable value for this key; directory None keeps nothing."""
    if directory is None:
        return
    # What a reader verifies: the value as it reads back from JSON (a tuple becomes a list).
    value = json.loads(json.dumps(value, default=str))
    signature = _signature(_canonical(key, value))
    if signature is None:
        return

    def write(partial: str) -> None:
        with open(partial, "w") as handle:
            json.dump({"key": key, "value": value, "signature": signature}, handle, default=str)

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
    array = load_array(path)
    if array is None:
        array = compute()
        store_array(path, array)
    return array


def load_array(path: Path | None) -> np.ndarray | None:
    """The array kept at `path` by store_array, or None (a miss) when there is none, it cannot be
    read, or its signature does not verify."""
    if path is None:
        return None
    try:
        with np.load(path) as saved:  # allow_pickle stays False: an object array is a miss
            array, signature = saved["array"], str(saved["signature"])
    except (OSError, ValueError, KeyError):
        return None
    return array if _verified(_array_payload(path, array), signature) else None


def store_array(path: Path | None, array: np.ndarray) -> None:
    """Keeps `array` at `path`, signed; nothing without a path or a signing key."""
    signature = _signature(_array_payload(path, array)) if path is not None else None
    if signature is not None:
        _write_atomically(path, lambda partial: np.savez(partial, array=array, signature=signature), ".partial.npz")


def _array_payload(path: Path, array: np.ndarray) -> bytes:
    """What an array's signature covers: its name (the caller's content digest), dtype, shape and bytes."""
    header = json.dumps([Path(path).name, array.dtype.str, list(array.shape)]).encode()
    return header + b"\0" + np.ascontiguousarray(array).tobytes()
