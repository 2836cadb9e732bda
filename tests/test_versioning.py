"""Pinning data to DVC versions: at a revision, in the working tree, and concurrently."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from calibflow.versioning import DataVersionError, resolve_data, resolve_recorded_data
from tests.conftest import dvc, run


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
    with ThreadPoolExecutor(max_workers=4) as pool:
        versions = list(pool.map(lambda _: resolve_data(repo, "data/tiny", "HEAD~1"), range(4)))
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
