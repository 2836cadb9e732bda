"""Training on more than one process: DistributedDataParallel under torchrun, from the same flow.

With `train.distributed: ddp` the flow's training step does not train in its own process. It
writes what training reads (the train and val images, the model spec, `train:`, the seed) to one
file, starts `torchrun` (`python -m torch.distributed.run`, the same interpreter) with
`train.nproc` processes on this node, and waits. Rank 0 reads the file and hands it to the other
ranks over the process group, so the processes of other nodes need no shared disk; every process
runs calibflow.training.loop's one loop, which under a process group trains through DDP on its share
of each global batch (`train.batch_size` is the global batch, whatever the number of processes)
and scores its share of the val split. Rank 0 alone checkpoints and writes: each epoch's
statistics to `epochs.jsonl` (the flow logs them to MLflow as they come) and the final weights to
`result.pt`. The flow then goes on as for a one-process training: logits, calibration, gates and
the registry stay in the flow's process, so only rank 0's results are ever logged or registered.

Backends: NCCL when training on CUDA (one GPU per process, `cuda:LOCAL_RANK`), gloo on the CPU;
rank 0 decides and the others read its choice from torchrun's store. Several nodes
(`train.nnodes` > 1): this node is node 0 and serves the rendezvous at `train.rendezvous`
(HOST:PORT, an address the other nodes reach, e.g. a Kubernetes headless Service); each other
node runs `torchrun --nnodes N --node-rank K --master-addr HOST --master-port PORT -m
calibflow.training.distributed` (`follower_command` prints it; infra/k8s/ddp runs it in a StatefulSet, one
pod per node). Every process checks it runs node 0's training code and that the processes add up
to what node 0 planned. The training processes die with the flow's process (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch

from calibflow.data.image_files import ImageFiles, ImageSource
from calibflow.config import TrainConfig, rendezvous_address
from calibflow.environment import cpu_cores
from calibflow.errors import ConfigError, ManifestError
from calibflow.training.models import ImageClassifier, ModelSpec, build_model
from calibflow.training.resume import EpochCheckpoints, load_error_reason, training_code_digest
from calibflow.training.loop import (
    EpochStats,
    ProcessGroup,
    Runtime,
    TrainingInputs,
    resolve_runtime,
    train_classifier,
)
from calibflow.errors import DistributedTrainingError

BUNDLE, RESULT, EPOCHS, LOG = "bundle.pt", "result.pt", "epochs.jsonl", "workers.log"
# A worker's refusal of a file, for the flow to raise as its own: "ManifestError: <message>" (a file
# of a streamed split that does not decode) or "ConfigError: <message>" (initial weights that changed).
REFUSED = "refused.txt"
REFUSALS = {error.__name__: error for error in (ManifestError, ConfigError)}
DEVICE_ENV = "CALIBFLOW_DDP_DEVICE"
# How long a process waits for the others (a follower node still starting, a peer that died):
# NCCL and gloo otherwise wait 10-30 minutes before they say anything.
PEER_TIMEOUT_S = 300


# Each process trains on its share of every global batch, with BatchNorm statistics of that share
# alone: below this many images a share's statistics are noise. `nproc: auto` stays above it.
MIN_SHARE = 8


def available_slots(on_cuda: bool) -> tuple[int, str]:
    """How many processes this node can hold: its GPUs when training on CUDA, else its CPU cores
    (calibflow.environment.cpu_cores: the affinity, capped by a cgroup v2 CPU quota)."""
    if on_cuda:
        return torch.cuda.device_count(), "GPUs"
    return cpu_cores(), "CPU cores"


def resolve_nproc(config: TrainConfig) -> int:
    """`train.nproc` as a number, checked against what this node has and against the global batch
    it shares with the others (ConfigError otherwise)."""
    on_cuda = resolve_runtime(config.device, config.precision).on_cuda
    slots, kind = available_slots(on_cuda)
    threads = 1 if on_cuda or config.threads == "auto" else int(config.threads)
    if config.nproc == "auto":
        by_batch = max(1, config.batch_size // (MIN_SHARE * config.nnodes))
        return max(1, min(slots // threads, by_batch))
    needed = config.nproc * threads
    if needed > slots:
        per = "" if threads == 1 else f" x {threads} threads each (train.threads)"
        raise ConfigError(
            f"train.nproc = {config.nproc}{per} needs {needed} {kind} and this machine has {slots}: lower "
            f"train.nproc to at most {max(1, slots // threads)} (or auto), or run on a node with more {kind}"
        )
    processes = config.nproc * config.nnodes
    if config.batch_size < 2 * processes:
        raise ConfigError(
            f"train.batch_size = {config.batch_size} is the global batch and {processes} processes share it: "
            f"each needs at least 2 images (BatchNorm), so no step would train; raise train.batch_size to "
            f"{MIN_SHARE * processes} or more, or lower train.nproc"
        )
    return config.nproc


def train_distributed(
    inputs: TrainingInputs,
    *,
    work_dir: str | Path,
    on_epoch_end: Callable[[EpochStats], None] | None = None,
    checkpoints: EpochCheckpoints | None = None,
) -> tuple[ImageClassifier, list[EpochStats]]:
    """Train `inputs.spec` as train_classifier does, in `train.nproc` torchrun processes (x
    `train.nnodes` nodes) launched in a new directory under `work_dir`; returns rank 0's weights
    and epoch statistics."""
    config = inputs.config
    nproc = resolve_nproc(config)
    sources = (inputs.train_images, inputs.val_images, inputs.outlier_images)
    if config.nnodes > 1 and not all(isinstance(s, torch.Tensor) for s in sources if s is not None):
        raise ConfigError(
            f"train.nnodes = {config.nnodes} with images read from their files (larger than data.in_memory_max_mb): "
            f"the other nodes get the pixels in the launch bundle and have no copy of the files; raise "
            f"data.in_memory_max_mb to hold the train and val splits (and train.outlier_exposure's folder) in "
            f"memory, or train on one node"
        )
    if inputs.weights_path and not Path(inputs.weights_path).is_file():
        raise ConfigError(
            f"model.weights_path {inputs.weights_path} does not exist: put the state_dict there or set it to null"
        )
    if checkpoints is not None:
        checkpoints.load()  # a damaged checkpoint is a CheckpointError here, not a worker's crash
    work = Path(tempfile.mkdtemp(prefix="ddp-", dir=Path(work_dir)))
    torch.save(_bundle(inputs, nproc * config.nnodes, checkpoints), work / BUNDLE)
    try:
        returncode = _run_torchrun(config, nproc, work, on_epoch_end)
    finally:
        (work / BUNDLE).unlink(missing_ok=True)  # a copy of the training data
    if returncode != 0 and (work / REFUSED).is_file():
        kind, _, message = (work / REFUSED).read_text().partition(": ")
        raise REFUSALS.get(kind, ManifestError)(message)
    if returncode != 0 or not (work / RESULT).is_file():
        tail = (work / LOG).read_text(errors="replace")[-3000:]
        raise DistributedTrainingError(
            f"DDP training ({nproc} process(es) x {config.nnodes} node(s)) exited with code {returncode}; "
            f"the end of the workers' log ({work / LOG}):\n{tail}"
        )
    return _read_result(work, inputs.spec)


def _bundle(inputs: TrainingInputs, world_size: int, checkpoints: EpochCheckpoints | None) -> dict:
    """What every process reads: `inputs` as plain values and tensors (no calibflow classes, so a
    node that runs other code still reads it and says so), and what node 0 planned. Plain values
    and tensors are all torch.load(weights_only=True) accepts: _load reads it so."""
    return {
        "code": training_code_digest(),
        "world_size": world_size,
        "spec": dataclasses.asdict(inputs.spec),
        "config": dataclasses.asdict(inputs.config),
        "seed": inputs.seed,
        # a split read from its files travels as its file list (each process decodes its own batches)
        "train": (_plain(inputs.train_images), inputs.train_labels),
        "train_targets": inputs.train_targets,  # train.targets soft or sampled: (N, K), else None
        "val": (_plain(inputs.val_images), inputs.val_labels),
        "outliers": _plain(inputs.outlier_images) if inputs.outlier_images is not None else None,
        "workers": inputs.workers,
        "weights_path": inputs.weights_path,  # read by rank 0, on this node
        "weights_sha256": inputs.weights_sha256,
        "checkpoints": str(checkpoints.directory) if checkpoints is not None else None,
    }


def _inputs_of(bundle: dict, rank: int) -> TrainingInputs:
    config = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in bundle["config"].items()})
    (train_images, train_labels), (val_images, val_labels) = bundle["train"], bundle["val"]
    return TrainingInputs(
        ModelSpec(**bundle["spec"]),
        _source(train_images),
        train_labels,
        _source(val_images),
        val_labels,
        config,
        bundle["seed"],
        # DDP hands rank 0's initial weights to the others: only rank 0 reads model.weights_path
        weights_path=bundle["weights_path"] if rank == 0 else None,
        weights_sha256=bundle["weights_sha256"] if rank == 0 else None,
        outlier_images=_source(bundle["outliers"]) if bundle["outliers"] is not None else None,
        workers=bundle["workers"],
        train_targets=bundle["train_targets"],
    )


def _plain(source: ImageSource) -> torch.Tensor | dict:
    return source if isinstance(source, torch.Tensor) else source.to_record()


def _source(value: torch.Tensor | dict) -> ImageSource:
    return value if isinstance(value, torch.Tensor) else ImageFiles.from_record(value)


def _run_torchrun(
    config: TrainConfig, nproc: int, work: Path, on_epoch_end: Callable[[EpochStats], None] | None
) -> int:
    """Run node 0's torchrun on the bundle in `work`, its output to the workers' log, handing each
    epoch rank 0 writes to `on_epoch_end` as it comes; torchrun's exit code."""
    command = [sys.executable, "-m", "torch.distributed.run", *launcher_args(config, nproc, node_rank=0)]
    command = _dies_with_this_process([*command, "-m", "calibflow.training.distributed", str(work)])
    on_cuda = resolve_runtime(config.device, config.precision).on_cuda
    env = {**os.environ, DEVICE_ENV: "cuda" if on_cuda else "cpu"}
    env.setdefault("OMP_NUM_THREADS", "1")  # each process sets train.threads itself
    reported = 0
    with open(work / LOG, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                finished = process.poll() is not None
                reported = _report_new_epochs(work / EPOCHS, reported, on_epoch_end)
                if finished:
                    return process.returncode
                time.sleep(0.5)
        except BaseException:  # an interrupted flow must not leave training processes behind
            process.terminate()  # torchrun passes SIGTERM on to its workers
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()  # and the workers die with torchrun (_dies_with_this_process)
            raise


def _load(path: Path) -> dict:
    """`path`, a file calibflow's own processes wrote, as tensors and plain values. Never unpickled:
    the launch directory is a folder on disk like any other, and what is in it may not be what
    calibflow put there (DistributedTrainingError naming it otherwise)."""
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001  any failure to read it is the same refusal
        raise DistributedTrainingError(
            f"{path} cannot be loaded as tensors and plain values, so it is not what this DDP training "
            f"wrote and is not read ({load_error_reason(error)}); run the training again"
        ) from error
    if not isinstance(content, dict):
        raise DistributedTrainingError(f"{path} holds a {type(content).__name__}, not what this DDP training wrote")
    return content


def _read_result(work: Path, spec: ModelSpec) -> tuple[ImageClassifier, list[EpochStats]]:
    result = _load(work / RESULT)
    try:
        model = build_model(spec)
        model.load_state_dict(result["model"])
        model.eval()
        history = [EpochStats(**stats) for stats in result["history"]]
    except (KeyError, TypeError, RuntimeError) as error:
        raise DistributedTrainingError(
            f"the DDP training's result {work / RESULT} is not the weights and epochs rank 0 writes "
            f"({type(error).__name__}: {error}); run the training again"
        ) from error
    (work / RESULT).unlink()  # the weights are the run's checkpoint from here on
    return model, history


# PR_SET_PDEATHSIG (linux/prctl.h): the kernel sends the signal when the parent dies. Neither
# torchrun (whose workers start in sessions of their own) nor SIGKILL of the flow would otherwise
# stop the training processes: they would train on, holding GPUs, and race a restarted run for its
# checkpoints. The setting survives exec; a parent gone before it was set is checked right after.
PR_SET_PDEATHSIG = 1
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl({option}, signal.SIGKILL)\n"
    "if os.getppid() != int(sys.argv[1]): os._exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
).format(option=PR_SET_PDEATHSIG)


