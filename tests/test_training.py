import io
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from calibflow.config import TrainConfig
from calibflow.training.models import ModelSpec, build_model, load_checkpoint, save_checkpoint
import dataclasses

from calibflow.training.loop import (
    Runtime,
    TrainingInputs,
    collect_logits,
    intra_op_threads,
    random_translate,
    resolve_runtime,
    train_classifier,
    validates_after,
)


def blobs(n_per_class=40, classes=3, size=8, seed=0):
    """Images whose class is the position of a bright square: learnable in a few epochs."""
    g = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for k in range(classes):
        base = torch.zeros(n_per_class, 1, size, size)
        base[:, :, 1 + 2 * k : 3 + 2 * k, 2:6] = 200
        images.append((base + torch.rand(base.shape, generator=g) * 40).to(torch.uint8))
        labels.append(torch.full((n_per_class,), k))
    return torch.cat(images), torch.cat(labels)


SPEC = ModelSpec(arch="small_cnn", in_channels=1, num_classes=3, image_height=8, image_width=8, width=8)
FAST = TrainConfig(epochs=4, batch_size=16, lr=0.05, device="cpu")  # the bit-for-bit claims are the CPU's


def test_auto_runtime_on_a_cpu_machine_is_fp32_without_channels_last():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    runtime = resolve_runtime("auto", "auto")
    assert runtime.device.type == "cpu" and runtime.autocast_dtype is None and not runtime.channels_last


def test_asking_for_cuda_without_one_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        resolve_runtime("cuda", "auto")


def test_training_learns_and_reports_each_epoch():
    x, y = blobs()
    seen = []
    model, history = train_classifier(
        TrainingInputs(SPEC, x, y, x, y, FAST, seed=0), on_epoch_end=seen.append, progress=False
    )
    assert [h.epoch for h in history] == [1, 2, 3, 4] and seen == history
    assert history[-1].val_accuracy > 0.9  # chance is 1/3
    assert history[-1].train_loss < history[0].train_loss


