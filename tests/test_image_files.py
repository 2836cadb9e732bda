"""A split read from its files a batch at a time (ImageFiles, data.in_memory_max_mb) gives the
same pixels, the same training and the same logits as the split decoded into memory, bit for bit
on the CPU, with DataLoader workers or without; and a file that fails to decode mid-stream is one
line naming it."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from calibflow.config import Config, TrainConfig, load_config
from calibflow.data.image_files import ImageFiles, ImageLoading, every_nth, in_order, read_batches
from calibflow.data.images import channel_stats, load_images
from calibflow.errors import ManifestError
from calibflow.training.loop import TrainingInputs, collect_logits, train_classifier
from calibflow.training.models import ModelSpec

CLASSES, PER_CLASS, SIZE = 3, 24, 12


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Images whose class is the row of a bright bar, in PNG and JPEG, RGB, with noise."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for k in range(CLASSES):
        (root / str(k)).mkdir()
        for i in range(PER_CLASS):
            pixels = rng.integers(0, 60, (SIZE, SIZE, 3), dtype=np.uint8)
            pixels[2 + 3 * k : 4 + 3 * k, 2:10] = 220
            name = f"{k}/{i}.{'png' if i % 2 else 'jpg'}"
            Image.fromarray(pixels).save(root / name)
            paths.append(name)
            labels.append(k)
    return root, paths, torch.tensor(labels)


def _files(folder) -> ImageFiles:
    root, paths, _ = folder
    return ImageFiles(root, paths, "RGB", (SIZE, SIZE))


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_read_from_the_files_equal_the_decoded_tensor(folder, workers):
    root, paths, _ = folder
    decoded = load_images(root, paths, "RGB", (SIZE, SIZE))
    files = _files(folder)
    assert files.shape == tuple(decoded.shape) and len(files) == len(decoded)
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(1))
    batches = list(order.split(10))
    read = list(read_batches(files, batches, workers=workers))
    assert len(read) == len(batches)
    assert all(torch.equal(images, decoded[batch]) for images, batch in zip(read, batches))
    assert torch.equal(torch.cat(list(every_nth(files, 1, 3).decode(range(24)))), torch.cat(list(decoded[1::3][:24])))


def test_channel_statistics_of_streamed_batches_equal_the_tensors(folder):
    root, paths, _ = folder
    decoded = load_images(root, paths, "RGB", (SIZE, SIZE))
    streamed = channel_stats(read_batches(_files(folder), in_order(len(paths), 7), workers=0))
    assert all(torch.equal(a, b) for a, b in zip(streamed, channel_stats(decoded)))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("damage", ["truncated", "removed"])
def test_a_file_that_fails_mid_stream_is_one_line_naming_it(folder, tmp_path, workers, damage):
    """Validation saw every file whole; one is cut short (or removed) before its batch is read."""
    root, paths, _ = folder
    copy = tmp_path / "copy"
    for name in paths:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes((root / name).read_bytes())
    victim = copy / paths[40]
    if damage == "truncated":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    else:
        victim.unlink()
    files = ImageFiles(copy, paths, "RGB", (SIZE, SIZE))
    with pytest.raises(ManifestError) as caught:
        for _ in read_batches(files, in_order(len(paths), 8), workers=workers):
            pass
    message = str(caught.value)
    assert str(victim) in message and "\n" not in message and "Traceback" not in message


def _copied(folder, into):
    root, paths, _ = folder
    for name in paths:
        (into / name).parent.mkdir(parents=True, exist_ok=True)
        (into / name).write_bytes((root / name).read_bytes())
    return into


def _digests(root, paths) -> list[str]:
    return [hashlib.sha256((root / name).read_bytes()).hexdigest() for name in paths]


def _one_split(manifest, tmp_path, name: str) -> None:
    """tmp_path/manifest.csv and tmp_path/split.json: every row of `manifest` in the split `name`."""
    from calibflow.data.manifest import save_manifest
    from calibflow.data.splits import SPLIT_NAMES, Split

    save_manifest(manifest, tmp_path / "manifest.csv")
    everything = np.arange(len(manifest))
    indices = {split: everything if split == name else everything[:0] for split in SPLIT_NAMES}
    Split(indices=indices, seed=0, fractions={}, manifest_fingerprint="").save(tmp_path / "split.json")


def _replace_with_another_class(copy, paths, index: int) -> Path:
    """paths[index] overwritten with a whole, valid image of another class (in the same format), as
    a `git checkout` + `dvc checkout` of another data version in the same working tree would: it
    decodes fine, only its bytes say it is not the file the run pinned."""
    victim = copy / paths[index]
    other = next(
        copy / p for p in reversed(paths) if p.split("/")[0] != paths[index].split("/")[0] and p.endswith(victim.suffix)
    )
    assert victim.read_bytes() != other.read_bytes()
    victim.write_bytes(other.read_bytes())
    return victim


def _assert_refused_naming(caught, victim) -> None:
    message = str(caught.value)
    assert str(victim) in message and "changed since the data version was pinned" in message, message
    assert "dvc checkout" in message and "\n" not in message and "Traceback" not in message, message


@pytest.mark.parametrize("workers", [0, 2])
def test_a_file_replaced_by_another_valid_image_mid_stream_is_refused_naming_it(folder, tmp_path, workers):
    """The source was built with the bytes the run pinned (the manifest's SHA-256 of each file);
    then one file becomes another image, whole and decodable: a read of it is refused, on one line
    naming it, by a DataLoader worker or by the thread pool alike."""
    root, paths, _ = folder
    copy = _copied(folder, tmp_path / "copy")
    files = ImageFiles(copy, paths, "RGB", (SIZE, SIZE), _digests(root, paths))
    unchanged = list(read_batches(files, in_order(len(paths), 8), workers=workers))  # every file as recorded
    victim = _replace_with_another_class(copy, paths, 5)
    with pytest.raises(ManifestError) as caught:
        for _ in read_batches(files, in_order(len(paths), 8), workers=workers):
            pass
    _assert_refused_naming(caught, victim)
    files.close()
    assert len(unchanged) == -(-len(paths) // 8)


@pytest.mark.parametrize("workers", [0, 2])
def test_checked_files_give_the_same_batches_bit_for_bit(folder, workers):
    """Checking the bytes changes no pixel: the batches equal those decoded without digests."""
    root, paths, _ = folder
    order = list(torch.randperm(len(paths), generator=torch.Generator().manual_seed(2)).split(10))
    plain = list(read_batches(_files(folder), order, workers=workers))
    checked_files = ImageFiles(root, paths, "RGB", (SIZE, SIZE), _digests(root, paths))
    checked = list(read_batches(checked_files, order, workers=workers))
    checked_files.close()
    assert all(torch.equal(a, b) for a, b in zip(plain, checked)) and len(plain) == len(checked) == len(order)
    assert torch.equal(
        load_images(root, paths, "RGB", (SIZE, SIZE), digests=_digests(root, paths)),
        torch.cat(plain)[torch.argsort(torch.cat(order))],
    )


def test_the_digests_travel_with_the_files(folder):
    """A subset, the evaluation framing, a DDP bundle's record and a worker's pickled copy keep each
    file's digest beside its path."""
    import pickle

    root, paths, _ = folder
    files = ImageFiles(root, paths, "RGB", (SIZE, SIZE), _digests(root, paths))
    taken = files.take([4, 1])
    assert taken.paths == (paths[4], paths[1]) and taken.digests == tuple(_digests(root, [paths[4], paths[1]]))
    assert files.evaluated().digests == files.digests == ImageFiles.from_record(files.to_record()).digests
    assert pickle.loads(pickle.dumps(files)).digests == files.digests
    assert ImageFiles.from_record(_files(folder).to_record()).digests is None  # no digest: nothing to check
    with pytest.raises(ValueError, match="one per file"):
        ImageFiles(root, paths, "RGB", (SIZE, SIZE), _digests(root, paths)[1:])


def _train(images, labels, workers=0, **changes):
    spec = ModelSpec(arch="small_cnn", in_channels=3, num_classes=CLASSES, image_height=SIZE, image_width=SIZE, width=8)
    config = dataclasses.replace(TrainConfig(epochs=3, batch_size=16, lr=0.05, val_every=1), **changes)
    inputs = TrainingInputs(spec, images, labels, images, labels, config, seed=3, workers=workers)
    return train_classifier(inputs, progress=False)


@pytest.mark.parametrize("workers", [0, 2])
def test_training_from_the_files_equals_training_in_memory_bit_for_bit(folder, workers):
    """The same seeded order, augmentation and mixing draws, and pixels: the same weights, losses
    and validation metrics (augmentation and mixup on, so every random stream is exercised)."""
    root, paths, labels = folder
    decoded = load_images(root, paths, "RGB", (SIZE, SIZE))
    in_memory, history = _train(decoded, labels, mix="mixup")
    streamed, streamed_history = _train(_files(folder), labels, workers=workers, mix="mixup")
    assert in_memory.state_dict().keys() == streamed.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(in_memory.state_dict().values(), streamed.state_dict().values()))
    assert [(h.train_loss, h.val_accuracy, h.val_nll) for h in history] == [
        (h.train_loss, h.val_accuracy, h.val_nll) for h in streamed_history
    ]
    assert history[-1].val_accuracy > 0.9  # it learned: equal weights of an untrained model would prove little
    logits = collect_logits(in_memory, decoded, batch_size=10)
    assert torch.equal(logits, collect_logits(in_memory, _files(folder), batch_size=10, workers=workers))


