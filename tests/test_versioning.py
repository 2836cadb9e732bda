"""Pinning data to DVC versions: at a revision, in the working tree, and concurrently."""

from __future__ import annotations

import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from calibflow.data.versioning import resolve_data, resolve_recorded_data
from calibflow.errors import DataVersionError
from tests.conftest import dvc, run
from calibflow import errors


@pytest.fixture
def two_versions(tiny_repo_template, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo_template, repo, symlinks=True)
    first = resolve_data(repo, "data/tiny")
    for path in sorted((repo / "data" / "tiny" / "2").glob("*.png"))[:3]:
        path.unlink()
    dvc("add", "-q", "data/tiny", cwd=repo)
    run("git", "commit", "-qam", "drop three twos", cwd=repo)
    return repo, first


def test_an_older_revision_is_materialised_once_even_by_concurrent_readers(two_versions):
    repo, first = two_versions
    # 8 threads: without versioning.DVC_ACCESS a third of such trials saw the data "not tracked by DVC"
    with ThreadPoolExecutor(max_workers=8) as pool:
        versions = list(pool.map(lambda _: resolve_data(repo, "data/tiny", "HEAD~1"), range(8)))
    assert {v.dvc_hash for v in versions} == {first.dvc_hash}
    assert len({v.local_dir for v in versions}) == 1
    assert sum(1 for _ in (repo / ".calibflow" / "data").iterdir()) == 1  # no staging directory left behind
    assert resolve_data(repo, "data/tiny").dvc_hash != first.dvc_hash


def test_recorded_data_is_read_in_place_when_the_working_tree_holds_it(two_versions):
    repo, first = two_versions
    head = run("git", "rev-parse", "HEAD", cwd=repo).stdout.strip()
    current = resolve_data(repo, "data/tiny")
    in_place = resolve_recorded_data(repo, "data/tiny", head, current.dvc_hash)
    assert in_place.local_dir == str(repo / "data" / "tiny")
    older = resolve_recorded_data(repo, "data/tiny", head + "~1", first.dvc_hash)
    assert older.local_dir != in_place.local_dir


def test_a_recorded_hash_that_the_revision_does_not_hold_is_refused(two_versions):
    repo, first = two_versions
    with pytest.raises(DataVersionError, match="trained on"):
        resolve_recorded_data(repo, "data/tiny", "HEAD", first.dvc_hash)


def swap_same_size_files_in_place(data_dir):
    """Exchange the bytes of two different, same-size images and restore their mtimes: what DVC's
    state cache (inode, size, mtime) cannot see."""
    by_size = {}
    for path in sorted(data_dir.rglob("*.png")):
        by_size.setdefault(path.stat().st_size, []).append(path)
    a, b = next(
        (a, b) for group in by_size.values() for a, b in zip(group, group[1:]) if a.read_bytes() != b.read_bytes()
    )
    stat_a, stat_b = a.stat(), b.stat()
    bytes_a, bytes_b = a.read_bytes(), b.read_bytes()
    with open(a, "r+b") as handle:  # in place: same inode
        handle.write(bytes_b)
    with open(b, "r+b") as handle:
        handle.write(bytes_a)
    os.utime(a, ns=(stat_a.st_atime_ns, stat_a.st_mtime_ns))
    os.utime(b, ns=(stat_b.st_atime_ns, stat_b.st_mtime_ns))
    assert (a.stat().st_ino, a.stat().st_size, a.stat().st_mtime_ns) == (
        stat_a.st_ino,
        stat_a.st_size,
        stat_a.st_mtime_ns,
    )
    return a, b


def test_bytes_swapped_in_place_with_size_and_mtime_kept_are_refused(tiny_repo_template, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo_template, repo, symlinks=True)
    resolve_data(repo, "data/tiny")  # DVC's state cache now knows every file's inode, size and mtime
    a, b = swap_same_size_files_in_place(repo / "data" / "tiny")
    dvc_status = run(str(Path(sys.executable).parent / "dvc"), "status", "data/tiny.dvc", cwd=repo).stdout
    assert "up to date" in dvc_status  # DVC alone is fooled

    with pytest.raises(DataVersionError) as refused:
        resolve_data(repo, "data/tiny")
    message = str(refused.value)
    assert "2 file(s) no longer hold the bytes DVC recorded" in message
    assert (
        str(a.relative_to(repo / "data" / "tiny")) in message and str(b.relative_to(repo / "data" / "tiny")) in message
    )
    assert "dvc add data/tiny" in message and "dvc checkout data/tiny" in message

    # The fix the message names works: delete them and check them out again.
    a.unlink()
    b.unlink()
    dvc("checkout", "-q", "data/tiny", cwd=repo)
    assert resolve_data(repo, "data/tiny").dvc_hash


def test_a_dvc_state_database_locked_by_another_process_is_waited_for_not_reported(monkeypatch):
    import sqlite3

    from calibflow.data import versioning

    calls = []

    def locked_twice(*args):
        calls.append(args)
        if len(calls) <= 2:
            raise sqlite3.OperationalError("database is locked")
        return "resolved"

    monkeypatch.setattr(versioning, "LOCKED_RETRY_DELAYS_S", (0.0, 0.0, 0.0))
    monkeypatch.setattr(versioning, "_resolve_data", locked_twice)
    assert versioning.resolve_data("repo", "data/x") == "resolved" and len(calls) == 3

    calls.clear()
    monkeypatch.setattr(
        versioning,
        "_resolve_data",
        lambda *args: calls.append(args) or (_ for _ in ()).throw(sqlite3.OperationalError("database is locked")),
    )
    with pytest.raises(sqlite3.OperationalError, match="locked"):  # still locked after every wait: reported
        versioning.resolve_data("repo", "data/x")
    assert len(calls) == 4

    def other_error(*args):
        calls.append(args)
        raise errors.DataVersionError("not tracked by DVC")

    calls.clear()
    monkeypatch.setattr(versioning, "_resolve_data", other_error)
    with pytest.raises(errors.DataVersionError):
        versioning.resolve_data("repo", "data/x")
    assert len(calls) == 1  # anything else is not retried