def _dies_with_this_process(command: list[str]) -> list[str]:
    """`command`, run so that the kernel kills it when this process dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *command]


def _die_with_parent() -> None:
    """This worker is killed when its torchrun agent dies (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def launcher_args(config: TrainConfig, nproc: int, node_rank: int | str) -> list[str]:
    """torchrun's options for node `node_rank`: a standalone rendezvous on one node; several
    nodes meet at train.rendezvous, served by node 0 (which holds global rank 0)."""
    args = [f"--nproc-per-node={nproc}"]
    if config.nnodes == 1:
        return ["--standalone", *args]
    host, port = rendezvous_address(config.rendezvous)
    return [
        f"--nnodes={config.nnodes}",
        f"--node-rank={node_rank}",
        f"--master-addr={host}",
        f"--master-port={port}",
        *args,
    ]


def follower_command(config: TrainConfig, nproc: int, node_rank: str = "$NODE_RANK") -> str:
    """The command each other node runs to join a multi-node training (README, infra/k8s/ddp)."""
    return f"torchrun {' '.join(launcher_args(config, nproc, node_rank))} -m calibflow.training.distributed"


def _report_new_epochs(path: Path, reported: int, on_epoch_end: Callable[[EpochStats], None] | None) -> int:
    """Hand the epochs rank 0 has written since the last call to `on_epoch_end`; complete lines only."""
    if not path.is_file():
        return reported
    lines = path.read_text().split("\n")[:-1]  # the last piece is empty or still being written
    for line in lines[reported:]:
        if on_epoch_end is not None:
            on_epoch_end(EpochStats(**json.loads(line)))
    return max(reported, len(lines))


def _worker(work_dir: str | None) -> None:
    """One torchrun process. Rank 0 reads the bundle (its node launched the run) and sends it to
    the others; only rank 0 writes."""
    import torch.distributed as dist

    _die_with_parent()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_cuda = _device_of_rank0()
    if on_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if on_cuda else "gloo", timeout=timedelta(seconds=PEER_TIMEOUT_S))
    group = ProcessGroup.current()
    try:
        work = Path(work_dir) if work_dir else None
        if group.is_rank0 and work is None:
            raise SystemExit("rank 0 needs the launch directory: the flow starts node 0, followers join it")
        bundle = group.from_rank0(_load(work / BUNDLE) if group.is_rank0 else None)
        _check_nodes_agree(group, bundle)
        inputs = _inputs_of(bundle, group.rank)
        base = resolve_runtime(inputs.config.device, inputs.config.precision)
        runtime = (
            Runtime(torch.device("cuda", local_rank), base.autocast_dtype, base.channels_last) if on_cuda else base
        )

        def write_epoch(stats: EpochStats) -> None:
            with open(work / EPOCHS, "a") as out:
                out.write(json.dumps(dataclasses.asdict(stats)) + "\n")

        checkpoints = EpochCheckpoints(Path(bundle["checkpoints"])) if bundle["checkpoints"] else None
        try:
            model, history = train_classifier(
                inputs,
                runtime=runtime,
                on_epoch_end=write_epoch if group.is_rank0 else None,
                progress=False,
                checkpoints=checkpoints,
            )
        except tuple(REFUSALS.values()) as error:
            if work is not None:  # the launching node's ranks tell the flow which file, in one line
                kind = next(name for name, refusal in REFUSALS.items() if isinstance(error, refusal))
                (work / REFUSED).write_text(f"{kind}: {error}")
            raise
        if group.is_rank0:
            partial = work / f".{RESULT}.partial"
            torch.save({"model": model.state_dict(), "history": [dataclasses.asdict(h) for h in history]}, partial)
            os.replace(partial, work / RESULT)  # the flow never reads half a result
    finally:
        dist.destroy_process_group()


