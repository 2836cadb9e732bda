"""Resume after a kill (issue 14): a training stopped after any epoch and started again with the
same inputs ends with the same weights, bit for bit on CPU, as one never interrupted; a
half-written checkpoint is never read; a corrupted one is a clear error."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from calibflow.config import TrainConfig
from calibflow.training.resume import EpochCheckpoints
from calibflow.errors import CheckpointError
from calibflow.training.loop import TrainingInputs, train_classifier
from tests.test_training import SPEC, blobs


class Killed(BaseException):
    """Stands for SIGKILL inside one process: nothing after it runs (not even `except Exception`)."""


def killer(after_epoch: int):
    def on_epoch_end(stats):
        if stats.epoch == after_epoch:
            raise Killed

    return on_epoch_end


# Every random stream the loop reads: augmentation (the loop's generator), mixup (torch's global
# one), dropout; momentum and the one-cycle schedule carry state across epochs too.
CONFIGS = {
    "plain": TrainConfig(epochs=5, batch_size=16, lr=0.05, threads=1, device="cpu"),
    "mixup+augment": TrainConfig(epochs=5, batch_size=16, lr=0.05, threads=1, device="cpu", mix="mixup", augment=True),
}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("killed_after", [1, 3, 4])
def test_a_training_killed_after_any_epoch_resumes_to_the_same_weights(tmp_path, name, killed_after):
    config = CONFIGS[name]
    spec = dataclasses.replace(SPEC, dropout=0.2)
    x, y = blobs()
    reference, reference_history = train_classifier(TrainingInputs(spec, x, y, x, y, config, seed=4), progress=False)

    checkpoints = EpochCheckpoints(tmp_path / "ckpt")
    with pytest.raises(Killed):
        train_classifier(
            TrainingInputs(spec, x, y, x, y, config, seed=4),
            progress=False,
            checkpoints=checkpoints,
            on_epoch_end=killer(killed_after),
        )
    assert json.loads((tmp_path / "ckpt" / "latest.json").read_text())["epoch"] == killed_after
    torch.manual_seed(1234)  # a different process: whatever the global streams hold now is overwritten

    replayed = []
    resumed, history = train_classifier(
        TrainingInputs(spec, x, y, x, y, config, seed=4),
        progress=False,
        checkpoints=checkpoints,
        on_epoch_end=replayed.append,
    )
    a, b = reference.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # BatchNorm buffers too
    assert [h.train_loss for h in history] == [h.train_loss for h in reference_history]
    assert [h.epoch for h in replayed] == list(range(1, config.epochs + 1))  # the saved epochs replayed, then the rest
    assert checkpoints.completed_epoch() == config.epochs


def test_a_finished_training_is_not_trained_again(tmp_path):
    """An ensemble member done before the kill: its last epoch's state is the trained model."""
    x, y = blobs()
    checkpoints = EpochCheckpoints(tmp_path / "ckpt")
    first, _ = train_classifier(
        TrainingInputs(SPEC, x, y, x, y, CONFIGS["plain"], seed=4), progress=False, checkpoints=checkpoints
    )
    replayed = []
    again, history = train_classifier(
        TrainingInputs(SPEC, x, y, x, y, CONFIGS["plain"], seed=4),
        progress=False,
        checkpoints=checkpoints,
        on_epoch_end=replayed.append,
    )
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in first.state_dict().items())
    assert len(history) == len(replayed) == CONFIGS["plain"].epochs