@pytest.mark.parametrize("steps", range(1, 9))
def test_any_number_of_scheduler_steps_trains(steps):
    # one batch of all 12 images an epoch: `steps` epochs are `steps` one-cycle steps; exactly 4
    # (one epoch over at most 256 images at batch 64) once divided by zero inside OneCycleLR
    x, y = blobs(n_per_class=4)
    _, history = train_classifier(
        TrainingInputs(SPEC, x, y, x, y, TrainConfig(epochs=steps, batch_size=12, lr=0.05), seed=0), progress=False
    )
    assert len(history) == steps and all(np.isfinite(h.train_loss) for h in history)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_training_shows_progress_within_each_epoch_and_logits_their_own(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    x, y = blobs(n_per_class=8)  # 24 images, batches of 8: 3 steps an epoch
    model, _ = train_classifier(TrainingInputs(SPEC, x, y, x, y, TrainConfig(epochs=2, batch_size=8, lr=0.05), seed=0))
    collect_logits(model, x, batch_size=10, progress="logits test")
    shown = terminal.getvalue()
    # drawn at least at each epoch's end (more often when slower than tqdm's redraw interval)
    assert "train epoch 1/2 batch 3/3:  50%" in shown and "train epoch 2/2 batch 3/3: 100%" in shown
    assert "48/48" in shown and "img/s" in shown  # both epochs' images, and their rate
    assert re.search(r"logits test: +\d+%\|.*\| \d+/24 ", shown)  # cleared when done: a run's log keeps train's


def test_off_a_terminal_no_bar_is_drawn(monkeypatch):
    captured = io.StringIO()
    monkeypatch.setattr(sys, "stderr", captured)
    x, y = blobs(n_per_class=8)
    model, _ = train_classifier(TrainingInputs(SPEC, x, y, x, y, TrainConfig(epochs=1, batch_size=8, lr=0.05), seed=0))
    collect_logits(model, x, progress="logits test")
    assert captured.getvalue() == ""


def test_same_seed_gives_the_same_weights():
    x, y = blobs()
    a, _ = train_classifier(TrainingInputs(SPEC, x, y, x, y, FAST, seed=5), progress=False)
    b, _ = train_classifier(TrainingInputs(SPEC, x, y, x, y, FAST, seed=5), progress=False)
    c, _ = train_classifier(TrainingInputs(SPEC, x, y, x, y, FAST, seed=6), progress=False)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not all(torch.equal(a.state_dict()[k], c.state_dict()[k]) for k in a.state_dict())


def test_cuda_code_path_bf16_autocast_and_channels_last_runs_on_cpu():
    """The GPU path's numerics (bf16 autocast, channels_last) exercised where they run: on the CPU."""
    x, y = blobs()
    runtime = Runtime(device=torch.device("cpu"), autocast_dtype=torch.bfloat16, channels_last=True)
    model, history = train_classifier(TrainingInputs(SPEC, x, y, x, y, FAST, seed=0), runtime=runtime, progress=False)
    assert all(torch.isfinite(torch.tensor(h.train_loss)) for h in history)
    assert history[-1].val_accuracy > 0.8
    # Parameters stay fp32 under autocast (only the matmuls/convs run in bf16).
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_collect_logits_uses_eval_mode_and_no_grad():
    x, y = blobs()
    model, _ = train_classifier(TrainingInputs(SPEC, x, y, x, y, FAST, seed=0), progress=False)
    model.train()  # the trap: BatchNorm in train mode would use batch statistics
    logits = collect_logits(model, x, batch_size=7)
    assert not model.training
    assert not logits.requires_grad and logits.dtype == torch.float32
    with torch.no_grad():
        expected = model.eval()(x)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_random_translate_moves_content_without_inventing_it():
    x, _ = blobs(n_per_class=8)
    g = torch.Generator().manual_seed(0)
    shifted = random_translate(x, max_shift=1, hflip=False, generator=g)
    assert shifted.shape == x.shape and shifted.dtype == torch.uint8
    assert not torch.equal(shifted, x)
    # Zero fill: a shift can only drop pixels at the border, never add intensity.
    assert (shifted.flatten(1).sum(1) <= x.flatten(1).sum(1)).all()


@pytest.mark.parametrize("arch, size, channels", [("small_cnn", 28, 1), ("resnet18", 8, 1), ("resnet18", 32, 3)])
def test_models_take_uint8_images_of_small_sizes(arch, size, channels):
    spec = ModelSpec(arch=arch, in_channels=channels, num_classes=10, image_height=size, image_width=size)
    model = build_model(spec).eval()
    images = torch.randint(0, 256, (2, channels, size, size), dtype=torch.uint8)
    assert model(images).shape == (2, 10)


def test_checkpoint_round_trip_gives_the_same_logits(tmp_path):
    x, y = blobs()
    model, _ = train_classifier(TrainingInputs(SPEC, x, y, x, y, FAST, seed=0), progress=False)
    path = save_checkpoint(tmp_path / "c.pt", model, SPEC, ["a", "b", "c"], "L")
    loaded = load_checkpoint(path)
    assert loaded.classes == ["a", "b", "c"] and loaded.image_mode == "L" and loaded.spec == SPEC
    torch.testing.assert_close(collect_logits(loaded.model, x), collect_logits(model, x))


def test_served_model_loads_the_temperature_only_calibration_state_of_older_versions(tmp_path):
    """Registered versions from before pluggable calibrators saved {"method", "temperature"} only."""
    import json

    from calibflow.metrics import calibrated_probabilities
    from calibflow.tracking.served_model import CalibratedImageClassifier, write_model_files

    x, y = blobs()
    model, _ = train_classifier(TrainingInputs(SPEC, x, y, x, y, FAST, seed=0), progress=False)
    checkpoint = save_checkpoint(tmp_path / "c.pt", model, SPEC, ["a", "b", "c"], "L")
    legacy = tmp_path / "calibration.json"
    legacy.write_text(json.dumps({"method": "temperature", "temperature": 1.7}))
    served = CalibratedImageClassifier()
    artifacts = write_model_files(checkpoint, legacy, tmp_path / "model")  # what registration stores
    served.load_context(type("Context", (), {"artifacts": artifacts})())
    images = x[:5].permute(0, 2, 3, 1).numpy()
    flow_network = load_checkpoint(checkpoint, for_inference=True).model  # as the flow reads logits
    expected = calibrated_probabilities(collect_logits(flow_network, x[:5]), 1.7).numpy()
    np.testing.assert_allclose(served.predict(None, images), expected, rtol=1e-12)


def test_validation_runs_every_val_every_epochs_and_after_the_last():
    assert [e for e in range(1, 8) if validates_after(e, 7, 3)] == [3, 6, 7]
    assert [e for e in range(1, 7) if validates_after(e, 6, 3)] == [3, 6]
    assert [e for e in range(1, 5) if validates_after(e, 4, 1)] == [1, 2, 3, 4]
    assert [e for e in range(1, 5) if validates_after(e, 4, 10)] == [4]  # longer than the run: the last only


def test_skipping_validation_leaves_the_trained_weights_bit_identical():
    """Validation reads the model under eval() and draws no random numbers: skipping it must not
    move the data order, the augmentation, BatchNorm's running statistics or any weight."""
    x, y = blobs()
    config = dataclasses.replace(FAST, epochs=7, threads=1)
    every, every_epoch = train_classifier(
        TrainingInputs(SPEC, x, y, x, y, dataclasses.replace(config, val_every=1), seed=3), progress=False
    )
    third, every_third = train_classifier(
        TrainingInputs(SPEC, x, y, x, y, dataclasses.replace(config, val_every=3), seed=3), progress=False
    )
    a, b = every.state_dict(), third.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # buffers too: running stats
    assert [h.train_loss for h in every_epoch] == [h.train_loss for h in every_third]
    assert [h.epoch for h in every_third if h.validated] == [3, 6, 7]
    assert all(h.val_accuracy is None for h in every_third if h.epoch not in (3, 6, 7))
    for epoch in (3, 6, 7):  # the same number where both validated
        assert every_third[epoch - 1].val_accuracy == every_epoch[epoch - 1].val_accuracy
    assert all(h.images_per_second > 0 for h in every_third)


def test_training_runs_on_train_threads_and_restores_the_callers_count():
    x, y = blobs(n_per_class=10)
    before = torch.get_num_threads()
    outside = 3 if before != 3 else 2
    seen = []
    try:
        torch.set_num_threads(outside)
        train_classifier(
            TrainingInputs(SPEC, x, y, x, y, dataclasses.replace(FAST, epochs=2, threads=1), seed=0),
            on_epoch_end=lambda stats: seen.append(torch.get_num_threads()),
            progress=False,
        )
        assert seen == [1, 1] and torch.get_num_threads() == outside
        train_classifier(
            TrainingInputs(SPEC, x, y, x, y, dataclasses.replace(FAST, epochs=1, threads="auto"), seed=0),
            on_epoch_end=lambda stats: seen.append(torch.get_num_threads()),
            progress=False,
        )
        assert seen[-1] == outside  # auto leaves torch's count alone

        def fail(stats):
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):  # an interrupted run restores it too
            train_classifier(
                TrainingInputs(SPEC, x, y, x, y, dataclasses.replace(FAST, epochs=2, threads=1), seed=0),
                on_epoch_end=fail,
                progress=False,
            )
        assert torch.get_num_threads() == outside
    finally:
        torch.set_num_threads(before)


