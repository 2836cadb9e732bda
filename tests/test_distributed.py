"""More than one process (issue 14): DistributedDataParallel under torchrun on the CPU (gloo).

Two processes at one global batch train as well as one; two nodes of one process each are the
same training as one node of two, bit for bit; a DDP training killed with SIGKILL resumes to the
weights of one never interrupted; and what cannot run says so before anything trains.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import torch.nn.functional as F

from calibflow.training import distributed
from calibflow.config import TrainConfig, load_config
from calibflow.errors import ConfigError, ManifestError
from calibflow import environment
from calibflow.training.distributed import follower_command, launcher_args, resolve_nproc, train_distributed
from calibflow.errors import DistributedTrainingError
from calibflow.data.images import channel_stats
from calibflow.training.models import ModelSpec, build_model
from calibflow.training.resume import EpochCheckpoints
from calibflow.errors import CheckpointError
from calibflow.training.loop import (
    TrainingInputs,
    one_cycle_schedule,
    resolve_runtime,
    seed_everything,
    train_classifier,
    validation_metrics,
)

ROOT = Path(__file__).resolve().parents[1]
SPEC = ModelSpec(arch="small_cnn", in_channels=1, num_classes=10, image_height=8, image_width=8, width=16)
DDP = TrainConfig(epochs=4, batch_size=64, device="cpu", threads=1, distributed="ddp", nproc=2)


def digits(seed: int = 0):
    """scikit-learn's digits as uint8 8x8 images: 1,000 train, 100 val, 697 test, shuffled by `seed`."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images * 16, dtype=torch.float32).clamp(0, 255).to(torch.uint8)[:, None]
    labels = torch.tensor(data.target)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    train, val, test = order[:1000], order[1000:1100], order[1100:]
    return (images[train], labels[train]), (images[val], labels[val]), (images[test], labels[test])


def accuracy(model, images, labels) -> float:
    with torch.no_grad():
        return (model.eval()(images).argmax(1) == labels).double().mean().item()


def same_weights(a, b) -> bool:
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def workers_of(work: Path) -> list:
    """The live processes started for the launch directory under `work` (the workers' argv names it)."""
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = process.info["cmdline"] or []
        if process.info["status"] != psutil.STATUS_ZOMBIE and any(str(work) in part for part in cmdline):
            found.append(process)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- what cannot run is refused before anything trains --------------------------------------


def test_a_cgroup_cpu_quota_caps_the_cores(tmp_path, monkeypatch):
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # a Kubernetes CPU limit of 1.5: one whole core
    monkeypatch.setattr(environment, "CGROUP_CPU_MAX", quota)
    assert distributed.available_slots(on_cuda=False) == (1, "CPU cores")
    quota.write_text("max 100000\n")
    assert distributed.available_slots(on_cuda=False)[0] == len(os.sched_getaffinity(0))


def test_a_global_batch_too_small_to_share_is_refused_and_auto_keeps_shares_large():
    with pytest.raises(ConfigError, match="train.batch_size = 4 is the global batch and 3 processes share it"):
        resolve_nproc(dataclasses.replace(DDP, nproc=1, nnodes=3, rendezvous="h:1", batch_size=4))
    # auto: never more processes than give each MIN_SHARE images of the global batch
    assert resolve_nproc(dataclasses.replace(DDP, nproc="auto", batch_size=distributed.MIN_SHARE)) == 1


def test_more_processes_than_cores_is_refused_with_the_fix():
    cores = len(os.sched_getaffinity(0))
    with pytest.raises(ConfigError, match=rf"train.nproc = {cores + 1} needs {cores + 1} CPU cores.*has {cores}"):
        resolve_nproc(dataclasses.replace(DDP, nproc=cores + 1))
    # threads count too: each process runs train.threads of them
    with pytest.raises(ConfigError, match=r"x 2 threads each"):
        resolve_nproc(dataclasses.replace(DDP, nproc=cores, threads=2))
    assert resolve_nproc(dataclasses.replace(DDP, nproc="auto")) == cores
    assert resolve_nproc(dataclasses.replace(DDP, nproc=1)) == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.nproc=2"], "train.nproc = 2 needs train.distributed = ddp"),
        (["train.nnodes=2"], "train.nnodes = 2 needs train.distributed = ddp"),
        (["train.distributed=ddp", "train.nnodes=2"], "needs train.rendezvous"),
        (["train.distributed=ddp", "train.nproc=0"], "train.nproc = 0"),
        (["train.distributed=ddp", "train.nnodes=0"], "train.nnodes = 0: must be 1 or more"),
        (["train.distributed=ddp", "train.device=cuda:1"], "picks one GPU"),
        (["train.distributed=mpi"], "must be one of 'none', 'ddp'"),
    ],
)
def test_distributed_settings_that_cannot_work_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "params.yaml", overrides)


