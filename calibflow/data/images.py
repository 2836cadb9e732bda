"""Decode image files into one uint8 tensor (N, C, H, W).

Small-image datasets fit in memory many times over (CIFAR-10 is 150 MB as uint8), so they are
decoded once and kept as a single tensor: on a GPU the whole set then lives on the device and an
epoch is index arithmetic, with no DataLoader workers to feed.
"""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
import threading
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from calibflow.errors import ManifestError

# What Pillow's decoders raise on a file that is not a whole image: OSError for a truncated or
# unreadable file, SyntaxError and struct.error for a malformed header, EOFError for a file that
# ends inside one, ValueError for a mode or size it cannot convert.
_UNDECODABLE = (OSError, SyntaxError, struct.error, EOFError, ValueError)


def decode_image(
    path: str | Path | BinaryIO,
    mode: str,
    size: Size = None,
    *,
    seed: int | None = None,
    name: str | Path | None = None,
    sha256: str | None = None,
) -> np.ndarray:
    """One image as an (H, W, C) uint8 array in `mode`, framed by `size`: a Framing, or (W, H) to
    stretch it to when it differs (what a dataset of one size has always done). `path` may be an
    open binary file (a served request's bytes), named in errors by `name`. `seed`: a training
    framing's random crop and flip for this image (Framing.crop). `sha256`: the digest recorded
    for the file when the run pinned its data (the manifest's): its bytes are read once, checked
    against it (checked_bytes) and decoded from memory; without one the file is decoded as it is.

    A file that cannot be decoded is a ManifestError naming the file and what is wrong with it (a
    refusal: exit 2 with one line on the CLI, wherever the file came from), never Pillow's own
    error, whose message may not name the file and which the CLI would read as a store failure."""
    with _no_bomb_warning():
        return _decode(path, mode, size, seed=seed, name=name, sha256=sha256)


@contextmanager
def _no_bomb_warning() -> Iterator[None]:
    """Pillow's DecompressionBombWarning silenced: _refuse_bomb refuses every image it warns about,
    in one line, and the warning's two lines on stderr would precede that line. catch_warnings is
    process-wide state, so it is entered once around all of load_images' threads, never by them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


# What a model reads: 8-bit gray ("L") or 8-bit colour ("RGB"). A file in another mode is
# converted where the conversion is defined by the format itself, and refused where it is not.
MODEL_MODES = ("L", "RGB")
SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})  # 16-bit gray PNG and TIFF
WITH_ALPHA = frozenset({"LA", "RGBA", "PA"})
GRAY_MODES = frozenset({"1", "L", "LA"}) | SIXTEEN_BIT
COLOUR_MODES = frozenset({"RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "P", "PA"})
WIDE_MODES = frozenset({"I", "F"})  # 32-bit integer and float: their range is the writer's choice


# torchvision's reference classification recipe (references/classification/train.py): training
# crops a random area of 8-100% at aspect ratios 3/4-4/3 (RandomResizedCrop); evaluation resizes
# the shorter side to 256 and keeps the centre 224 (Resize + CenterCrop): 7/8 of it.
REFERENCE_CROP_SCALE = (0.08, 1.0)
REFERENCE_CROP_RATIOS = (3.0 / 4.0, 4.0 / 3.0)
REFERENCE_CENTRE_SHARE = 224 / 256


def reference_resize(image_size: int) -> int:
    """The evaluation transform's shorter side for a crop of `image_size`: 256 for 224."""
    return int(round(image_size / REFERENCE_CENTRE_SHARE))