def test_training_autotunes_cudnn_on_a_gpu_only_and_restores_the_setting(monkeypatch):
    """torch.backends.cudnn.benchmark is process-wide: on for a training on CUDA (the fastest
    convolution algorithm for each batch shape, as torchvision's reference trains), left as it was
    on the CPU or where the process asked for deterministic algorithms, and back to its previous
    value after a training, an interrupted one too."""
    from calibflow.training import loop
    from calibflow.training.loop import cudnn_autotune

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    with cudnn_autotune(True):
        assert torch.backends.cudnn.benchmark
    assert not torch.backends.cudnn.benchmark
    with pytest.raises(KeyboardInterrupt), cudnn_autotune(True):
        raise KeyboardInterrupt
    assert not torch.backends.cudnn.benchmark
    with cudnn_autotune(False):
        assert not torch.backends.cudnn.benchmark
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    with cudnn_autotune(True):
        assert not torch.backends.cudnn.benchmark  # a search picks by timing: not deterministic
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)  # the caller's own choice, kept
    with cudnn_autotune(False):
        assert torch.backends.cudnn.benchmark
    assert torch.backends.cudnn.benchmark
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)

    x, y = blobs()
    during = []
    inputs = TrainingInputs(SPEC, x, y, x, y, dataclasses.replace(FAST, epochs=1), seed=0)
    train_classifier(inputs, progress=False, on_epoch_end=lambda _: during.append(torch.backends.cudnn.benchmark))
    assert during == [False] and not torch.backends.cudnn.benchmark

    # A training on CUDA, on any machine: the setting its set-up finds, then a stop before it
    # touches the device (the setting is restored on the way out).
    def stop_at_set_up(inputs, runtime):
        during.append(torch.backends.cudnn.benchmark)
        raise KeyboardInterrupt

    during.clear()
    with monkeypatch.context() as patched:
        patched.setattr(loop, "set_up_training", stop_at_set_up)
        cuda = Runtime(device=torch.device("cuda"), autocast_dtype=torch.bfloat16, channels_last=True)
        with pytest.raises(KeyboardInterrupt):
            train_classifier(inputs, runtime=cuda, progress=False)
    assert during == [True] and not torch.backends.cudnn.benchmark
    if torch.cuda.is_available():
        during.clear()
        train_classifier(
            inputs,
            runtime=resolve_runtime("cuda"),
            progress=False,
            on_epoch_end=lambda _: during.append(torch.backends.cudnn.benchmark),
        )
        assert during == [True] and not torch.backends.cudnn.benchmark


