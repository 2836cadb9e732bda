"""model.arch: any torchvision classification model by name (calibflow/training/models.py), its
stem by image size, 1-channel input, pretrained weights by name from torch hub's cache (a fake
one here: nothing is downloaded), and the fine-tuning knobs. docs/models.md describes them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from calibflow import errors
from calibflow.config import TrainConfig, load_config
from calibflow.errors import ConfigError
from calibflow.training.loop import TrainingInputs, resolve_runtime, set_up_training, train_classifier
from calibflow.training.models import (
    ModelSpec,
    build_model,
    first_conv,
    head_parameter_names,
    hub_weights_file,
    load_checkpoint,
    load_pretrained_weights,
    pretrained_weights_file,
    save_checkpoint,
)


def forward(spec: ModelSpec, batch: int = 2) -> torch.Tensor:
    model = build_model(spec).eval()
    images = torch.randint(0, 256, (batch, spec.in_channels, spec.image_height, spec.image_width), dtype=torch.uint8)
    with torch.no_grad():
        return model(images)


@pytest.mark.parametrize(
    "arch, size",
    [
        ("resnet50", 64),
        ("efficientnet_b0", 64),
        ("mobilenet_v3_large", 64),
        ("convnext_tiny", 64),
        ("vit_b_16", 64),  # 4 x 4 patches of 16 px
    ],
)
def test_torchvision_archs_build_and_predict_with_the_imagenet_stem(arch, size):
    spec = ModelSpec(arch, 3, 7, size, size)
    assert spec.stem == "imagenet"
    assert forward(spec).shape == (2, 7)


@pytest.mark.parametrize("arch", ["resnet50", "efficientnet_b0", "mobilenet_v3_large", "wide_resnet50_2"])
def test_small_images_get_the_small_stem_where_the_family_has_one(arch):
    spec = ModelSpec(arch, 3, 4, 16, 16)
    assert spec.stem == "small"
    name, conv = first_conv(build_model(spec).backbone)
    assert conv.stride == (1, 1), name
    assert forward(spec).shape == (2, 4)


def test_the_resnet_small_stem_is_the_cifar_stem_and_resnet18_keeps_its_keys():
    backbone = build_model(ModelSpec("resnet18", 1, 10, 32, 32)).backbone
    assert backbone.conv1.kernel_size == (3, 3) and backbone.conv1.stride == (1, 1)
    assert isinstance(backbone.maxpool, nn.Identity)
    # the keys of resnet18 checkpoints saved before this module knew other archs
    assert backbone.conv1.weight.shape == (64, 1, 3, 3) and "fc.weight" in backbone.state_dict()
    # from 64 px up, the ImageNet stem
    big = build_model(ModelSpec("resnet18", 3, 10, 64, 64)).backbone
    assert big.conv1.kernel_size == (7, 7) and isinstance(big.maxpool, nn.MaxPool2d)


def test_a_record_from_before_stems_rebuilds_resnet18_with_the_small_stem_at_any_size():
    old = {"arch": "resnet18", "in_channels": 3, "num_classes": 3, "image_height": 96, "image_width": 96}
    assert ModelSpec.from_record(old).stem == "small"
    assert ModelSpec.from_record({**old, "arch": "resnet50"}).stem == "imagenet"
    assert ModelSpec.from_record({**old, "stem": "imagenet"}).stem == "imagenet"


@pytest.mark.parametrize(
    "arch, size, needs",
    [
        ("convnext_tiny", 32, "at least 64x64 px"),
        ("vit_b_16", 32, "at least 64x64 px"),
        ("vit_b_16", 72, "multiple of 16"),
        ("inception_v3", 64, "at least 75x75 px"),
        ("maxvit_t", 64, "multiples of 224"),
    ],
)
def test_a_size_an_arch_cannot_take_is_refused_with_what_it_needs(arch, size, needs):
    with pytest.raises(ConfigError, match=needs) as refused:
        build_model(ModelSpec(arch, 3, 3, size, size))
    assert "data.image_size" in str(refused.value)  # what sets the size


def test_an_arch_that_cannot_read_the_images_is_refused_by_the_run_s_settings_check(tmp_path):
    """Before training (and the gate-power simulation), not when train-model builds the network."""
    from PIL import Image

    from calibflow.pipeline.data_steps import write_manifest
    from calibflow.pipeline.model_steps import check_network

    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (48, 48), (40 * i, 90, 30)).save(tmp_path / "data" / label / f"{i}.png")
    manifest = write_manifest(str(tmp_path / "data"), str(tmp_path / "manifest.csv"))
    with pytest.raises(ConfigError, match="vit_b_16 needs images of at least 64x64 px") as refused:
        check_network(None, manifest, load_config(None, ["model.arch=vit_b_16"]))
    assert "these are 48x48" in str(refused.value) and "data.image_size" in str(refused.value)
    check_network(None, manifest, load_config(None, ["model.arch=vit_b_16", "data.image_size=64"]))


@pytest.mark.parametrize("arch, size", [("resnet50", 16), ("efficientnet_b0", 64), ("vit_b_16", 64)])
def test_one_channel_images_get_a_one_channel_first_conv(arch, size):
    spec = ModelSpec(arch, 1, 3, size, size)
    _, conv = first_conv(build_model(spec).backbone)
    assert conv.in_channels == 1
    assert forward(spec).shape == (2, 3)


def test_an_unknown_arch_is_refused_with_close_matches():
    with pytest.raises(ConfigError, match=r"model.arch = 'efficientnet_b9'.*close matches: .*efficientnet_b"):
        load_config(None, ["model.arch=efficientnet_b9"])
    with pytest.raises(ConfigError, match=r"must be one of.*resnet50"):
        load_config(None, ["model.arch=resnet05"])
    assert load_config(None, ["model.arch=convnext_tiny"]).model.arch == "convnext_tiny"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.backbone_lr_factor=0", r"must be in \(0, 1\]"),
        ("train.backbone_lr_factor=1.5", r"must be in \(0, 1\]"),
        ("model.pretrained=IMAGENET9K", "has the weights IMAGENET1K_V1"),
    ],
)
def test_bad_fine_tuning_values_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.arch=resnet18", override])


def test_pretrained_needs_a_torchvision_arch_and_excludes_weights_path():
    with pytest.raises(ConfigError, match="small_cnn has no torchvision weights"):
        load_config(None, ["model.pretrained=DEFAULT"])
    with pytest.raises(ConfigError, match="set one"):
        load_config(None, ["model.arch=resnet18", "model.pretrained=DEFAULT", "model.weights_path=w.pt"])


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache of this test's own (TORCH_HOME)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def fake_hub_file(arch: str, name: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """torchvision's `arch` with 1000 classes and random weights, saved where torch hub keeps `name`."""
    import torchvision.models

    torch.manual_seed(seed)
    state = torchvision.models.get_model(arch, weights=None).state_dict()
    path = hub_weights_file(arch, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def test_pretrained_by_name_loads_the_hub_file_and_replaces_the_head(hub):
    state = fake_hub_file("mobilenet_v3_small", "DEFAULT")
    config = load_config(None, ["model.arch=mobilenet_v3_small", "model.pretrained=DEFAULT"])
    path = pretrained_weights_file(config.model.arch, config.model.pretrained)
    assert path.parent == hub and path.name.startswith("mobilenet_v3_small-")
    model = build_model(ModelSpec("mobilenet_v3_small", 3, 5, 64, 64))
    load_pretrained_weights(model, path, "mobilenet_v3_small")
    loaded = model.backbone.state_dict()
    head = {"classifier.3.weight", "classifier.3.bias"}
    assert loaded["classifier.3.weight"].shape == (5, 1024)  # the head, for 5 classes, at its initial values
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if k not in head)
    assert not torch.equal(loaded["classifier.3.weight"][:5], state["classifier.3.weight"][:5])


