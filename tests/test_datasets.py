"""`calibflow data add`: a new ImageFolder becomes a DVC-tracked, git-committed data/NAME in one
command, and the next run trains on it and records its hash."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from calibflow.tracking import store
from cli.main import main as calibflow
from calibflow.data.datasets import same_tree
from calibflow.data.prepare import write_digits
from tests.conftest import dvc, run


def head(repo: Path) -> str:
    return run("git", "rev-parse", "HEAD", cwd=repo).stdout.strip()


def recorded_hash(repo: Path, name: str) -> str:
    return yaml.safe_load((repo / "data" / f"{name}.dvc").read_text())["outs"][0]["md5"]


def dvc_status(repo: Path) -> dict:
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        return dvc_repo.status()


@pytest.fixture
def images(tmp_path) -> Path:
    """An ImageFolder outside the repository: digits 5 to 9, 60 of each."""
    source = tmp_path / "incoming"
    write_digits(source, classes=(5, 6, 7, 8, 9), per_class=60)
    return source


@pytest.mark.e2e
def test_data_add_commits_only_the_pointer_and_the_next_run_records_its_hash(tiny_repo, images, capsys):
    (tiny_repo / "notes.txt").write_text("someone's unrelated work in progress\n")
    run("git", "add", "notes.txt", cwd=tiny_repo)
    before = head(tiny_repo)

    assert (
        calibflow(
            [
                "data",
                "add",
                str(images),
                "--name",
                "fives",
                "--repo",
                str(tiny_repo),
                "--message",
                "Digits 5-9, first drop",
            ]
        )
        == 0
    )
    assert "data/fives: 300 images in 5 classes" in capsys.readouterr().out
    assert same_tree(images, tiny_repo / "data" / "fives")

    commit = head(tiny_repo)
    assert run("git", "rev-parse", "HEAD~1", cwd=tiny_repo).stdout.strip() == before
    assert run("git", "log", "-1", "--format=%B", cwd=tiny_repo).stdout.startswith("Digits 5-9, first drop\n")
    files = run("git", "diff-tree", "--no-commit-id", "--name-only", "-r", "HEAD", cwd=tiny_repo).stdout.split()
    assert sorted(files) == ["data/.gitignore", "data/fives.dvc"]
    assert "/fives" in (tiny_repo / "data" / ".gitignore").read_text().split()
    assert "A  notes.txt" in run("git", "status", "--porcelain", cwd=tiny_repo).stdout  # still staged, not committed
    assert dvc_status(tiny_repo) == {}  # the working tree is what DVC recorded

    # The same files again: nothing to copy, nothing to commit.
    assert calibflow(["data", "add", str(images), "--name", "fives", "--repo", str(tiny_repo)]) == 0
    assert "already recorded at HEAD" in capsys.readouterr().out
    assert head(tiny_repo) == commit

    # The next run trains on it and names it.
    assert calibflow(["run", "--repo", str(tiny_repo), "--set", "data.path=data/fives"]) == 0
    store.configure_tracking(tiny_repo)
    champion = MlflowClient().get_model_version_by_alias("tiny-digits", "champion")
    assert champion.tags["data_path"] == "data/fives"
    assert champion.tags["data_hash"] == recorded_hash(tiny_repo, "fives")
    assert champion.tags["data_rev"] == commit


def test_an_existing_different_dataset_is_replaced_only_when_asked(tiny_repo, images, tmp_path, capsys):
    assert calibflow(["data", "add", str(images), "--name", "drop", "--repo", str(tiny_repo)]) == 0
    first_commit, first_hash = head(tiny_repo), recorded_hash(tiny_repo, "drop")
    changed = tmp_path / "changed"
    shutil.copytree(images, changed)
    next((changed / "7").glob("*.png")).unlink()

    assert calibflow(["data", "add", str(changed), "--name", "drop", "--repo", str(tiny_repo)]) == 2
    error = capsys.readouterr().err
    assert "data/drop already exists and differs" in error and "--replace" in error
    assert head(tiny_repo) == first_commit and same_tree(images, tiny_repo / "data" / "drop")

    assert calibflow(["data", "add", str(changed), "--name", "drop", "--repo", str(tiny_repo), "--replace"]) == 0
    assert same_tree(changed, tiny_repo / "data" / "drop")
    assert recorded_hash(tiny_repo, "drop") != first_hash
    assert run("git", "rev-parse", "HEAD~1", cwd=tiny_repo).stdout.strip() == first_commit
    assert first_hash in run("git", "show", "HEAD~1:data/drop.dvc", cwd=tiny_repo).stdout  # the old version stays
    assert dvc_status(tiny_repo) == {}


def test_what_is_not_an_image_folder_is_refused_before_anything_changes(tiny_repo, tmp_path, capsys):
    before = head(tiny_repo)
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes(b"not even an image")
    assert calibflow(["data", "add", str(flat), "--name", "flat", "--repo", str(tiny_repo)]) == 2
    assert "is not an ImageFolder" in capsys.readouterr().err

    no_images = tmp_path / "no_images"
    (no_images / "cats").mkdir(parents=True)
    (no_images / "cats" / "README.txt").write_text("the cats are coming")
    (no_images / "dogs").mkdir()
    (no_images / "dogs" / "1.png").write_bytes(b"\x89PNG")
    assert calibflow(["data", "add", str(no_images), "--name", "pets", "--repo", str(tiny_repo)]) == 2
    assert "cats hold no image" in capsys.readouterr().err

    assert calibflow(["data", "add", str(tmp_path / "missing"), "--name", "x", "--repo", str(tiny_repo)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert calibflow(["data", "add", str(no_images), "--name", "../escape", "--repo", str(tiny_repo)]) == 2
    assert "dataset name" in capsys.readouterr().err

    assert head(tiny_repo) == before
    assert sorted(p.name for p in (tiny_repo / "data").iterdir()) == [".gitignore", "tiny", "tiny.dvc"]


def test_push_sends_the_files_to_the_dvc_remote_before_committing(tiny_repo, images, tmp_path, capsys):
    before = head(tiny_repo)
    assert calibflow(["data", "add", str(images), "--name", "fives", "--repo", str(tiny_repo), "--push"]) == 2
    assert "no DVC remote is configured" in capsys.readouterr().err
    assert head(tiny_repo) == before  # nothing committed that nobody else could fetch

    remote = tmp_path / "dvc-remote"
    dvc("remote", "add", "-d", "shared", str(remote), cwd=tiny_repo)
    assert calibflow(["data", "add", str(images), "--name", "fives", "--repo", str(tiny_repo), "--push"]) == 0
    assert "pushed to the DVC remote" in capsys.readouterr().out
    assert head(tiny_repo) != before
    digest = recorded_hash(tiny_repo, "fives")
    assert (remote / "files" / "md5" / digest[:2] / digest[2:]).is_file()  # the directory listing
    contents = {hashlib.md5(p.read_bytes()).hexdigest() for p in images.rglob("*.png")}
    assert sum(1 for p in (remote / "files" / "md5").rglob("*") if p.is_file()) == len(contents) + 1  # every image


def test_a_png_link_to_a_file_outside_the_folder_is_refused_and_nothing_is_copied(tiny_repo, images, tmp_path, capsys):
    secret = tmp_path / "private.png"
    secret.write_bytes((images / "5" / sorted(p.name for p in (images / "5").iterdir())[0]).read_bytes())
    (images / "5" / "innocent.png").symlink_to(secret)
    before = head(tiny_repo)

    assert calibflow(["data", "add", str(images), "--name", "linked", "--repo", str(tiny_repo)]) == 2
    error = capsys.readouterr().err
    assert "symbolic link" in error and f"5/innocent.png -> {secret}" in error and "\n" not in error.strip()
    assert not (tiny_repo / "data" / "linked").exists() and not (tiny_repo / "data" / "linked.dvc").exists()
    assert head(tiny_repo) == before


def test_a_link_to_a_directory_outside_the_folder_is_refused(tiny_repo, images, capsys):
    (images / "6" / "everything").symlink_to(tiny_repo, target_is_directory=True)  # the repository, mlflow.db and all
    assert calibflow(["data", "add", str(images), "--name", "linked", "--repo", str(tiny_repo)]) == 2
    assert f"6/everything -> {tiny_repo}" in capsys.readouterr().err
    assert not (tiny_repo / "data" / "linked").exists()


def test_a_failed_dvc_add_leaves_data_name_as_it_was(tiny_repo, images, tmp_path, capsys):
    (tiny_repo / ".dvcignore").write_text("data/fresh\ndata/tiny\n")  # dvc add refuses ignored paths
    assert calibflow(["data", "add", str(images), "--name", "fresh", "--repo", str(tiny_repo)]) == 2
    assert "dvc add data/fresh failed" in capsys.readouterr().err
    assert not (tiny_repo / "data" / "fresh").exists() and not (tiny_repo / "data" / "fresh.dvc").exists()
    assert not [p.name for p in (tiny_repo / "data").iterdir() if p.name.startswith(".fresh")]  # no staging left

    # Replacing an existing dataset: the old files come back.
    old_files = sorted(p.relative_to(tiny_repo) for p in (tiny_repo / "data" / "tiny").rglob("*.png"))
    assert calibflow(["data", "add", str(images), "--name", "tiny", "--repo", str(tiny_repo), "--replace"]) == 2
    assert sorted(p.relative_to(tiny_repo) for p in (tiny_repo / "data" / "tiny").rglob("*.png")) == old_files
    assert not [p.name for p in (tiny_repo / "data").iterdir() if p.name.startswith(".tiny")]
