"""A soft-label dataset whose true class probabilities are known: MNIST digits blended in pairs.

Calibration can only be judged against the truth, and a real dataset's labels are one-hot: they say
which class an image is, not how likely each class is. Here the truth is made by construction. Two
digits of different classes are blended with weight a, drawn uniformly in [0.3, 0.7] (pixel =
round(a*x1 + (1-a)*x2)), and the image is labelled a for the first digit's class and 1-a for the
second's; clean digits are mixed in with one-hot labels. A classifier that reports 0.62 for "3" on
a 62/38 blend of a 3 and a 5 is right in a sense a hard label cannot express, and evaluation can
compare predicted probabilities with these labels directly.

The output is an ImageFolder any calibflow run reads, plus the soft labels beside it:

- `OUT/<class>/clean_NNNNN.png` and `OUT/<class>/blend_NNNNN.png`, 8-bit grayscale at the source
  images' size (28x28 for MNIST), each in the folder of its label's largest probability; the name
  says whether the image is a clean digit or a blend, so the CSV needs no extra column for it;
- `OUT/soft_labels.csv`: header `path,<class>,...` with the classes in sorted order, one row per
  image, `path` relative to OUT with forward slashes, each row's probabilities summing to exactly
  1.0 when parsed as floats.

Ties cannot happen: a is drawn on a grid of 1e-6 that leaves out 0.5, so one digit of each blend
always outweighs the other and the folder is never a choice. The larger weight is written as its
short decimal (0.612345) and the smaller as 1.0 minus it, which is exact in binary floating point
for a weight of at least 0.5, so the two add up to exactly 1.0.

The same seed and arguments give byte-identical PNGs and CSV, so DVC's hash of the folder is
stable. The archive is read without unpacking it: its members are indexed once and only the images
drawn are decoded.

    python -m calibflow.data.blended_digits --out data/blended --clean 2000 --blended 2000 --seed 0
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
# The shared datasets sit beside the checkout (../shared/datasets), as the benchmarks expect them.
DEFAULT_ARCHIVE = REPO.parent / "shared" / "datasets" / "mnist-png.tar.gz"
CSV_NAME = "soft_labels.csv"

MIN_WEIGHT, MAX_WEIGHT = 0.3, 0.7
# Weights are multiples of 1/GRID: short decimals in the CSV, and a grid on which 0.5 (a tie) can be
# left out while the rest of [MIN_WEIGHT, MAX_WEIGHT] stays uniform and symmetric about 0.5.
GRID = 1_000_000


@dataclass(frozen=True)
class WrittenImage:
    """One written image: its path relative to OUT, the archive members it was made from, the
    weight and class of each (one member with weight 1.0 for a clean digit, two for a blend)."""

    path: str
    sources: tuple[str, ...]
    weights: tuple[float, ...]
    classes: tuple[str, ...]

    @property
    def blended(self) -> bool:
        return len(self.sources) == 2


@dataclass(frozen=True)
class Written:
    """What `write_blended_digits` wrote: the classes (the CSV's columns, in order), how many images
    of each kind, how many landed in each class folder, and every image's provenance."""

    out: Path
    classes: tuple[str, ...]
    clean: int
    blended: int
    per_class: dict[str, int]
    images: tuple[WrittenImage, ...]


def _index(tar: tarfile.TarFile, split: str) -> dict[str, list[tarfile.TarInfo]]:
    """The split's PNG members by class folder, each class's list sorted by name: the draw then
    depends on the archive's contents and the seed alone, not on the order the archive stores them."""
    members: dict[str, list[tarfile.TarInfo]] = {}
    for member in tar:
        parts = PurePosixPath(member.name).parts
        if member.isfile() and len(parts) == 3 and parts[0] == split and parts[2].lower().endswith(".png"):
            members.setdefault(parts[1], []).append(member)
    for listed in members.values():
        listed.sort(key=lambda m: m.name)
    return members


def _weights(rng: np.random.Generator, n: int) -> np.ndarray:
    """n weights for the first digit, uniform on the grid of 1/GRID in [MIN_WEIGHT, MAX_WEIGHT] less 0.5,
    as integers k (the weight is k/GRID)."""
    low, high, half = round(MIN_WEIGHT * GRID), round(MAX_WEIGHT * GRID), GRID // 2
    below = half - low  # values low..half-1, and as many above: half+1..high
    assert high - half == below  # a range symmetric about 0.5, so leaving 0.5 out keeps the draw uniform
    j = rng.integers(0, 2 * below, size=n)
    return low + j + (j >= below)


def _pair(k: int) -> tuple[float, float]:
    """The first and second digit's weights for grid value k, as floats that sum to exactly 1.0: the
    larger is k/GRID (or its complement) and the smaller is 1.0 minus it, a subtraction with no
    rounding error when the larger is at least 0.5 (Sterbenz), so the sum is exact too."""
    if 2 * k > GRID:
        first = k / GRID
        return first, 1.0 - first
    second = (GRID - k) / GRID
    return 1.0 - second, second


def _decode(tar: tarfile.TarFile, member: tarfile.TarInfo) -> np.ndarray:
    with Image.open(io.BytesIO(tar.extractfile(member).read())) as image:
        if image.mode != "L":
            raise ValueError(f"{member.name}: mode {image.mode}, expected 8-bit grayscale (L)")
        return np.asarray(image, dtype=np.uint8).copy()


def _fresh_folder(out: Path) -> Path:
    """A new empty staging folder beside `out`, after checking that `out`, if it exists, is one this
    module wrote (it holds soft_labels.csv) or is empty: it is replaced whole, so that no image of a
    previous run stays behind without a row, and a folder of someone else's files is not deleted."""
    if out.exists() and not (out / CSV_NAME).is_file() and any(out.iterdir()):
        raise ValueError(f"{out} exists, is not empty and holds no {CSV_NAME}: refusing to replace it")
    staging = out.parent / f".{out.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def write_blended_digits(
    out: str | Path,
    *,
    clean: int,
    blended: int,
    seed: int,
    split: str = "train",
    archive: str | Path = DEFAULT_ARCHIVE,
    classes: list[str] | tuple[str, ...] | None = None,
) -> Written:
    """Write `clean` clean digits and `blended` blends of two digits from `archive`'s `split` as an
    ImageFolder with soft_labels.csv at `out` (module docstring), replacing a previous output there.

    `classes` picks class folders of the archive (default: all in the split). Clean digits are spread
    evenly over the classes; a blend's first class is uniform over them and its second uniform over
    the others. Each class's images are drawn in a seeded order without reuse until all of that class
    have been used. Every class must end with at least one image, or the ImageFolder would lack a
    folder for a column of the CSV: that is refused before anything is written.
    """
    if clean < 0 or blended < 0 or clean + blended == 0:
        raise ValueError(f"need a non-negative number of clean and blended images, not both 0 (got {clean}, {blended})")
    out, archive = Path(out), Path(archive)
    with tarfile.open(archive, "r:*") as tar:
        members = _index(tar, split)
        if not members:
            raise ValueError(f"{archive} has no PNG under {split}/<class>/")
        if classes is None:
            classes = sorted(members)
        else:
            missing = sorted(set(classes) - set(members))
            if missing:
                raise ValueError(f"{archive} has no images of class {', '.join(missing)} under {split}/")
            classes = sorted(set(classes))
        if blended and len(classes) < 2:
            raise ValueError("a blend needs two classes; got " + ", ".join(classes))

        # The whole plan is drawn before any image is read or written, in a fixed order (clean
        # classes, blend classes, weights, then source images), so it is a function of the seed and
        # the arguments alone.
        rng = np.random.default_rng(seed)
        n_classes = len(classes)
        clean_labels = rng.permutation(np.resize(np.arange(n_classes), clean))
        firsts = rng.integers(0, n_classes, size=blended)
        seconds = (firsts + rng.integers(1, n_classes, size=blended)) % n_classes if n_classes > 1 else firsts
        grid_weights = _weights(rng, blended)
        order = {c: rng.permutation(len(members[c])) for c in classes}
        used = dict.fromkeys(classes, 0)

        def draw(label: int) -> tarfile.TarInfo:
            name = classes[label]
            listed = members[name]
            member = listed[order[name][used[name] % len(listed)]]
            used[name] += 1
            return member

        width = max(5, len(str(max(clean, blended) - 1)))
        planned: list[tuple[str, tuple[tarfile.TarInfo, ...], tuple[float, ...], tuple[str, ...]]] = []
        for n, label in enumerate(clean_labels):
            planned.append((f"{classes[label]}/clean_{n:0{width}d}.png", (draw(label),), (1.0,), (classes[label],)))
        for n, (first, second, k) in enumerate(zip(firsts, seconds, grid_weights)):
            weights = _pair(int(k))
            folder = classes[first] if weights[0] > weights[1] else classes[second]
            sources = (draw(first), draw(second))
            planned.append((f"{folder}/blend_{n:0{width}d}.png", sources, weights, (classes[first], classes[second])))
        per_class = dict.fromkeys(classes, 0)
        for path, *_ in planned:
            per_class[path.split("/", 1)[0]] += 1
        empty = [c for c, count in per_class.items() if count == 0]
        if empty:
            raise ValueError(
                f"no image would land in class {', '.join(empty)}: its CSV column would have no folder; "
                f"ask for at least {n_classes} clean images"
            )

        # Read the drawn members in the order they lie in the archive: a gzip stream only seeks
        # forward cheaply, so this is one more pass over the archive however many images are drawn.
        needed = {m.name: m for _, sources, _, _ in planned for m in sources}
        pixels = {m.name: _decode(tar, m) for m in sorted(needed.values(), key=lambda m: m.offset_data)}

    shapes = {p.shape for p in pixels.values()}
    if len(shapes) > 1:
        raise ValueError(f"{archive} {split}/: images of different sizes {sorted(shapes)} cannot be blended")

    staging = _fresh_folder(out)
    images = []
    rows = []
    for path, sources, weights, source_classes in planned:
        if len(sources) == 1:
            image = pixels[sources[0].name]
        else:
            # float64 throughout and round half to even: the test recomputes exactly this from the CSV's weights.
            mixed = weights[0] * pixels[sources[0].name].astype(np.float64)
            mixed += weights[1] * pixels[sources[1].name].astype(np.float64)
            image = np.rint(mixed).astype(np.uint8)
        (staging / path).parent.mkdir(exist_ok=True)
        # optimize=False and no metadata: the same pixels always give the same bytes (a stable DVC hash).
        Image.fromarray(image).save(staging / path, optimize=False)
        label = dict.fromkeys(classes, 0.0)
        for name, weight in zip(source_classes, weights):
            label[name] += weight
        rows.append([path, *(repr(label[c]) for c in classes)])
        images.append(WrittenImage(path, tuple(m.name for m in sources), weights, source_classes))
    with open(staging / CSV_NAME, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", *classes])
        writer.writerows(sorted(rows))
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return Written(out, tuple(classes), clean, blended, per_class, tuple(images))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="the ImageFolder to write (replaced if it exists)")
    parser.add_argument("--clean", required=True, type=int, help="number of clean digits (one-hot labels)")
    parser.add_argument("--blended", required=True, type=int, help="number of blends of two digits (soft labels)")
    parser.add_argument("--seed", required=True, type=int)
    parser.add_argument("--split", choices=("train", "test"), default="train", help="the archive's split to draw from")
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE, help="default: %(default)s")
    parser.add_argument("--classes", nargs="+", default=None, help="class folders to use (default: all)")
    args = parser.parse_args()
    try:
        written = write_blended_digits(
            args.out,
            clean=args.clean,
            blended=args.blended,
            seed=args.seed,
            split=args.split,
            archive=args.archive,
            classes=args.classes,
        )
    except (ValueError, OSError, tarfile.TarError) as error:
        parser.exit(2, f"blended_digits: {error}\n")
    counts = ", ".join(f"{c}: {n}" for c, n in written.per_class.items())
    print(
        f"wrote {written.clean} clean and {written.blended} blended images to {written.out} "
        f"with {CSV_NAME} (per class folder: {counts})"
    )


if __name__ == "__main__":
    main()
