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


def test_an_entry_not_signed_with_the_key_is_a_miss_and_recomputed(tmp_path, monkeypatch):
    """Who can write the cache (a restored CI cache, a copied checkout) cannot make an entry count:
    it is read only when its HMAC verifies with the key kept outside the cache."""
    import json

    monkeypatch.setenv(disk_cache.KEY_VARIABLE, "key-one")
    disk_cache.signing_key.cache_clear()
    assert disk_cache.cached(tmp_path, "ns", {"n": 1}, lambda: "computed") == "computed"
    [entry] = (tmp_path / "ns").iterdir()
    stored = json.loads(entry.read_text())

    forged = {**stored, "value": "poisoned"}  # the value changed, its signature kept
    entry.write_text(json.dumps(forged))
    assert disk_cache.cached(tmp_path, "ns", {"n": 1}, lambda: "recomputed") == "recomputed"
    entry.write_text(json.dumps({"key": {"n": 1}, "value": "poisoned"}))  # no signature at all
    assert disk_cache.load(tmp_path, "ns", {"n": 1}) is None

    disk_cache.store(tmp_path, "ns", {"n": 1}, "signed")
    assert disk_cache.load(tmp_path, "ns", {"n": 1}) == "signed"
    monkeypatch.setenv(disk_cache.KEY_VARIABLE, "key-two")  # another machine's key: its entries miss here
    disk_cache.signing_key.cache_clear()
    assert disk_cache.load(tmp_path, "ns", {"n": 1}) is None
    disk_cache.signing_key.cache_clear()


def test_an_array_not_signed_with_the_key_is_recomputed(tmp_path, monkeypatch):
    monkeypatch.setenv(disk_cache.KEY_VARIABLE, "key-one")
    disk_cache.signing_key.cache_clear()
    path = tmp_path / "x.npz"
    disk_cache.cached_array(path, lambda: np.arange(3))
    np.savez(path, array=np.full(3, 7), signature=str(np.load(path)["signature"]))  # other bytes, old signature
    assert np.array_equal(disk_cache.cached_array(path, lambda: np.arange(3)), np.arange(3))
    np.savez(path, array=np.full(3, 7))  # unsigned
    assert np.array_equal(disk_cache.cached_array(path, lambda: np.arange(3)), np.arange(3))
    disk_cache.signing_key.cache_clear()


def test_without_a_key_nothing_is_cached(tmp_path, monkeypatch):
    monkeypatch.delenv(disk_cache.KEY_VARIABLE, raising=False)
    monkeypatch.setattr(disk_cache, "KEY_FILE", tmp_path / "not-a-dir" / "key")
    (tmp_path / "not-a-dir").write_text("a file where the key's folder would go")
    disk_cache.signing_key.cache_clear()
    calls = []
    for _ in range(2):
        disk_cache.cached(tmp_path / "cache", "ns", {"n": 1}, lambda: calls.append(1))
    assert len(calls) == 2 and not (tmp_path / "cache").exists()
    disk_cache.signing_key.cache_clear()


def test_threads_and_processes_making_the_key_at_once_all_read_one_whole_key(tmp_path, monkeypatch):
    """The suite's threads write their first cache entries at once: each must find either no key
    file or a whole one, never one another thread has created but not yet written."""
    import threading

    monkeypatch.delenv(disk_cache.KEY_VARIABLE, raising=False)
    monkeypatch.setattr(disk_cache, "KEY_FILE", tmp_path / "keys" / "key")
    make_key = disk_cache.signing_key.__wrapped__  # the uncached function: each thread makes or reads it
    start, keys = threading.Barrier(8), []

    def one() -> None:
        start.wait()
        keys.append(make_key())

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(keys) == 8 and len(set(keys)) == 1 and len(keys[0]) == 64
    assert [p.name for p in (tmp_path / "keys").iterdir()] == ["key"]  # no leftovers beside it
    assert ((tmp_path / "keys" / "key").stat().st_mode & 0o777) == 0o600


def test_an_empty_key_file_is_replaced_and_a_file_system_without_hard_links_still_gets_a_key(tmp_path, monkeypatch):
    monkeypatch.delenv(disk_cache.KEY_VARIABLE, raising=False)
    key_file = tmp_path / "keys" / "key"
    monkeypatch.setattr(disk_cache, "KEY_FILE", key_file)
    make_key = disk_cache.signing_key.__wrapped__
    key_file.parent.mkdir()
    key_file.write_bytes(b"")  # left by a process killed between creating the file and writing it
    key = make_key()
    assert len(key) == 64 and key_file.read_bytes() == key and make_key() == key

    key_file.unlink()

    def no_hard_links(source, target):
        raise PermissionError(1, "Operation not permitted")  # as vfat, exFAT or a CIFS mount answer

    monkeypatch.setattr(disk_cache.os, "link", no_hard_links)
    key = make_key()
    assert len(key) == 64 and key_file.read_bytes() == key
    assert [p.name for p in key_file.parent.iterdir()] == ["key"]


def test_the_cache_folder_is_the_checkout_s_unless_calibflow_cache_dir_names_a_shared_one(tmp_path, monkeypatch):
    monkeypatch.delenv(disk_cache.DIR_VARIABLE, raising=False)
    assert disk_cache.cache_dir(tmp_path / "repo") == tmp_path / "repo" / ".calibflow" / "cache"
    monkeypatch.setenv(disk_cache.DIR_VARIABLE, str(tmp_path / "shared"))
    assert disk_cache.cache_dir(tmp_path / "repo") == disk_cache.cache_dir(tmp_path / "other") == tmp_path / "shared"
