import numpy as np
import pytest

from calibflow.data.splits import SPLIT_NAMES, Split, stratified_split

FRACTIONS = {"train": 0.6, "val": 0.1, "calibration": 0.15, "test": 0.15}


def make_labels(counts):
    return np.concatenate([np.full(n, k) for k, n in enumerate(counts)])


def test_splits_are_disjoint_and_cover_every_row():
    labels = make_labels([50, 37, 12, 101])
    groups = np.array([f"h{i}" for i in range(len(labels))])
    split = stratified_split(labels, groups, FRACTIONS, seed=0)
    together = np.concatenate([split.indices[name] for name in SPLIT_NAMES])
    assert len(together) == len(labels) == len(np.unique(together))


def test_each_class_is_spread_in_the_requested_fractions():
    counts = [50, 37, 12, 101]
    labels = make_labels(counts)
    split = stratified_split(labels, np.arange(len(labels)).astype(str), FRACTIONS, seed=3)
    for k, n in enumerate(counts):
        for name, fraction in FRACTIONS.items():
            got = np.sum(labels[split.indices[name]] == k)
            assert abs(got - n * fraction) < 1, (k, name, got, n * fraction)


def test_same_seed_same_split_other_seed_other_split():
    labels = make_labels([40, 40, 40])
    groups = np.arange(len(labels)).astype(str)
    a = stratified_split(labels, groups, FRACTIONS, seed=7)
    b = stratified_split(labels, groups, FRACTIONS, seed=7)
    c = stratified_split(labels, groups, FRACTIONS, seed=8)
    assert a.digest == b.digest
    assert a.digest != c.digest


def test_identical_files_stay_in_one_split():
    labels = make_labels([30, 30])
    groups = np.array([f"h{i % 20}" for i in range(len(labels))])  # each content hash appears 3 times
    groups[30:] = [f"g{i % 10}" for i in range(30)]
    split = stratified_split(labels, groups, FRACTIONS, seed=1)
    where = split.assignment(len(labels))
    for group in np.unique(groups):
        assert len(set(where[groups == group])) == 1


def test_save_load_round_trip_and_tamper_detection(tmp_path):
    labels = make_labels([20, 20])
    split = stratified_split(labels, np.arange(40).astype(str), FRACTIONS, seed=0, manifest_fingerprint="abc")
    path = split.save(tmp_path / "splits.json")
    loaded = Split.load(path)
    assert loaded.digest == split.digest and loaded.manifest_fingerprint == "abc"
    for name in SPLIT_NAMES:
        np.testing.assert_array_equal(loaded.indices[name], split.indices[name])
    path.write_text(path.read_text().replace('"test": [', '"test": [0, '))
    with pytest.raises(ValueError, match="digest"):
        Split.load(path)


def test_adding_images_moves_few_old_ones_to_another_split():
    labels = make_labels([200, 200, 200])
    groups = np.array([f"h{i}" for i in range(len(labels))])
    before = stratified_split(labels, groups, FRACTIONS, seed=0).assignment(len(labels))
    more_labels = np.concatenate([labels, make_labels([10, 10, 10])])
    more_groups = np.concatenate([groups, [f"new{i}" for i in range(30)]])
    after = stratified_split(more_labels, more_groups, FRACTIONS, seed=0).assignment(len(more_labels))
    kept = np.mean(before == after[: len(labels)])
    assert kept > 0.95, kept  # a shuffled split would keep about 0.6^2 + 0.1^2 + 2 * 0.15^2 = 41%


def imbalanced_digits(root, big: int = 60, small: int = 10):
    """Digits 0 and 1 as an ImageFolder: `big` images of 0, `small` of 1 (each class passes
    min_per_class 10)."""
    from calibflow.data.prepare import write_digits

    write_digits(root, classes=(0, 1), per_class=big)
    for extra in sorted((root / "1").iterdir())[small:]:
        extra.unlink()
    return root


# 2% of 60 images of class 0 is 1.2 test images, of 10 images of class 1 is 0.2: the test split
# gets one image of class 0 and none of class 1.
ONE_CLASS_TEST = {"train": 0.5, "val": 0.1, "calibration": 0.38, "test": 0.02}


