"""Training on more than one process: DistributedDataParallel under torchrun, from the same flow.

With `train.distributed: ddp` the flow's training step does not train in its own process. It
writes what training reads (the train and val images, the model spec, `train:`, the seed) to one
file, starts `torchrun` (`python -m torch.distributed.run`, the same interpreter) with
`train.nproc` processes on this node, and waits. Rank 0 reads the file and hands it to the other
ranks over the process group, so the processes of other nodes need no shared disk; every process
runs calibflow.training's one loop, which under a process group trains through DDP on its share
of each global batch (`train.batch_size` is the global batch, whatever the number of processes).
Rank 0 alone validates, checkpoints and writes: each epoch's statistics to `epochs.jsonl` (the
flow logs them to MLflow as they come) and the final weights to `result.pt`. The flow then goes
on as for a one-process training: logits, calibration, gates and the registry stay in the flow's
process, so only rank 0's results are ever logged or registered.

Backends: NCCL when training on CUDA (one GPU per process, `cuda:LOCAL_RANK`), gloo on the CPU.
Several nodes (`train.nnodes` > 1): this node is node 0 and serves the rendezvous at
`train.rendezvous` (HOST:PORT, an address the other nodes reach, e.g. a Kubernetes headless
Service); each other node runs `torchrun --nnodes N --node-rank K --master-addr HOST
--master-port PORT -m calibflow.distributed` (`follower_command` prints it; infra/k8s/ddp runs
it in a StatefulSet, one pod per node).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from calibflow.config import ConfigError, TrainConfig, rendezvous_address
from calibflow.models import ImageClassifier, ModelSpec, build_model
from calibflow.resume import EpochCheckpoints
from calibflow.training import EpochStats, ProcessGroup, Runtime, resolve_runtime, train_classifier

BUNDLE, RESULT, EPOCHS, LOG = "bundle.pt", "result.pt", "epochs.jsonl", "workers.log"
DEVICE_ENV = "CALIBFLOW_DDP_DEVICE"
# How long a process waits for the others (a follower node still starting, a peer that died):
# NCCL and gloo otherwise wait 10-30 minutes before they say anything.
PEER_TIMEOUT_S = 300


class DistributedTrainingError(RuntimeError):
    """The torchrun workers did not finish; the message holds the end of their log."""


def available_slots(on_cuda: bool) -> tuple[int, str]:
    """How many processes this node can hold: its GPUs when training on CUDA, else the CPU cores
    this process may run on (its affinity, which is what a container's CPU set allows)."""
    if on_cuda:
        return torch.cuda.device_count(), "GPUs"
    return len(os.sched_getaffinity(0)), "CPU cores"


def resolve_nproc(config: TrainConfig) -> int:
    """`train.nproc` as a number, checked against what this node has (ConfigError otherwise)."""
    on_cuda = resolve_runtime(config.device, config.precision).on_cuda
    slots, kind = available_slots(on_cuda)
    threads = 1 if on_cuda or config.threads == "auto" else int(config.threads)
    if config.nproc == "auto":
        return max(1, slots // threads)
    needed = config.nproc * threads
    if needed > slots:
        per = "" if threads == 1 else f" x {threads} threads each (train.threads)"
        raise ConfigError(
            f"train.nproc = {config.nproc}{per} needs {needed} {kind} and this machine has {slots}: lower "
            f"train.nproc to at most {max(1, slots // threads)} (or auto), or run on a node with more {kind}"
        )
    return config.nproc


def train_distributed(
    spec: ModelSpec,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    val_images: torch.Tensor,
    val_labels: torch.Tensor,
    config: TrainConfig,
    seed: int,
    work_dir: str | Path,
    weights_path: str | None = None,
    on_epoch_end: Callable[[EpochStats], None] | None = None,
    outlier_images: torch.Tensor | None = None,
    checkpoints: EpochCheckpoints | None = None,
) -> tuple[ImageClassifier, list[EpochStats]]:
    """Train `spec` as train_classifier does, in `train.nproc` torchrun processes (x `train.nnodes`
    nodes); returns rank 0's weights and epoch statistics."""
    nproc = resolve_nproc(config)
    work = Path(tempfile.mkdtemp(prefix="ddp-", dir=Path(work_dir)))
    bundle = {
        "spec": dataclasses.asdict(spec),
        "config": dataclasses.asdict(config),
        "seed": seed,
        "train": (train_images, train_labels),
        "val": (val_images, val_labels),
        "outliers": outlier_images,
        "weights_path": weights_path,  # read by rank 0, on this node
        "checkpoints": str(checkpoints.directory) if checkpoints is not None else None,
    }
    torch.save(bundle, work / BUNDLE)
    command = [sys.executable, "-m", "torch.distributed.run", *launcher_args(config, nproc, node_rank=0)]
    command += ["-m", "calibflow.distributed", str(work)]
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
                    break
                time.sleep(0.5)
        except BaseException:  # an interrupted flow must not leave training processes behind
            process.terminate()  # torchrun passes SIGTERM on to its workers
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
            raise
    if process.returncode != 0 or not (work / RESULT).is_file():
        tail = (work / LOG).read_text(errors="replace")[-3000:]
        raise DistributedTrainingError(
            f"DDP training ({nproc} process(es) x {config.nnodes} node(s)) exited with code {process.returncode}; "
            f"the end of the workers' log ({work / LOG}):\n{tail}"
        )
    result = torch.load(work / RESULT, map_location="cpu", weights_only=False)
    model = build_model(spec)
    model.load_state_dict(result["model"])
    model.eval()
    history = [EpochStats(**stats) for stats in result["history"]]
    for path in (work / BUNDLE, work / RESULT):  # the weights are the run's checkpoint from here on
        path.unlink(missing_ok=True)
    return model, history


def launcher_args(config: TrainConfig, nproc: int, node_rank: int) -> list[str]:
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
    args = " ".join(launcher_args(config, nproc, node_rank=0)).replace("--node-rank=0", f"--node-rank={node_rank}")
    device = f"{DEVICE_ENV}=cpu " if not resolve_runtime(config.device, config.precision).on_cuda else ""
    return f"{device}torchrun {args} -m calibflow.distributed"


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

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_cuda = torch.cuda.is_available() and _wants_cuda()
    if on_cuda:
        torch.cuda.set_device(local_rank)
    from datetime import timedelta

    dist.init_process_group("nccl" if on_cuda else "gloo", timeout=timedelta(seconds=PEER_TIMEOUT_S))
    group = ProcessGroup.current()
    try:
        work = Path(work_dir) if work_dir else None
        if group.is_rank0 and work is None:
            raise SystemExit("rank 0 needs the launch directory: the flow starts node 0, followers join it")
        bundle = group.from_rank0(torch.load(work / BUNDLE, weights_only=False) if group.is_rank0 else None)
        config = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in bundle["config"].items()})
        base = resolve_runtime(config.device, config.precision)
        runtime = (
            Runtime(torch.device("cuda", local_rank), base.autocast_dtype, base.channels_last) if on_cuda else base
        )
        spec = ModelSpec(**bundle["spec"])
        # DDP hands rank 0's initial weights to the others: only rank 0 reads model.weights_path
        weights = bundle["weights_path"] if group.is_rank0 else None

        def write_epoch(stats: EpochStats) -> None:
            with open(work / EPOCHS, "a") as out:
                out.write(json.dumps(dataclasses.asdict(stats)) + "\n")

        checkpoints = EpochCheckpoints(Path(bundle["checkpoints"])) if bundle["checkpoints"] else None
        model, history = train_classifier(
            spec,
            *bundle["train"],
            *bundle["val"],
            config,
            bundle["seed"],
            runtime,
            weights_path=weights,
            on_epoch_end=write_epoch if group.is_rank0 else None,
            progress=False,
            outlier_images=bundle["outliers"],
            checkpoints=checkpoints,
        )
        if group.is_rank0:
            partial = work / f".{RESULT}.partial"
            torch.save({"model": model.state_dict(), "history": [dataclasses.asdict(h) for h in history]}, partial)
            os.replace(partial, work / RESULT)  # the flow never reads half a result
    finally:
        dist.destroy_process_group()


def _wants_cuda() -> bool:
    """Whether this training runs on CUDA, known before the process group (and so before the
    bundle): the launcher sets DEVICE_ENV; a follower node trains on its GPUs unless told cpu."""
    return os.environ.get(DEVICE_ENV, "auto") != "cpu"


if __name__ == "__main__":
    _worker(sys.argv[1] if len(sys.argv) > 1 else None)
