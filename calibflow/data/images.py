"""Decode image files into one uint8 tensor (N, C, H, W).

Small-image datasets fit in memory many times over (CIFAR-10 is 150 MB as uint8), so they are
decoded once and kept as a single tensor: on a GPU the whole set then lives on the device and an
epoch is index arithmetic, with no DataLoader workers to feed.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image


def decode_image(path: str | Path, mode: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """One image as an (H, W, C) uint8 array in `mode`, resized to `size` (W, H) when it differs."""
    with Image.open(path) as image:
        image = image.convert(mode)
        if size is not None and image.size != tuple(size):
            image = image.resize(tuple(size), Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def load_images(
    root: str | Path, relative_paths: Sequence[str], mode: str, size: tuple[int, int] | None = None, workers: int = 8
) -> torch.Tensor:
    """Decode many files (PIL releases the GIL while decoding, so threads help)."""
    root = Path(root)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        arrays = list(pool.map(lambda p: decode_image(root / p, mode, size), relative_paths, chunksize=64))
    if not arrays:
        raise ValueError("no images to load")
    stacked = np.stack(arrays)  # (N, H, W, C)
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 images on the [0, 1] scale (accumulated in float64)."""
    x = images.to(torch.float64) / 255.0
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return mean.float(), std.float()
