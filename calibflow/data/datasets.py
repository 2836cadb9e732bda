"""New data in one step: copy an ImageFolder into `data/NAME`, track it with DVC, commit the
pointer with git (and optionally push the bytes to the DVC remote).

    calibflow data add /path/to/images --name cifar10 [--message MSG] [--replace] [--push]

After it, `calibflow run --set data.path=data/NAME` (or the scheduled deployment, once params.yaml
points at it) trains on exactly those bytes, and the git commit made here is the `data_rev` the
run records. Plain git and DVC; no Prefect, no MLflow.
"""

from __future__ import annotations

import filecmp
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from calibflow.data.manifest import is_image_file, list_classes
from calibflow.errors import ManifestError
from calibflow.data.versioning import DVC_ACCESS
from calibflow.errors import DatasetError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class AddedDataset:
    path: str  # data/NAME, relative to the repository root: what data.path takes
    dvc_file: str  # data/NAME.dvc
    dvc_hash: str  # DVC's md5 of the directory, the data_hash a run will record
    n_classes: int
    n_images: int
    copied: bool  # False when data/NAME already held these exact files
    commit: str | None  # the git commit that records it; None when HEAD already did
    pushed: bool


def add_dataset(
    repo_root: str | Path,
    source: str | Path,
    name: str,
    message: str | None = None,
    replace: bool = False,
    push: bool = False,
) -> AddedDataset:
    """Copy the ImageFolder `source` into `repo_root/data/name`, `dvc add` it, optionally `dvc push`
    it, and commit `data/name.dvc` and `data/.gitignore` (only those: other staged work stays
    staged). Refuses a `source` that is not an ImageFolder, and an existing, different
    `data/name` unless `replace`. Adding the same files again changes nothing."""
    root = _repo_root(repo_root)
    if not NAME_PATTERN.match(name) or name.endswith(".dvc"):
        raise DatasetError(f"dataset name {name!r}: use letters, digits, '.', '_' and '-' (for example cifar10-v2)")
    source = Path(source).resolve()
    refuse_links(source)  # first: counting images would already follow a link to a directory
    classes, n_images = check_image_folder(source)

    rel = f"data/{name}"
    target = root / rel
    dvc_file = f"{rel}.dvc"
    # source == target: the files are already in data/NAME, tracked as they are.
    copy = source != target.resolve() and not (target.exists() and same_tree(source, target))
    if copy and target.exists() and not replace:
        raise DatasetError(
            f"{rel} already exists and differs from {source}: pass --replace to record the new files "
            f"as the next version of {rel} (the old one stays reachable from git history), or pick "
            f"another --name"
        )
    dvc_file_existed = (root / dvc_file).exists()
    previous = _copy_tree(source, target) if copy else None
    try:
        _dvc_add(root, target)
    except DatasetError:
        if copy:  # put data/NAME back as it was: files DVC did not record must not pass for a dataset
            shutil.rmtree(target, ignore_errors=True)
            if previous is not None:
                os.replace(previous, target)
            elif not dvc_file_existed:
                (root / dvc_file).unlink(missing_ok=True)
        raise
    finally:
        if previous is not None:
            shutil.rmtree(previous.parent, ignore_errors=True)
    dvc_hash = _recorded_hash(root / dvc_file)
    paths = [dvc_file, "data/.gitignore"]
    if push:
        _dvc_push(root, root / dvc_file)  # before the commit: a commit must not name bytes nobody can fetch
    commit = None
    _git(root, "add", "--", *paths)
    if _git(root, "status", "--porcelain", "--", *paths):
        summary = f"{n_images} images in {len(classes)} classes, DVC {dvc_hash}"
        text = f"{message}\n\n{rel}: {summary}" if message else f"Data: {rel} ({summary})"
        _git(root, "commit", "-q", "-m", text, "--", *paths)
        commit = _git(root, "rev-parse", "HEAD")
    return AddedDataset(
        path=rel,
        dvc_file=dvc_file,
        dvc_hash=dvc_hash,
        n_classes=len(classes),
        n_images=n_images,
        copied=copy,
        commit=commit,
        pushed=push,
    )


