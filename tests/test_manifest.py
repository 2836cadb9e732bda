"""calibflow.data.manifest: ImageFolder listing, per-file decoding facts, fingerprint, CSV round-trip."""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFile

from calibflow.data.manifest import (
    IMAGE_SUFFIXES,
    MANIFEST_COLUMNS,
    build_manifest,
    class_counts,
    list_classes,
    list_files,
    load_manifest,
    manifest_fingerprint,
    save_manifest,
)
from calibflow.errors import ManifestError

CLASSES = ("0", "1", "2")
PER_CLASS = 12


def png_bytes(seed: int, size: tuple[int, int] = (8, 8), mode: str = "L") -> bytes:
    """A PNG of random pixels; the seed is also written into the first pixel so that distinct
    seeds always give distinct content."""
    rng = np.random.default_rng(seed)
    w, h = size
    shape = (h, w) if mode == "L" else (h, w, len(mode))
    arr = rng.integers(0, 256, shape, dtype=np.uint8)
    arr.reshape(-1)[:4] = np.frombuffer(seed.to_bytes(4, "little"), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def make_imagefolder(root: Path, classes=CLASSES, per_class: int = PER_CLASS, seed: int = 0) -> Path:
    for ci, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / name / f"img_{i:03d}.png").write_bytes(png_bytes(seed + 1000 * ci + i))
    return root


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_imagefolder(tmp_path / "data")