@pytest.mark.parametrize("workers", [0, 2])
def test_outlier_exposure_from_the_files_equals_outlier_exposure_in_memory_bit_for_bit(folder, workers):
    """train.outlier_exposure's folder above data.in_memory_max_mb is read from its files, each
    epoch's draws decoded ahead by its own workers: the same outliers, so the same weights."""
    root, paths, labels = folder
    decoded = load_images(root, paths, "RGB", (SIZE, SIZE))
    inside, outside = labels < 2, (labels == 2).nonzero().flatten().tolist()
    train, train_labels = decoded[inside], labels[inside]
    outlier_files = ImageFiles(root, [paths[i] for i in outside], "RGB", (SIZE, SIZE))

    def trained(outliers, workers=0):
        spec = ModelSpec(arch="small_cnn", in_channels=3, num_classes=2, image_height=SIZE, image_width=SIZE, width=8)
        config = TrainConfig(epochs=2, batch_size=16, lr=0.05, val_every=1)
        inputs = TrainingInputs(
            spec, train, train_labels, train, train_labels, config, seed=3, outlier_images=outliers, workers=workers
        )
        model, history = train_classifier(inputs, progress=False)
        return list(model.state_dict().values()), [h.train_loss for h in history]

    in_memory = trained(decoded[labels == 2])
    streamed = trained(outlier_files, workers)
    assert all(torch.equal(a, b) for a, b in zip(in_memory[0], streamed[0])) and in_memory[1] == streamed[1]
    without = trained(None)  # the outliers took part: equal weights would prove nothing otherwise
    assert not all(torch.equal(a, b) for a, b in zip(in_memory[0], without[0]))


