"""Photos of mixed sizes (data.image_size): torchvision's reference transforms, applied the same way
by training, evaluation, every later command and the served model, which frames an image of any
size itself."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from calibflow.config import ConfigError, TrainConfig, load_config
from calibflow.data.image_files import ImageFiles, read_batches
from calibflow.data.images import Framing, decode_image, load_images, reference_resize
from calibflow.errors import ManifestError
from calibflow.training.loop import TrainingInputs, train_classifier
from calibflow.training.models import ModelSpec

CLASSES, PER_CLASS, SIZE = 3, 16, 24
EVALUATION = Framing(SIZE, SIZE, reference_resize(SIZE), min_side=16)
TRAINING = dataclasses.replace(EVALUATION, crop_scale=(0.08, 1.0), hflip=True)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Images of many sizes and aspects whose class is the row of a bright bar (PNG and JPEG, RGB)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for k in range(CLASSES):
        (root / str(k)).mkdir()
        for i in range(PER_CLASS):
            width, height = (int(v) for v in rng.integers(20, 90, 2))
            pixels = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
            band = slice(height * (1 + 2 * k) // 7, height * (2 + 2 * k) // 7)
            pixels[band, width // 6 : width - width // 6] = 220
            name = f"{k}/{i}.{'png' if i % 2 else 'jpg'}"
            Image.fromarray(pixels).save(root / name)
            paths.append(name)
            labels.append(k)
    return root, paths, torch.tensor(labels)


def test_evaluation_framing_is_torchvisions_resize_and_centre_crop(photos):
    root, paths, _ = photos
    reference = v2.Compose([v2.Resize(reference_resize(SIZE)), v2.CenterCrop(SIZE)])
    for path in paths[:6]:
        with Image.open(root / path) as image:
            expected = np.asarray(reference(image.convert("RGB")))
        assert np.array_equal(decode_image(root / path, "RGB", EVALUATION), expected)
    assert reference_resize(224) == 256  # torchvision's reference recipe: 256, then the centre 224


def test_a_training_crop_is_torchvisions_random_resized_crop_drawn_from_the_images_seed(photos):
    root, paths, _ = photos
    no_flip = dataclasses.replace(TRAINING, hflip=False)
    with Image.open(root / paths[0]) as image:
        image = image.convert("RGB")
        torch.manual_seed(11)
        expected = np.asarray(v2.RandomResizedCrop(SIZE, scale=(0.08, 1.0), antialias=True)(image))
    ours = decode_image(root / paths[0], "RGB", no_flip, seed=11)
    assert np.array_equal(ours, expected)
    assert np.array_equal(
        decode_image(root / paths[0], "RGB", TRAINING, seed=5), decode_image(root / paths[0], "RGB", TRAINING, seed=5)
    )
    crops = {decode_image(root / paths[0], "RGB", TRAINING, seed=s).tobytes() for s in range(8)}
    assert len(crops) == 8  # another seed, another crop
    with pytest.raises(ValueError, match="seed"):
        decode_image(root / paths[0], "RGB", TRAINING)


@pytest.mark.parametrize("workers", [0, 2])
def test_seeded_crops_are_the_same_pixels_whichever_process_or_thread_decodes_them(photos, workers):
    root, paths, _ = photos
    files = ImageFiles(root, paths, "RGB", TRAINING)
    indices = [list(range(0, 16)), list(range(16, 48))]
    seeds = [[1000 + i for i in batch] for batch in indices]
    try:
        batches = list(read_batches(files, indices, workers=workers, seeds=seeds))
    finally:
        files.close()
    one_by_one = [
        torch.from_numpy(np.array(decode_image(root / paths[i], "RGB", TRAINING, seed=1000 + i))).permute(2, 0, 1)
        for batch in indices
        for i in batch
    ]
    assert torch.equal(torch.cat(batches), torch.stack(one_by_one))
    with pytest.raises(ValueError, match="seeds go with a training framing"):
        next(read_batches(files, indices, workers=0))


def test_images_of_every_size_become_the_models_size_and_a_too_small_one_is_refused_by_name(photos, tmp_path):
    root, paths, _ = photos
    assert load_images(root, paths, "RGB", EVALUATION).shape == (len(paths), 3, SIZE, SIZE)
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1)).save(tiny)
    with pytest.raises(ManifestError) as refused:
        decode_image(tiny, "RGB", EVALUATION)
    message = str(refused.value)
    assert str(tiny) in message and "1x1" in message and "data.min_side" in message and "\n" not in message


def test_framing_records_round_trip():
    for framing in (EVALUATION, TRAINING, Framing(8, 8)):
        assert Framing.from_record(framing.to_record()) == framing
    assert TRAINING.for_evaluation() == EVALUATION


def _train(images, val_images, labels, workers=0, **changes):
    spec = ModelSpec(arch="small_cnn", in_channels=3, num_classes=CLASSES, image_height=SIZE, image_width=SIZE, width=8)
    config = dataclasses.replace(TrainConfig(epochs=2, batch_size=16, lr=0.05, val_every=1), **changes)
    inputs = TrainingInputs(spec, images, labels, val_images, labels, config, seed=3, workers=workers)
    return train_classifier(inputs, progress=False)


def test_training_on_random_crops_is_the_same_with_any_number_of_workers_and_differs_from_centre_crops(photos):
    root, paths, labels = photos
    centre = load_images(root, paths, "RGB", EVALUATION)
    weights = []
    for workers in (0, 2):
        model, _ = _train(ImageFiles(root, paths, "RGB", TRAINING), centre, labels, workers=workers)
        weights.append(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(weights[0].values(), weights[1].values()))
    uncropped, _ = _train(centre, centre, labels, augment=False)
    assert not all(torch.equal(a, b) for a, b in zip(weights[0].values(), uncropped.state_dict().values()))


@pytest.mark.parametrize(
    "overrides, problem",
    [
        (["data.resize_size=256"], "needs data.image_size"),
        (["data.image_size=224", "data.allowed_sizes=['32x32']"], "set one of them"),
        (["data.image_size=224", "data.resize_size=200"], "is below data.image_size"),
        (["data.image_size=2"], "data.image_size = 2"),
        (["train.crop_min_scale=0"], "train.crop_min_scale"),
    ],
)
def test_image_size_settings_that_cannot_work_are_refused_by_name(overrides, problem):
    with pytest.raises(ConfigError, match=problem):
        load_config(None, overrides)


def test_the_image_size_settings_are_part_of_the_build():
    base = load_config(None, ["data.image_size=224"]).params_hash
    assert base != load_config(None, []).params_hash
    assert base != load_config(None, ["data.image_size=224", "data.resize_size=232"]).params_hash
    assert base != load_config(None, ["data.image_size=224", "train.crop_min_scale=0.35"]).params_hash


def test_the_served_model_frames_a_photo_of_any_size_as_evaluation_framed_its_file(photos, tmp_path):
    """A photo sent as its pixels, at its own size (the default input), gives the probabilities of
    the same file framed by calibflow and sent as framed: one Framing on one PIL image."""
    import json

    from calibflow.calibrators import fit_calibrator
    from calibflow.tracking import served_model
    from calibflow.training.models import build_model, save_checkpoint

    root, paths, _ = photos
    torch.manual_seed(0)
    spec = ModelSpec(arch="small_cnn", in_channels=3, num_classes=CLASSES, image_height=SIZE, image_width=SIZE, width=4)
    network = build_model(spec).eval()
    checkpoint = save_checkpoint(tmp_path / "checkpoint.pt", network, spec, ["0", "1", "2"], "RGB", framing=EVALUATION)
    framed = load_images(root, paths, "RGB", EVALUATION)
    with torch.no_grad():
        logits = network(framed)
    state = tmp_path / "calibration.json"
    # labels that mostly agree with the network, so the temperature has an interior optimum
    agree = torch.where(torch.arange(len(paths)) % 4 == 0, torch.arange(len(paths)) % CLASSES, logits.argmax(dim=1))
    state.write_text(json.dumps(fit_calibrator("temperature", logits, agree).to_state()))
    served = served_model.CalibratedImageClassifier()
    served.load(served_model.write_model_files(checkpoint, state, tmp_path / "served"))

    as_framed = served.predict(None, framed.permute(0, 2, 3, 1).numpy(), params={"input": "framed"})
    for i, path in enumerate(paths[:6]):
        with Image.open(root / path) as image:
            photo = np.asarray(image.convert("RGB"))[None]  # its own size, not the model's
        assert photo.shape[1:3] != (SIZE, SIZE)
        assert np.array_equal(served.predict(None, photo), as_framed[i : i + 1])
    with pytest.raises(ValueError, match="image 0 of the request: 10x10 pixels"):
        served.predict(None, np.zeros((1, 10, 10, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="reads images at the network's 24x24, got 30x40"):
        served.predict(None, np.zeros((1, 40, 30, 3), dtype=np.uint8), params={"input": "framed"})
    with pytest.raises(ValueError, match="images shaped"):
        served.predict(None, np.zeros((1, 40, 30, 1), dtype=np.uint8))


def test_a_photo_sent_as_bytes_is_read_with_its_name_in_errors():
    buffer = io.BytesIO()
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(buffer, "PNG")
    buffer.seek(0)
    with pytest.raises(ManifestError, match="^upload.png: has transparent pixels"):
        decode_image(buffer, "RGB", EVALUATION, name="upload.png")


def test_commands_that_read_a_whole_split_decode_it_a_chunk_at_a_time(photos, monkeypatch):
    """evaluate, gate and monitor hold DECODED_AT_A_TIME images at once, whatever the split's size,
    and answer in the files' order."""
    from types import SimpleNamespace

    from calibflow.lifecycle import reproduce

    root, paths, _ = photos
    seen = []

    def predict(images, params=None):
        seen.append(len(images))
        assert params == {"input": "framed"} and images.shape[1:] == (SIZE, SIZE, 3)
        return images.reshape(len(images), -1)[:, :3].astype(float)

    meta = {"image_mode": "RGB", "image_size": [SIZE, SIZE], "framing": EVALUATION.to_record(), "classes": ["a"]}
    model = SimpleNamespace(metadata=SimpleNamespace(metadata=meta), predict=predict)
    monkeypatch.setattr(reproduce, "DECODED_AT_A_TIME", 7)
    got = reproduce.predict_files_of(model, root, paths)
    whole = load_images(root, paths, "RGB", EVALUATION).permute(0, 2, 3, 1).reshape(len(paths), -1)[:, :3]
    assert np.array_equal(got, whole.numpy().astype(float))
    assert max(seen) == 7 and sum(seen) == len(paths)


