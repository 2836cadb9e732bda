"""channel_stats: the per-channel mean and std the model normalises by, accumulated a chunk of
images at a time, equal to the float64 formula over the whole set."""

from __future__ import annotations

import pytest
import torch

from calibflow.data import images as images_module
from calibflow.data.images import channel_stats


def _whole_set(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = images.to(torch.float64) / 255.0
    return x.mean(dim=(0, 2, 3)).float(), x.std(dim=(0, 2, 3)).clamp_min(1e-3).float()


@pytest.mark.parametrize("chunk", [1, 100, 1 << 24])  # one image a chunk (uneven), several, all at once
@pytest.mark.parametrize("shape", [(7, 3, 5, 9), (1, 1, 8, 8), (300, 3, 16, 16)])
def test_chunked_sums_equal_the_float64_formula_over_the_whole_set(monkeypatch, chunk, shape):
    monkeypatch.setattr(images_module, "CHANNEL_STATS_CHUNK", chunk)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(sum(shape)))
    mean, std = channel_stats(images)
    expected_mean, expected_std = _whole_set(images)
    assert torch.equal(mean, expected_mean) and torch.equal(std, expected_std)


def test_extreme_values_lose_nothing_to_cancellation():
    """A large mean and a small spread (1.6 million values, a tenth 250 and the rest 255): sums
    of squares in floating point cancel here; exact integer sums do not."""
    images = torch.full((400, 1, 64, 64), 255, dtype=torch.uint8)
    images[::10] = 250
    mean, std = channel_stats(images)
    expected_mean, expected_std = _whole_set(images)
    assert torch.allclose(mean, expected_mean, rtol=0, atol=1e-7)
    assert torch.allclose(std, expected_std, rtol=1e-5, atol=0)