def test_a_split_is_read_from_its_files_above_the_memory_limit(folder, tmp_path):
    from calibflow.data.manifest import build_manifest
    from calibflow.pipeline.data_steps import ImageFormat, image_loading, load_split_images

    root, paths, _ = folder
    manifest = build_manifest(root)
    _one_split(manifest, tmp_path, "test")
    fmt = ImageFormat("RGB", SIZE, SIZE)
    decoded_bytes = len(manifest) * 3 * SIZE * SIZE
    kept, _, _ = load_split_images(
        str(root),
        str(tmp_path / "manifest.csv"),
        str(tmp_path / "split.json"),
        "test",
        fmt,
        loading=ImageLoading(in_memory_max_bytes=decoded_bytes, workers=0),
    )
    streamed, labels, rows = load_split_images(
        str(root),
        str(tmp_path / "manifest.csv"),
        str(tmp_path / "split.json"),
        "test",
        fmt,
        loading=ImageLoading(in_memory_max_bytes=decoded_bytes - 1, workers=0),
    )
    assert isinstance(kept, torch.Tensor) and isinstance(streamed, ImageFiles)
    assert torch.equal(streamed.decode(range(len(streamed))), kept) and len(labels) == len(rows) == len(kept)
    assert image_loading(load_config(None, ["data.in_memory_max_mb=0", "data.workers=3"]).data) == ImageLoading(0, 3)