def test_a_rendezvous_without_a_port_or_host_is_refused():
    config = dataclasses.replace(DDP, nnodes=2, rendezvous=":29500")
    with pytest.raises(ConfigError, match="HOST:PORT"):
        launcher_args(config, 1, node_rank=0)


def test_the_follower_command_joins_node_0s_rendezvous():
    config = dataclasses.replace(DDP, nnodes=3, rendezvous="calibflow-ddp.calibflow.svc:29400")
    command = follower_command(config, 2)
    assert command.startswith("torchrun ")  # the device kind comes from rank 0, through torchrun's store
    for part in ("--nnodes=3", "--node-rank=$NODE_RANK", "--master-addr=calibflow-ddp.calibflow.svc"):
        assert part in command
    assert "--master-port=29400" in command and command.endswith("-m calibflow.training.distributed")
    assert "--node-rank=0" in " ".join(launcher_args(config, 2, node_rank=0))  # the flow's node holds rank 0


# --- training under torchrun ----------------------------------------------------------------


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """One 2-process DDP training of the digits, and what its flow was told epoch by epoch."""
    (train, val, _) = digits()
    reported = []
    model, history = train_distributed(
        TrainingInputs(SPEC, *train, *val, DDP, seed=0),
        work_dir=tmp_path_factory.mktemp("ddp"),
        on_epoch_end=reported.append,
    )
    return model, history, reported


@pytest.mark.slow
def test_rank_0_reports_every_epoch_once_with_the_global_loss(two_process_run):
    model, history, reported = two_process_run
    assert [s.epoch for s in reported] == [1, 2, 3, 4] == [s.epoch for s in history]
    assert reported == history
    assert all(math.isfinite(s.train_loss) for s in history) and history[-1].train_loss < history[0].train_loss
    assert history[-1].validated and history[-1].val_accuracy > 0.5
    # the processes' shares of the val split, gathered, are rank 0's model scored on the whole split
    (_, (val_x, val_y), _) = digits()
    whole = validation_metrics(model, val_x, val_y, resolve_runtime("cpu", "fp32"))
    assert history[-1].val_accuracy == whole["accuracy"]
    assert history[-1].val_nll == pytest.approx(whole["nll"], rel=1e-6)
    assert history[-1].val_ece == pytest.approx(whole["ece"], abs=1e-9)


def uncertain_targets(labels: torch.Tensor, classes: int = 10) -> torch.Tensor:
    """0.7 on each image's class, the rest spread over the others: soft labels to train on."""
    one_hot = torch.eye(classes)[labels]
    return one_hot * 0.7 + (1 - one_hot) * 0.3 / (classes - 1)


@pytest.mark.slow
@pytest.mark.parametrize("targets", ["hard", "sampled"])
def test_one_process_under_torchrun_trains_the_weights_of_the_plain_loop(tmp_path, targets):
    """nproc 1: the same loop in a torchrun process, so the same weights bit for bit; what differs
    at nproc 2 is then the sharing of the batch, not the launch or the hand-off. Sampled soft
    labels too: the distributions travel with the bundle and each draw comes from the same stream."""
    (train, val, _) = digits()
    config = dataclasses.replace(DDP, epochs=2, nproc=1, targets=targets)
    soft = uncertain_targets(train[1]) if targets != "hard" else None
    launched, launched_history = train_distributed(
        TrainingInputs(SPEC, *train, *val, config, seed=3, train_targets=soft), work_dir=tmp_path
    )
    plain, plain_history = train_classifier(
        TrainingInputs(
            SPEC,
            *train,
            *val,
            dataclasses.replace(config, distributed="none", nproc="auto"),
            3,
            train_targets=soft,
        ),
        progress=False,
    )
    assert same_weights(launched, plain)
    untimed = [dataclasses.replace(h, images_per_second=0.0) for h in launched_history]
    assert untimed == [dataclasses.replace(h, images_per_second=0.0) for h in plain_history]


