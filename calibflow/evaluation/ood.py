"""Out-of-distribution inputs: the folder they come from, the scores, and how well they separate.

Scores, from the logits the served model computes (z) and its fitted calibrator:
- MSP, the maximum calibrated softmax probability (Hendrycks & Gimpel 2017);
- energy, -T log sum_k exp(z_k / T) (Liu et al. 2020) with the fitted temperature T (T = 1 for
  other calibrators; an ensemble's is the mean of its members'). Lower energy = more in-distribution.
Detection metrics treat the test split as positives and score "in-distribution-ness" (MSP, and
minus the energy): AUROC, AUPR (in-distribution positive) and FPR at 95% TPR, the share of OOD
images at or above the threshold that keeps 95% of the test split.

The OOD folder (`ood.path`) is pinned by DVC like the data, read as an ImageFolder or a flat
folder (every file under it, at any depth), and refused before training when it is missing,
empty, holds files that are not images, or holds images of the training data (same bytes).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibflow.errors import OODDataError

SCORES = ("msp", "energy")


@dataclass(frozen=True)
class OODData:
    path: str  # ood.path, relative to the repository root
    local_dir: str
    dvc_hash: str
    files: tuple[str, ...]  # relative paths of the images used (at most ood.max_images: _used), sorted
    rev: str = "workspace"  # the git commit the folder was read at, or "workspace" (versioning.DataVersion.rev)
    # each file's SHA-256 when the folder was checked, which its bytes must still have when a run
    # reads it (images.checked_bytes); empty in a record written before they were kept
    sha256: tuple[str, ...] = ()


def _listed(root: Path) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def check_ood_folder(
    repo_root: str | Path,
    path: str,
    training_hashes: set[str],
    max_images: int,
    key: str = "ood.path",
    other_hashes: set[str] = frozenset(),
    other: str = "",
    *,
    min_side: int = 1,
) -> OODData:
    """Pin `path` (params.yaml's `key`) with DVC and check it can serve as out-of-distribution
    images; OODDataError otherwise. `other_hashes`: images it must not share either (the OOD
    evaluation folder, for the outlier-exposure one), named `other`."""
    from PIL import Image, UnidentifiedImageError

    from calibflow.data.images import transparency_problem

    from calibflow.data.versioning import resolve_data
    from calibflow.errors import DataVersionError

    local = Path(repo_root) / path
    if not local.exists():
        raise OODDataError(
            f"{key} {path!r} does not exist: add a folder of out-of-distribution images there "
            f"(`dvc add {path}`), or set {key} to null"
        )
    if not local.is_dir():
        raise OODDataError(f"{key} {path!r} is a file: it must be a folder of images (flat, or <class>/<image>)")
    files = _listed(local)
    if not files:
        raise OODDataError(f"{key} {path!r} is empty: put out-of-distribution images in it and `dvc add {path}`")
    try:
        version = resolve_data(repo_root, path, None)
    except DataVersionError as error:
        raise OODDataError(str(error).replace("data.path", key)) from error
    root = Path(version.local_dir)
    not_images, unreadable, overlapping, shared = [], [], [], []
    digests: dict[str, str] = {}
    for relative in files:
        data = (root / relative).read_bytes()  # hashed and checked as one read: the digest is of what was checked
        digest = digests[relative] = hashlib.sha256(data).hexdigest()
        if digest in training_hashes:
            overlapping.append(relative)
        if digest in other_hashes:
            shared.append(relative)
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                # what reading it later would refuse, refused now, before anything trains
                problem = transparency_problem(image)
                if problem is None and min(image.size) < min_side:
                    problem = f"{image.size[0]}x{image.size[1]}, below data.min_side = {min_side}"
                if problem is not None:
                    unreadable.append(f"{relative} ({problem.split(':')[0]})")
        except (UnidentifiedImageError, OSError, ValueError):
            not_images.append(relative)
    if not_images:
        shown = ", ".join(not_images[:5]) + (f" and {len(not_images) - 5} more" if len(not_images) > 5 else "")
        raise OODDataError(
            f"{key} {path!r}: {len(not_images)} of {len(files)} files are not images ({shown}): "
            f"remove them and `dvc add {path}`"
        )
    if unreadable:
        shown = ", ".join(unreadable[:5]) + (f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else "")
        raise OODDataError(
            f"{key} {path!r}: {len(unreadable)} of {len(files)} images cannot be read as the model reads images "
            f"({shown}): flatten transparent ones without alpha, remove those too small, and `dvc add {path}`"
        )
    if shared:
        raise OODDataError(
            f"{key} {path!r}: {len(shared)} image(s) have the same bytes as images of {other} "
            f"(e.g. {shared[0]}): training on them would leak into the OOD evaluation; remove them"
        )
    if overlapping:
        shown = ", ".join(overlapping[:5]) + (f" and {len(overlapping) - 5} more" if len(overlapping) > 5 else "")
        raise OODDataError(
            f"{key} {path!r}: {len(overlapping)} image(s) have the same bytes as images of data.path "
            f"({shown}), so they are not out of distribution: remove them from {path} and "
            f"`dvc add {path}`"
        )
    used = _used(files, digests, max_images)
    return OODData(
        path=version.path,
        local_dir=str(root),
        dvc_hash=version.dvc_hash,
        files=used,
        rev=version.rev,
        sha256=tuple(digests[relative] for relative in used),
    )


def _used(files: list[str], digests: dict[str, str], max_images: int) -> tuple[str, ...]:
    """At most `max_images` of a folder's files (sorted), taken in the order of their content
    hashes: a sample spread over every sub-folder alike (the first by path would take the first
    sub-folders whole and none of the last), that keeps most of its images as the folder grows."""
    if len(files) <= max_images:
        return tuple(files)
    return tuple(sorted(sorted(files, key=lambda relative: digests[relative])[:max_images]))


def folder_hashes(data: OODData) -> set[str]:
    if data.sha256:
        return set(data.sha256)
    return {hashlib.sha256((Path(data.local_dir) / r).read_bytes()).hexdigest() for r in data.files}


def load_ood_data(path: str | Path) -> OODData:
    raw = json.loads(Path(path).read_text())
    return OODData(
        raw["path"],
        raw["local_dir"],
        raw["dvc_hash"],
        tuple(raw["files"]),
        raw.get("rev", "workspace"),
        tuple(raw.get("sha256") or ()),
    )


def save_ood_data(data: OODData, out_path: str | Path) -> str:
    Path(out_path).write_text(
        json.dumps(
            {
                "path": data.path,
                "local_dir": data.local_dir,
                "dvc_hash": data.dvc_hash,
                "rev": data.rev,
                "files": list(data.files),
                "sha256": list(data.sha256),
            },
            indent=1,
        )
    )
    return str(out_path)


# The version tag that names the OOD folder a version was measured on, so `calibflow gate` can
# score the same images again: {"path", "rev", "dvc_hash", "n_images", "score", "selection",
# "files_digest"}.
OOD_TAG = "ood_data"
# How a folder larger than ood.max_images was sampled (_used); a tag without "selection" was
# written when the run scored the first n_images files by path.
OOD_SELECTION = "content_hash"


def files_digest(sha256s) -> str:
    """One SHA-256 over the scored files' SHA-256s, in their order: what a version's OOD tag
    records of the bytes it was measured on (a tag without it was written before it was kept)."""
    return hashlib.sha256("\n".join(sha256s).encode()).hexdigest()


@dataclass(frozen=True)
class RecordedOODFiles:
    local_dir: str
    files: list[str]  # relative paths, sorted: the files the run scored
    sha256: list[str]  # each file's SHA-256 as hashed here, which the read that scores it must find


def recorded_ood_files(repo_root: str | Path, recorded: dict) -> RecordedOODFiles:
    """The OOD folder a version recorded (OOD_TAG) at its DVC hash: the same `n_images` files,
    sorted, that the run scored, each hashed once, their digests checked against the tag's
    files_digest (OODDataError when the bytes differ from what the version was measured on)."""
    from calibflow.data.versioning import resolve_recorded_data

    version = resolve_recorded_data(repo_root, recorded["path"], recorded["rev"], recorded["dvc_hash"])
    root, n_images = Path(version.local_dir), int(recorded["n_images"])
    files = _listed(root)
    sampled = recorded.get("selection") == OOD_SELECTION and len(files) > n_images
    used = files if sampled else files[:n_images]
    digests = {relative: hashlib.sha256((root / relative).read_bytes()).hexdigest() for relative in used}
    if sampled:
        used = list(_used(files, digests, n_images))
    sha256 = [digests[relative] for relative in used]
    expected = recorded.get("files_digest")
    if expected and files_digest(sha256) != expected:
        raise OODDataError(
            f"ood.path {recorded['path']!r} at {recorded['rev']}: the {len(used)} images read back are not the bytes "
            f"the version was measured on (their digest {files_digest(sha256)[:12]}, recorded {expected[:12]}), though "
            f"they match the DVC hash the version names: a file changed while they were read; gate again once nothing "
            f"writes to {recorded['path']}, and if this repeats, the version's record does not match its folder"
        )
    return RecordedOODFiles(version.local_dir, used, sha256)


def _temperature(calibrator) -> float:
    members = getattr(calibrator, "members", None)
    if members:
        return float(np.mean([getattr(m, "temperature", None) or 1.0 for m in members]))
    return float(getattr(calibrator, "temperature", None) or 1.0)


def energy(logits: np.ndarray, temperature: float) -> np.ndarray:
    """-T log sum_k exp(z_k / T) per image; the mean over members for an ensemble's (N, M, K)."""
    from scipy.special import logsumexp

    z = np.asarray(logits, np.float64)
    e = -temperature * logsumexp(z / temperature, axis=-1)
    return e.mean(axis=1) if e.ndim == 2 else e


def ood_scores(logits: np.ndarray, calibrator) -> dict[str, np.ndarray]:
    """{"msp": max calibrated probability, "energy": -T logsumexp(z / T)} per image."""
    probabilities = np.asarray(calibrator.transform(logits), np.float64)
    return {"msp": probabilities.max(axis=1), "energy": energy(logits, _temperature(calibrator))}


def in_distribution_score(name: str, scores: dict[str, np.ndarray]) -> np.ndarray:
    """Higher = more in-distribution: MSP itself, minus the energy."""
    return scores["msp"] if name == "msp" else -scores["energy"]


def detection_metrics(inside: np.ndarray, outside: np.ndarray) -> dict[str, float]:
    """AUROC, AUPR (in-distribution positive) and FPR at 95% TPR of an in-distribution score."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    from calibflow.gates.statistics import empirical_tpr_threshold

    y = np.concatenate([np.ones(len(inside)), np.zeros(len(outside))])
    s = np.concatenate([inside, outside])
    return {
        "auroc": float(roc_auc_score(y, s)),
        "aupr": float(average_precision_score(y, s)),
        "fpr95": float(np.mean(np.asarray(outside) >= empirical_tpr_threshold(inside, 0.95))),
    }
