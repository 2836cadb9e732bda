"""Images read from their files a batch at a time, for splits too large to decode into memory.

A split is either a uint8 tensor (N, C, H, W), decoded once (load_images: small images, where an
epoch is index arithmetic on the device), or an ImageFiles: the same files, decoded when a batch
asks for them, by torch's DataLoader worker processes that prefetch the next batches while the
model computes. Both give the same uint8 pixels for the same file (the one decode function of
calibflow.data.images), so a training, its logits and its metrics are the same either way, bit
for bit on the CPU; only memory and speed differ. `read_batches` is the one way the training loop
and the logit collectors read either kind.

A file that fails to decode mid-stream is a ManifestError naming it, on one line: the worker's
failure is passed back as a value, not as DataLoader's re-raised exception (whose message holds
the worker's traceback). So is a file whose bytes are no longer those the run pinned: with the
digests the manifest recorded, each file is read once, its SHA-256 checked, and those bytes decoded
(images.checked_bytes).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch

from calibflow.data.images import Framing, Size, as_framing, decode_image, load_images
from calibflow.environment import cpu_cores
from calibflow.errors import ManifestError

# A DataLoader worker is a process: above this many the CPU time they take from the model's own
# threads costs more than their decoding gives (a GPU host has cores to spare; `data.workers`).
MAX_AUTO_WORKERS = 8
PREFETCH_BATCHES = 2  # per worker: DataLoader's own default


@dataclass(frozen=True)
class ImageLoading:
    """How the pipeline reads a split: decoded into memory when its uint8 pixels take at most
    `in_memory_max_bytes`, else from its files with `workers` DataLoader processes (0: in this
    process, decoding each batch with a thread pool)."""

    in_memory_max_bytes: int
    workers: int

    def keeps_in_memory(self, n_images: int, channels: int, width: int, height: int) -> bool:
        return n_images * channels * width * height <= self.in_memory_max_bytes


def auto_workers() -> int:
    """One DataLoader worker per core beyond the one the model computes on, at most MAX_AUTO_WORKERS
    (cores: the affinity, capped by a cgroup CPU quota)."""
    return max(0, min(MAX_AUTO_WORKERS, cpu_cores() - 1))


class ImageFiles(torch.utils.data.Dataset):
    """The files `root/<path>` of a split, decoded to uint8 (C, H, W) in `mode`, framed by `size`
    (a Framing, or (W, H)) when read. len() and shape as a decoded tensor of them would have;
    `take` a subset, without decoding. A training framing (Framing.random) crops each image by
    the seed read with it: an item is then an (index, seed) pair. `digests`: each file's SHA-256
    as the run recorded it (the manifest's), checked against the bytes read before they are
    decoded; they travel with the paths (take, to_record, a worker's copy)."""

    def __init__(
        self, root: str | Path, paths: Sequence[str], mode: str, size: Size, digests: Sequence[str] | None = None
    ):
        self.root = str(root)
        self.paths = tuple(str(p) for p in paths)
        self.digests = None if digests is None else tuple(str(d) for d in digests)
        if self.digests is not None and len(self.digests) != len(self.paths):
            raise ValueError(f"{len(self.digests)} digests for {len(self.paths)} files: one per file")
        self.mode = mode
        self.framing: Framing = as_framing(size)
        self._loaders: dict[tuple[int, bool], tuple[torch.utils.data.DataLoader, _Batches]] = {}

    def __getstate__(self) -> dict:
        # what a worker receives: the files, not this process's loaders and their workers
        return {**self.__dict__, "_loaders": {}}

    def loader(self, workers: int, pin_memory: bool = False) -> tuple[torch.utils.data.DataLoader, _Batches]:
        """This split's DataLoader with `workers` persistent processes, and the batch sampler the
        next pass sets: the workers start once and serve every epoch and validation pass."""
        if (workers, pin_memory) not in self._loaders:
            batches = _Batches()
            loader = torch.utils.data.DataLoader(
                self,
                batch_sampler=batches,
                num_workers=workers,
                collate_fn=_stack,
                pin_memory=pin_memory,
                prefetch_factor=PREFETCH_BATCHES,
                persistent_workers=True,
                # its own generator: seeding the workers would otherwise draw from torch's global
                # stream, which dropout draws from, and a training would differ from one in memory
                generator=torch.Generator().manual_seed(0),
                multiprocessing_context=_worker_context(),
            )
            self._loaders[(workers, pin_memory)] = (loader, batches)
        return self._loaders[(workers, pin_memory)]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), len(self.mode), self.framing.height, self.framing.width)

    @property
    def crops(self) -> bool:
        """Whether each read draws a random crop (a training framing), from a seed read with it."""
        return self.framing.random

    def evaluated(self) -> ImageFiles:
        """The same files, framed as evaluation frames them: no random crop."""
        return ImageFiles(self.root, self.paths, self.mode, self.framing.for_evaluation(), self.digests)

    def __getitem__(self, item: int | tuple[int, int]) -> torch.Tensor | str:
        """One image as uint8 (C, H, W), or, for a file that fails to decode or whose bytes are not
        those recorded, the refusal's message: read_batches raises it, on one line, wherever the
        decoding ran. `item`: an index, or an (index, seed) pair for a training framing."""
        index, seed = item if isinstance(item, tuple) else (item, None)
        try:
            array = decode_image(
                Path(self.root) / self.paths[index], self.mode, self.framing, seed=seed, sha256=self._digest(index)
            )
        except ManifestError as error:
            return str(error)
        return torch.from_numpy(np.array(array)).permute(2, 0, 1)  # a writable copy: decode's may be read-only

    def close(self) -> None:
        """Stop this split's worker processes (each loader holds this object: a cycle that only
        the cyclic garbage collector would break, with the workers alive until then)."""
        for loader, _ in self._loaders.values():
            iterator = getattr(loader, "_iterator", None)
            if iterator is not None:
                iterator._shutdown_workers()
        self._loaders.clear()

    def _digest(self, index: int) -> str | None:
        return self.digests[index] if self.digests is not None else None

    def _at(self, indices: Iterable[int]) -> tuple[list[str], list[str] | None]:
        """The paths and recorded digests (None without) of the files at `indices`."""
        indices = list(indices)
        digests = None if self.digests is None else [self.digests[i] for i in indices]
        return [self.paths[i] for i in indices], digests

    def take(self, indices: Iterable[int]) -> ImageFiles:
        paths, digests = self._at(indices)
        return ImageFiles(self.root, paths, self.mode, self.framing, digests)

    def decode(self, indices: Iterable[int], seeds: Sequence[int] | None = None) -> torch.Tensor:
        """The images at `indices` as one uint8 tensor (N, C, H, W), decoded here by a thread pool."""
        paths, digests = self._at(indices)
        return load_images(self.root, paths, self.mode, self.framing, seeds=seeds, digests=digests)

    def to_record(self) -> dict:
        """Plain values (for a torchrun worker's bundle, which torch.load reads with weights_only)."""
        return {
            "root": self.root,
            "paths": list(self.paths),
            "mode": self.mode,
            "framing": self.framing.to_record(),
            "digests": None if self.digests is None else list(self.digests),
        }

    @classmethod
    def from_record(cls, record: dict) -> ImageFiles:
        return cls(
            record["root"],
            record["paths"],
            record["mode"],
            Framing.from_record(record["framing"]),
            record.get("digests"),
        )