@pytest.mark.slow
def test_two_nodes_of_one_process_are_one_node_of_two_bit_for_bit(two_process_run, tmp_path):
    """torchrun's multi-node path on one machine: this process launches node 0 (global rank 0) and
    serves the rendezvous; node 1 is a follower started as docs/production_loop.md and infra/k8s/ddp start it."""
    (train, val, _) = digits()
    port = free_port()
    config = dataclasses.replace(DDP, nproc=1, nnodes=2, rendezvous=f"127.0.0.1:{port}")
    torchrun = follower_command(config, 1, node_rank="1").split()
    assert torchrun[0] == "torchrun"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("CALIBFLOW_DDP_DEVICE", None)
    follower = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", *torchrun[1:]],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        model, history = train_distributed(TrainingInputs(SPEC, *train, *val, config, seed=0), work_dir=tmp_path)
        output, _ = follower.communicate(timeout=120)
    finally:
        follower.kill()
    assert follower.returncode == 0, output[-3000:]
    assert same_weights(model, two_process_run[0])
    assert [s.train_loss for s in history] == [s.train_loss for s in two_process_run[1]]


@pytest.mark.slow
def test_two_processes_train_as_well_as_one_at_the_same_global_batch(tmp_path):
    """Test accuracy of 3 seeds each, on 697 held-out digits: the end-to-end check that DDP's
    changes (its own random streams per process, BatchNorm per share) do not cost accuracy. The
    tolerance is 3 standard errors of the difference of two 3-seed means, each seed's accuracy taken
    as binomial test noise plus as much again from training; it treats the two arms as independent
    though they share the test images, so it is loose: it catches a training that learns much less
    (a broken exchange that leaves a process on its own data, say), not a step-size error, which
    test_one_step_of_two_processes_is_the_gradient_of_the_mean_of_their_shares pins exactly."""
    config = dataclasses.replace(DDP, epochs=8)
    one, two = [], []
    for seed in range(3):
        (train, val, (test_x, test_y)) = digits(seed)
        single, _ = train_classifier(
            TrainingInputs(SPEC, *train, *val, dataclasses.replace(config, distributed="none", nproc="auto"), seed),
            progress=False,
        )
        double, _ = train_distributed(TrainingInputs(SPEC, *train, *val, config, seed), work_dir=tmp_path)
        one.append(accuracy(single, test_x, test_y))
        two.append(accuracy(double, test_x, test_y))
    p = float(np.mean(one + two))
    per_seed = math.sqrt(2 * p * (1 - p) / 697)  # binomial, doubled for training noise (in variance)
    tolerance = 3 * per_seed * math.sqrt(2 / 3)
    assert min(two) > 0.85, two
    assert abs(np.mean(two) - np.mean(one)) <= tolerance, (one, two, tolerance)


@pytest.mark.slow
def test_a_killed_ddp_training_resumes_to_the_uninterrupted_weights(two_process_run, tmp_path):
    """SIGKILL to the launcher and both workers (a preempted node) after an epoch's checkpoint; the
    same training started again resumes there and ends bit for bit where the uninterrupted one did."""
    checkpoints = EpochCheckpoints(tmp_path / "checkpoints")
    script = (
        "import sys\nfrom pathlib import Path\n"
        "from tests.test_distributed import DDP, SPEC, digits\n"
        "from calibflow.training.distributed import train_distributed\n"
        "from calibflow.training.loop import TrainingInputs\n"
        "from calibflow.training.resume import EpochCheckpoints\n"
        "(train, val, _) = digits()\n"
        "inputs = TrainingInputs(SPEC, *train, *val, DDP, 0)\n"
        "train_distributed(inputs, work_dir=sys.argv[1], checkpoints=EpochCheckpoints(Path(sys.argv[2])))\n"
    )
    (tmp_path / "work").mkdir()
    killed = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "work"), str(checkpoints.directory)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill takes torchrun and the workers
    )
    deadline = time.monotonic() + 300
    while checkpoints.completed_epoch() < 2:
        assert killed.poll() is None, "the training ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(killed.pid, signal.SIGKILL)  # the launcher and torchrun; the workers die with torchrun
    killed.wait()
    deadline = time.monotonic() + 30
    while workers_of(tmp_path / "work"):
        assert time.monotonic() < deadline, "the workers outlived the kill"
        time.sleep(0.1)
    at_kill = checkpoints.completed_epoch()
    assert 2 <= at_kill < DDP.epochs
    saved = json.loads((checkpoints.directory / "latest.json").read_text())
    assert saved["epoch"] == at_kill

    (train, val, _) = digits()
    reported = []
    model, history = train_distributed(
        TrainingInputs(SPEC, *train, *val, DDP, 0),
        work_dir=tmp_path,
        on_epoch_end=reported.append,
        checkpoints=checkpoints,
    )
    assert same_weights(model, two_process_run[0])
    assert [s.epoch for s in reported] == [1, 2, 3, 4]  # the saved epochs replayed: the curves are whole