def test_weights_of_another_width_are_refused_naming_the_mismatch_not_half_loaded(tmp_path):
    narrow = ModelSpec("small_cnn", 1, 3, 8, 8, width=4)
    path = tmp_path / "narrow.pt"
    torch.save(build_model(narrow).state_dict(), path)
    with pytest.raises(ConfigError, match=r"size mismatch for \d+ tensors outside the classifier head and the stem"):
        load_pretrained_weights(build_model(ModelSpec("small_cnn", 1, 3, 8, 8, width=8)), path, "small_cnn")
    # another class count differs in the head alone: loaded, the head left at its initial values
    load_pretrained_weights(build_model(ModelSpec("small_cnn", 1, 5, 8, 8, width=4)), path, "small_cnn")


def test_calibflows_own_rgb_weights_on_gray_images_average_their_channel_statistics(tmp_path):
    """A calibflow state dict carries the normalisation it trained with (mean, std per channel):
    on gray images those are averaged over RGB, while the first conv's kernels are summed."""
    rgb = build_model(
        ModelSpec("small_cnn", 3, 3, 8, 8, width=4), torch.tensor([0.2, 0.5, 0.8]), torch.tensor([0.1, 0.2, 0.3])
    )
    path = tmp_path / "rgb.pt"
    torch.save(rgb.state_dict(), path)
    gray = build_model(ModelSpec("small_cnn", 1, 3, 8, 8, width=4))
    load_pretrained_weights(gray, path, "small_cnn")
    assert gray.mean.flatten().tolist() == pytest.approx([0.5]) and gray.std.flatten().tolist() == pytest.approx([0.2])
    first = next(k for k, v in rgb.backbone.state_dict().items() if v.dim() == 4)
    torch.testing.assert_close(gray.backbone.state_dict()[first], rgb.backbone.state_dict()[first].sum(1, keepdim=True))


