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


def fresh_copy(template, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(template, repo, symlinks=True)
    return repo


def dvc_status(repo):
    return run(str(Path(sys.executable).parent / "dvc"), "status", "data/tiny.dvc", cwd=repo).stdout


def test_a_file_that_dvcignore_hides_from_dvc_is_refused_by_name(tiny_repo_template, tmp_path):
    repo = fresh_copy(tiny_repo_template, tmp_path)
    recorded = resolve_data(repo, "data/tiny")
    data = repo / "data" / "tiny"
    shutil.copyfile(sorted((data / "1").glob("*.png"))[0], data / "0" / "smuggled.png")
    (repo / ".dvcignore").write_text("smuggled.png\n")
    assert "up to date" in dvc_status(repo)  # DVC alone is fooled: the extra image is not part of its hash

    with pytest.raises(DataVersionError) as refused:
        resolve_data(repo, "data/tiny")
    message = str(refused.value)
    assert "0/smuggled.png" in message and "1 file(s)" in message
    assert "dvc add data/tiny" in message and ".dvcignore" in message

    # Either fix the message names works: remove the file, or record it (the ignore line gone).
    (data / "0" / "smuggled.png").unlink()
    assert resolve_data(repo, "data/tiny").dvc_hash == recorded.dvc_hash
    shutil.copyfile(sorted((data / "1").glob("*.png"))[0], data / "0" / "smuggled.png")
    (repo / ".dvcignore").write_text("")
    dvc("add", "-q", "data/tiny", cwd=repo)
    assert resolve_data(repo, "data/tiny").dvc_hash != recorded.dvc_hash


def test_an_empty_class_folder_dvc_did_not_record_is_refused(tiny_repo_template, tmp_path):
    # DVC records files, not folders; an empty folder would still be a class and shift every label index.
    repo = fresh_copy(tiny_repo_template, tmp_path)
    (repo / "data" / "tiny" / "00").mkdir()
    with pytest.raises(DataVersionError, match="00"):
        resolve_data(repo, "data/tiny")


def test_a_recorded_file_that_is_missing_is_refused_by_name(tiny_repo_template, tmp_path):
    repo = fresh_copy(tiny_repo_template, tmp_path)
    gone = sorted((repo / "data" / "tiny" / "3").glob("*.png"))[2]
    gone.unlink()
    with pytest.raises(DataVersionError) as refused:
        resolve_data(repo, "data/tiny")
    message = str(refused.value)
    assert f"3/{gone.name}" in message and "missing" in message and "dvc checkout data/tiny" in message


def test_hidden_files_are_neither_read_nor_refused(tiny_repo_template, tmp_path):
    # The manifest skips hidden names, so one DVC did not record decides nothing.
    repo = fresh_copy(tiny_repo_template, tmp_path)
    (repo / "data" / "tiny" / "0" / ".DS_Store").write_bytes(b"finder")
    (repo / ".dvcignore").write_text(".DS_Store\n")
    assert resolve_data(repo, "data/tiny").dvc_hash


def test_a_file_edited_in_the_materialised_copy_is_never_used(two_versions):
    repo, first = two_versions
    cached = Path(resolve_data(repo, "data/tiny", "HEAD~1").local_dir)
    assert cached.is_relative_to(repo / ".calibflow" / "data")
    a, b = swap_same_size_files_in_place(cached)  # size and mtime kept: only the bytes tell
    (cached / "0" / "smuggled.png").write_bytes(a.read_bytes())

    try:
        version = resolve_data(repo, "data/tiny", "HEAD~1")
    except DataVersionError:
        return  # refused: not used
    read = Path(version.local_dir)
    assert version.dvc_hash == first.dvc_hash
    assert not (read / "0" / "smuggled.png").exists()
    for path in (a, b):
        rel = path.relative_to(cached)
        assert (read / rel).read_bytes() == _bytes_at_first_version(repo, rel)


def _bytes_at_first_version(repo, rel):
    from dvc.api import DVCFileSystem

    return DVCFileSystem(str(repo), rev="HEAD~1").read_bytes(f"data/tiny/{rel.as_posix()}")