@dataclass(frozen=True)
class Framing:
    """How a decoded image becomes what the model reads: width x height pixels.

    resize None: stretched to width x height when it differs (a dataset whose images share one
    size, data.image_size unset). resize R: torchvision's reference evaluation transform, the
    shorter side resized to R with the aspect kept, then the centre width x height (Resize +
    CenterCrop). crop_scale (lo, hi): the training transform instead, torchvision's
    RandomResizedCrop to width x height with that share of the area and REFERENCE_CROP_RATIOS,
    then a horizontal flip with probability 1/2 when `hflip`; drawn for each image from the seed
    decode_image is given, so one seed gives the same pixels in any worker process or thread.
    An image whose shorter side is below `min_side` is refused (a thumbnail, or a 1x1 pixel)."""

    width: int
    height: int
    resize: int | None = None
    crop_scale: tuple[float, float] | None = None
    hflip: bool = False
    min_side: int = 1

    @property
    def size(self) -> tuple[int, int]:
        return (self.width, self.height)

    @property
    def random(self) -> bool:
        return self.crop_scale is not None

    def for_evaluation(self) -> Framing:
        return Framing(self.width, self.height, self.resize, min_side=self.min_side)

    def check_size(self, path: str | Path, size: tuple[int, int]) -> None:
        if min(size) < self.min_side:
            raise ManifestError(
                f"{path}: {size[0]}x{size[1]} pixels, smaller than data.min_side = {self.min_side} on its shorter "
                f"side: the model reads {self.width}x{self.height}, and an image this small holds too little of "
                f"it; remove it from the folder, or lower data.min_side"
            )

    def apply(self, image: Image.Image, seed: int | None = None) -> Image.Image:
        if self.crop_scale is None and self.resize is None:  # a dataset of one size: no torchvision to import
            return image if image.size == self.size else image.resize(self.size, Image.Resampling.BILINEAR)
        # imported here, not per module: a second or more of start-up in every process and
        # DataLoader worker, which files of one size never need
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        if self.crop_scale is not None:
            if seed is None:
                raise ValueError("a training framing draws each image's crop from a seed: decode_image(seed=...)")
            top, left, height, width, flip = self._draw_crop(image, seed)
            image = F.resized_crop(
                image, top, left, height, width, [self.height, self.width], InterpolationMode.BILINEAR, antialias=True
            )
            return F.horizontal_flip(image) if flip else image
        image = F.resize(image, [self.resize], InterpolationMode.BILINEAR, antialias=True)  # the shorter side
        return F.center_crop(image, [self.height, self.width])

    def _draw_crop(self, image: Image.Image, seed: int) -> tuple[int, int, int, int, bool]:
        from torchvision.transforms import RandomResizedCrop

        # torchvision's own draw of the crop, which reads torch's global CPU stream: seeded per image
        # inside a fork of it, under a lock that keeps decoding threads from seeding each other's.
        # Its CPU generator alone: torch.manual_seed would also reseed every CUDA device's stream,
        # which the fork does not restore, and dropout on a GPU would draw from the last image's seed.
        with _CROP_DRAWS, torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            top, left, height, width = RandomResizedCrop.get_params(
                image, list(self.crop_scale), list(REFERENCE_CROP_RATIOS)
            )
            flip = self.hflip and bool(torch.rand(()) < 0.5)
        return top, left, height, width, flip

    def to_record(self) -> dict:
        return {
            "width": self.width,
            "height": self.height,
            "resize": self.resize,
            "crop_scale": list(self.crop_scale) if self.crop_scale is not None else None,
            "hflip": self.hflip,
            "min_side": self.min_side,
        }

    @classmethod
    def from_record(cls, record: dict) -> Framing:
        scale = record.get("crop_scale")
        return cls(
            int(record["width"]),
            int(record["height"]),
            None if record.get("resize") is None else int(record["resize"]),
            None if scale is None else (float(scale[0]), float(scale[1])),
            bool(record.get("hflip", False)),
            int(record.get("min_side", 1)),
        )


_CROP_DRAWS = threading.Lock()

# What decoding frames an image to: a Framing, or (width, height) to stretch it to (Framing(width,
# height)), or None to keep it as the file has it.
Size = Union[Framing, tuple[int, int], None]


def as_framing(size: Size) -> Framing | None:
    if size is None or isinstance(size, Framing):
        return size
    return Framing(int(size[0]), int(size[1]))