def test_logits_do_not_depend_on_the_thread_count():
    """write_split_logits collects on train.threads while the served model, in `calibflow evaluate`,
    runs on torch's default: the logged numbers are reproduced exactly only if a forward pass gives
    the same logits on either count."""
    x, y = blobs()
    model, _ = train_classifier(TrainingInputs(SPEC, x, y, x, y, FAST, seed=0), progress=False)
    with intra_op_threads(1):
        one = collect_logits(model, x, batch_size=64)
    with intra_op_threads(2):
        two = collect_logits(model, x, batch_size=64)
    assert torch.equal(one, two)


def test_inference_batches_are_capped_by_input_values_not_by_image_count():
    """At 224 px a batch sized for 8x8 digits held gigabytes of activations; the cap leaves small
    images alone and the logits do not depend on the batch."""
    from calibflow.training.loop import CPU_INFERENCE_VALUES, INFERENCE_VALUES, inference_batch

    photos = torch.zeros(300, 3, 224, 224, dtype=torch.uint8)
    assert inference_batch(1024, photos, "cuda") == INFERENCE_VALUES // (3 * 224 * 224) == 111
    assert (
        inference_batch(1024, photos)
        == inference_batch(1024, photos, "cpu")
        == CPU_INFERENCE_VALUES // (3 * 224 * 224)
        == 27
    )
    assert inference_batch(1024, blobs()[0]) == 1024 and inference_batch(7, photos) == 7
    x, _ = blobs()
    model = build_model(SPEC, torch.full((1,), 0.3), torch.full((1,), 0.2))
    assert torch.allclose(collect_logits(model, x, batch_size=7), collect_logits(model, x, batch_size=120), atol=1e-6)


def test_convolutional_networks_read_channels_last_on_the_cpu_and_others_keep_the_default_format():
    from torch import nn

    from calibflow.training.models import inference_memory_format

    photos = ModelSpec("small_cnn", 3, 4, 64, 64, width=4)
    assert inference_memory_format(build_model(photos), "cpu") == torch.channels_last
    assert (
        inference_memory_format(build_model(dataclasses.replace(photos, arch="resnet18")), "cpu") == torch.channels_last
    )
    # On a GPU it has not been measured: the default format.
    assert inference_memory_format(build_model(photos), "cuda") == torch.contiguous_format
    # Most weights in Linear layers (a transformer's shape: vit_b_16 read 1.00x in channels_last).
    patches_then_mlp = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Flatten(), nn.Linear(8 * 16 * 16, 512))
    assert inference_memory_format(patches_then_mlp, "cpu") == torch.contiguous_format
    assert inference_memory_format(nn.Flatten(), "cpu") == torch.contiguous_format  # no weights at all