def test_calibflow_predict_decodes_its_files_a_chunk_at_a_time_in_their_order(photos, monkeypatch):
    from types import SimpleNamespace

    from calibflow.lifecycle import reproduce

    root, paths, _ = photos
    seen = []

    def predict(images, params=None):
        seen.append(len(images))
        scores = images.reshape(len(images), -1)[:, :3].astype(float) + 1.0
        return scores / scores.sum(axis=1, keepdims=True)

    meta = {
        "image_mode": "RGB",
        "image_size": [SIZE, SIZE],
        "framing": EVALUATION.to_record(),
        "classes": ["a", "b", "c"],
    }
    model = SimpleNamespace(
        metadata=SimpleNamespace(metadata=meta), predict=predict, unwrap_python_model=lambda: SimpleNamespace()
    )
    monkeypatch.setattr(reproduce.registration, "load_model", lambda uri: model)
    monkeypatch.setattr(reproduce, "DECODED_AT_A_TIME", 7)
    files = [str(root / p) for p in paths]
    got = reproduce.predict_files("models:/m/1", files)
    assert max(seen) == 7 and sum(seen) == len(paths) and [g.path for g in got] == files
    whole = predict(load_images(root, paths, "RGB", EVALUATION).permute(0, 2, 3, 1).numpy())
    assert [g.probability for g in got] == pytest.approx(whole.max(axis=1).tolist())
    assert [g.label for g in got] == [["a", "b", "c"][k] for k in whole.argmax(axis=1)]
    assert reproduce.predict_files("models:/m/1", []) == []