def model_mode(file_modes: Iterable[str]) -> str:
    """The mode a model of these files reads: "RGB" when any of them is colour (a palette may
    be), else "L". ValueError naming a mode no defined conversion reads (32-bit integer "I" and
    float "F": their range is the writer's choice)."""
    modes = set(file_modes)
    unknown = sorted(modes - GRAY_MODES - COLOUR_MODES)
    if unknown:
        wide = [m for m in unknown if m in WIDE_MODES]
        why = (
            f"{', '.join(wide)} pixels have no defined 8-bit range (32-bit integer or float)"
            if wide
            else f"calibflow defines no conversion of {', '.join(unknown)} to 8-bit gray or RGB"
        )
        raise ValueError(
            f"image mode(s) {', '.join(unknown)}: calibflow reads 8-bit gray or colour, and converts 1-bit, "
            f"16-bit gray, palette, CMYK, YCbCr and opaque alpha images; {why}: export them as 8- or 16-bit "
            f"PNG or as JPEG"
        )
    return "RGB" if modes & COLOUR_MODES else "L"


def to_model_mode(image: Image.Image, mode: str, path: str | Path) -> Image.Image:
    """`image` as `mode` ("L" or "RGB"), the same way wherever a file is read (training, the
    test split, `calibflow predict`, monitor): 16-bit gray is scaled to 8 bits (x / 257, rounded;
    Pillow's own convert clips it, so every value above 255 would read white); an alpha channel
    is dropped when every pixel is opaque and refused otherwise (what lies under a transparent
    pixel is not in the file); CMYK becomes RGB by Pillow's formula, without any ICC profile;
    palette and 1-bit images are looked up and expanded. ManifestError naming the file for a
    mode with no defined conversion."""
    image = _with_alpha_if_keyed(image)
    try:
        model_mode([image.mode])
    except ValueError as error:
        raise ManifestError(f"{path}: {error}") from error
    if image.mode in WITH_ALPHA:
        problem = transparency_problem(image)
        if problem:
            raise ManifestError(f"{path}: {problem}")
        image = image.convert("RGB" if image.mode != "LA" else "L")
    if image.mode in SIXTEEN_BIT:
        wide = np.asarray(image).astype(np.uint32)
        image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))  # 2-D uint8: "L"
    return image if image.mode == mode else image.convert(mode)


EXIF_ORIENTATION = 0x0112


def upright(image: Image.Image) -> Image.Image:
    """`image` as it is meant to be seen: a camera's EXIF orientation (a phone photo stored sideways
    with Orientation 6, say) applied, as viewers, browsers and most clients' decoders apply it, so
    a model is trained on the photo a client sends. torchvision's PIL loader leaves it as stored.
    An image without the tag is returned as it is."""
    if image.getexif().get(EXIF_ORIENTATION, 1) in (0, 1):
        return image
    from PIL import ImageOps

    return ImageOps.exif_transpose(image)


def _with_alpha_if_keyed(image: Image.Image) -> Image.Image:
    """A palette entry or a colour key (PNG's tRNS) marked transparent, made an alpha channel to
    check; any other image as it is."""
    if "transparency" in image.info and image.mode not in WITH_ALPHA:
        return image.convert("LA" if image.mode in GRAY_MODES else "RGBA")
    return image


def transparency_problem(image: Image.Image) -> str | None:
    """Why a decoded image cannot be read as a model reads it because of transparency (an alpha
    channel, a palette entry or a colour key with a pixel below fully opaque), or None. The
    manifest asks it of every file, so validation refuses such a file by name before anything
    trains; to_model_mode asks it again of a file read later."""
    image = _with_alpha_if_keyed(image)
    if image.mode not in WITH_ALPHA:
        return None
    low, _ = image.getchannel("A").getextrema()
    if low == 255:
        return None
    return (
        f"has transparent pixels ({image.mode}), and what lies under them is not in the file: flatten it onto the "
        f"background you want (for example white) and save it without alpha, or remove it from the folder"
    )


