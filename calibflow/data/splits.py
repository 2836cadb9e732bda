"""Stratified, seeded, group-aware, stable train / val / calibration / test split.

Written here rather than taken from scikit-learn because we need four disjoint parts at once,
exact per-class counts (largest remainder, so a class of 12 images still gets its share),
grouping by content hash (byte-identical images always land in the same split, so duplicated
files cannot leak a test image into training), and stability: within a class, images are
ordered by a seeded hash of their content and cut at the fractions, so adding images to a
dataset moves only a few old ones across a split boundary. A retrain on new data then shares
most of its test split with the champion's, which is what the gates against the champion
compare them on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

# The four parts, in the order each class's hash-sorted images are cut into them (params.yaml's
# split: keys).
SPLIT_NAMES = ("train", "val", "calibration", "test")


@dataclass(frozen=True)
class Split:
    """Row indices into the manifest for each split, and what produced them."""

    indices: Mapping[str, np.ndarray]
    seed: int
    fractions: Mapping[str, float]
    manifest_fingerprint: str

    @property
    def digest(self) -> str:
        """A short hash of the indices: the split's identity, logged as a tag."""
        canonical = json.dumps({k: [int(i) for i in self.indices[k]] for k in SPLIT_NAMES}, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        return {
            "seed": self.seed,
            "fractions": dict(self.fractions),
            "manifest_fingerprint": self.manifest_fingerprint,
            "digest": self.digest,
            "indices": {k: [int(i) for i in self.indices[k]] for k in SPLIT_NAMES},
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json()))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Split":
        record = json.loads(Path(path).read_text())
        split = cls(
            indices={k: np.asarray(record["indices"][k], dtype=np.int64) for k in SPLIT_NAMES},
            seed=int(record["seed"]),
            fractions=record["fractions"],
            manifest_fingerprint=record["manifest_fingerprint"],
        )
        if split.digest != record["digest"]:
            raise ValueError(f"{path}: split indices do not match their recorded digest; the file was altered")
        return split

    def assignment(self, n_rows: int) -> np.ndarray:
        """The split name of every manifest row (as a numpy array of str)."""
        names = np.full(n_rows, "", dtype=object)
        for name in SPLIT_NAMES:
            names[self.indices[name]] = name
        return names


def stratified_split(
    labels: Sequence[int] | np.ndarray,
    groups: Sequence[str] | np.ndarray,
    fractions: Mapping[str, float],
    seed: int,
    manifest_fingerprint: str = "",
) -> Split:
    """Split rows so that each class is spread over the splits in the given fractions.

    `groups` (the content hash) keeps identical files together: a group is assigned as a whole,
    and its class is the label of its first row (conflicting labels are a validation error).
    """
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    if labels.shape != groups.shape:
        raise ValueError("labels and groups must have one entry per manifest row")
    group_ids, first_row, group_of_row = np.unique(groups, return_index=True, return_inverse=True)
    group_label = labels[first_row]
    names = list(SPLIT_NAMES)
    weights = np.array([fractions[n] for n in names], dtype=np.float64)
    split_of_group = np.empty(len(group_ids), dtype=np.int64)
    for label in np.unique(group_label):
        members = np.flatnonzero(group_label == label)
        members = members[np.argsort(_keyed_hashes(group_ids[members], seed), kind="stable")]
        counts = _largest_remainder(len(members), weights)
        split_of_group[members] = np.repeat(np.arange(len(names)), counts)
    split_of_row = split_of_group[group_of_row]
    indices = {name: np.flatnonzero(split_of_row == k) for k, name in enumerate(names)}
    return Split(
        indices=indices,
        seed=seed,
        fractions=dict(zip(names, weights.tolist())),
        manifest_fingerprint=manifest_fingerprint,
    )


def stratified_subset(labels: np.ndarray, groups: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Positions of at most `limit` of the rows whose `labels` and `groups` (content hashes) are
    given, ascending: each class keeps its share of the rows (largest remainder), and within a
    class the rows come in the split's seeded content-hash order, so a subset of grown data keeps
    most of the images it had. Every row when there are `limit` or fewer."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    if len(labels) <= limit:
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    take = _largest_remainder(limit, counts.astype(np.float64))
    chosen = []
    for label, n in zip(classes, take):
        members = np.flatnonzero(labels == label)
        chosen.append(members[np.argsort(_keyed_hashes(groups[members], seed), kind="stable")[:n]])
    return np.sort(np.concatenate(chosen))


def _keyed_hashes(group_ids: np.ndarray, seed: int) -> np.ndarray:
    """A seeded pseudo-random sort key per group that depends on nothing else (not on the other
    images), which is what makes the split stable as data is added."""
    return np.array([hashlib.blake2b(f"{seed}:{g}".encode(), digest_size=8).digest() for g in group_ids], dtype="S8")


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Integer counts summing to `total`, as close to total * weights as rounding allows."""
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    shortfall = total - counts.sum()
    # Ties broken by split order (train first) so the result is deterministic.
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:shortfall]] += 1
    return counts