def test_the_corruption_suite_reads_a_split_a_chunk_at_a_time_with_the_same_logits(photos, tmp_path, monkeypatch):
    """The flow's suite (and the shift-aware fit, which reads the whole calibration split) and
    evaluate/gate's hold DECODED_AT_A_TIME images and their corrupted copies at once, whatever the
    split's size, and give the logits and probabilities a single pass over all images gives, in
    the split's order."""
    from types import SimpleNamespace

    from calibflow.data import images as image_module
    from calibflow.data.manifest import build_manifest, save_manifest
    from calibflow.data.splits import Split
    from calibflow.evaluation.corruptions import corrupt_batch
    from calibflow.evaluation.shift import Suite
    from calibflow.lifecycle import reproduce
    from calibflow.pipeline import model_steps
    from calibflow.training.models import build_model, save_checkpoint

    root, _, _ = photos
    manifest = build_manifest(root)
    save_manifest(manifest, tmp_path / "manifest.csv")
    order = np.random.default_rng(4).permutation(len(manifest))  # not the manifest's order
    Split(
        indices={"train": order[:0], "val": order[:0], "calibration": order[:0], "test": order},
        seed=0,
        fractions={},
        manifest_fingerprint="",
    ).save(tmp_path / "split.json")
    torch.manual_seed(0)
    spec = ModelSpec(arch="small_cnn", in_channels=3, num_classes=CLASSES, image_height=SIZE, image_width=SIZE, width=4)
    checkpoint = save_checkpoint(
        tmp_path / "checkpoint.pt", build_model(spec).eval(), spec, ["0", "1", "2"], "RGB", framing=EVALUATION
    )
    suite = Suite(("gaussian_noise", "contrast"), (1, 5), 10**9, seed=3)
    decoded, events = [], []
    real_decode, real_logits = model_steps.load_images_nhwc, model_steps.predictive_logits

    def decode(*args, **kwargs):
        decoded.append(len(args[1]))
        events.append("decode")
        return real_decode(*args, **kwargs)

    def logits(*args, **kwargs):
        events.append("read")
        return real_logits(*args, **kwargs)

    monkeypatch.setattr(model_steps, "load_images_nhwc", decode)
    monkeypatch.setattr(model_steps, "predictive_logits", logits)

    def suite_logits(chunk: int, of: Suite = suite):
        monkeypatch.setattr(model_steps, "DECODED_AT_A_TIME", chunk)
        decoded.clear()
        events.clear()
        args = (str(checkpoint), str(root), str(tmp_path / "manifest.csv"), str(tmp_path / "split.json"), "test", of)
        return model_steps._suite_logits_of_split(*args, batch_size=5, device="cpu", threads=1, cache_dir=None)

    whole, labels, rows = suite_logits(10**6)
    assert decoded == [len(order)] and np.array_equal(rows, order)
    chunked, chunked_labels, chunked_rows = suite_logits(7)
    assert max(decoded) == 7 and sum(decoded) == len(order)
    # every cell of a chunk is read before the next chunk is decoded: one chunk held at a time
    assert events == (["decode"] + ["read"] * len(suite.cells)) * len(decoded)
    assert torch.equal(labels, chunked_labels) and np.array_equal(rows, chunked_rows)
    assert set(chunked) == set(suite.keys) and all(np.array_equal(chunked[k], whole[k]) for k in suite.keys)
    limited, _, _ = suite_logits(7, dataclasses.replace(suite, max_images=10, selection="first"))
    assert decoded == [7, 3] and all(np.array_equal(limited[k], whole[k][:10]) for k in suite.keys)

    # evaluate and gate: the served model's probabilities on the same corrupted pixels
    seen = []

    def predict(images, params=None):
        seen.append(len(images))
        return images.reshape(len(images), -1)[:, :3].astype(float)

    meta = {"image_mode": "RGB", "image_size": [SIZE, SIZE], "framing": EVALUATION.to_record(), "classes": ["a"]}
    model = SimpleNamespace(metadata=SimpleNamespace(metadata=meta), predict=predict)
    monkeypatch.setattr(reproduce, "DECODED_AT_A_TIME", 7)
    got = reproduce.shift_predictions(model, str(root), manifest, order, suite)
    clean = image_module.load_images(root, manifest["path"].iloc[order].tolist(), "RGB", EVALUATION)
    clean = clean.permute(0, 2, 3, 1).contiguous().numpy()
    for corruption, severity in suite.cells:
        expected = corrupt_batch(clean, corruption, severity, suite.seed).reshape(len(order), -1)[:, :3]
        assert np.array_equal(got[suite.key(corruption, severity)], expected.astype(float))
    assert max(seen) == 7 and sum(seen) == len(order) * len(suite.cells)