def _check_nodes_agree(group: ProcessGroup, bundle: dict) -> None:
    """Every process runs node 0's training code, and there are as many as node 0 planned; otherwise every process stops with the same message (so node 0's log,
    which the flow shows, names the node that differs)."""
    import socket

    mine = {"host": socket.gethostname(), "code": training_code_digest()}
    everyone = group.gather_to_all(mine)
    problems = []
    if group.world_size != bundle["world_size"]:
        problems.append(
            f"{group.world_size} processes joined and node 0 planned {bundle['world_size']} (train.nproc x "
            f"train.nnodes): give every node the same NNODES and NPROC_PER_NODE as the flow's train: settings"
        )
    for rank, their in enumerate(everyone):
        if their["code"] != bundle["code"]:
            problems.append(
                f"rank {rank} on {their['host']} runs other training code: deploy the same image everywhere"
            )
    if problems:
        raise SystemExit("the nodes of this DDP training disagree: " + "; ".join(problems))


def _device_of_rank0() -> bool:
    """Whether this training runs on CUDA, as rank 0 decided (the launcher passes the flow's choice
    in DEVICE_ENV), read through torchrun's own store before the process group exists, since the
    group's backend depends on it: NCCL in one process and gloo in another would wait forever."""
    import torch.distributed as dist

    rank0 = torch.cuda.is_available() and os.environ.get(DEVICE_ENV, "auto") != "cpu"
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return rank0
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(seconds=PEER_TIMEOUT_S),
    )
    key = f"calibflow/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/cuda"
    if int(os.environ["RANK"]) == 0:
        store.set(key, "1" if rank0 else "0")
    return store.get(key) == b"1"


if __name__ == "__main__":
    _worker(sys.argv[1] if len(sys.argv) > 1 else None)