ImageSource = Union[torch.Tensor, ImageFiles]


def _worker_context():
    """Workers forked from a clean server process, not from this one: a run's process holds
    threads (Prefect's engine and API client, MLflow's), and a child forked from it mid-way through
    one of their locks dies (seen: a worker exiting with code 1 in two `calibflow run`s and a bare
    Prefect task). The server starts once per process with this module (and torch) imported; each
    worker still imports the main module again, as multiprocessing does (the `calibflow` script:
    about 40 ms; `python -m prefect.engine` under a deployment: Prefect's import time)."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


class _Batches:
    """A batch sampler whose batches each pass sets (a DataLoader with persistent workers keeps
    its sampler): the training's own seeded order, never a sampler's."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _stack(items: list) -> torch.Tensor | str:
    failed = next((item for item in items if isinstance(item, str)), None)
    return failed if failed is not None else torch.stack(items)


def read_batches(
    source: ImageSource,
    index_batches: Sequence[Sequence[int] | torch.Tensor],
    *,
    workers: int = 0,
    pin_memory: bool = False,
    seeds: Sequence[Sequence[int] | torch.Tensor] | None = None,
) -> Iterator[torch.Tensor]:
    """The images of each batch of indices, in order: a tensor source indexed where it lies (on
    the device, for a training's), an ImageFiles decoded by its `workers` persistent DataLoader
    processes that run PREFETCH_BATCHES batches ahead (on the host, in pinned memory with
    `pin_memory`: for a copy to a GPU), or by a thread pool here when `workers` is 0. One pass at a time per
    source: a new pass on the same ImageFiles ends the one before. `seeds`, one per index in
    batches of the same shape: each image's random crop, for an ImageFiles that crops (and only
    for one)."""
    if isinstance(source, torch.Tensor):
        for batch in index_batches:
            yield source[batch]
        return
    if (seeds is not None) != source.crops:
        raise ValueError("seeds go with a training framing's files, and only with them: one seed per image read")
    batches = [_host_list(batch) for batch in index_batches]
    seed_batches = [_host_list(batch) for batch in seeds] if seeds is not None else [None] * len(batches)
    if workers == 0:
        for batch, batch_seeds in zip(batches, seed_batches):
            yield source.decode(batch, batch_seeds)
        return
    loader, sampler = source.loader(workers, pin_memory)
    sampler.batches = [
        batch if batch_seeds is None else list(zip(batch, batch_seeds))
        for batch, batch_seeds in zip(batches, seed_batches)
    ]
    for batch in loader:
        if isinstance(batch, str):
            raise ManifestError(batch)
        yield batch


def _host_list(batch: Sequence[int] | torch.Tensor) -> list[int]:
    return batch.tolist() if isinstance(batch, torch.Tensor) else list(batch)


def in_order(n: int, batch_size: int) -> list[range]:
    """Consecutive batches of range(n): how logits are collected."""
    return [range(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def every_nth(source: ImageSource, start: int, step: int) -> ImageSource:
    """source[start::step], without decoding an ImageFiles: one process's share of a split."""
    if isinstance(source, torch.Tensor):
        return source[start::step]
    return source.take(range(start, len(source), step))


@contextmanager
def closing(*sources: ImageSource | None) -> Iterator[list[ImageSource | None]]:
    """Stops the workers of every ImageFiles among `sources`, and of those appended to the list
    it yields, on the way out."""
    more: list[ImageSource | None] = []
    try:
        yield more
    finally:
        for source in [*sources, *more]:
            if isinstance(source, ImageFiles):
                source.close()