@pytest.mark.parametrize("in_memory", [True, False])
def test_a_split_file_changed_after_the_manifest_is_refused_naming_it(folder, tmp_path, in_memory):
    """load_split_images checks every file against the manifest's SHA-256, decoded into memory or
    streamed: one overwritten with another class's valid image after the manifest was built (after
    the run pinned the data) is refused by name, never decoded as if it were the pinned one."""
    from calibflow.data.manifest import build_manifest
    from calibflow.pipeline.data_steps import ImageFormat, load_split_images

    _, paths, _ = folder
    copy = _copied(folder, tmp_path / "copy")
    manifest = build_manifest(copy)
    _one_split(manifest, tmp_path, "train")
    victim = _replace_with_another_class(copy, list(manifest["path"]), 5)
    loading = ImageLoading(in_memory_max_bytes=10**9 if in_memory else 0, workers=0)

    def load():
        images, _, _ = load_split_images(
            str(copy),
            str(tmp_path / "manifest.csv"),
            str(tmp_path / "split.json"),
            "train",
            ImageFormat("RGB", SIZE, SIZE),
            loading=loading,
        )
        return images if in_memory else images.decode(range(len(images)))

    with pytest.raises(ManifestError) as caught:
        load()
    _assert_refused_naming(caught, victim)
    victim.write_bytes((folder[0] / victim.relative_to(copy)).read_bytes())  # restored, as `dvc checkout` would
    assert torch.equal(load(), load_images(copy, list(manifest["path"]), "RGB", (SIZE, SIZE)))


def test_the_corruption_suite_checks_each_chunk_against_the_manifest(folder, tmp_path, monkeypatch):
    """The suite's chunks (load_images_nhwc, DECODED_AT_A_TIME at a time) are checked as a split's
    images are: the changed file is named, on one line."""
    from calibflow.data.manifest import build_manifest
    from calibflow.evaluation.shift import Suite
    from calibflow.pipeline import model_steps
    from calibflow.training.models import build_model, save_checkpoint

    copy = _copied(folder, tmp_path / "copy")
    manifest = build_manifest(copy)
    _one_split(manifest, tmp_path, "test")
    spec = ModelSpec(arch="small_cnn", in_channels=3, num_classes=CLASSES, image_height=SIZE, image_width=SIZE, width=4)
    checkpoint = save_checkpoint(tmp_path / "checkpoint.pt", build_model(spec).eval(), spec, ["0", "1", "2"], "RGB")
    monkeypatch.setattr(model_steps, "DECODED_AT_A_TIME", 16)  # the change lands in a later chunk than the first
    victim = _replace_with_another_class(copy, list(manifest["path"]), 40)
    with pytest.raises(ManifestError) as caught:
        model_steps._suite_logits_of_split(
            str(checkpoint),
            str(copy),
            str(tmp_path / "manifest.csv"),
            str(tmp_path / "split.json"),
            "test",
            Suite(("contrast",), (1,), 10**9, seed=0),
            batch_size=16,
            device="cpu",
            threads=None,
            cache_dir=None,
        )
    _assert_refused_naming(caught, victim)


