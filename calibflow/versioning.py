"""Which data and which code: DVC-tracked datasets at a git revision, and the git commit.

A run reads its dataset either from the working tree (the default) or at a git revision. In both
cases the dataset must be tracked by DVC, and the DVC hash of what is read is recorded, so a
registered model names the exact bytes it was trained on.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

WORKSPACE = "workspace"


class DataVersionError(RuntimeError):
    """The dataset cannot be pinned to a DVC version; the message says how to fix that."""


@dataclass(frozen=True)
class DataVersion:
    path: str  # data.path, relative to the repository root
    local_dir: str  # where the files can be read now
    dvc_hash: str  # DVC's md5 of the directory, e.g. "17d3...f0.dir"
    rev: str  # the git commit the data was read at, or "workspace"
    requested_rev: str | None  # what the user asked for (None: the working tree)


def git(repo_root: str | Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=repo_root, capture_output=True, text=True)
    if result.returncode != 0:
        raise DataVersionError(f"git {' '.join(args)} failed in {repo_root}: {result.stderr.strip()}")
    return result.stdout.strip()


def code_commit(repo_root: str | Path) -> tuple[str, bool]:
    """HEAD's commit and whether tracked files have uncommitted changes."""
    commit = git(repo_root, "rev-parse", "HEAD")
    dirty = bool(git(repo_root, "status", "--porcelain", "--untracked-files=no"))
    return commit, dirty


def resolve_data(repo_root: str | Path, data_path: str, rev: str | None = None, cache_root: str | Path | None = None) -> DataVersion:
    """Pin `data_path` to a DVC hash at `rev` (None: the working tree) and say where to read it.

    At a revision the files are materialised from the DVC cache (or remote) into
    `cache_root/<hash>`, written to a temporary directory first and renamed, so an interrupted
    copy never passes for a complete one.
    """
    from dvc.api import DVCFileSystem  # imported here: DVC's import is slow and not always needed
    from dvc.scm import RevError

    repo_root = Path(repo_root).resolve()
    data_path = Path(data_path).as_posix().rstrip("/")
    if not (repo_root / ".dvc").is_dir():
        raise DataVersionError(f"{repo_root} is not a DVC repository: run `dvc init` there (or `make run`, which does)")
    try:
        fs = DVCFileSystem(str(repo_root), rev=rev)
        info = fs.info(data_path)
    except RevError as error:
        raise DataVersionError(f"data_rev {rev!r}: {error}; pass a commit, branch or tag of {repo_root}") from error
    except FileNotFoundError as error:
        where = f"at revision {rev}" if rev else "in the working tree"
        raise DataVersionError(
            f"data.path {data_path!r} does not exist {where}: create it (`dvc repro prepare` for the default data) "
            f"or set data.path to an ImageFolder directory tracked by DVC") from error
    dvc_info = info.get("dvc_info") or {}
    dvc_hash = dvc_info.get("md5")
    if not dvc_info.get("isout") or not dvc_hash:
        raise DataVersionError(
            f"data.path {data_path!r} is not tracked by DVC: run `dvc add {data_path}` and commit the .dvc file")
    if info.get("type") != "directory":
        raise DataVersionError(f"data.path {data_path!r} is a file; it must be an ImageFolder directory (<class>/<image>)")

    if rev is None:
        changes = _uncommitted_data_changes(repo_root, data_path)
        if changes:
            raise DataVersionError(
                f"data.path {data_path!r} differs from its DVC-tracked version ({changes}): record it with "
                f"`dvc add {data_path}` (or `dvc commit`) so the run can name the data it trained on")
        return DataVersion(path=data_path, local_dir=str(repo_root / data_path), dvc_hash=dvc_hash,
                           rev=_workspace_rev(repo_root, data_path, dvc_hash), requested_rev=None)

    commit = git(repo_root, "rev-parse", "--verify", f"{rev}^{{commit}}")
    cache_root = Path(cache_root or repo_root / ".calibflow" / "data")
    target = cache_root / dvc_hash.removesuffix(".dir")
    if not target.is_dir():
        cache_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=cache_root))
        try:
            fs.get(data_path, str(staging / "data"), recursive=True)
            os.replace(staging / "data", target)
        except FileNotFoundError as error:
            raise DataVersionError(
                f"the files of {data_path!r} at {rev} (DVC hash {dvc_hash}) are in neither the local DVC cache nor a "
                f"remote: run `dvc fetch --rev {rev}` (or `dvc pull`) with a remote configured") from error
        except OSError:
            if not target.is_dir():
                raise
            # Another process materialised the same version first; content-addressed, so identical.
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return DataVersion(path=data_path, local_dir=str(target), dvc_hash=dvc_hash, rev=commit, requested_rev=rev)


def _uncommitted_data_changes(repo_root: Path, data_path: str) -> str:
    """What `dvc status` says changed in the outputs under `data_path` (stage dependencies are
    ignored: an edited prepare script does not make the data already written wrong)."""
    from dvc.repo import Repo

    with Repo(str(repo_root)) as repo:
        status = repo.status()
    changes = []
    for entries in status.values():
        for entry in entries if isinstance(entries, list) else []:
            if not isinstance(entry, dict):
                continue
            for out, state in (entry.get("changed outs") or {}).items():
                if Path(out).as_posix().rstrip("/") == data_path:
                    changes.append(f"{out}: {state}")
    return "; ".join(changes)


def _workspace_rev(repo_root: Path, data_path: str, dvc_hash: str) -> str:
    """HEAD when HEAD's DVC metadata already names this data, so the run can be rebuilt from git;
    otherwise 'workspace' (the hash is still recorded and checked on rebuild)."""
    from dvc.api import DVCFileSystem

    try:
        head = git(repo_root, "rev-parse", "HEAD")
        info = DVCFileSystem(str(repo_root), rev=head).info(data_path)
    except Exception:  # no commit yet, or the path not at HEAD: either way not reproducible from git
        return WORKSPACE
    return head if (info.get("dvc_info") or {}).get("md5") == dvc_hash else WORKSPACE


def resolve_recorded_data(repo_root: str | Path, data_path: str, rev: str, dvc_hash: str) -> DataVersion:
    """Materialise the data a run recorded and check it is byte-for-byte the same version. When
    the working tree holds exactly that version (same DVC hash, nothing uncommitted), it is read
    in place rather than copied out of the cache."""
    if rev != WORKSPACE:
        try:
            in_place = resolve_data(repo_root, data_path, None)
        except DataVersionError:
            in_place = None
        if in_place is not None and in_place.dvc_hash == dvc_hash:
            return DataVersion(in_place.path, in_place.local_dir, dvc_hash, rev, rev)
    version = resolve_data(repo_root, data_path, None if rev == WORKSPACE else rev)
    if version.dvc_hash != dvc_hash:
        raise DataVersionError(
            f"data {data_path!r} at {rev} has DVC hash {version.dvc_hash}, but the model was trained on {dvc_hash}: "
            f"check out the revision that holds it, or `dvc checkout` it")
    return version