def check_image_folder(root: Path) -> tuple[list[str], int]:
    """(class names, image count) of an ImageFolder `root/<class>/<image>`; DatasetError when it
    is not one, or a class folder holds no image. The full checks (every file decodes, one size and
    mode, enough images per class) run with the pipeline's data validation."""
    try:
        classes = list_classes(root)
    except ManifestError as error:
        raise DatasetError(str(error)) from error
    counts = {label: sum(1 for path in _files(root / label) if is_image_file(path)) for label in classes}
    empty = [label for label, count in counts.items() if count == 0]
    if empty:
        raise DatasetError(
            f"{str(root)!r} is not an ImageFolder: class folder(s) {', '.join(empty)} hold no image "
            f"(.png, .jpg, ...). Put each class's images in its own subdirectory named after the class."
        )
    return classes, sum(counts.values())


def same_tree(a: Path, b: Path) -> bool:
    """Whether two directories hold the same non-hidden files with the same bytes."""
    files_a = {path.relative_to(a) for path in _files(a)}
    files_b = {path.relative_to(b) for path in _files(b)}
    return files_a == files_b and all(filecmp.cmp(a / rel, b / rel, shallow=False) for rel in files_a)


def _files(root: Path):
    """Non-hidden regular files under `root`, skipping hidden directories (what the manifest reads)."""
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        for file_name in names:
            if not file_name.startswith("."):
                yield Path(directory) / file_name


def _copy_tree(source: Path, target: Path) -> Path | None:
    """Copy into a hidden staging directory beside `target`, then swap it in: an interrupted copy
    never passes for the dataset. A previous `target` is moved into the staging directory and its
    path returned, so a failed `dvc add` can put it back; the caller removes it (its parent)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    previous = None
    try:
        # symlinks=True: never follow a link out of the source (refuse_links has refused them already).
        shutil.copytree(source, staging / "data", ignore=shutil.ignore_patterns(".*"), symlinks=True)
        if target.exists():
            previous = staging / "previous"
            os.replace(target, previous)
        try:
            os.replace(staging / "data", target)
        except OSError:
            if previous is not None:
                os.replace(previous, target)
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if previous is None:
        shutil.rmtree(staging, ignore_errors=True)
    return previous


def refuse_links(source: Path) -> None:
    """DatasetError naming every symbolic link under `source` (hidden entries aside, which are
    not copied). A link can point anywhere, out of the folder (a whole repository with its
    mlflow.db, someone's private files): DVC would follow it into its cache and on to the remote."""
    links = []
    for directory, subdirs, names in os.walk(source):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        for entry in [*subdirs, *names]:
            path = Path(directory) / entry
            if not entry.startswith(".") and path.is_symlink():
                links.append(path)
    if links:
        shown = ", ".join(f"{link.relative_to(source)} -> {os.readlink(link)}" for link in links[:5])
        more = f" and {len(links) - 5} more" if len(links) > 5 else ""
        raise DatasetError(
            f"{source} holds {len(links)} symbolic link(s) ({shown}{more}): calibflow copies no links, as one "
            f"can point out of the folder and DVC would follow it into its cache and remote; replace each "
            f"with the file it points to (copy it in) or remove it"
        )


def _repo_root(repo_root: str | Path) -> Path:
    root = Path(repo_root).resolve()
    if not (root / ".dvc").is_dir():
        raise DatasetError(f"{root} is not the root of a DVC repository (no .dvc/): run there, or pass --repo")
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True)
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root:
        raise DatasetError(f"{root} is not the root of a git repository: run there, or pass --repo")
    return root


def _git(root: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if result.returncode != 0:
        raise DatasetError(f"git {' '.join(args)} failed in {root}: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip()


def _dvc_add(root: Path, target: Path) -> None:
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with DVC_ACCESS, Repo(str(root)) as repo:
            repo.scm_context.quiet = True  # no "To track the changes with git, run": we commit here
            repo.add(str(target))
    except DvcException as error:
        raise DatasetError(f"dvc add {target.relative_to(root)} failed: {error}") from error


def _dvc_push(root: Path, dvc_file: Path) -> None:
    from dvc.config import NoRemoteError
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with DVC_ACCESS, Repo(str(root)) as repo:
            repo.push(targets=[str(dvc_file)])
    except NoRemoteError as error:
        raise DatasetError(
            f"dvc push: no DVC remote is configured in {root}: add one with `dvc remote add -d NAME URL` "
            f"(a directory, or s3://... for S3/MinIO); nothing was committed"
        ) from error
    except DvcException as error:
        raise DatasetError(f"dvc push {dvc_file.relative_to(root)} failed: {error}; nothing was committed") from error


def _recorded_hash(dvc_file: Path) -> str:
    return str(yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"])
