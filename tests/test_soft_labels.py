"""Soft labels (data.soft_labels, train.targets): the CSV checked by Great Expectations before
anything trains, and a training on each image's distribution, or on a class drawn from it each
epoch."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from calibflow.config import ConfigError, TrainConfig, load_config
from calibflow.data.soft_labels import read_soft_labels, soft_targets, validate_soft_labels
from calibflow.errors import ManifestError
from calibflow.training.loop import TrainingInputs, sample_labels, train_classifier
from calibflow.training.models import ModelSpec

CLASSES = ["a", "b", "c"]
MANIFEST = pd.DataFrame(
    {
        "path": ["a/1.png", "a/2.png", "b/3.png", "b/4.png", "c/5.png"],
        "label": ["a", "a", "b", "b", "c"],
    }
)
GOOD = """path,a,b,c
a/1.png,0.7,0.3,0
a/2.png,3,1,0
b/3.png,0.5,0.5,0
b/4.png,0,1,0
c/5.png,0.2,0.2,0.6
"""


def table(text: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)


def check(text: str, agreement: str = "argmax"):
    return validate_soft_labels(table(text), MANIFEST, CLASSES, tolerance=1e-3, agreement=agreement)


def test_probabilities_and_annotator_counts_pass_and_are_read_in_the_manifests_order():
    report = check(GOOD)
    assert report.success, report.summary()
    targets = soft_targets(table(GOOD), MANIFEST.iloc[[4, 1, 2]], CLASSES, 1e-3)
    np.testing.assert_allclose(targets, [[0.2, 0.2, 0.6], [0.75, 0.25, 0.0], [0.5, 0.5, 0.0]], rtol=1e-6)
    assert targets.dtype == np.float32


@pytest.mark.parametrize(
    "change, check_name, example",
    [
        (("a/2.png,3,1,0\n", ""), "every image has a row", "a/2.png"),
        (("c/5.png,0.2,0.2,0.6\n", "c/5.png,0.2,0.2,0.6\nc/9.png,0,0,1\n"), "every row names an image", "c/9.png"),
        (("b/4.png,0,1,0\n", "b/4.png,0,1,0\nb/4.png,0,1,0\n"), "each image has one row", "b/4.png"),
        (("b/4.png,0,1,0", "b/4.png,-0.5,1.5,0"), "every value is a non-negative number", "b/4.png"),
        (("b/4.png,0,1,0", "b/4.png,0,one,0"), "every value is a non-negative number", "b/4.png"),
        (("c/5.png,0.2,0.2,0.6", "c/5.png,0.2,0.2,0.5"), "every row sums to 1", "c/5.png"),
        (("a/2.png,3,1,0", "a/2.png,0,0,0"), "every row sums to 1", "a/2.png"),
        (("a/1.png,0.7,0.3,0", "a/1.png,0.3,0.7,0"), "folder is among its row's most probable", "a/1.png"),
    ],
)
def test_each_kind_of_bad_row_is_refused_with_its_count_and_an_example(change, check_name, example):
    report = check(GOOD.replace(*change))
    assert not report.success
    assert len(report.failures) == 1, report.summary()  # one bad row fails one check
    failure = report.failures[0]
    assert check_name in failure.check and example in failure.describe()
    assert failure.unexpected_count >= 1 and failure.element_count is not None


def test_a_tie_for_the_most_probable_class_agrees_with_either_folder_and_agreement_none_checks_nothing():
    assert check(GOOD.replace("b/3.png,0.5,0.5,0", "b/3.png,0.5,0.5,0")).success
    disagreeing = GOOD.replace("a/1.png,0.7,0.3,0", "a/1.png,0.3,0.7,0")
    assert check(disagreeing, agreement="none").success


def test_columns_that_are_not_the_class_folders_are_named_once():
    report = check(GOOD.replace("path,a,b,c", "path,a,b,d"))
    assert [f.column for f in report.failures] == ["columns_are_classes"]
    text = report.failures[0].describe()
    assert "no column for c" in text and "not class folders: d" in text


def test_a_missing_csv_or_one_without_a_path_column_is_one_line_naming_it(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        read_soft_labels(tmp_path / "soft.csv", CLASSES)
    (tmp_path / "soft.csv").write_text("file,a,b,c\na/1.png,1,0,0\n")
    with pytest.raises(ManifestError, match="first column of the header must be `path`"):
        read_soft_labels(tmp_path / "soft.csv", CLASSES)


@pytest.mark.parametrize(
    "overrides, problem",
    [
        (["train.targets=soft"], "needs data.soft_labels"),
        (["data.soft_labels=../soft.csv"], "at the root of data.path"),
        (["data.soft_labels=sub/soft.csv"], "at the root of data.path"),
        (["data.soft_label_tolerance=0"], "data.soft_label_tolerance"),
    ],
)
def test_soft_label_settings_that_cannot_work_are_refused_by_name(overrides, problem):
    with pytest.raises(ConfigError, match=problem):
        load_config(None, overrides)


def test_sampled_labels_follow_each_images_distribution():
    """A known truth: 20,000 draws of one row (0.3, 0.7): the share of class 1 lies in its 99.9%
    Wilson interval around 0.7's draw, and a one-hot row always gives its class."""
    rows = torch.tensor([[0.3, 0.7, 0.0]]).repeat(20_000, 1)
    drawn = sample_labels(rows, torch.Generator().manual_seed(0))
    ones = int((drawn == 1).sum())
    interval = stats.binomtest(ones, len(drawn)).proportion_ci(0.999, method="wilson")
    assert interval.low <= 0.7 <= interval.high and not bool((drawn == 2).any())
    one_hot = torch.eye(3)[[2, 0, 1]]
    assert sample_labels(one_hot, torch.Generator().manual_seed(1)).tolist() == [2, 0, 1]


def _train(targets_kind: str, targets: torch.Tensor | None, seed: int = 3, mix: str = "none"):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (48, 1, 8, 8), dtype=torch.uint8)
    labels = torch.arange(48) % 3
    images[labels == 1, :, :2] = 255  # something to learn
    spec = ModelSpec(arch="small_cnn", in_channels=1, num_classes=3, image_height=8, image_width=8, width=4)
    config = dataclasses.replace(
        TrainConfig(epochs=3, batch_size=16, lr=0.05, val_every=3), targets=targets_kind, mix=mix
    )
    inputs = TrainingInputs(spec, images, labels, images, labels, config, seed=seed, train_targets=targets)
    return train_classifier(inputs, progress=False)


@pytest.mark.parametrize("mix", ["none", "mixup", "cutmix"])
def test_soft_targets_of_one_hot_rows_train_as_hard_labels_do(mix):
    """With train.mix too: torchvision mixes the distributions as it mixes the one-hot rows of the
    indices, with the same draws."""
    labels = torch.arange(48) % 3
    hard, hard_history = _train("hard", None, mix=mix)
    soft, soft_history = _train("soft", torch.eye(3)[labels], mix=mix)
    for a, b in zip(hard.state_dict().values(), soft.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert abs(hard_history[-1].train_loss - soft_history[-1].train_loss) < 1e-5


def test_sampled_targets_are_seeded_and_a_new_draw_each_epoch_changes_the_training():
    labels = torch.arange(48) % 3
    uncertain = torch.eye(3)[labels] * 0.6 + 0.2 * (1 - torch.eye(3)[labels])  # 0.6 on the folder's class
    first, _ = _train("sampled", uncertain)
    again, _ = _train("sampled", uncertain)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    soft, _ = _train("soft", uncertain)
    assert not all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), soft.state_dict().values()))