def test_a_half_written_checkpoint_is_never_read(tmp_path):
    """Killed while writing epoch 3: its partial file exists, latest.json still names epoch 2."""
    x, y = blobs()
    config = CONFIGS["plain"]
    checkpoints = EpochCheckpoints(tmp_path / "ckpt")
    with pytest.raises(Killed):
        train_classifier(
            TrainingInputs(SPEC, x, y, x, y, config, seed=4),
            progress=False,
            checkpoints=checkpoints,
            on_epoch_end=killer(2),
        )
    (tmp_path / "ckpt" / ".epoch-00003.pt.abc.partial").write_bytes(b"\x80\x02half a pickle")
    assert checkpoints.load()["epoch"] == 2
    reference, _ = train_classifier(TrainingInputs(SPEC, x, y, x, y, config, seed=4), progress=False)
    resumed, _ = train_classifier(
        TrainingInputs(SPEC, x, y, x, y, config, seed=4), progress=False, checkpoints=checkpoints
    )
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in reference.state_dict().items())


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "record unreadable"])
def test_a_corrupted_checkpoint_is_an_error_that_names_it_and_the_fix(tmp_path, damage):
    x, y = blobs()
    checkpoints = EpochCheckpoints(tmp_path / "ckpt")
    with pytest.raises(Killed):
        train_classifier(
            TrainingInputs(SPEC, x, y, x, y, CONFIGS["plain"], seed=4),
            progress=False,
            checkpoints=checkpoints,
            on_epoch_end=killer(2),
        )
    saved = tmp_path / "ckpt" / "epoch-00002.pt"
    payload = bytearray(saved.read_bytes())
    if damage == "flipped byte":
        payload[len(payload) // 2] ^= 0xFF
        saved.write_bytes(bytes(payload))
    elif damage == "truncated":
        saved.write_bytes(bytes(payload[:100]))
    else:
        (tmp_path / "ckpt" / "latest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"delete .*ckpt to train this model from its first epoch") as error:
        train_classifier(
            TrainingInputs(SPEC, x, y, x, y, CONFIGS["plain"], seed=4), progress=False, checkpoints=checkpoints
        )
    assert "latest.json" in str(error.value) or "epoch-00002.pt" in str(error.value)


# --- nothing in a checkpoint is unpickled ------------------------------------------------------


class RunsCode:
    """A pickle payload that, if unpickled, creates `marker` (any callable would do: this one leaves a trace)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(directory, state, epoch: int = 2):
    """Write `state` as epoch `epoch`'s checkpoint with a matching latest.json, as anyone who can
    write to the checkpoint folder can: the recorded SHA-256 proves nothing about who wrote it."""
    import hashlib
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    directory.mkdir(parents=True, exist_ok=True)
    name = f"epoch-{epoch:05d}.pt"
    (directory / name).write_bytes(payload)
    record = {"file": name, "epoch": epoch, "sha256": hashlib.sha256(payload).hexdigest()}
    (directory / "latest.json").write_text(json.dumps(record))
    return directory / name


def killed_checkpoint(tmp_path):
    """A real checkpoint after epoch 2 of 5, and its state as saved."""
    x, y = blobs()
    checkpoints = EpochCheckpoints(tmp_path / "ckpt")
    with pytest.raises(Killed):
        train_classifier(
            TrainingInputs(SPEC, x, y, x, y, CONFIGS["plain"], seed=4),
            progress=False,
            checkpoints=checkpoints,
            on_epoch_end=killer(2),
        )
    return checkpoints, torch.load(tmp_path / "ckpt" / "epoch-00002.pt", weights_only=True)


def resume(checkpoints):
    x, y = blobs()
    return train_classifier(
        TrainingInputs(SPEC, x, y, x, y, CONFIGS["plain"], seed=4), progress=False, checkpoints=checkpoints
    )


FIX = r"delete .*ckpt to train this model from its first epoch"


def test_a_checkpoint_whose_pickle_would_run_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    checkpoints = EpochCheckpoints(tmp_path / "ckpt")
    planted = plant(checkpoints.directory, {"epoch": 2, "model": RunsCode(marker)})
    with pytest.raises(CheckpointError, match=FIX) as error:
        resume(checkpoints)
    assert not marker.exists()
    assert str(planted) in str(error.value) and "open" in str(error.value)  # the file, and what it asked to run


def test_a_checkpoint_without_the_weights_is_an_error_naming_the_file_not_a_key_error(tmp_path):
    checkpoints = EpochCheckpoints(tmp_path / "ckpt")
    planted = plant(checkpoints.directory, {"epoch": 2, "history": []})
    with pytest.raises(CheckpointError, match=FIX) as error:
        resume(checkpoints)
    assert str(planted) in str(error.value) and "'model'" in str(error.value)


def test_a_checkpoint_with_a_numpy_array_is_refused(tmp_path):
    """Not only callables: whatever is not a tensor or a plain value is refused, NumPy's arrays too."""
    import numpy as np

    checkpoints, state = killed_checkpoint(tmp_path)
    plant(checkpoints.directory, {**state, "extra": np.zeros(3)})
    with pytest.raises(CheckpointError, match=FIX):
        checkpoints.load()


@pytest.mark.parametrize("key", ["model", "optimizer", "schedule", "history", "epoch", "random"])
def test_a_checkpoint_that_lacks_a_key_is_an_error_naming_the_file_and_the_key(tmp_path, key):
    checkpoints, state = killed_checkpoint(tmp_path)
    del state[key]
    planted = plant(checkpoints.directory, state)
    with pytest.raises(CheckpointError, match=FIX) as error:
        resume(checkpoints)
    assert str(planted) in str(error.value) and repr(key) in str(error.value)


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: s.update(model=[1, 2]),
        lambda s: s["random"]["numpy"].update(key=[1, 2, 3]),
        lambda s: s["random"]["numpy"].pop("pos"),
        lambda s: s["random"].update(generator="not a tensor"),
        lambda s: s["random"]["python"].pop("state"),
        lambda s: s.update(history=["not stats"]),
    ],
    ids=[
        "model not a dict",
        "numpy key short",
        "numpy pos missing",
        "generator not a tensor",
        "python state missing",
        "history",
    ],
)
def test_a_checkpoint_with_malformed_state_is_an_error_before_anything_is_restored(tmp_path, damage):
    checkpoints, state = killed_checkpoint(tmp_path)
    damage(state)
    planted = plant(checkpoints.directory, state)
    with pytest.raises(CheckpointError, match=FIX) as error:
        resume(checkpoints)
    assert str(planted) in str(error.value)


