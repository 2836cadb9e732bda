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