def test_collect_logits_reads_channels_last_and_gives_the_weights_back_as_they_were():
    from calibflow.training.models import in_memory_format

    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (10, 3, 32, 32), dtype=np.uint8))
    model = build_model(ModelSpec("small_cnn", 3, 4, 32, 32, width=4), torch.full((3,), 100.0), torch.full((3,), 50.0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        plain = model.eval()(x)
    logits = collect_logits(model, x, batch_size=4)
    assert torch.allclose(logits, plain, atol=1e-5)
    # Moved back: a checkpoint saved after it is contiguous, and the values are untouched.
    assert all(p.is_contiguous() for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # A model laid out channels_last already (the served model's members) stays so, with the same logits.
    model.to(memory_format=torch.channels_last)
    assert torch.equal(collect_logits(model, x, batch_size=4), logits)
    assert in_memory_format(model, torch.channels_last) and not all(p.is_contiguous() for p in model.parameters())


def test_a_cpu_training_keeps_a_convolutional_network_channels_last_and_others_in_the_default_format():
    from torch import nn

    from calibflow.training.models import in_memory_format, training_memory_format

    x, y = blobs()
    photos = torch.cat([x] * 3, dim=1)  # three channels: a 1-channel weight is both formats at once
    spec = dataclasses.replace(SPEC, in_channels=3)
    model, _ = train_classifier(TrainingInputs(spec, photos, y, photos, y, FAST, seed=0), progress=False)
    assert in_memory_format(model, torch.channels_last) and not all(p.is_contiguous() for p in model.parameters())
    patches_then_mlp = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Flatten(), nn.Linear(8 * 16 * 16, 512))
    assert training_memory_format(patches_then_mlp, "cpu") == torch.contiguous_format
    # On a GPU every network trains channels_last (tensor cores read NHWC).
    assert training_memory_format(patches_then_mlp, "cuda") == training_memory_format(model, "cuda")
    assert training_memory_format(model, "cuda") == torch.channels_last


def test_validation_reads_the_same_logits_from_a_model_loaded_from_a_file():
    """A model loaded from a checkpoint comes back contiguous, and validation must still read it as
    the training did (channels_last), to the last bit, and hand it back as it came. One input
    channel is where the layouts part: its images are both formats at once, so the weights' layout
    picks oneDNN's convolution."""
    from calibflow.training.loop import validation_logits

    x, y = blobs()
    trained, _ = train_classifier(TrainingInputs(SPEC, x, y, x, y, FAST, seed=0), progress=False)
    loaded = build_model(SPEC)
    loaded.load_state_dict(trained.state_dict())
    assert all(p.is_contiguous() for p in loaded.parameters())
    runtime = resolve_runtime("cpu", "fp32")
    assert torch.equal(validation_logits(loaded, x, runtime), validation_logits(trained, x, runtime))
    assert all(p.is_contiguous() for p in loaded.parameters())
    with torch.no_grad():  # read in the default layout, the numbers differ in their last bits
        contiguous = loaded.eval()(x.contiguous(memory_format=torch.channels_last))
    assert not torch.equal(contiguous, validation_logits(trained, x, runtime))
    assert torch.allclose(contiguous, validation_logits(trained, x, runtime), atol=1e-5)


def _with_running_statistics(model, seed=0):
    """BatchNorm statistics of a trained network's scale (an untrained one's are 0 and 1, which
    folding leaves nearly as they were)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.1)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18", "mobilenet_v3_small"])
def test_a_network_prepared_for_inference_folds_every_batch_norm_into_its_convolution(arch):
    import copy

    from calibflow.training.models import in_memory_format, prepare_for_inference

    spec = ModelSpec(arch, 3, 5, 64, 64, width=4)
    model = _with_running_statistics(build_model(spec, torch.full((3,), 100.0), torch.full((3,), 50.0)))
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (6, 3, 64, 64), dtype=np.uint8))
    with torch.no_grad():
        plain = model(x)
    prepared = prepare_for_inference(copy.deepcopy(model), "cpu")
    assert norms > 0 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in prepared.modules())
    assert sum(isinstance(m, torch.nn.Identity) for m in prepared.modules()) >= norms
    assert in_memory_format(prepared, torch.channels_last) and not prepared.training
    batch = x.contiguous(memory_format=torch.channels_last)  # as collect_logits hands it to the network
    sent = batch.clone()
    with torch.no_grad():
        direct = prepared(batch)
    assert torch.equal(batch, sent)  # normalized on a float copy, never in the caller's batch
    folded = collect_logits(prepared, x)
    assert torch.equal(folded, direct)
    assert not torch.equal(folded, plain)  # the last bits move
    torch.testing.assert_close(folded, plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_a_prepared_network_normalizes_uint8_batches_to_the_bits_registered_versions_were_read_with(layout):
    """The served model and `calibflow evaluate` reproduce a version's recorded logits only if the
    network's input is the same bits: a uint8 batch times the float 1/(255 std), minus mean/std."""
    from calibflow.training.models import prepare_for_inference

    spec = ModelSpec("small_cnn", 3, 4, 32, 32, width=4)
    mean, std = torch.tensor([120.0, 101.5, 77.25]), torch.tensor([61.0, 55.5, 70.125])
    prepared = prepare_for_inference(build_model(spec, mean, std), "cpu")
    seen = []
    prepared.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    x = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8))
    with torch.no_grad():
        prepared(x.contiguous(memory_format=layout))
    expected = (x * (1.0 / (255.0 * prepared.std))).sub_(prepared.mean / prepared.std)
    assert seen[0].dtype == torch.float32 and torch.equal(seen[0], expected)
    assert seen[0].is_contiguous(memory_format=layout)