@pytest.mark.slow
def test_a_worker_that_fails_is_an_error_with_the_workers_log(tmp_path):
    (train, val, _) = digits()
    soft = dataclasses.replace(DDP, targets="soft")
    wrong = torch.full(
        (len(train[1]), SPEC.num_classes + 2), 1.0 / (SPEC.num_classes + 2)
    )  # another K than the network's
    with pytest.raises(DistributedTrainingError, match=r"exited with code [1-9](.|\n)*Traceback"):
        train_distributed(TrainingInputs(SPEC, *train, *val, soft, 0, train_targets=wrong), work_dir=tmp_path)
    assert not list(tmp_path.glob("ddp-*/bundle.pt"))  # the copy of the training data is gone


def test_weights_a_worker_refuses_are_the_flow_s_refusal_in_one_line(tmp_path):
    """What rank 0 refuses while it reads model.weights_path (weights of another network, or a file
    changed since the run hashed it) reaches the launcher as the same ConfigError, exit 2."""
    (train, val, _) = digits()
    other = ModelSpec(arch="small_cnn", in_channels=1, num_classes=3, image_height=8, image_width=8, width=4)
    torch.save(build_model(other).state_dict(), tmp_path / "other-model.pt")  # shapes that do not fit SPEC
    with pytest.raises(ConfigError, match="size mismatch") as refused:
        train_distributed(
            TrainingInputs(SPEC, *train, *val, DDP, 0, weights_path=str(tmp_path / "other-model.pt")), work_dir=tmp_path
        )
    assert "Traceback" not in str(refused.value) and str(tmp_path / "other-model.pt") in str(refused.value)
    torch.save(build_model(SPEC).state_dict(), tmp_path / "model.pt")
    with pytest.raises(ConfigError, match="changed while the run used them"):
        train_distributed(
            TrainingInputs(
                SPEC, *train, *val, DDP, 0, weights_path=str(tmp_path / "model.pt"), weights_sha256="0" * 64
            ),
            work_dir=tmp_path,
        )
    assert not list(tmp_path.glob("ddp-*/bundle.pt"))


def test_what_the_launcher_can_check_is_refused_before_torchrun_starts(tmp_path):
    (train, val, _) = digits()
    with pytest.raises(ConfigError, match="model.weights_path .* does not exist"):
        train_distributed(
            TrainingInputs(SPEC, *train, *val, DDP, 0, weights_path=str(tmp_path / "missing.pt")), work_dir=tmp_path
        )
    damaged = EpochCheckpoints(tmp_path / "checkpoints")
    damaged.save(1, {"epoch": 1})
    saved = damaged.directory / "epoch-00001.pt"
    saved.write_bytes(saved.read_bytes()[:-8] + bytes(8))
    with pytest.raises(CheckpointError, match="is corrupted"):
        train_distributed(TrainingInputs(SPEC, *train, *val, DDP, 0), work_dir=tmp_path, checkpoints=damaged)
    assert not list(tmp_path.glob("ddp-*"))  # nothing was launched


@pytest.mark.slow
def test_nodes_that_disagree_with_node_0_stop_with_a_message_naming_it(tmp_path):
    """A follower started with more processes than the flow's train.nproc (its NPROC_PER_NODE out
    of step): every process stops, and node 0's log (what the flow shows) says why."""
    (train, val, _) = digits()
    config = dataclasses.replace(DDP, nproc=1, nnodes=2, rendezvous=f"127.0.0.1:{free_port()}", batch_size=64)
    torchrun = follower_command(config, 2, node_rank="1").split()  # 2 processes where node 0 planned 1
    follower = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", *torchrun[1:]],
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with pytest.raises(DistributedTrainingError, match="3 processes joined and node 0 planned 2"):
            train_distributed(TrainingInputs(SPEC, *train, *val, config, seed=0), work_dir=tmp_path)
        follower.wait(timeout=120)
    finally:
        follower.kill()
    assert follower.returncode != 0


