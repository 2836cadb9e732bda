"""Which data and which code: DVC-tracked datasets at a git revision, and the git commit.

A run reads its dataset either from the working tree (the default) or at a git revision. In both
cases the dataset must be tracked by DVC, and the DVC hash of what is read is recorded, so a
registered model names the exact bytes it was trained on.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from calibflow.errors import DataVersionError

WORKSPACE = "workspace"

logger = logging.getLogger(__name__)


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


# Tracked paths that are not code a model is built from: reports/ is what runs write (dvc.yaml's
# metrics and plots, tracked so `dvc metrics diff` compares commits); the docs, tests and
# benchmarks are read by people and CI; params.yaml is read, but the params hash covers what in it
# shapes a model (a gates-only change re-gates instead of retraining). A commit that changes only
# these (the nightly job committing its reports, a docs fix, a new threshold) leaves the code as it
# was: it neither dirties the tree nor changes code_tree.
NOT_CODE = ("reports", "docs", "tests", "benchmarks", "README.md", "params.yaml")


@dataclass(frozen=True)
class CodeVersion:
    commit: str  # HEAD
    tree: str  # sha256 of HEAD's tracked files outside NOT_CODE (git's object ids and paths)
    dirty: bool  # tracked files outside NOT_CODE have uncommitted changes


def _is_code(path: str) -> bool:
    return not any(path == skip or path.startswith(f"{skip}/") for skip in NOT_CODE)


def code_version(repo_root: str | Path) -> CodeVersion:
    """HEAD's commit, a digest of the code at HEAD a model is built from, and whether that code
    has uncommitted changes."""
    commit = git(repo_root, "rev-parse", "HEAD")
    listing = git(repo_root, "ls-tree", "-r", "--full-tree", "HEAD")
    code = [line for line in listing.splitlines() if _is_code(line.split("\t", 1)[1])]
    tree = hashlib.sha256("\n".join(code).encode()).hexdigest()
    excluded = [f":(exclude){skip}" for skip in NOT_CODE]
    dirty = bool(git(repo_root, "status", "--porcelain", "--untracked-files=no", "--", ":/", *excluded))
    return CodeVersion(commit, tree, dirty)


def code_origin(repo_root: str | Path) -> tuple[str | None, str | None]:
    """HEAD's branch (None when detached) and the `origin` remote's URL (None without one)."""
    found = []
    for args in (("rev-parse", "--abbrev-ref", "HEAD"), ("remote", "get-url", "origin")):
        result = subprocess.run(["git", *args], cwd=repo_root, capture_output=True, text=True)
        value = result.stdout.strip() if result.returncode == 0 else ""
        found.append(value if value and value != "HEAD" else None)
    return found[0], found[1]


# DVC keeps its state (file hashes, the data index) in SQLite files under .dvc/tmp; two processes
# reading the same repository at once (two `calibflow promote` in one CD run) can find one locked
# for longer than SQLite's own wait. The lock is held for a moment: wait and read again.
LOCKED_RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0)

# Within one process DVC is not safe to use from several threads at once: fsspec hands every
# thread asking for the same repository and revision the one cached DVCFileSystem, and a thread
# that reads it while another is still building its index sees the directory without its DVC
# record ("not tracked by DVC"; 8 of 25 trials at 8 threads before this lock). Prefect's thread
# task runner can resolve data from two tasks at once, so every DVC read here takes this lock.
DVC_ACCESS = threading.RLock()


def resolve_data(
    repo_root: str | Path, data_path: str, rev: str | None = None, cache_root: str | Path | None = None
) -> DataVersion:
    """Pin `data_path` to a DVC hash at `rev` (None: the working tree) and say where to read it.

    At a revision the files are materialised from the DVC cache (or remote) into
    `cache_root/<hash>`, written to a temporary directory first and renamed, so an interrupted
    copy never passes for a complete one. Either way the folder read must hold exactly the files
    DVC recorded, byte for byte: an extra file (even one .dvcignore hides from DVC), a missing
    one, or changed bytes refuse the working tree, and make a materialised copy be made again.
    A DVC state database locked by another process is waited for (LOCKED_RETRY_DELAYS_S), not
    reported as a failure.
    """
    for delay in (*LOCKED_RETRY_DELAYS_S, None):
        try:
            with DVC_ACCESS:
                return _resolve_data(repo_root, data_path, rev, cache_root)
        except Exception as error:  # noqa: BLE001  sqlite3.OperationalError, raw or wrapped by DVC
            if delay is None or "database is locked" not in str(error):
                raise
            time.sleep(delay)
    raise AssertionError("unreachable")


def _resolve_data(repo_root: str | Path, data_path: str, rev: str | None, cache_root: str | Path | None) -> DataVersion:
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
            f"or set data.path to an ImageFolder directory tracked by DVC"
        ) from error
    dvc_info = info.get("dvc_info") or {}
    dvc_hash = dvc_info.get("md5")
    if not dvc_info.get("isout") or not dvc_hash:
        raise DataVersionError(
            f"data.path {data_path!r} is not tracked by DVC: run `dvc add {data_path}` and commit the .dvc file"
        )
    if info.get("type") != "directory":
        raise DataVersionError(
            f"data.path {data_path!r} is a file; it must be an ImageFolder directory (<class>/<image>)"
        )

    entry = dvc_info.get("entry")
    hash_name = entry.hash_info.name if entry else "md5"  # or md5-dos2unix for data added by DVC 2
    if rev is None:
        if not (repo_root / data_path).is_dir():
            # DVC knows it (a .dvc file or a stage output in dvc.lock) but the files are not here yet.
            raise DataVersionError(
                f"data.path {data_path!r} is tracked by DVC but not in the working tree: `dvc pull {data_path}` "
                f"fetches it from the DVC remote (`dvc repro prepare` rebuilds the default data/digits)"
            )
        # The file-by-file check comes first: it names what differs, where `dvc status` only says "modified".
        recorded = _recorded_files_in_cache(info, data_path, dvc_hash)
        mismatch = _compare_with_record(repo_root / data_path, recorded, hash_name)
        if mismatch:
            raise DataVersionError(f"data.path {data_path!r}: {mismatch.describe(data_path)}")
        changes = _uncommitted_data_changes(repo_root, data_path)
        if changes:
            raise DataVersionError(
                f"data.path {data_path!r} differs from its DVC-tracked version ({changes}): record it with "
                f"`dvc add {data_path}` (or `dvc commit`) so the run can name the data it trained on"
            )
        return DataVersion(
            path=data_path,
            local_dir=str(repo_root / data_path),
            dvc_hash=dvc_hash,
            rev=_workspace_rev(repo_root, data_path, dvc_hash),
            requested_rev=None,
        )

    commit = git(repo_root, "rev-parse", "--verify", f"{rev}^{{commit}}")
    not_available = DataVersionError(
        f"the files of {data_path!r} at {rev} (DVC hash {dvc_hash}) are in neither the local DVC cache nor a "
        f"remote: run `dvc fetch --rev {rev}` (or `dvc pull`) with a remote configured"
    )
    # The files DVC lists at the revision: what the copy below must hold, byte for byte.
    prefix = data_path + "/"
    try:
        listed = fs.find(data_path, detail=True)
    except FileNotFoundError as error:
        raise not_available from error
    recorded = {name.removeprefix(prefix): found["dvc_info"]["md5"] for name, found in listed.items()}
    if not recorded:
        raise not_available
    cache_root = Path(cache_root or repo_root / ".calibflow" / "data")
    target = cache_root / dvc_hash.removesuffix(".dir")
    if target.is_dir():
        # Anything may have written into the copy since it was made; only DVC's record is trusted.
        mismatch = _compare_with_record(target, recorded, hash_name)
        if not mismatch:
            return DataVersion(path=data_path, local_dir=str(target), dvc_hash=dvc_hash, rev=commit, requested_rev=rev)
        logger.warning("%s no longer matches DVC's record (%s): materialising it again", target, mismatch.summary())
        _discard(target, cache_root)
    cache_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=cache_root))
    try:
        fs.get(data_path, str(staging / "data"), recursive=True)
        mismatch = _compare_with_record(staging / "data", recorded, hash_name)
        if mismatch:
            raise DataVersionError(
                f"the files of {data_path!r} at {rev} (DVC hash {dvc_hash}), copied out of the DVC cache, do not match "
                f"DVC's record of them ({mismatch.summary()}): the DVC cache is corrupt; delete .dvc/cache and "
                f"`dvc fetch --rev {rev}` from a remote"
            )
        os.replace(staging / "data", target)
    except FileNotFoundError as error:
        raise not_available from error
    except OSError:
        if not target.is_dir():
            raise
        # Another process materialised the same version first; it is checked like any copy found in place.
        mismatch = _compare_with_record(target, recorded, hash_name)
        if mismatch:
            raise DataVersionError(
                f"{target} (the files of {data_path!r} at {rev}) does not match DVC's record "
                f"({mismatch.summary()}): delete it and run again"
            ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return DataVersion(path=data_path, local_dir=str(target), dvc_hash=dvc_hash, rev=commit, requested_rev=rev)


def _discard(target: Path, cache_root: Path) -> None:
    """Move `target` out of the way in one rename (a reader never sees it half-deleted), then delete it."""
    aside = Path(tempfile.mkdtemp(prefix=".stale-", dir=cache_root))
    try:
        os.replace(target, aside / "data")
    except FileNotFoundError:
        pass  # another process discarded it first
    finally:
        shutil.rmtree(aside, ignore_errors=True)


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


def _recorded_files_in_cache(info: dict, data_path: str, dvc_hash: str) -> dict[str, str]:
    """DVC's record of the working-tree dataset: file path (posix, relative to it) -> md5, read
    from the .dir object in the local DVC cache (listing the folder through DVC would apply
    .dvcignore, which is exactly what must not decide)."""
    from dvc.cachemgr import LEGACY_HASH_NAMES
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    entry = info["dvc_info"].get("entry")
    hash_info = entry.hash_info if entry else HashInfo("md5", dvc_hash)
    cache = info["repo"].cache
    try:
        tree = Tree.load(cache.legacy if hash_info.name in LEGACY_HASH_NAMES else cache.local, hash_info)
    except Exception as error:  # noqa: BLE001 - the .dir object is missing or unreadable
        raise DataVersionError(
            f"data.path {data_path!r}: DVC's file list {dvc_hash} is not in the local cache, so the files cannot "
            f"be checked against it: run `dvc fetch {data_path}` (or `dvc add {data_path}` if these files "
            f"are the new version)"
        ) from error
    return {"/".join(key): file_hash.value for key, _, file_hash in tree}


def _shown(paths: list[str]) -> str:
    return ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")


@dataclass(frozen=True)
class _Mismatch:
    """How a folder differs from DVC's record of it."""

    extra: list[str]  # files a reader would open that DVC did not record
    empty: list[str]  # folders holding no recorded file (an empty class folder is still a class)
    missing: list[str]  # recorded files that are not there
    changed: list[str]  # recorded files whose bytes differ

    def __bool__(self) -> bool:
        return bool(self.extra or self.empty or self.missing or self.changed)

    def summary(self) -> str:
        kinds = (("not recorded", self.extra), ("empty folder", self.empty), ("missing", self.missing))
        parts = [f"{what}: {_shown(paths)}" for what, paths in (*kinds, ("changed", self.changed)) if paths]
        return "; ".join(parts)

    def describe(self, data_path: str) -> str:
        parts = []
        if self.extra:
            parts.append(
                f"{len(self.extra)} file(s) that DVC did not record ({_shown(self.extra)}) would be read as data "
                f"(a .dvcignore pattern hides them from `dvc status`, or they were never added): remove them, or "
                f"delete the line of .dvcignore that matches them and `dvc add {data_path}` to record them"
            )
        if self.empty:
            parts.append(
                f"{len(self.empty)} folder(s) hold no file DVC recorded ({_shown(self.empty)}) and would still "
                f"count as classes: remove them"
            )
        if self.missing:
            parts.append(
                f"{len(self.missing)} file(s) DVC recorded are missing ({_shown(self.missing)}): "
                f"`dvc checkout {data_path}` to restore them, or `dvc add {data_path}` to record their removal"
            )
        if self.changed:
            parts.append(
                f"{len(self.changed)} file(s) no longer hold the bytes DVC recorded ({_shown(self.changed)}), "
                f"though their size and modification time may look unchanged (so DVC's state cache still trusts "
                f"them): `touch` them and `dvc add {data_path}` to record them as a new version, or delete them and "
                f"`dvc checkout {data_path}` to restore the recorded bytes"
            )
        return "; ".join(parts)