def test_a_cameras_exif_rotation_is_applied_when_decoding_and_in_the_manifest(tmp_path):
    from calibflow.data.manifest import build_manifest

    (tmp_path / "a").mkdir()
    pixels = np.zeros((30, 50, 3), np.uint8)
    pixels[:, :10] = 255  # a bright left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown rotated 90 degrees clockwise
    Image.fromarray(pixels).save(tmp_path / "a" / "phone.jpg", exif=exif.tobytes(), quality=95)
    decoded = decode_image(tmp_path / "a" / "phone.jpg", "RGB")
    assert decoded.shape == (50, 30, 3)  # upright: 30 wide, 50 high
    assert decoded[:10, :, 0].mean() > 200 and decoded[-10:, :, 0].mean() < 50  # the edge is now on top
    assert build_manifest(tmp_path)["size"].tolist() == ["30x50"]


def test_a_crop_draw_leaves_every_cuda_stream_alone(photos, monkeypatch):
    """Seeding torch's global stream (torch.manual_seed) would reseed every GPU's, which the fork of
    the CPU stream does not restore: dropout on a GPU would then draw from the last image's seed."""
    root, paths, _ = photos
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))
    load_images(root, paths[:8], "RGB", TRAINING, seeds=range(8))
    assert reseeded == []