def test_folding_leaves_a_batch_norm_whose_convolution_feeds_another_layer_too_and_an_untraceable_network():
    from torch import nn

    from calibflow.training.models import ImageClassifier, prepare_for_inference

    class SkipAroundNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm, self.conv2, self.norm2 = (
                nn.Conv2d(3, 4, 3),
                nn.BatchNorm2d(4),
                nn.Conv2d(4, 4, 1),
                nn.BatchNorm2d(4),
            )
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

        def forward(self, x):
            y = self.conv(x)
            z = self.norm(y) + y  # the conv's output is read twice: folding would change the sum
            return self.head(self.norm2(self.conv2(z)))

    class Untraceable(SkipAroundNorm):
        def forward(self, x):
            if x.sum() > 0:  # a branch on the input's values: fx cannot trace it
                x = x * 1.0
            return self.head(self.norm2(self.conv2(self.norm(self.conv(x)))))

    x = torch.rand(3, 3, 12, 12)
    for backbone, kept in ((SkipAroundNorm(), {"norm"}), (Untraceable(), {"norm", "norm2"})):
        model = _with_running_statistics(ImageClassifier(backbone, torch.zeros(3), torch.ones(3)))
        with torch.no_grad():
            plain = model(x)
            prepared = prepare_for_inference(model, "cpu")
            torch.testing.assert_close(prepared(x), plain, rtol=1e-4, atol=1e-5)
        left = {name.removeprefix("backbone.") for name, m in prepared.named_modules() if isinstance(m, nn.BatchNorm2d)}
        assert left == kept


def test_a_checkpoint_records_its_folds_and_one_from_before_them_is_traced_at_load(tmp_path, monkeypatch):
    import torch.fx

    from calibflow.training.models import batch_norm_folds

    x, y = blobs()
    model, _ = train_classifier(TrainingInputs(SPEC, x, y, x, y, FAST, seed=0), progress=False)
    path = save_checkpoint(tmp_path / "c.pt", model, SPEC, ["a", "b", "c"], "L")
    record = torch.load(path, weights_only=True)
    assert record["folds"] == batch_norm_folds(model) and len(record["folds"]) == 5  # small_cnn's 5 conv-BN pairs
    expected = collect_logits(load_checkpoint(path, for_inference=True).model, x)
    del record["folds"]  # a checkpoint saved before folds were recorded
    torch.save(record, tmp_path / "old.pt")
    assert torch.equal(collect_logits(load_checkpoint(tmp_path / "old.pt", for_inference=True).model, x), expected)

    traced, trace = [], torch.fx.symbolic_trace

    def counted_trace(*args, **kwargs):
        traced.append(1)
        return trace(*args, **kwargs)

    monkeypatch.setattr(torch.fx, "symbolic_trace", counted_trace)
    assert torch.equal(collect_logits(load_checkpoint(path, for_inference=True).model, x), expected)
    assert not traced  # the recorded folds: no trace at load
    load_checkpoint(tmp_path / "old.pt", for_inference=True)
    assert traced


