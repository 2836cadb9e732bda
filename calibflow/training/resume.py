"""Resume training after a kill: the state of the last complete epoch, on disk, keyed by inputs.

A run that is killed (SIGKILL, a preempted GPU node) and started again with the same data, params
and code continues from the last epoch it completed instead of starting over, and ends with the
same weights, bit for bit on CPU, as a run that was never interrupted (issue 14). Each completed
epoch saves everything the next epoch reads: the weights and BatchNorm statistics, the optimiser's
momentum buffers, the learning-rate schedule, every random stream (the loop's generator, which
draws the data order and the augmentation, torch's global one, which mixup/CutMix and dropout
draw from, NumPy's and Python's, and CUDA's), and the epochs' statistics so the resumed run's
curves are whole.

Why our own keyed store and not Prefect's result persistence: Prefect caches a task's *result*,
all or nothing; a training task killed in epoch 29 of 30 has no result, so its cache would restart
from epoch 1. The key is a digest of what training computes from (data, split, the `model:` and
`train:` settings that change the numbers, seed, the training code); any change starts afresh.

Half-written checkpoints are never read: a checkpoint file is written under a temporary name and
renamed, then `latest.json` (its name and SHA-256) replaces the previous one atomically. A
checkpoint whose bytes do not match the digest `latest.json` recorded (a disk fault, a hand edit)
is an error that names the file and the fix, not a silent restart. The checkpoints of a training
are deleted when it completes: the trained weights are the run's artifact from then on.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from calibflow.errors import CheckpointError

CHECKPOINT_SUBDIR = Path(".calibflow") / "checkpoints"
LATEST = "latest.json"


def checkpoint_root(repo_root: str | Path) -> Path:
    return Path(repo_root) / CHECKPOINT_SUBDIR


# The code a training's numbers come from: a change here starts a killed training afresh, and every
# node of a DDP training must run the same.
TRAINING_CODE = (
    "training/loop.py",
    "training/models.py",
    "training/losses.py",
    "data/images.py",
    "training/resume.py",
    "training/distributed.py",
)


def training_code_digest() -> str:
    from calibflow.disk_cache import files_digest

    package = Path(__file__).parent.parent
    return files_digest(package / name for name in TRAINING_CODE)


def training_key(**inputs: Any) -> str:
    """A digest of everything a training's numbers depend on (JSON-serialisable values)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:32]


def random_states(generator: torch.Generator) -> dict[str, Any]:
    states = {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_random_states(generator: torch.Generator, states: dict[str, Any]) -> None:
    generator.set_state(states["generator"])
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


@dataclass(frozen=True)
class EpochCheckpoints:
    """The checkpoints of one training (one ensemble member) in `directory`."""

    directory: Path

    def completed_epoch(self) -> int:
        """The last epoch saved here (0: none), read from latest.json alone; load() checks it."""
        try:
            return int(json.loads((self.directory / LATEST).read_text())["epoch"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def load(self) -> dict[str, Any] | None:
        """The last complete epoch's state, or None when this training has none."""
        latest = self.directory / LATEST
        if not latest.is_file():
            return None
        fix = f"delete {self.directory} to train this model from its first epoch"
        try:
            record = json.loads(latest.read_text())
            payload = (self.directory / record["file"]).read_bytes()
        except (OSError, ValueError, KeyError) as error:
            raise CheckpointError(f"training checkpoint record {latest} cannot be read ({error}): {fix}") from error
        if hashlib.sha256(payload).hexdigest() != record.get("sha256"):
            raise CheckpointError(
                f"training checkpoint {self.directory / record['file']} is corrupted (its bytes do "
                f"not match the SHA-256 recorded when it was written): {fix}"
            )
        try:
            return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
        except Exception as error:  # noqa: BLE001  the digest matched, so this is a format from other code
            raise CheckpointError(
                f"training checkpoint {self.directory / record['file']} cannot be loaded "
                f"({type(error).__name__}: {error}): {fix}"
            ) from error

    def save(self, epoch: int, state: dict[str, Any]) -> None:
        """Write epoch `epoch`'s state, then point latest.json at it; earlier epochs are removed."""
        self.directory.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        payload = buffer.getvalue()
        name = f"epoch-{epoch:05d}.pt"
        _write_atomically(self.directory / name, payload)
        record = {"file": name, "epoch": epoch, "sha256": hashlib.sha256(payload).hexdigest()}
        _write_atomically(self.directory / LATEST, json.dumps(record).encode())
        for old in self.directory.glob("epoch-*.pt"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _write_atomically(path: Path, payload: bytes) -> None:
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())  # the bytes are on disk before the name points at them
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
