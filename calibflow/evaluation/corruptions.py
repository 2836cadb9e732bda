"""Common corruptions of images at severities 1-5, deterministic per image.

The formulas and severities are those Hendrycks & Dietterich (2019) used to build CIFAR-10-C
(`make_cifar_c.py`): noise (gaussian, shot, impulse, speckle), gaussian blur, contrast,
brightness, pixelate and JPEG compression. They are written here in numpy, scipy and Pillow rather
than taken from the `imagecorruptions` package because that package refuses images smaller than
32x32 (the default digits are 8x8), draws its noise from numpy's global random state (so a result
depends on what else the process drew), carries the ImageNet-C severities (tuned for 224x224
images), and pulls opencv-python and scikit-image into the lock for what is a few lines each.

Every corruption here works on grayscale ("L") and RGB images of any size: the noises, contrast
and brightness are per pixel; blur and pixelate are in pixels (on 8x8 digits a blur of sigma 1 is
already severe); JPEG is encoded in the image's own mode. Left out: the corruptions that need
textures or a 3-D scene (frost, snow, fog, spatter), motion, zoom and glass blur, and elastic
transforms.

Determinism: the random draws of one image come from a generator seeded by a hash of the image's
bytes, the corruption, the severity and the run's seed, so the corrupted pixels of an image do not
depend on the batch it arrives in, on its position, or on anything else the process has drawn:
`calibflow evaluate` and the champion comparison rebuild exactly the pixels the run measured.
"""

from __future__ import annotations

import hashlib
import io
from typing import Callable

import numpy as np
from PIL import Image

# Every corruption this module implements (CIFAR-10-C's formulas and severities): the names
# params.yaml's shift.corruptions and calibration.shift_corruptions accept.
CORRUPTION_NAMES = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "speckle_noise",
    "gaussian_blur",
    "contrast",
    "brightness",
    "pixelate",
    "jpeg_compression",
)

# CIFAR-10-C's parameters, severity 1..5 (Hendrycks & Dietterich 2019, make_cifar_c.py).
SEVERITY_PARAMETERS: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # std on the [0, 1] scale
    "shot_noise": (500, 250, 100, 75, 50),  # photons per unit intensity (Poisson)
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # share of pixels set to 0 or 1 (salt and pepper)
    "speckle_noise": (0.06, 0.10, 0.12, 0.16, 0.20),  # std of the multiplicative noise
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # sigma in pixels
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor towards each channel's mean
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to the HSV value
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # side scale of the down-sampling
    "jpeg_compression": (80, 65, 58, 50, 40),  # JPEG quality
}
CORRUPTION_VERSION = "1"  # part of every cache key: bump when a formula changes