def test_pretrained_rgb_kernels_are_summed_for_one_channel_images(hub):
    state = fake_hub_file("resnet50", "IMAGENET1K_V2")
    model = build_model(ModelSpec("resnet50", 1, 3, 64, 64))
    load_pretrained_weights(model, pretrained_weights_file("resnet50", "IMAGENET1K_V2"), "resnet50")
    torch.testing.assert_close(model.backbone.conv1.weight, state["conv1.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(model.backbone.layer4[2].conv3.weight, state["layer4.2.conv3.weight"])


def test_vit_position_embeddings_are_interpolated_to_the_image_size(hub):
    state = fake_hub_file("vit_b_16", "IMAGENET1K_V1")  # 224 px: 14 x 14 patches
    model = build_model(ModelSpec("vit_b_16", 3, 3, 64, 64))
    load_pretrained_weights(model, pretrained_weights_file("vit_b_16", "IMAGENET1K_V1"), "vit_b_16")
    assert model.backbone.encoder.pos_embedding.shape == (1, 1 + 4 * 4, 768)
    assert torch.equal(model.backbone.conv_proj.weight, state["conv_proj.weight"])


def test_an_absent_hub_file_is_a_config_error_naming_the_path_and_exit_2(hub):
    with pytest.raises(ConfigError) as refused:
        pretrained_weights_file("resnet50", "IMAGENET1K_V2")
    message = str(refused.value)
    assert str(hub / "resnet50-11ad3fa6.pth") in message
    assert "https://download.pytorch.org/models/resnet50-11ad3fa6.pth" in message and "nothing is downloaded" in message
    assert errors.policy_of(refused.value).exit_code == 2
    assert not hub.exists()  # nothing fetched


def tiny_inputs(spec: ModelSpec, config: TrainConfig) -> TrainingInputs:
    torch.manual_seed(0)
    x = torch.randint(0, 256, (16, spec.in_channels, spec.image_height, spec.image_width), dtype=torch.uint8)
    y = torch.arange(16) % spec.num_classes
    return TrainingInputs(spec, x, y, x[:4], y[:4], config, seed=0)


SMALL_MOBILENET = ModelSpec("mobilenet_v3_small", 1, 3, 16, 16)
FEW_STEPS = TrainConfig(epochs=1, batch_size=8, lr=0.1, augment=False, val_every=1, device="cpu")


def test_freeze_backbone_trains_the_head_alone():
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in build_model(SMALL_MOBILENET).named_parameters()}
    config = dataclasses.replace(FEW_STEPS, freeze_backbone=True)
    model, _ = train_classifier(tiny_inputs(SMALL_MOBILENET, config), progress=False)
    head = head_parameter_names(model, 3)
    assert head == {"backbone.classifier.3.weight", "backbone.classifier.3.bias"}
    after = dict(model.named_parameters())
    assert all(torch.equal(after[k], v) for k, v in before.items() if k not in head)
    assert all(not torch.equal(after[k], before[k]) for k in head)


def test_backbone_lr_factor_is_a_parameter_group_at_lr_times_factor():
    config = dataclasses.replace(FEW_STEPS, backbone_lr_factor=0.1)
    training = set_up_training(tiny_inputs(SMALL_MOBILENET, config), resolve_runtime("cpu", "fp32"))
    head, backbone = training.optimizer.param_groups
    assert (head["max_lr"], backbone["max_lr"]) == pytest.approx((0.1, 0.01))
    assert len(head["params"]) == 2
    assert len(backbone["params"]) == len(list(training.model.parameters())) - 2
    # without fine-tuning knobs, one group as before
    training = set_up_training(tiny_inputs(SMALL_MOBILENET, FEW_STEPS), resolve_runtime("cpu", "fp32"))
    assert len(training.optimizer.param_groups) == 1


def test_a_torchvision_arch_checkpoint_rebuilds_the_same_network(tmp_path):
    spec = ModelSpec("efficientnet_b0", 1, 3, 16, 16, dropout=0.2)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    path = save_checkpoint(tmp_path / "model.pt", model, spec, ["a", "b", "c"], "L")
    loaded = load_checkpoint(path)
    assert loaded.spec == spec
    images = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(loaded.model(images), model(images))


def test_dropout_on_a_torchvision_arch_is_the_head_mc_dropout_samples():
    from calibflow.training.ensembles import mc_dropout_logits

    model = build_model(ModelSpec("efficientnet_b0", 1, 3, 16, 16, dropout=0.3))
    images = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    assert mc_dropout_logits(model, images, samples=3, seed=0).shape == (4, 3)
    with pytest.raises(ConfigError, match="not a Linear"):
        build_model(ModelSpec("squeezenet1_1", 3, 3, 64, 64, dropout=0.3))


MODEL = "tiny-digits"
CALIBFLOW = str(Path(sys.executable).parent / "calibflow")
FRESH_PROCESS_PREDICT = """
import json, sys
import mlflow, numpy as np
from calibflow.tracking import store
store.configure_tracking(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
print(json.dumps(np.asarray(model.predict(images)).tolist()))
"""


@pytest.mark.e2e
def test_a_torchvision_arch_trains_registers_and_a_fresh_process_serves_it(tiny_repo):
    from mlflow import MlflowClient

    from calibflow.tracking import store

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("MLFLOW_TRACKING_URI", None)
    # resnet34 through the registry (not resnet18's old path), with the small stem and a 1-channel
    # first conv. A few epochs of small batches: fewer leave logits with no information to calibrate.
    # (mobilenet_v3's BatchNorm momentum of 0.01 leaves its eval-mode statistics far behind after
    # the ~40 steps of this run: its eval predictions are constant; docs/models.md.)
    overrides = ["model.arch=resnet34", "train.epochs=4", "train.batch_size=16", "train.lr=0.01", "train.val_every=4"]
    overrides += ["gates.min_accuracy=0", "gates.max_ece=1"]
    sets = [arg for override in overrides for arg in ("--set", override)]
    done = subprocess.run(
        [CALIBFLOW, "run", "--repo", str(tiny_repo), *sets], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    client = (store.configure_tracking(tiny_repo), MlflowClient())[1]
    [version] = client.search_model_versions(f"name='{MODEL}'")
    assert client.get_run(version.run_id).data.params["model.arch"] == "resnet34"
    served = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_PREDICT, str(tiny_repo), f"models:/{MODEL}/{version.version}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tiny_repo,
    )
    assert served.returncode == 0, served.stderr[-3000:]
    probabilities = torch.tensor(json.loads(served.stdout.strip().splitlines()[-1]))
    assert probabilities.shape == (3, 5)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(3, dtype=probabilities.dtype))