@pytest.mark.parametrize("read", ["predict_rows", "decode_rows"])
def test_evaluate_gate_monitor_and_recalibrate_check_each_file_against_the_manifest(folder, tmp_path, read):
    """The lifecycle commands rebuild the version's manifest at its pinned revision and read its
    rows again to score them: a file changed in between is refused by name, not scored. The refusal
    comes before the model is called, so a registered model's metadata is all this needs."""
    from types import SimpleNamespace

    from calibflow.data.manifest import build_manifest
    from calibflow.lifecycle import reproduce

    copy = _copied(folder, tmp_path / "copy")
    manifest = build_manifest(copy)
    loaded = SimpleNamespace(metadata=SimpleNamespace(metadata={"image_mode": "RGB", "image_size": [SIZE, SIZE]}))
    victim = _replace_with_another_class(copy, list(manifest["path"]), 7)
    with pytest.raises(ManifestError) as caught:
        getattr(reproduce, read)(loaded, str(copy), manifest, np.arange(len(manifest)))
    _assert_refused_naming(caught, victim)


def test_how_a_split_is_read_is_not_part_of_the_build():
    """Reading from the files changes no pixel, so it registers no new build (params_hash)."""
    base = Config().params_hash
    assert load_config(None, ["data.in_memory_max_mb=0", "data.workers=4"]).params_hash == base
    assert load_config(None, ["data.min_per_class=11"]).params_hash != base


def test_workers_start_once_for_every_pass_and_stop_when_closed(folder):
    """Persistent workers: every epoch and validation pass of a training reuses them (a GPU host
    would otherwise start them per pass), and a finished training stops them."""
    files = _files(folder)
    first = list(read_batches(files, in_order(len(files), 16), workers=2))
    loader, _ = files.loader(2)
    workers = list(loader._iterator._workers)
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(5)).split(16)
    partial = read_batches(files, order, workers=2)
    next(partial)  # a pass left unfinished, as a zip over an epoch's batches leaves it
    second = list(read_batches(files, list(order), workers=2))
    assert [w.pid for w in loader._iterator._workers] == [w.pid for w in workers]
    assert torch.equal(torch.cat(first), files.decode(range(len(files))))
    assert all(torch.equal(images, files.decode(batch.tolist())) for images, batch in zip(second, order))
    files.close()
    assert not any(w.is_alive() for w in workers) and files._loaders == {}


def test_collecting_logits_stops_the_workers_it_started(folder):
    from calibflow.training.models import ModelSpec, build_model

    spec = ModelSpec(arch="small_cnn", in_channels=3, num_classes=CLASSES, image_height=SIZE, image_width=SIZE, width=4)
    model = build_model(spec, torch.zeros(3), torch.ones(3))
    files = _files(folder)
    collect_logits(model, files, batch_size=16, workers=2)
    assert files._loaders == {}  # the persistent workers of that one pass are gone with it


