"""calibflow.data.blended_digits: a soft-label dataset whose labels are true by construction. Most tests
read a tiny archive made here, laid out as ../shared/datasets/mnist-png.tar.gz is, so they depend on
nothing outside the repository; one checks a small run on the real archive when it is there."""

from __future__ import annotations

import csv
import io
import math
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from calibflow.data import blended_digits
from calibflow.data.blended_digits import CSV_NAME, DEFAULT_ARCHIVE, write_blended_digits

CLASSES = ["0", "1", "2", "3"]


def fake_archive(path: Path, per_class: int = 6, size: int = 28) -> Path:
    """train/<class>/<n>.png and test/<class>/<n>.png of random 8-bit gray pixels, added to the
    archive in a shuffled order and with a LICENSE beside the splits, as the real one has."""
    rng = np.random.default_rng(123)
    entries = [("LICENSE", b"not an image\n")]
    for split in ("train", "test"):
        for name in CLASSES:
            for n in range(per_class):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, size=(size, size), dtype=np.uint8)).save(buffer, format="PNG")
                entries.append((f"{split}/{name}/{1000 + n}.png", buffer.getvalue()))
    with tarfile.open(path, "w:gz") as tar:
        for k in rng.permutation(len(entries)):
            name, data = entries[k]
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return fake_archive(tmp_path_factory.mktemp("archive") / "mnist-png.tar.gz")


def archive_pixels(archive: Path) -> dict[str, np.ndarray]:
    """Every image of the archive by member name, read here independently of the module."""
    pixels = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.name.endswith(".png"):
                with Image.open(io.BytesIO(tar.extractfile(member).read())) as image:
                    pixels[member.name] = np.asarray(image)
    return pixels


def read_csv(out: Path) -> tuple[list[str], dict[str, dict[str, float]]]:
    with open(out / CSV_NAME, newline="") as f:
        header, *rows = list(csv.reader(f))
    labels = {row[0]: dict(zip(header[1:], map(float, row[1:]))) for row in rows}
    assert len(labels) == len(rows), "a path has more than one row"
    return header, labels


def folder_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_labels_pixels_and_folders_agree(archive, tmp_path):
    out = tmp_path / "blended"
    written = write_blended_digits(out, clean=8, blended=40, seed=3, archive=archive)
    header, labels = read_csv(out)
    assert header == ["path", *CLASSES]
    assert written.classes == tuple(CLASSES) and (written.clean, written.blended) == (8, 40)

    # Every image has exactly one row and every row an image; only the CSV sits at the root.
    pngs = {p.relative_to(out).as_posix() for p in out.rglob("*.png")}
    assert set(labels) == pngs and len(pngs) == 48
    assert {p.name for p in out.iterdir() if p.is_file()} == {CSV_NAME}
    assert {w.path for w in written.images} == pngs
    assert sum(written.per_class.values()) == 48

    sources = archive_pixels(archive)
    kinds = {"clean": 0, "blend": 0}
    for image in written.images:
        row = labels[image.path]
        folder, name = image.path.split("/")
        # Exactly 1.0, not nearly: the CSV's values are written so that they add up exactly.
        assert sum(row.values()) == 1.0 and math.fsum(row.values()) == 1.0
        assert folder == max(row, key=row.get)
        with Image.open(out / image.path) as png:
            assert (png.mode, png.size) == ("L", (28, 28))
            pixels = np.asarray(png)
        # The provenance names real members of the split, in the folders of the classes it says.
        assert all(s.startswith("train/") and s.split("/")[1] == c for s, c in zip(image.sources, image.classes))
        kind = name.split("_")[0]
        kinds[kind] += 1
        nonzero = {c: v for c, v in row.items() if v != 0.0}
        if kind == "clean":
            assert not image.blended and nonzero == {folder: 1.0}
            assert np.array_equal(pixels, sources[image.sources[0]])
        else:
            assert image.blended and kind == "blend"
            first, second = image.classes
            assert first != second and set(nonzero) == {first, second}
            a, b = row[first], row[second]
            assert 0.3 <= a <= 0.7 and 0.3 <= b <= 0.7 and a != b
            x1, x2 = (sources[s].astype(np.float64) for s in image.sources)
            assert np.array_equal(pixels, np.rint(a * x1 + b * x2).astype(np.uint8))
            assert not np.array_equal(pixels, sources[image.sources[0]])
    assert kinds == {"clean": 8, "blend": 40}