@pytest.mark.slow
def test_one_step_of_two_processes_is_the_gradient_of_the_mean_of_their_shares(tmp_path):
    """The exact check the accuracy comparison is too coarse for: one DDP step equals one process
    stepping on the mean of the two shares' losses (each share with its own BatchNorm statistics,
    as each process computes them), to float rounding; rank 0 stepping on its share alone, or a
    summed instead of averaged gradient, lands far from it."""
    (train_x, train_y), (val_x, val_y), _ = digits()
    images, labels = train_x[:128], train_y[:128]  # two global batches of 64
    config = dataclasses.replace(DDP, epochs=1, augment=False, val_every=1)
    launched, _ = train_distributed(
        TrainingInputs(SPEC, images, labels, val_x, val_y, config, seed=5), work_dir=tmp_path
    )

    def by_hand(combine) -> dict[str, torch.Tensor]:
        seed_everything(5)
        model = build_model(SPEC, *channel_stats(images)).train()
        optimizer = torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=config.momentum, nesterov=True, weight_decay=config.weight_decay
        )
        schedule = one_cycle_schedule(optimizer, config.lr, 2)
        order = torch.randperm(128, generator=torch.Generator().manual_seed(5))
        for batch in order.split(64):
            shares = [F.cross_entropy(model(images[batch[r::2]]), labels[batch[r::2]]) for r in (0, 1)]
            optimizer.zero_grad()
            combine(shares).backward()
            optimizer.step()
            schedule.step()
        return dict(model.named_parameters())

    def distance(params) -> float:
        return max((launched.state_dict()[k] - p.detach()).abs().max().item() for k, p in params.items())

    assert distance(by_hand(lambda shares: (shares[0] + shares[1]) / 2)) < 1e-5
    assert distance(by_hand(lambda shares: shares[0])) > 1e-3  # rank 0 alone: no gradient exchange
    assert distance(by_hand(lambda shares: shares[0] + shares[1])) > 1e-3  # summed, not averaged


# --- nothing calibflow's processes hand each other on disk is unpickled ------------------------