def test_an_absent_hub_file_is_refused_before_training_by_the_run_s_settings_check(hub):
    from calibflow.pipeline.data_steps import check_run_settings

    config = load_config(
        Path(__file__).resolve().parents[1] / "params.yaml", ["model.arch=resnet50", "model.pretrained=IMAGENET1K_V2"]
    )
    with pytest.raises(ConfigError, match="resnet50-11ad3fa6.pth"):
        check_run_settings(config, tuple("0123456789"), {"train": 500, "val": 100, "calibration": 200, "test": 720})


def test_a_registered_ensembles_weights_start_from_its_first_member(tmp_path):
    """docs/models.md: a registered version's weights.pt is used as it is; an ensemble's holds
    {"members": [state dict, ...]}, and the network starts from the first."""
    spec = ModelSpec("small_cnn", 1, 3, 8, 8, width=4)
    torch.manual_seed(0)
    first, second = build_model(spec), build_model(spec)
    path = tmp_path / "weights.pt"
    torch.save({"members": [first.state_dict(), second.state_dict()]}, path)
    model = build_model(spec)
    load_pretrained_weights(model, path, "small_cnn")
    assert all(torch.equal(v, first.state_dict()[k]) for k, v in model.state_dict().items())


def test_another_architectures_file_is_refused_naming_model_arch(tmp_path):
    import torchvision.models

    path = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.get_model("resnet18", weights=None).state_dict(), path)
    with pytest.raises(ConfigError) as refused:
        load_pretrained_weights(build_model(ModelSpec("small_cnn", 1, 3, 8, 8, width=4)), path, "small_cnn")
    assert "model.arch small_cnn" in str(refused.value) and "Sequential" not in str(refused.value)