def test_weights_are_uniform_without_ties_and_pairs_sum_to_one():
    k = blended_digits._weights(np.random.default_rng(0), 20_000)
    a = k / blended_digits.GRID
    assert a.min() >= 0.3 and a.max() <= 0.7 and not np.any(k == blended_digits.GRID // 2)
    assert abs(a.mean() - 0.5) < 0.005 and abs(np.mean(a > 0.5) - 0.5) < 0.02
    assert np.histogram(a, bins=4, range=(0.3, 0.7))[0].min() > 4_500  # about 5,000 in each quarter
    # Every grid value's pair, as it is written (repr) and read back, sums to exactly 1.
    for value in range(300_000, 700_001, 997):
        first, second = blended_digits._pair(value)
        assert float(repr(first)) + float(repr(second)) == 1.0
        assert abs(first - value / blended_digits.GRID) < 1e-12


def test_same_seed_same_bytes_other_seed_other_bytes(archive, tmp_path):
    def make(name: str, seed: int) -> dict[str, bytes]:
        write_blended_digits(tmp_path / name, clean=6, blended=12, seed=seed, archive=archive)
        return folder_bytes(tmp_path / name)

    first, again, other = make("a", 7), make("b", 7), make("c", 8)
    assert first == again
    assert first != other and first[CSV_NAME] != other[CSV_NAME]


def test_rewrites_its_own_output_and_refuses_a_foreign_folder(archive, tmp_path):
    out = tmp_path / "blended"
    write_blended_digits(out, clean=4, blended=20, seed=0, archive=archive)
    write_blended_digits(out, clean=4, blended=2, seed=0, archive=archive)
    # The larger first run's blends are gone: every image on disk still has its row.
    assert len(list(out.rglob("*.png"))) == len(read_csv(out)[1]) == 6
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())

    foreign = tmp_path / "photos"
    (foreign / "x").mkdir(parents=True)
    (foreign / "x" / "keep.png").write_bytes(b"mine")
    with pytest.raises(ValueError, match="refusing"):
        write_blended_digits(foreign, clean=4, blended=0, seed=0, archive=archive)
    assert (foreign / "x" / "keep.png").read_bytes() == b"mine"


def test_classes_split_and_refusals(archive, tmp_path):
    written = write_blended_digits(
        tmp_path / "two", clean=2, blended=10, seed=1, split="test", archive=archive, classes=["3", "1"]
    )
    header, labels = read_csv(tmp_path / "two")
    assert header == ["path", "1", "3"] and written.classes == ("1", "3")
    assert {d.name for d in (tmp_path / "two").iterdir() if d.is_dir()} == {"1", "3"}
    assert all(s.startswith("test/") for w in written.images for s in w.sources)
    # With two classes every blend mixes exactly those two.
    assert all(sorted(w.classes) == ["1", "3"] for w in written.images if w.blended)

    with pytest.raises(ValueError, match="no image would land in class"):
        write_blended_digits(tmp_path / "few", clean=2, blended=0, seed=0, archive=archive)
    with pytest.raises(ValueError, match="class 7"):
        write_blended_digits(tmp_path / "bad", clean=4, blended=0, seed=0, archive=archive, classes=["1", "7"])
    with pytest.raises(ValueError, match="two classes"):
        write_blended_digits(tmp_path / "one", clean=4, blended=1, seed=0, archive=archive, classes=["1"])
    assert not (tmp_path / "few").exists() and not (tmp_path / "bad").exists()


def test_command_line(archive, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cli"
    argv = ["blended_digits", "--out", str(out), "--clean", "4", "--blended", "4", "--seed", "5"]
    monkeypatch.setattr(sys, "argv", [*argv, "--archive", str(archive), "--classes", "0", "2"])
    blended_digits.main()
    assert "wrote 4 clean and 4 blended images" in capsys.readouterr().out
    assert read_csv(out)[0] == ["path", "0", "2"]


@pytest.mark.skipif(not DEFAULT_ARCHIVE.is_file(), reason=f"no {DEFAULT_ARCHIVE}")
def test_real_mnist_archive(tmp_path):
    out = tmp_path / "mnist"
    written = write_blended_digits(out, clean=20, blended=20, seed=0, split="test")
    header, labels = read_csv(out)
    assert header == ["path", *map(str, range(10))] and len(labels) == 40
    assert all(sum(row.values()) == 1.0 for row in labels.values())
    assert {p.relative_to(out).as_posix() for p in out.rglob("*.png")} == set(labels)
    assert sum(w.blended for w in written.images) == 20
