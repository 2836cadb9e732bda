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
is an error that names the file and the fix, not a silent restart. Nothing in a checkpoint is
unpickled: it is read as tensors and plain values (torch.load(weights_only=True)) and checked for
every key resume reads, so a crafted one is refused with the same error before any of it runs or
is restored. The checkpoints of a training
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
    "data/image_files.py",
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


# Checkpoints are read with torch.load(weights_only=True), which accepts tensors and plain values
# (dicts, lists, tuples, str, int, float, bool, None) and refuses everything else, so a crafted
# checkpoint cannot run code (its SHA-256 sits beside it in the same folder and proves nothing about
# who wrote it). NumPy's state holds an ndarray, which only loads by allowlisting NumPy's internal
# reconstructors (torch.serialization.add_safe_globals): those are private names that change between
# NumPy releases and widen what every weights-only load in this process accepts. So each stream is
# stored as plain values instead, and converted back exactly (the integers are the whole state).
def random_states(generator: torch.Generator) -> dict[str, Any]:
    """Every random stream training draws from, as tensors and plain values."""
    bit_generator, key, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    version, python_state, gauss_next = random.getstate()
    states: dict[str, Any] = {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": str(bit_generator),
            "key": [int(word) for word in key],
            "pos": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": int(version), "state": list(python_state), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _native_random_states(states: dict[str, Any]) -> dict[str, Any]:
    """`states` as random_states() wrote them, in the forms each library's setter takes; KeyError,
    TypeError or ValueError where they are not what random_states() writes."""
    numpy_state = states["numpy"]
    python_state = states["python"]
    for name in ("generator", "torch"):
        if not isinstance(states[name], torch.Tensor):
            raise TypeError(f"random state {name!r} is a {type(states[name]).__name__}, not a tensor")
    key = np.asarray(numpy_state["key"], dtype=np.int64)
    if key.shape != (624,) or (key < 0).any() or (key > np.iinfo(np.uint32).max).any():
        raise ValueError("NumPy's random state is not 624 32-bit words")
    gauss_next = python_state["gauss_next"]
    return {
        "generator": states["generator"],
        "torch": states["torch"],
        "numpy": (
            str(numpy_state["bit_generator"]),
            key.astype(np.uint32),
            int(numpy_state["pos"]),
            int(numpy_state["has_gauss"]),
            float(numpy_state["cached_gaussian"]),
        ),
        "python": (
            int(python_state["version"]),
            tuple(int(word) for word in python_state["state"]),
            None if gauss_next is None else float(gauss_next),
        ),
        **({"cuda": states["cuda"]} if "cuda" in states else {}),
    }


def restore_random_states(generator: torch.Generator, states: dict[str, Any]) -> None:
    native = _native_random_states(states)
    generator.set_state(native["generator"])
    torch.set_rng_state(native["torch"])
    np.random.set_state(native["numpy"])
    random.setstate(native["python"])
    if "cuda" in native and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(native["cuda"])


# What resume_from_checkpoint (calibflow.training.loop) reads from a checkpoint: one process's
# random streams, or with DDP the shared data order and every rank's streams.
REQUIRED_KEYS = ("epoch", "model", "optimizer", "schedule", "history")


def check_checkpoint(state: Any) -> None:
    """Raise ValueError naming what is missing or malformed where `state` is not a checkpoint
    save_epoch_checkpoint writes; read before any of it is restored into a training."""
    if not isinstance(state, dict):
        raise ValueError(f"it holds a {type(state).__name__}, not a dict of training state")
    missing = [repr(key) for key in REQUIRED_KEYS if key not in state]
    if "random" not in state and not ("order" in state and "random_by_rank" in state):
        missing.append("'random' (or 'order' and 'random_by_rank')")
    if missing:
        raise ValueError(f"it lacks {', '.join(missing)}")
    for name in ("model", "optimizer", "schedule"):
        if not isinstance(state[name], dict):
            raise ValueError(f"its {name!r} is a {type(state[name]).__name__}, not a state dict")
    if not isinstance(state["history"], list) or not all(isinstance(h, dict) for h in state["history"]):
        raise ValueError("its 'history' is not a list of epoch statistics")
    by_rank = [state["random"]] if "random" in state else state["random_by_rank"]
    if "order" in state and not isinstance(state["order"], torch.Tensor):
        raise ValueError("its 'order' is not a generator state tensor")
    if not isinstance(by_rank, list) or not by_rank:
        raise ValueError("its random states are not a list by rank")
    for states in by_rank:
        try:
            _native_random_states(states)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"its random states cannot be restored ({type(error).__name__}: {error})") from error


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
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"training checkpoint record {latest} cannot be read ({error}): {fix}") from error
        path = self.directory / record["file"]
        if hashlib.sha256(payload).hexdigest() != record.get("sha256"):
            raise CheckpointError(
                f"training checkpoint {path} is corrupted (its bytes do "
                f"not match the SHA-256 recorded when it was written): {fix}"
            )
        try:
            # weights_only: tensors and plain values only; anything else is refused, never run
            state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001  the digest matched: crafted, or written by other code
            raise CheckpointError(
                f"training checkpoint {path} cannot be loaded as tensors and plain values, so it was "
                f"not written by this code and is not read ({load_error_reason(error)}): {fix}"
            ) from error
        try:
            check_checkpoint(state)
        except ValueError as error:
            raise CheckpointError(f"training checkpoint {path} is not a training state: {error}: {fix}") from error
        return state

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


def load_error_reason(error: BaseException) -> str:
    """Why torch.load refused a file, in one line: its weights-only refusal runs to a page of advice
    about loading the file anyway with the full unpickler, which is the one fix calibflow must not take."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].strip().split(". ", 1)[0]
    lines = text.strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


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