def checked_bytes(path: str | Path, sha256: str, name: str | Path | None = None) -> bytes:
    """The bytes of `path`, read once, when their SHA-256 is `sha256` (the digest recorded when the
    run pinned its data); else a ManifestError naming the file (`name`, else `path`), on one line.
    DVC checks every file once, when a run pins the data version; a file overwritten after that (by
    hand, or by a `git checkout` + `dvc checkout` in the same working tree mid-run) would otherwise
    be trained on or measured under the version the run names. The bytes checked are the bytes
    decoded: there is no second read for the file to change in between."""
    with open(path, "rb") as handle:
        data = handle.read()
    found = hashlib.sha256(data).hexdigest()
    if found != sha256:
        raise ManifestError(
            f"{name if name is not None else path}: its bytes changed since the data version was pinned "
            f"(sha256 {found[:12]}, recorded {sha256[:12]}), so what is read would not be the version named: "
            f"restore the file (`dvc checkout`), or start again so that the new version is pinned"
        )
    return data


def _decode(
    path: str | Path | BinaryIO,
    mode: str,
    size: Size,
    *,
    seed: int | None = None,
    name: str | Path | None = None,
    sha256: str | None = None,
) -> np.ndarray:
    label = name if name is not None else path
    framing = as_framing(size)
    try:
        # with a recorded digest: read once, checked, and decoded from those bytes (a read that
        # fails, a removed file say, is an OSError handled below as an unopenable file always was)
        source = io.BytesIO(checked_bytes(path, sha256, label)) if sha256 else path
        with Image.open(source) as image:
            _refuse_bomb(label, image)  # before decoding: the header alone says how big it is
            image = upright(image)
            if framing is not None:
                framing.check_size(label, image.size)
            image = to_model_mode(image, mode, label)
            if framing is not None:
                image = framing.apply(image, seed)
            array = np.asarray(image, dtype=np.uint8)
    except ManifestError:
        raise  # _refuse_bomb's, a ValueError that already names the file
    except Image.DecompressionBombError as error:  # Pillow's own check, at twice its limit
        raise ManifestError(f"{label}: {_bomb(error)}") from error
    except UnidentifiedImageError as error:
        raise ManifestError(
            f"{label}: not an image Pillow can read (an unknown format, or not an image at all): "
            f"remove it from the folder or convert it to PNG or JPEG"
        ) from error
    except _UNDECODABLE as error:
        raise ManifestError(f"{label}: cannot be decoded as an image ({_problem(error)}): {_FIX}") from error
    return array[:, :, None] if array.ndim == 2 else array


_FIX = "copy the file again from its source, or remove it from the folder"


def _refuse_bomb(path: str | Path, image: Image.Image) -> None:
    """Refuse an image whose header declares more pixels than Pillow's limit (Image.MAX_IMAGE_PIXELS,
    read now so that a caller may change it): decoding one would take gigabytes for an input that
    is resized to a few thousand pixels. Pillow itself only warns up to twice the limit."""
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    if limit is not None and width * height > limit:
        raise ManifestError(
            f"{path}: {width}x{height} = {width * height} pixels, more than the {limit} Pillow decodes safely "
            f"(PIL.Image.MAX_IMAGE_PIXELS): a decompression bomb, or an image far too large for this model; "
            f"remove it from the folder or resize it"
        )


def _bomb(error: Exception) -> str:
    return (
        f"{error} Its header declares more pixels than Pillow decodes safely (PIL.Image.MAX_IMAGE_PIXELS): "
        f"a decompression bomb, or an image far too large for this model; remove it from the folder or resize it"
    )


def _problem(error: Exception) -> str:
    """Pillow's message without the path it may repeat, on one line."""
    text = " ".join(str(error).split()) or type(error).__name__
    if "truncated" in text:
        return "the file is truncated: its data ends before the image does"
    return f"{type(error).__name__}: {text}"