def image_seed(image: np.ndarray, corruption: str, severity: int, seed: int) -> int:
    """The seed of one image's random draws: a hash of its bytes and shape, the corruption, the
    severity and the run's seed."""
    digest = hashlib.sha256()
    digest.update(f"{corruption}:{severity}:{seed}:{image.shape}:".encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return int.from_bytes(digest.digest()[:8], "little")


def _unit(image: np.ndarray) -> np.ndarray:
    x = image.astype(np.float64)
    x /= 255.0
    return x


def _uint8(x: np.ndarray) -> np.ndarray:
    """[0, 1] floats to uint8, rounding half up as PIL does; `x` is overwritten (the in-place steps
    are the same float64 operations in the same order as clip(x) * 255 + 0.5, without their copies)."""
    np.clip(x, 0.0, 1.0, out=x)
    x *= 255.0
    x += 0.5
    return x.astype(np.uint8)


def gaussian_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return x + rng.normal(size=x.shape, scale=c)


def shot_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return rng.poisson(x * c) / c


def impulse_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    out = x.copy()
    hit = rng.random(x.shape) < c  # each value hit with probability c, then salt or pepper half and half
    out[hit] = (rng.random(int(hit.sum())) < 0.5).astype(np.float64)
    return out


def speckle_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return x + x * rng.normal(size=x.shape, scale=c)


def gaussian_blur(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(x, sigma=(c, c, 0), mode="nearest")


def contrast(image: np.ndarray, c: float) -> np.ndarray:
    """Each channel pulled towards its mean: (x - mean) * c + mean on the [0, 1] scale. The result
    of a pixel depends only on its own value and its channel's mean, so it is looked up in a
    256-entry table per channel, made by the same float64 operations: the same bytes as computing
    it pixel by pixel, at a fraction of the cost on photos."""
    values = _unit(np.arange(256, dtype=np.uint8))
    means = _unit(image).mean(axis=(0, 1))
    out = np.empty_like(image)
    for channel, mean in enumerate(means):
        table = _uint8((values - mean) * c + mean)
        out[:, :, channel] = table[image[:, :, channel]]
    return out


def brightness(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """HSV value + c, hue and saturation kept: RGB scales with the value (a black pixel, whose hue
    and saturation are undefined, becomes gray); one channel is the value itself."""
    if x.shape[2] == 1:
        return x + c
    value = x.max(axis=2, keepdims=True)
    raised = np.minimum(value + c, 1.0)
    scale = np.divide(raised, value, out=np.zeros_like(value), where=value > 0)
    return np.where(value > 0, x * scale, raised)


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)


def _array(image: Image.Image, channels: int) -> np.ndarray:
    out = np.asarray(image, dtype=np.uint8)
    return out[:, :, None] if out.ndim == 2 else out[:, :, :channels]


def pixelate(image: np.ndarray, c: float) -> np.ndarray:
    h, w, channels = image.shape
    small = _pil(image).resize((max(1, int(w * c)), max(1, int(h * c))), Image.Resampling.BOX)
    return _array(small.resize((w, h), Image.Resampling.BOX), channels)


def jpeg_compression(image: np.ndarray, c: int) -> np.ndarray:
    buffer = io.BytesIO()
    _pil(image).save(buffer, format="JPEG", quality=int(c))
    with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
        return _array(decoded.convert("L" if image.shape[2] == 1 else "RGB"), image.shape[2])


# Functions on [0, 1] floats (H, W, C) with a generator (None for those in no _RANDOM); the others
# work on uint8 images directly.
_FLOAT_CORRUPTIONS: dict[str, Callable[[np.ndarray, float, np.random.Generator | None], np.ndarray]] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "speckle_noise": speckle_noise,
    "gaussian_blur": gaussian_blur,
    "brightness": brightness,
}
_UINT8_CORRUPTIONS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "contrast": contrast,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
}
_RANDOM = {"gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"}  # those that draw from `rng`
assert set(_FLOAT_CORRUPTIONS) | set(_UINT8_CORRUPTIONS) == set(CORRUPTION_NAMES) == set(SEVERITY_PARAMETERS)


def corrupt_image(image: np.ndarray, corruption: str, severity: int, seed: int = 0) -> np.ndarray:
    """One uint8 image (H, W, C), C 1 or 3, corrupted: uint8, the same shape."""
    if corruption not in SEVERITY_PARAMETERS:
        raise ValueError(f"unknown corruption {corruption!r}; known: {', '.join(CORRUPTION_NAMES)}")
    if not 1 <= severity <= 5:
        raise ValueError(f"severity {severity}: must be 1 to 5")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"expected a uint8 image (H, W, 1 or 3), got {image.dtype} {image.shape}")
    c = SEVERITY_PARAMETERS[corruption][severity - 1]
    if corruption in _UINT8_CORRUPTIONS:
        return _UINT8_CORRUPTIONS[corruption](image, c)
    # only the noises draw: the others skip hashing the image
    rng = np.random.default_rng(image_seed(image, corruption, severity, seed)) if corruption in _RANDOM else None
    return _uint8(_FLOAT_CORRUPTIONS[corruption](_unit(image), c, rng))


def corrupt_batch(images: np.ndarray, corruption: str, severity: int, seed: int = 0) -> np.ndarray:
    """uint8 images (N, H, W, C) corrupted one by one (each seeded by its own bytes), written into
    one array: no list of copies beside it."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"expected a batch of images (N, H, W, C), got shape {images.shape}")
    out = np.empty_like(images)
    for i, image in enumerate(images):
        out[i] = corrupt_image(image, corruption, severity, seed)
    return out