_PILOT_FILES = 256  # hashed on this thread before deciding whether a thread pool pays
_THREADS_PAY_OFF_BYTES = 256 * 1024  # mean file size from which it does


def _compare_with_record(folder: Path, recorded: dict[str, str], hash_name: str) -> _Mismatch:
    """Compare `folder` with DVC's record of it: the files a reader lists (manifest.list_files,
    which ignores .dvcignore) must be recorded, and every recorded file must be there and hash to
    its recorded md5.

    Every file is hashed, because `dvc status` trusts its state cache (inode, size, mtime): bytes
    rewritten in place with the size and mtime restored look unchanged to it. md5 is cheap next to
    the manifest's full decode: on data/digits (1,797 files, 2 CPUs) about 0.25 s against 0.7 s.
    """
    from dvc_data.hashfile.hash import fobj_md5

    from calibflow.data.manifest import list_files

    files, folders = list_files(folder)
    extra = [rel for rel in files if rel not in recorded]
    holding = {rel.rsplit("/", depth)[0] for rel in recorded for depth in range(1, rel.count("/") + 1)}
    empty = [rel for rel in folders if rel not in holding]

    pilot_bytes = [0]

    def check(rel: str) -> str:
        try:
            with open(folder / rel, "rb") as handle:
                same = fobj_md5(handle, name=hash_name) == recorded[rel]
                pilot_bytes[0] += handle.tell()
                return "" if same else "changed"
        except FileNotFoundError:
            return "missing"
        except OSError:
            return "changed"

    # Small files hash fastest on one thread (measured on data/digits, 2 CPUs: 230 ms serial, 330 ms
    # on a pool); hashlib releases the GIL only on large buffers, so the pool is kept for big files.
    names = list(recorded)
    found = [check(rel) for rel in names[:_PILOT_FILES]]
    rest = names[_PILOT_FILES:]
    if rest and pilot_bytes[0] >= _THREADS_PAY_OFF_BYTES * len(found):
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            found += pool.map(check, rest, chunksize=_PILOT_FILES)
    else:
        found += map(check, rest)
    missing = [rel for rel, what in zip(recorded, found) if what == "missing"]
    changed = [rel for rel, what in zip(recorded, found) if what == "changed"]
    return _Mismatch(extra=extra, empty=empty, missing=missing, changed=changed)


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
            f"check out the revision that holds it, or `dvc checkout` it"
        )
    return version