def test_a_test_split_of_one_class_is_refused_naming_the_dataset_and_the_fix(tmp_path):
    from calibflow.config import SplitConfig
    from calibflow.errors import ConfigError, policy_of
    from calibflow.pipeline import data_steps

    data = imbalanced_digits(tmp_path / "imbalanced")
    manifest = data_steps.write_manifest(str(data), str(tmp_path / "manifest.csv"))
    split = SplitConfig(**ONE_CLASS_TEST)
    record = data_steps.write_split(manifest.path, split, 0, str(tmp_path / "splits.json"))
    assert data_steps.split_class_counts(manifest.path, record.path, "test") == {"0": 1}
    with pytest.raises(ConfigError) as refused:
        data_steps.check_test_split_classes(manifest.path, record.path, dataset="data/imbalanced", split=split)
    message = str(refused.value)
    assert "data/imbalanced" in message and "one class only" in message
    assert "class '1' has 10" in message and "split.test (now 0.02)" in message
    assert policy_of(refused.value).exit_code == 2

    both = SplitConfig(train=0.5, val=0.1, calibration=0.2, test=0.2)  # 12 and 2 test images
    record = data_steps.write_split(manifest.path, both, 0, str(tmp_path / "splits-both.json"))
    data_steps.check_test_split_classes(manifest.path, record.path, dataset="data/imbalanced", split=both)


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_calibflow_run_refuses_a_single_class_test_split_with_exit_2_before_training(tiny_repo, capsys):
    import shutil

    import yaml

    from cli.main import main as calibflow
    from tests.conftest import dvc, run

    data = tiny_repo / "data" / "tiny"
    shutil.rmtree(data)
    imbalanced_digits(data)
    params = yaml.safe_load((tiny_repo / "params.yaml").read_text())
    params["split"] = ONE_CLASS_TEST
    params["gates"] = {"max_ece": 0.9, "min_accuracy": 0.0}  # not what refuses it
    (tiny_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc("add", "-q", "data/tiny", cwd=tiny_repo)
    run("git", "add", "-A", cwd=tiny_repo)
    run("git", "commit", "-qm", "two imbalanced classes", cwd=tiny_repo)

    assert calibflow(["run", "--repo", str(tiny_repo)]) == 2
    err = capsys.readouterr().err
    [said] = [line for line in err.splitlines() if line.startswith("calibflow run:")]
    assert "the test split of data/tiny holds images of one class only" in said, err[-3000:]
    assert "Traceback" not in err
    assert not any((tiny_repo / ".calibflow" / "runs").glob("*/checkpoint.pt"))  # refused before training


def test_a_stratified_subset_gives_each_class_its_share_and_keeps_its_images_as_data_grows():
    """What the corruption suite reads of a larger test split: rows in manifest order are class by
    class, so the first 500 of the default 720 test images held no 7, 8 or 9."""
    from calibflow.data.splits import stratified_subset

    labels = make_labels([72] * 10)
    groups = np.array([f"h{i}" for i in range(len(labels))])
    picked = stratified_subset(labels, groups, 500, seed=0)
    assert len(picked) == 500 and np.all(np.diff(picked) > 0)
    assert sorted(np.bincount(labels[picked]).tolist()) == [50] * 10
    uneven = make_labels([300, 100, 10])
    counts = np.bincount(uneven[stratified_subset(uneven, np.arange(410).astype(str), 41, seed=0)])
    assert counts.tolist() == [30, 10, 1]
    assert np.array_equal(stratified_subset(labels, groups, 720, seed=0), np.arange(720))
    assert not np.array_equal(picked, stratified_subset(labels, groups, 500, seed=1))

    grown_labels = np.concatenate([labels, make_labels([8] * 10)])
    grown_groups = np.concatenate([groups, [f"new{i}" for i in range(80)]])
    grown = stratified_subset(grown_labels, grown_groups, 500, seed=0)
    kept = len(np.intersect1d(groups[picked], grown_groups[grown])) / 500
    assert kept > 0.8, kept  # a fresh random 500 of 800 would keep about 500/800 = 62%
