"""calibflow.disk_cache: read back for the same key, recomputed for another, a miss when unreadable."""

from __future__ import annotations

import numpy as np

from calibflow import disk_cache


def test_a_stored_none_is_a_hit_and_another_key_a_miss(tmp_path):
    calls = []
    compute = lambda: calls.append(1)  # noqa: E731  returns None: "no warning" is an answer to keep
    assert disk_cache.cached(tmp_path, "ns", {"n": 1}, compute) is None
    assert disk_cache.cached(tmp_path, "ns", {"n": 1}, compute) is None and len(calls) == 1
    disk_cache.cached(tmp_path, "ns", {"n": 2}, compute)
    assert len(calls) == 2
    assert disk_cache.cached(None, "ns", {"n": 1}, compute) is None and len(calls) == 3  # no directory: no cache


def test_an_unreadable_array_is_recomputed_and_replaced(tmp_path):
    path = tmp_path / "a" / "x.npz"
    first = disk_cache.cached_array(path, lambda: np.arange(3))
    assert np.array_equal(disk_cache.cached_array(path, lambda: np.zeros(3)), first)  # read back
    path.write_bytes(b"half a file")
    assert np.array_equal(disk_cache.cached_array(path, lambda: np.ones(3)), np.ones(3))
    assert np.array_equal(disk_cache.cached_array(path, lambda: np.zeros(3)), np.ones(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.npz"]  # no partial files left


def test_files_digest_changes_with_any_file_and_file_sha256_is_plain_sha256(tmp_path):
    import hashlib

    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    assert disk_cache.file_sha256(a) == hashlib.sha256(b"one").hexdigest()
    before = disk_cache.files_digest([a, b])
    b.write_bytes(b"tw0")
    assert disk_cache.files_digest([a, b]) != before
