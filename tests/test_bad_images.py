"""An image file that cannot be decoded (a decompression bomb, a truncated file, a file that is not
an image) is one calibflow refusal naming the file and what is wrong, wherever it is decoded:
`predict` and `monitor` exit 2 with one line, never a traceback nor a blamed MLflow registry."""

from __future__ import annotations

import argparse
import dataclasses
import warnings

import numpy as np
import pytest
from PIL import Image

from calibflow.data.images import decode_image, load_images
from calibflow.errors import ManifestError
from cli.main import COMMANDS, dispatch


def _png(path, size=(64, 64), mode="L"):
    Image.fromarray(np.full(size[::-1], 128, dtype=np.uint8)).convert(mode).save(path)
    return path


def _truncated_jpeg(path):
    full = path.with_name("whole.jpg")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(full, quality=95)
    data = full.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header is whole, the scan data ends early
    full.unlink()
    return path


def test_a_whole_image_still_decodes(tmp_path):
    array = decode_image(_png(tmp_path / "ok.png"), "RGB", (8, 8))
    assert array.shape == (8, 8, 3) and array.dtype == np.uint8


@pytest.mark.parametrize("factor", [1.5, 3])  # Pillow only warns up to twice its limit, and raises past it
def test_a_decompression_bomb_is_refused_naming_the_file_before_it_is_decoded(tmp_path, monkeypatch, factor):
    bomb = _png(tmp_path / "bomb.png", size=(100, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", int(100 * 100 / factor))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(ManifestError, match="decompression bomb") as caught:
            decode_image(bomb, "L", (8, 8))
        with pytest.raises(ManifestError, match="bomb.png"):
            load_images(tmp_path, ["bomb.png"], "L", (8, 8), workers=2)
    assert str(bomb) in str(caught.value) and "\n" not in str(caught.value)
    assert not seen  # Pillow's warning would print two lines before the refusal's one


def test_a_truncated_image_is_refused_naming_the_file_and_the_fix(tmp_path):
    cut = _truncated_jpeg(tmp_path / "cut.jpg")
    with pytest.raises(ManifestError, match="truncated") as caught:
        decode_image(cut, "RGB", (8, 8))
    assert str(cut) in str(caught.value) and "copy the file again" in str(caught.value)


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xd8"])
def test_a_file_that_is_not_an_image_is_refused_naming_the_file(tmp_path, content):
    path = tmp_path / "notes.png"
    path.write_bytes(content)
    with pytest.raises(ManifestError) as caught:
        decode_image(path, "L", (8, 8))
    assert str(path) in str(caught.value)


def test_load_images_refuses_the_one_bad_file_among_good_ones_naming_it(tmp_path):
    for i in range(5):
        _png(tmp_path / f"{i}.png")
    _truncated_jpeg(tmp_path / "3-cut.jpg")
    names = ["0.png", "1.png", "3-cut.jpg", "4.png"]
    with pytest.raises(ManifestError, match="3-cut.jpg"):
        load_images(tmp_path, names, "L", (8, 8), workers=2)
    assert load_images(tmp_path, ["0.png", "1.png"], "L", (8, 8)).shape == (2, 1, 8, 8)


@pytest.mark.parametrize("command", ["monitor", "predict", "recalibrate"])
def test_the_cli_says_a_bad_image_on_one_line_with_exit_2_and_no_registry_blamed(tmp_path, capsys, command):
    """The commands that decode a folder or the user's files, with their own refusal policy: a
    truncated file used to read as an OSError, which `monitor` blamed on the MLflow registry."""
    cut = _truncated_jpeg(tmp_path / "cut.jpg")
    decoding = dataclasses.replace(COMMANDS[command], handler=lambda args: load_images(tmp_path, ["cut.jpg"], "RGB"))
    assert dispatch(decoding, argparse.Namespace(command=command)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines  # no traceback
    assert str(cut) in lines[0] and "truncated" in lines[0] and "MLflow" not in lines[0]