def test_every_random_stream_survives_a_weights_only_round_trip_exactly(tmp_path):
    """The streams are stored as tensors and plain values and restored to the same state: the next
    draws of each are the ones the saved process would have made (a Gaussian pending included)."""
    import io
    import random

    import numpy as np

    from calibflow.training.resume import random_states, restore_random_states

    generator = torch.Generator().manual_seed(7)
    torch.manual_seed(8), np.random.seed(9), random.seed(10)
    np.random.standard_normal(), random.gauss(0, 1)  # each holds a cached second Gaussian now
    buffer = io.BytesIO()
    torch.save(random_states(generator), buffer)

    def draws():
        return (
            torch.rand(4, generator=generator).tolist(),
            torch.rand(4).tolist(),
            np.random.standard_normal(3).tolist(),
            np.random.randint(0, 2**31, 3).tolist(),
            [random.gauss(0, 1), random.random()],
        )

    expected = draws()
    generator.manual_seed(0), torch.manual_seed(0), np.random.seed(0), random.seed(0)
    buffer.seek(0)
    restore_random_states(generator, torch.load(buffer, weights_only=True))
    assert draws() == expected


def test_a_changed_initial_weights_file_does_not_resume_the_epochs_trained_from_the_old_one(tmp_path):
    """model.weights_path names a file: its bytes key the checkpoints, so a run started again after
    the file was replaced trains from its first epoch, while the same file resumes."""
    from calibflow.config import load_config
    from calibflow.pipeline.data_steps import ManifestRecord
    from calibflow.pipeline.model_steps import initial_weights, training_checkpoints
    from calibflow.training.models import build_model

    x, y = blobs()
    weights = tmp_path / "init.pt"
    torch.manual_seed(0)
    torch.save(build_model(SPEC).state_dict(), weights)
    config = load_config(None, [f"model.weights_path={weights}"])
    split = tmp_path / "split.json"
    split.write_text("{}")
    manifest = ManifestRecord(path="m.csv", fingerprint="f", n_images=len(y), classes=("a", "b", "c"))

    def checkpoints() -> EpochCheckpoints:
        initial = initial_weights(config, tmp_path)
        return training_checkpoints(
            str(tmp_path / "ckpt"), str(tmp_path), manifest, str(split), config, 4, None, initial
        )

    with pytest.raises(Killed):
        train_classifier(
            TrainingInputs(SPEC, x, y, x, y, CONFIGS["plain"], seed=4, weights_path=str(weights)),
            progress=False,
            checkpoints=checkpoints(),
            on_epoch_end=killer(2),
        )
    assert checkpoints().completed_epoch() == 2  # the same file: resumed after epoch 2
    torch.manual_seed(1)
    torch.save(build_model(SPEC).state_dict(), weights)  # the same path, other weights
    assert checkpoints().completed_epoch() == 0