@pytest.mark.parametrize("content", [b"not a torch file", None])
def test_a_weights_file_torch_cannot_read_as_a_state_dict_is_a_config_error(tmp_path, content):
    path = tmp_path / "odd.pt"
    if content is None:
        torch.save([1, 2, 3], path)  # read, but no state dict
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=str(path)) as refused:
        load_pretrained_weights(build_model(ModelSpec("small_cnn", 1, 3, 8, 8, width=4)), path, "small_cnn")
    assert errors.policy_of(refused.value).exit_code == 2


def test_a_relative_weights_path_is_read_from_the_repository_and_a_missing_one_refused(tmp_path, monkeypatch):
    from calibflow.pipeline.model_steps import initial_weights

    repo, elsewhere = tmp_path / "repo", tmp_path / "elsewhere"
    (repo / "weights").mkdir(parents=True)
    elsewhere.mkdir()
    torch.save(build_model(ModelSpec("small_cnn", 1, 3, 8, 8, width=4)).state_dict(), repo / "weights" / "init.pt")
    monkeypatch.chdir(elsewhere)  # the repository, not the current directory
    config = load_config(None, ["model.weights_path=weights/init.pt"])
    found = initial_weights(config, repo)
    assert found.path == str((repo / "weights" / "init.pt").resolve())
    assert found.sha256 == hashlib.sha256((repo / "weights" / "init.pt").read_bytes()).hexdigest()
    assert initial_weights(load_config(None, []), repo) is None  # the seeded initialisation: no file

    with pytest.raises(ConfigError) as refused:
        initial_weights(load_config(None, ["model.weights_path=weights/missing.pt"]), repo)
    assert str(repo / "weights" / "missing.pt") in str(refused.value) and "does not exist" in str(refused.value)
    assert errors.policy_of(refused.value).exit_code == 2


def test_a_pretrained_files_digest_is_of_its_bytes(hub):
    from calibflow.pipeline.model_steps import initial_weights

    fake_hub_file("mobilenet_v3_small", "DEFAULT", seed=1)
    config = load_config(None, ["model.arch=mobilenet_v3_small", "model.pretrained=DEFAULT"])
    before = initial_weights(config, ".")
    fake_hub_file("mobilenet_v3_small", "DEFAULT", seed=2)  # the same name, other weights
    after = initial_weights(config, ".")
    assert before.path == after.path and before.sha256 != after.sha256


def test_weights_replaced_after_the_run_hashed_them_are_refused_not_trained_from(tmp_path, capsys):
    """The run records the initial weights' sha256 (its tags, the same-build skip, the resume key):
    the settings check and the training read the file once each and refuse other bytes, naming it,
    rather than train from weights the records do not name."""
    from PIL import Image

    from calibflow.pipeline.data_steps import write_manifest
    from calibflow.pipeline.model_steps import check_network, initial_weights

    for label in ("a", "b", "c"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (16, 16), 40 * i).save(tmp_path / "data" / label / f"{i}.png")
    manifest = write_manifest(str(tmp_path / "data"), str(tmp_path / "manifest.csv"))
    config = load_config(None, ["model.arch=mobilenet_v3_small", "model.weights_path=init.pt"])
    torch.manual_seed(1)
    torch.save(build_model(SMALL_MOBILENET).state_dict(), tmp_path / "init.pt")
    initial = initial_weights(config, tmp_path)
    check_network(initial, manifest, config)
    assert capsys.readouterr().out == ""  # what the file leaves at its initial values is told once, by the training
    inputs = dataclasses.replace(
        tiny_inputs(SMALL_MOBILENET, FEW_STEPS), weights_path=initial.path, weights_sha256=initial.sha256
    )
    started = set_up_training(inputs, resolve_runtime("cpu")).model.state_dict()
    saved = torch.load(tmp_path / "init.pt", weights_only=True)
    assert torch.equal(
        started["backbone.features.0.0.weight"], saved["backbone.features.0.0.weight"]
    )  # the file's bytes
    torch.manual_seed(2)
    torch.save(build_model(SMALL_MOBILENET).state_dict(), tmp_path / "init.pt")  # replaced mid-run
    with pytest.raises(ConfigError, match="changed while the run used them") as refused:
        check_network(initial, manifest, config)
    assert initial.path in str(refused.value) and errors.policy_of(refused.value).exit_code == 2
    with pytest.raises(ConfigError, match=initial.sha256[:12]):
        train_classifier(inputs, progress=False)
