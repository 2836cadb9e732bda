"""Files in modes other than 8-bit gray and RGB: converted where the format defines the
conversion, refused with one line naming the file where it does not, and the same way wherever a
file is read (decode_image serves training, evaluation, `calibflow predict` and monitor)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from calibflow.config import DataConfig
from calibflow.data.images import decode_image, load_images, model_mode
from calibflow.data.manifest import build_manifest, save_manifest
from calibflow.errors import ManifestError
from calibflow.pipeline.data_steps import image_format

GRADIENT = np.arange(256, dtype=np.uint8).reshape(16, 16)


def _sixteen_bit_png(path, values=GRADIENT):
    Image.fromarray(values.astype(np.uint16) * 257).save(path)  # 8-bit v is 16-bit v * 257 exactly
    assert Image.open(path).mode.startswith("I;16")
    return path


def test_sixteen_bit_gray_is_scaled_to_eight_bits_not_clipped(tmp_path):
    path = _sixteen_bit_png(tmp_path / "deep.png")
    gray = decode_image(path, "L")
    assert gray.shape == (16, 16, 1) and np.array_equal(gray[..., 0], GRADIENT)  # Pillow's convert: 255 from 1 up
    colour = decode_image(path, "RGB")
    assert all(np.array_equal(colour[..., c], GRADIENT) for c in range(3))


def test_sixteen_bit_values_between_eight_bit_steps_round_to_the_nearest(tmp_path):
    values = np.array([[0, 128, 129, 65535 - 129, 65535]], dtype=np.uint16)
    path = tmp_path / "steps.png"
    Image.fromarray(values).save(path)
    assert decode_image(path, "L")[0, :, 0].tolist() == [0, 0, 1, 254, 255]


def test_cmyk_palette_and_one_bit_images_convert_as_pillow_defines(tmp_path):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    rgb.convert("CMYK").save(tmp_path / "cmyk.tif")  # lossless: the conversion alone is measured
    back = decode_image(tmp_path / "cmyk.tif", "RGB")
    assert np.array_equal(back, np.asarray(rgb.convert("CMYK").convert("RGB")))

    palette = rgb.quantize(colors=16)
    palette.save(tmp_path / "palette.png")
    assert np.array_equal(decode_image(tmp_path / "palette.png", "RGB"), np.asarray(palette.convert("RGB")))

    Image.fromarray(GRADIENT >= 128).save(tmp_path / "bits.png")
    assert Image.open(tmp_path / "bits.png").mode == "1"
    assert set(np.unique(decode_image(tmp_path / "bits.png", "L"))) == {0, 255}


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_an_opaque_alpha_channel_is_dropped(tmp_path, mode):
    base = Image.fromarray(GRADIENT).convert("RGB" if mode == "RGBA" else "L")
    base.convert(mode).save(tmp_path / "opaque.png")
    target = "RGB" if mode == "RGBA" else "L"
    assert np.array_equal(decode_image(tmp_path / "opaque.png", target)[..., 0], GRADIENT)


@pytest.mark.parametrize("kind", ["RGBA", "LA", "palette", "RGB colour key", "L colour key"])
def test_transparent_pixels_are_refused_naming_the_file_on_one_line(tmp_path, kind):
    path = tmp_path / f"{kind.replace(' ', '-')}.png"
    if kind == "palette":
        image = Image.fromarray(GRADIENT).convert("RGB").quantize(colors=8)
        image.info["transparency"] = 0
        image.save(path, transparency=0)
    elif kind.endswith("colour key"):  # PNG's tRNS chunk: pixels of this one value are transparent
        image = Image.fromarray(GRADIENT).convert(kind.split()[0])
        image.save(path, transparency=(0, 0, 0) if kind.startswith("RGB") else 0)
    else:
        image = Image.fromarray(GRADIENT).convert(kind)
        alpha = np.full((16, 16), 255, np.uint8)
        alpha[0, 0] = 0
        image.putalpha(Image.fromarray(alpha))
        image.save(path)
    with pytest.raises(ManifestError, match="transparent pixels") as caught:
        decode_image(path, "RGB")
    assert str(path) in str(caught.value) and "\n" not in str(caught.value) and "flatten it" in str(caught.value)
    with pytest.raises(ManifestError, match=path.name):
        load_images(tmp_path, [path.name], "RGB", (8, 8), workers=2)


@pytest.mark.parametrize("kind", ["RGBA", "palette", "RGB colour key"])
def test_a_transparent_file_fails_validation_by_name_before_anything_trains(tmp_path, kind):
    """The manifest decodes every file: a transparent one is refused there (check 1, "every file
    decodes as an image"), not when training first reads it; an opaque alpha channel passes."""
    from calibflow.data.manifest import build_manifest
    from calibflow.data.validation import validate_manifest

    for k, label in enumerate(("a", "b")):
        (tmp_path / label).mkdir()
        for i in range(3):  # each its own content: no image in two classes
            Image.fromarray(GRADIENT // (2 + 3 * k + i)).convert("RGB").save(tmp_path / label / f"{i}.png")
    Image.fromarray(GRADIENT).convert("RGBA").save(tmp_path / "a" / "opaque.png")
    victim = tmp_path / "b" / "see-through.png"
    if kind == "palette":
        Image.fromarray(GRADIENT).convert("RGB").quantize(colors=8).save(victim, transparency=0)
    elif kind == "RGB colour key":
        Image.fromarray(GRADIENT).convert("RGB").save(victim, transparency=(0, 0, 0))
    else:
        image = Image.fromarray(GRADIENT).convert("RGBA")
        image.putpixel((3, 3), (0, 0, 0, 10))
        image.save(victim)
    manifest = build_manifest(tmp_path)
    manifest["split"] = "train"
    report = validate_manifest(manifest, ["a", "b"], 1, allowed_modes=sorted(set(manifest["mode"]) - {""}))
    assert not report.success and [f.check for f in report.failures] == ["every file decodes as an image"]
    text = report.failures[0].describe()
    assert "1 of 8 files" in text and "b/see-through.png" in text and "transparent pixels" in text
    assert "save it without alpha, or remove it from the folder" in text  # the fix, not cut off


@pytest.mark.parametrize("mode", ["I", "F"])
def test_thirty_two_bit_and_float_pixels_are_refused_naming_the_file(tmp_path, mode):
    path = tmp_path / f"wide-{mode}.tif"
    Image.fromarray(GRADIENT.astype(np.int32 if mode == "I" else np.float32)).save(path)
    assert Image.open(path).mode == mode
    with pytest.raises(ManifestError, match="no defined 8-bit range") as caught:
        decode_image(path, "L")
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("modes", "expected"),
    [({"L"}, "L"), ({"1", "I;16"}, "L"), ({"L", "RGB"}, "RGB"), ({"P"}, "RGB"), ({"CMYK"}, "RGB"), ({"RGBA"}, "RGB")],
)
def test_the_model_reads_colour_when_any_file_is_colour(modes, expected):
    assert model_mode(modes) == expected


def test_a_folder_of_sixteen_bit_images_builds_a_one_channel_model(tmp_path):
    """A 16-bit folder's one mode is I;16: the model reads it as gray (one channel), not as a
    four-channel 'I;16' (its name's length), and its pixels are those of the 8-bit images."""
    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(3):
            _sixteen_bit_png(tmp_path / "data" / label / f"{i}.png", np.roll(GRADIENT, i + len(label)))
    manifest = build_manifest(tmp_path / "data")
    save_manifest(manifest, tmp_path / "manifest.csv")
    fmt = image_format(str(tmp_path / "manifest.csv"), DataConfig(path="data"))
    assert (fmt.mode, fmt.channels, fmt.width, fmt.height) == ("L", 1, 16, 16)
    images = load_images(tmp_path / "data", manifest["path"].tolist(), fmt.mode, (16, 16))
    assert images.shape == (6, 1, 16, 16) and int(images.max()) == 255 and int(images.min()) == 0


def test_a_folder_of_float_images_is_refused_with_examples(tmp_path):
    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        Image.fromarray(GRADIENT.astype(np.float32)).save(tmp_path / "data" / label / "0.tif")
    save_manifest(build_manifest(tmp_path / "data"), tmp_path / "manifest.csv")
    with pytest.raises(ManifestError, match=r"no defined 8-bit range.*2 images, for example a/0.tif"):
        image_format(str(tmp_path / "manifest.csv"), DataConfig(path="data"))


def test_a_mode_with_no_defined_conversion_is_named_as_such_not_as_wide_pixels():
    with pytest.raises(ValueError, match="defines no conversion of HSV") as caught:
        model_mode({"L", "HSV"})
    assert "32-bit" not in str(caught.value)