@pytest.mark.parametrize("workers", [0, 1])
def test_an_ood_folder_above_the_memory_limit_is_scored_from_its_files_to_the_same_numbers(
    folder, tmp_path, workers, monkeypatch
):
    """ood.path's folder is read a batch at a time above data.in_memory_max_mb: the same scores and
    detection metrics as the folder decoded into memory; a file broken mid-stream is an error naming it."""
    import json

    from calibflow.calibrators import fit_calibrator
    from calibflow.pipeline.evaluation_steps import CalibrationRecord, evaluate_ood
    from calibflow.training.models import build_model, save_checkpoint

    root, paths, _ = folder
    torch.manual_seed(0)
    spec = ModelSpec(arch="small_cnn", in_channels=3, num_classes=CLASSES, image_height=SIZE, image_width=SIZE, width=4)
    network = build_model(spec).eval()
    checkpoint = save_checkpoint(tmp_path / "checkpoint.pt", network, spec, ["0", "1", "2"], "RGB")
    inside = torch.randint(0, 256, (30, 3, SIZE, SIZE), dtype=torch.uint8)
    with torch.no_grad():
        logits = network(inside)
    np.savez(tmp_path / "test.npz", logits=logits.numpy(), labels=np.zeros(30), indices=np.arange(30))
    labels = torch.where(torch.arange(30) % 4 == 0, torch.arange(30) % CLASSES, logits.argmax(dim=1))
    (tmp_path / "calibration.json").write_text(json.dumps(fit_calibrator("temperature", logits, labels).to_state()))
    record = CalibrationRecord("temperature", str(tmp_path / "calibration.json"), None, 1.0, 1.0)
    ood = {"local_dir": str(root), "files": paths, "dvc_hash": "x", "path": "ood"}
    (tmp_path / "ood.json").write_text(json.dumps(ood))

    def scored(loading: ImageLoading, name: str):
        out = tmp_path / name
        out.mkdir()
        result = evaluate_ood(
            str(checkpoint),
            str(tmp_path / "ood.json"),
            str(tmp_path / "test.npz"),
            record,
            "energy",
            str(out),
            loading=loading,
            device="cpu",
        )
        with np.load(result.scores_path) as saved:
            return result.metrics, {key: saved[key] for key in saved.files}

    from calibflow.pipeline import evaluation_steps

    read_as = []
    real_source = evaluation_steps.image_source

    def spied_source(*args, **kwargs):
        source = real_source(*args, **kwargs)
        read_as.append(type(source))
        return source

    monkeypatch.setattr(evaluation_steps, "image_source", spied_source)
    kept_metrics, kept = scored(ImageLoading(in_memory_max_bytes=10**9, workers=workers), "kept")
    streamed_metrics, streamed = scored(ImageLoading(in_memory_max_bytes=0, workers=workers), "streamed")
    assert read_as == [torch.Tensor, ImageFiles]
    assert streamed_metrics == kept_metrics and set(streamed) == set(kept)
    assert all(np.array_equal(streamed[key], kept[key]) for key in kept)
    assert len(kept["outside_energy"]) == len(paths)

    gone = tmp_path / "gone"
    gone.mkdir()
    (gone / "a.png").write_bytes((root / paths[1]).read_bytes())
    (gone / "b.png").write_bytes(b"not a png")  # passed its check, then was overwritten
    (tmp_path / "ood.json").write_text(json.dumps({**ood, "local_dir": str(gone), "files": ["a.png", "b.png"]}))
    with pytest.raises(ManifestError, match="b.png"):
        scored(ImageLoading(in_memory_max_bytes=0, workers=workers), "gone-scores")

    # check_ood_data's record keeps each file's SHA-256: a file overwritten afterwards with another
    # valid image is refused by name, the folder in memory or streamed
    checked = _copied(folder, tmp_path / "checked")
    (tmp_path / "ood.json").write_text(
        json.dumps({**ood, "local_dir": str(checked), "sha256": _digests(checked, paths)})
    )
    victim = _replace_with_another_class(checked, paths, 7)
    for limit in (10**9, 0):
        with pytest.raises(ManifestError) as caught:
            scored(ImageLoading(in_memory_max_bytes=limit, workers=workers), f"changed-{limit}")
        _assert_refused_naming(caught, victim)


def test_an_ood_folder_check_records_the_digests_its_readers_check(folder, tmp_path, monkeypatch):
    """check_ood_folder hashes each file once (the bytes it also decodes and compares with the
    training data) and keeps the digests of the files it records, which save/load carry and the
    other folder's overlap check reuses."""
    from calibflow.data import versioning
    from calibflow.evaluation.ood import check_ood_folder, folder_hashes, load_ood_data, save_ood_data

    _, paths, _ = folder
    copy = _copied(folder, tmp_path / "ood")
    pinned = versioning.DataVersion("ood", str(copy), "x.dir", versioning.WORKSPACE, None)
    monkeypatch.setattr(versioning, "resolve_data", lambda *args, **kwargs: pinned)
    record = check_ood_folder(tmp_path, "ood", set(), max_images=10)
    assert len(record.files) == len(record.sha256) == 10 and record.sha256 == tuple(_digests(copy, record.files))
    again = load_ood_data(save_ood_data(record, tmp_path / "ood.json"))
    assert again == record and folder_hashes(again) == set(record.sha256)
