"""Progress bars of the long steps (training, logits, the corruption suite), one look for all.

On a terminal: images done, images/s and the time left, updated within an epoch; a CIFAR-10
epoch takes minutes on a CPU. Off a terminal (CI logs, pytest's captured stderr) tqdm draws
nothing: a log of carriage returns helps nobody, and the Prefect tasks log each result.
"""

from __future__ import annotations

from tqdm.auto import tqdm


def progress_bar(total: int, desc: str, unit: str = "img", enabled: bool = True, leave: bool = False) -> tqdm:
    """A bar over `total` units; `enabled=False` silences it even on a terminal."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        dynamic_ncols=True,
        leave=leave,
        disable=None if enabled else True,
        smoothing=0.1,
        mininterval=0.5,
    )