def test_mc_dropout_reads_a_network_prepared_for_inference_through_its_head():
    import copy

    from calibflow.training.ensembles import mc_dropout_logits
    from calibflow.training.models import prepare_for_inference

    spec = ModelSpec("small_cnn", 3, 4, 16, 16, width=4, dropout=0.3)
    model = _with_running_statistics(build_model(spec, torch.full((3,), 100.0), torch.full((3,), 50.0)))
    x = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (20, 3, 16, 16), dtype=np.uint8))
    plain = mc_dropout_logits(model, x, samples=8, seed=3)
    folded = mc_dropout_logits(prepare_for_inference(copy.deepcopy(model), "cpu"), x, samples=8, seed=3)
    assert folded.shape == plain.shape == (20, 4)
    torch.testing.assert_close(folded, plain, rtol=1e-4, atol=1e-5)


def test_inference_layout_gives_the_weights_back_in_the_format_they_came_in():
    """A CUDA training leaves its model channels_last; logits read in the default format there
    must not hand it back contiguous (the device string alone decides the format: nothing moves)."""
    from calibflow.training.loop import inference_layout
    from calibflow.training.models import in_memory_format

    model = build_model(ModelSpec("small_cnn", 3, 4, 32, 32, width=4)).to(memory_format=torch.channels_last)
    with inference_layout(model, "cuda") as memory_format:
        assert memory_format == torch.contiguous_format and all(p.is_contiguous() for p in model.parameters())
    assert in_memory_format(model, torch.channels_last) and not all(p.is_contiguous() for p in model.parameters())


def test_a_long_inference_pass_gives_freed_memory_back_and_a_short_one_does_not(tmp_path, monkeypatch):
    """collect_logits calls malloc_trim every TRIM_EVERY_BATCHES batches (glibc keeps what forward
    passes free), never in a pass shorter than that (a served request, a cell of the suite)."""
    import platform

    from calibflow.training import loop
    from tests.conftest import untrained_model

    model = untrained_model(tmp_path)
    trims = []
    real_release = loop.release_freed_memory
    monkeypatch.setattr(loop, "release_freed_memory", lambda: trims.append(1) or real_release())
    monkeypatch.setattr(loop, "TRIM_EVERY_BATCHES", 4)
    long_pass = loop.collect_logits(model.network, model.images[:18], batch_size=2)  # 9 batches
    assert len(trims) == 2
    trims.clear()
    short_pass = loop.collect_logits(model.network, model.images[:6], batch_size=2)  # 3 batches
    assert trims == [] and torch.equal(short_pass, long_pass[:6])
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert loop._malloc_trim() is not None  # the real trim ran above


def test_the_tracked_training_curves_hold_results_only_so_a_rerun_writes_them_again_byte_for_byte(tmp_path):
    """reports/plots/train.csv and val.csv are committed with the change that produced them: a
    rerun of the same training, which differs only in how fast it went, must leave git clean."""
    from calibflow.pipeline.model_steps import write_training_curves
    from calibflow.training.loop import EpochStats

    def history(speed: float) -> list[EpochStats]:
        return [
            EpochStats(1, 2.25, None, 0.01, speed),
            EpochStats(2, 1.5, 0.75, 0.05, speed * 1.1, val_nll=0.9, val_ece=0.08),
        ]

    written = []
    for run, speed in (("first", 3900.7), ("rerun", 4648.5)):
        (tmp_path / run).mkdir()
        train, val = write_training_curves(history(speed), tmp_path / run)
        written.append((Path(train).read_bytes(), Path(val).read_bytes()))
    assert written[0] == written[1]
    train_csv, val_csv = (text.decode().splitlines() for text in written[0])
    assert train_csv == ["epoch,loss,learning_rate", "1,2.25,0.01", "2,1.5,0.05"]
    assert val_csv == ["epoch,accuracy,nll,ece", "2,0.75,0.9,0.08"]
