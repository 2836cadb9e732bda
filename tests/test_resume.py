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
    "plain": TrainConfig(epochs=5, batch_size=16, lr=0.05, threads=1),
    "mixup+augment": TrainConfig(epochs=5, batch_size=16, lr=0.05, threads=1, mix="mixup", augment=True),
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
