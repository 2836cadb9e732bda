"""The `prepare` stage of dvc.yaml: scikit-learn's digits written as an ImageFolder of PNGs.

The embedded default goes through the same path as user data (an ImageFolder tracked by DVC), so
there is one code path to test and trust.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(out_dir: str | Path, classes: tuple[int, ...] | None = None, per_class: int | None = None) -> int:
    """Write the 1,797 8x8 digits as `out_dir/<class>/<n>.png` (8-bit grayscale); returns the count.

    `classes` and `per_class` select a subset (the first images of each class), for small tests.
    """
    from sklearn.datasets import load_digits

    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    digits = load_digits()
    # Pixel values are 0..16; stretch them to the full 8-bit range, as a scanned image would be.
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    written: dict[int, int] = {}
    for n, (image, label) in enumerate(zip(pixels, digits.target)):
        if (classes is not None and label not in classes) or written.get(label, 0) == (per_class or -1):
            continue
        written[label] = written.get(label, 0) + 1
        class_dir = out_dir / str(label)
        class_dir.mkdir(parents=True, exist_ok=True)
        # optimize=False and no metadata: the same pixels always give the same bytes, so the DVC hash is stable.
        Image.fromarray(image).save(class_dir / f"{n:04d}.png", optimize=False)
    return sum(written.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="data/digits")
    args = parser.parse_args()
    print(f"wrote {write_digits(args.out)} images to {args.out}")


if __name__ == "__main__":
    main()