class RunsCode:
    """A pickle payload that, if unpickled, creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_the_bundle_every_process_reads_is_tensors_and_plain_values(tmp_path):
    """What rank 0 reads back loads with weights_only=True and gives back the same inputs."""
    (train, val, _) = digits()
    soft = uncertain_targets(train[1])
    inputs = TrainingInputs(SPEC, *train, *val, DDP, 3, train_targets=soft)
    torch.save(distributed._bundle(inputs, 2, EpochCheckpoints(tmp_path / "ckpt")), tmp_path / "bundle.pt")
    bundle = distributed._load(tmp_path / "bundle.pt")
    back = distributed._inputs_of(bundle, rank=0)
    assert back.spec == SPEC and back.config == DDP and back.seed == 3
    assert torch.equal(back.train_images, train[0]) and torch.equal(back.val_labels, val[1])
    assert torch.equal(back.train_targets, soft)
    assert bundle["checkpoints"] == str(tmp_path / "ckpt")


@pytest.mark.parametrize("name", [distributed.BUNDLE, distributed.RESULT])
def test_a_launch_file_whose_pickle_would_run_code_is_refused_and_never_run(tmp_path, name):
    marker = tmp_path / "ran"
    torch.save({"model": RunsCode(marker), "history": []}, tmp_path / name)
    with pytest.raises(DistributedTrainingError, match="cannot be loaded as tensors and plain values") as error:
        if name == distributed.RESULT:
            distributed._read_result(tmp_path, SPEC)
        else:
            distributed._load(tmp_path / name)
    assert str(tmp_path / name) in str(error.value)
    assert not marker.exists()


def test_a_result_without_the_weights_is_an_error_naming_it(tmp_path):
    torch.save({"history": []}, tmp_path / distributed.RESULT)
    with pytest.raises(DistributedTrainingError, match="'model'") as error:
        distributed._read_result(tmp_path, SPEC)
    assert str(tmp_path / distributed.RESULT) in str(error.value)


@pytest.mark.slow
def test_two_processes_reading_from_files_train_the_weights_of_two_reading_memory(two_process_run, tmp_path):
    """A split read from its files travels to the torchrun workers as its file list (plain values
    in the bundle), and each process decodes its own shares: the same weights as the in-memory
    run, bit for bit."""
    from PIL import Image

    from calibflow.data.image_files import ImageFiles

    (train, val, _) = digits()

    def as_files(images, name):
        folder = tmp_path / name
        folder.mkdir()
        paths = []
        for i, image in enumerate(images):
            Image.fromarray(image[0].numpy()).save(folder / f"{i}.png")
            paths.append(f"{i}.png")
        return ImageFiles(folder, paths, "L", (8, 8))

    inputs = TrainingInputs(
        SPEC, as_files(train[0], "train"), train[1], as_files(val[0], "val"), val[1], DDP, seed=0, workers=1
    )
    bundle = distributed._bundle(inputs, 2, None)
    assert isinstance(bundle["train"][0], dict) and bundle["workers"] == 1
    (tmp_path / "ddp").mkdir()
    model, history = train_distributed(inputs, work_dir=tmp_path / "ddp")
    assert same_weights(model, two_process_run[0])
    assert [h.train_loss for h in history] == [h.train_loss for h in two_process_run[1]]


def _streamed_digits(tmp_path, images, name):
    from PIL import Image

    from calibflow.data.image_files import ImageFiles

    folder = tmp_path / name
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image[0].numpy()).save(folder / f"{i}.png")
    return ImageFiles(folder, [f"{i}.png" for i in range(len(images))], "L", (8, 8))


@pytest.mark.slow
def test_a_file_cut_short_under_torchrun_is_one_line_naming_it(tmp_path):
    """A worker's refusal of a file reaches the flow as the same ManifestError (exit 2, one line),
    not as the workers' log."""
    (train, val, _) = digits()
    files = _streamed_digits(tmp_path, train[0][:200], "train")
    victim = Path(files.root) / files.paths[150]
    victim.write_bytes(victim.read_bytes()[:40])
    inputs = TrainingInputs(SPEC, files, train[1][:200], val[0], val[1], DDP, seed=0, workers=1)
    (tmp_path / "ddp").mkdir()
    with pytest.raises(ManifestError) as refused:
        train_distributed(inputs, work_dir=tmp_path / "ddp")
    assert str(victim) in str(refused.value) and "\n" not in str(refused.value)


def test_several_nodes_with_a_split_read_from_files_are_refused_before_launch(tmp_path):
    (train, val, _) = digits()
    files = _streamed_digits(tmp_path, train[0][:20], "train")
    config = dataclasses.replace(DDP, nnodes=2, nproc=1)
    with pytest.raises(ConfigError, match="data.in_memory_max_mb"):
        train_distributed(TrainingInputs(SPEC, files, train[1][:20], val[0], val[1], config, 0), work_dir=tmp_path)


def test_outliers_read_from_files_travel_as_their_file_list_and_several_nodes_refuse_them(tmp_path):
    """train.outlier_exposure's folder read from its files goes to the torchrun workers as a file
    list, as a split does; other nodes have no copy of the files, so several are refused."""
    from calibflow.data.image_files import ImageFiles

    (train, val, _) = digits()
    outliers = _streamed_digits(tmp_path, train[0][:20], "outliers")
    inputs = TrainingInputs(SPEC, train[0], train[1], val[0], val[1], DDP, 0, outlier_images=outliers)
    bundle = distributed._bundle(inputs, 2, None)
    assert isinstance(bundle["outliers"], dict)
    arrived = distributed._inputs_of(bundle, rank=1).outlier_images
    assert isinstance(arrived, ImageFiles) and torch.equal(arrived.decode(range(20)), outliers.decode(range(20)))
    in_memory = distributed._inputs_of(
        distributed._bundle(dataclasses.replace(inputs, outlier_images=train[0][:5]), 2, None), 1
    )
    assert torch.equal(in_memory.outlier_images, train[0][:5])
    several = dataclasses.replace(inputs, config=dataclasses.replace(DDP, nnodes=2, nproc=1))
    with pytest.raises(ConfigError, match="outlier_exposure"):
        train_distributed(several, work_dir=tmp_path)