def test_image_suffixes_are_lowercase_and_complete():
    assert {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"} == set(IMAGE_SUFFIXES)


def test_list_classes_sorted_and_ignores_hidden_and_files(folder: Path):
    (folder / ".cache").mkdir()
    (folder / "README.txt").write_text("not a class")
    (folder / "10").mkdir()
    assert list_classes(folder) == ["0", "1", "10", "2"]


def test_list_classes_missing_root(tmp_path: Path):
    with pytest.raises(ManifestError, match="does not exist") as err:
        list_classes(tmp_path / "nope")
    assert "<root>/<class>/<image>" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_list_classes_flat_folder_is_not_an_imagefolder(tmp_path: Path):
    (tmp_path / "a.png").write_bytes(png_bytes(1))
    (tmp_path / ".hidden").mkdir()
    with pytest.raises(ManifestError) as err:
        list_classes(tmp_path)
    message = str(err.value)
    assert "is not an ImageFolder: expected <root>/<class>/<image>" in message
    assert "1 file(s) directly in the root" in message
    assert "Fix:" in message


def test_columns_dtypes_order_and_values(folder: Path):
    df = build_manifest(folder)
    assert tuple(df.columns) == MANIFEST_COLUMNS
    assert len(df) == len(CLASSES) * PER_CLASS
    for col in ("label_index", "width", "height", "channels"):
        assert df[col].dtype == np.int64, col
    assert df["decodable"].dtype == bool
    for col in ("path", "label", "mode", "size", "sha256", "error"):
        assert pd.api.types.is_string_dtype(df[col]), col
    # sorted by (label, path), label_index follows list_classes
    keys = list(zip(df["label"], df["path"]))
    assert keys == sorted(keys)
    assert list(df.index) == list(range(len(df)))
    assert (df["label_index"] == df["label"].map({c: i for i, c in enumerate(CLASSES)})).all()
    assert df["path"].iloc[0] == "0/img_000.png"
    assert (df["path"].str.split("/").str[0] == df["label"]).all()
    assert df["decodable"].all()
    assert (df["error"] == "").all()
    assert set(df["size"]) == {"8x8"} and set(df["mode"]) == {"L"}
    assert (df["width"] == 8).all() and (df["height"] == 8).all() and (df["channels"] == 1).all()
    # sha256 is of the file bytes
    for path, digest in zip(df["path"], df["sha256"]):
        assert hashlib.sha256((folder / path).read_bytes()).hexdigest() == digest
    assert df["sha256"].is_unique


def test_rgb_and_other_sizes_are_recorded(folder: Path):
    (folder / "1" / "wide.png").write_bytes(png_bytes(77, size=(10, 6), mode="RGB"))
    df = build_manifest(folder).set_index("path")
    row = df.loc["1/wide.png"]
    assert (row["width"], row["height"], row["size"]) == (10, 6, "10x6")
    assert (row["mode"], row["channels"]) == ("RGB", 3)
    assert bool(row["decodable"])


def test_corrupt_files_are_not_decodable(folder: Path):
    rng = np.random.default_rng(5)
    (folder / "0" / "x.png").write_bytes(rng.bytes(300))
    whole = png_bytes(9, size=(64, 64))
    (folder / "1" / "trunc.png").write_bytes(whole[: len(whole) // 2])
    (folder / "2" / "empty.jpg").write_bytes(b"")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    df = build_manifest(folder).set_index("path")

    assert int((~df["decodable"]).sum()) == 3
    bad = df.loc[["0/x.png", "1/trunc.png", "2/empty.jpg"]]
    assert not bad["decodable"].any()
    assert (bad[["width", "height", "channels"]] == -1).all().all()
    assert (bad["mode"] == "").all() and (bad["size"] == "").all()
    assert "UnidentifiedImageError" in df.loc["0/x.png", "error"]
    # the header parses, so only a full decode (load) notices the missing pixel data
    assert "truncated" in df.loc["1/trunc.png", "error"]
    assert "empty file" in df.loc["2/empty.jpg", "error"]
    # a corrupt file still has a content hash
    digest = hashlib.sha256((folder / "0/x.png").read_bytes()).hexdigest()
    assert df.loc["0/x.png", "sha256"] == digest
    # the messages are deterministic (no object addresses)
    assert not re.search(r"0x[0-9a-f]{6,}", " ".join(df["error"]))


def test_truncated_png_header_still_opens():
    """Guards the test above: Image.open alone accepts the truncated PNG; load() must reject it."""
    whole = png_bytes(9, size=(64, 64))
    im = Image.open(io.BytesIO(whole[: len(whole) // 2]))
    assert im.size == (64, 64)
    with pytest.raises(OSError):
        im.load()


def test_load_truncated_images_true_is_refused(folder: Path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ManifestError, match="LOAD_TRUNCATED_IMAGES"):
        build_manifest(folder)


def test_hidden_files_skipped_non_images_and_nested_files_included(folder: Path):
    (folder / "0" / ".DS_Store").write_bytes(b"junk")
    (folder / "0" / ".thumbs").mkdir()
    (folder / "0" / ".thumbs" / "t.png").write_bytes(png_bytes(3))
    (folder / "1" / "notes.txt").write_text("a stray note")
    (folder / "2" / "sub").mkdir()
    (folder / "2" / "sub" / "deep.PNG").write_bytes(png_bytes(4))
    df = build_manifest(folder).set_index("path")
    assert len(df) == len(CLASSES) * PER_CLASS + 2
    assert not any("/." in p for p in df.index)
    assert not bool(df.loc["1/notes.txt", "decodable"])
    assert "'.txt' is not an image suffix" in df.loc["1/notes.txt", "error"]
    assert bool(df.loc["2/sub/deep.PNG", "decodable"])
    assert df.loc["2/sub/deep.PNG", "label"] == "2"


def test_the_manifest_reads_exactly_the_listed_files_inside_class_folders(folder: Path):
    # Data versioning checks list_files against DVC's record, so it must cover all the manifest reads.
    (folder / "0" / ".DS_Store").write_bytes(b"junk")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x.png").write_bytes(png_bytes(5))
    (folder / "README.md").write_text("not in a class folder")
    (folder / "2" / "sub").mkdir()
    (folder / "2" / "sub" / "deep.png").write_bytes(png_bytes(4))
    (folder / "3").mkdir()
    files, folders = list_files(folder)
    assert files == sorted(files) and not any(part.startswith(".") for rel in files for part in rel.split("/"))
    assert "README.md" in files and "2/sub/deep.png" in files
    assert {"3", "2/sub"} <= set(folders) and set(list_classes(folder)) <= set(folders)
    assert sorted(build_manifest(folder)["path"]) == sorted(rel for rel in files if "/" in rel)


def test_fingerprint_stable_and_sensitive(folder: Path):
    first, second = build_manifest(folder), build_manifest(folder)
    pd.testing.assert_frame_equal(first, second)
    fp = manifest_fingerprint(first)
    assert re.fullmatch(r"[0-9a-f]{16}", fp)
    assert manifest_fingerprint(second) == fp

    (folder / "1" / "img_003.png").write_bytes(png_bytes(424242))  # same name, new pixels
    changed = build_manifest(folder)
    assert manifest_fingerprint(changed) != fp

    (folder / "1" / "img_003.png").rename(folder / "1" / "img_003b.png")  # same bytes, new name
    assert manifest_fingerprint(build_manifest(folder)) != manifest_fingerprint(changed)

    moved = folder / "2" / "img_000.png"  # same bytes, other class
    moved.rename(folder / "0" / "zz_from_2.png")
    assert manifest_fingerprint(build_manifest(folder)) not in {fp, manifest_fingerprint(changed)}


def test_thread_pool_gives_the_same_manifest(tmp_path: Path):
    root = make_imagefolder(tmp_path / "many", classes=("a", "b"), per_class=300)
    (root / "a" / "bad.png").write_bytes(b"\x89PNG not really")
    serial = build_manifest(root, workers=1)
    threaded = build_manifest(root, workers=4)
    auto = build_manifest(root)
    pd.testing.assert_frame_equal(serial, threaded)
    pd.testing.assert_frame_equal(serial, auto)
    assert len(serial) == 601 and int((~serial["decodable"]).sum()) == 1
    with pytest.raises(ValueError, match="workers"):
        build_manifest(root, workers=0)


def test_save_load_round_trip(folder: Path, tmp_path: Path):
    (folder / "0" / "x.png").write_bytes(b"garbage, with a comma")
    (folder / "2" / "rgb.png").write_bytes(png_bytes(8, mode="RGB"))
    df = build_manifest(folder)
    df.loc[0, "error"] = 'odd, "quoted"\nmulti-line error'
    df["split"] = ["train", "val", "calibration", "test"] * (len(df) // 4) + ["train"] * (len(df) % 4)
    path = tmp_path / "out" / "manifest.csv"
    save_manifest(df, path)
    back = load_manifest(path)
    pd.testing.assert_frame_equal(back, df)
    assert back.loc[back["path"] == "0/x.png", "mode"].item() == ""  # not NaN
    assert manifest_fingerprint(back) == manifest_fingerprint(df)


def test_load_manifest_rejects_foreign_csv(tmp_path: Path):
    path = tmp_path / "m.csv"
    path.write_text("path,label\n0/a.png,0\n")
    with pytest.raises(ManifestError, match="lacks column"):
        load_manifest(path)
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "missing.csv")


def test_class_counts(folder: Path):
    (folder / "2" / "extra.png").write_bytes(png_bytes(99))
    counts = class_counts(build_manifest(folder))
    assert counts == {"0": PER_CLASS, "1": PER_CLASS, "2": PER_CLASS + 1}
    assert all(type(v) is int for v in counts.values())