def test_photos_in_gray_and_colour_pass_validation_with_an_image_size():
    import pandas as pd

    from calibflow.data.validation import validate_manifest

    manifest = pd.DataFrame(
        {
            "path": ["a/1.jpg", "a/2.jpg", "b/3.jpg", "b/4.png"],
            "label": ["a", "a", "b", "b"],
            "size": ["300x200", "640x480", "200x200", "90x120"],
            "mode": ["RGB", "L", "RGB", "P"],
            "sha256": ["1", "2", "3", "4"],
            "decodable": [True] * 4,
            "error": [""] * 4,
            "split": ["train", "test", "train", "test"],
        }
    )
    assert validate_manifest(manifest, ["a", "b"], 1, min_side=32).success
    manifest.loc[3, "mode"] = "F"
    report = validate_manifest(manifest, ["a", "b"], 1, min_side=32)
    assert [f.check for f in report.failures] == ["every image's mode converts to 8-bit gray or RGB"]
    assert not validate_manifest(manifest.assign(mode=["RGB", "L", "RGB", "RGB"]), ["a", "b"], 1).success


def test_the_size_bounds_are_no_new_build_without_an_image_size_and_resume_keys_see_the_framing(tmp_path):
    from calibflow.pipeline.data_steps import ManifestRecord
    from calibflow.pipeline.model_steps import training_checkpoints

    base = load_config(None, []).params_hash
    assert base == load_config(None, ["data.min_side=8", "train.crop_min_scale=0.5"]).params_hash
    split = tmp_path / "split.json"
    split.write_text("{}")
    manifest = ManifestRecord(path="m.csv", fingerprint="f", n_images=10, classes=("a", "b"))

    def key(*overrides):
        config = load_config(None, list(overrides))
        return training_checkpoints(str(tmp_path), str(tmp_path), manifest, str(split), config, 0, None).directory

    assert (
        len(
            {
                key(),
                key("data.image_size=224"),
                key("data.image_size=160"),
                key("data.image_size=224", "data.resize_size=320"),
            }
        )
        == 4
    )
    assert key("data.workers=3") == key()  # how a split is read is not what it trains on


def test_several_nodes_cannot_read_a_cropped_train_split():
    with pytest.raises(ConfigError, match="would each need a copy"):
        load_config(None, ["data.image_size=64", "train.distributed=ddp", "train.nnodes=2", "train.rendezvous=h:1"])