def load_images(
    root: str | Path,
    relative_paths: Sequence[str],
    mode: str,
    size: Size = None,
    workers: int = 8,
    *,
    seeds: Sequence[int] | None = None,
    digests: Sequence[str] | None = None,
) -> torch.Tensor:
    """Decode many files (PIL releases the GIL while decoding, so threads help); `seeds`, one per
    file, for a training framing's crops; `digests`, one SHA-256 per file (the manifest's), to
    check each file's bytes against before decoding them (checked_bytes)."""
    stacked = load_images_nhwc(root, relative_paths, mode, size, workers, seeds=seeds, digests=digests)
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()


def load_images_nhwc(
    root: str | Path,
    relative_paths: Sequence[str],
    mode: str,
    size: Size = None,
    workers: int = 8,
    *,
    seeds: Sequence[int] | None = None,
    digests: Sequence[str] | None = None,
) -> np.ndarray:
    """load_images' pixels as one uint8 array (N, H, W, C), as the corruption suite and the served
    model take them, without the (N, C, H, W) copy."""
    root = Path(root)
    each = [None] * len(relative_paths) if seeds is None else [int(seed) for seed in seeds]
    if digests is not None and len(digests) != len(relative_paths):
        raise ValueError(f"{len(digests)} digests for {len(relative_paths)} files: one per file")
    checks = [None] * len(relative_paths) if digests is None else list(digests)
    with _no_bomb_warning(), ThreadPoolExecutor(max_workers=workers) as pool:
        arrays = list(
            pool.map(
                lambda p, seed, sha256: _decode(root / p, mode, size, seed=seed, sha256=sha256),
                relative_paths,
                each,
                checks,
                chunksize=64,
            )
        )
    if not arrays:
        raise ValueError("no images to load")
    return np.stack(arrays)


# Images decoded at a time wherever a whole split or a corruption suite is read (evaluate, gate,
# monitor, recalibrate, the suite in the flow): 111 MB of RGB at 224 px, whatever the split's size.
DECODED_AT_A_TIME = 740

CHANNEL_STATS_CHUNK = 1 << 24  # pixel values widened at a time: 128 MB of int64, whatever the dataset's size


def channel_stats(images: torch.Tensor | Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (unbiased) std of uint8 images on the [0, 1] scale: of a tensor
    (N, C, H, W), or of the batches an iterable yields (a split read from its files).

    Sums of the values and of their squares are accumulated exactly, as integers, a chunk of
    images at a time: a float64 copy of the whole set (8 times its size; 1.2 GB for 1,000 RGB
    images at 224 px, twice that with the temporaries of std) is never made."""
    chunks = _chunks(images) if isinstance(images, torch.Tensor) else images
    total = squares = None
    count = 0
    for batch in chunks:
        for chunk in _chunks(batch):  # a streamed batch may be larger than one chunk
            total, squares, count = _add_sums(chunk, total, squares, count)
    if total is None:
        raise ValueError("no images to compute channel statistics of")
    mean = [t / (255.0 * count) for t in total.tolist()]
    # count * sum(x^2) - sum(x)^2 is exact in Python's integers: no cancellation
    variance = [
        (count * q - t * t) / (count * (count - 1) * 255.0**2) if count > 1 else 0.0
        for t, q in zip(total.tolist(), squares.tolist())
    ]
    std = torch.tensor(variance, dtype=torch.float64).sqrt().clamp_min(1e-3)
    return torch.tensor(mean, dtype=torch.float32), std.float()


def _add_sums(chunk: torch.Tensor, total, squares, count: int):
    wide = chunk.to(torch.int64)
    sums, sums_of_squares = wide.sum(dim=(0, 2, 3)), (wide * wide).sum(dim=(0, 2, 3))
    total = sums if total is None else total + sums
    squares = sums_of_squares if squares is None else squares + sums_of_squares
    return total, squares, count + chunk.shape[0] * chunk.shape[2] * chunk.shape[3]


def _chunks(images: torch.Tensor) -> Iterator[torch.Tensor]:
    step = max(1, CHANNEL_STATS_CHUNK // max(1, images[0].numel())) if len(images) else 1
    for start in range(0, len(images), step):
        yield images[start : start + step]
