"""calibflow.data.validation: the seven GX checks, each failing alone when its fault is injected."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from calibflow.data.manifest import build_manifest, list_classes
from calibflow.data.validation import FailedExpectation, ValidationReport, validate_manifest
from calibflow.errors import DataValidationError
from tests.test_manifest import png_bytes

CLASSES = ("0", "1", "2")
PER_CLASS = 12
MIN_PER_CLASS = 5
SPLITS = ("train", "val", "calibration", "test")

CHECK_DECODES = "every file decodes as an image"
CHECK_SIZE = "every image has one size"
CHECK_MODE = "every image has one mode"
CHECK_LABELS = "labels equal the class folders"
CHECK_MIN = f"every class has at least {MIN_PER_CLASS} images"
CHECK_LEAK = "no image content appears in two splits"
CHECK_CONFLICT = "no image content carries two labels"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for ci, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            (root / name / f"img_{i:03d}.png").write_bytes(png_bytes(1000 * ci + i))
    return root


def split_manifest(root: Path, overrides: dict[str, str] | None = None) -> pd.DataFrame:
    """The manifest with splits assigned round-robin, then per-path overrides."""
    df = build_manifest(root)
    df["split"] = [SPLITS[i % len(SPLITS)] for i in range(len(df))]
    for path, split in (overrides or {}).items():
        assert (df["path"] == path).sum() == 1, path
        df.loc[df["path"] == path, "split"] = split
    return df


def run(root: Path, overrides: dict[str, str] | None = None, **kwargs) -> ValidationReport:
    kwargs.setdefault("min_per_class", MIN_PER_CLASS)
    return validate_manifest(split_manifest(root, overrides), list_classes(root), **kwargs)


def only_failure(report: ValidationReport) -> FailedExpectation:
    assert not report.success
    assert len(report.failures) == 1, report.summary()
    assert report.summary().startswith("data validation failed (1 of 7 expectations):")
    return report.failures[0]


def test_clean_data_passes_and_result_is_json(folder: Path):
    report = run(folder)
    assert report.success, report.summary()
    assert report.failures == ()
    assert report.summary() == "data validation passed (7 of 7 expectations)"
    stats = report.statistics
    assert stats["evaluated_expectations"] == 7 and stats["unsuccessful_expectations"] == 0
    assert stats["files"] == len(CLASSES) * PER_CLASS
    assert stats["expected_size"] == ["8x8"] and stats["expected_mode"] == ["L"]
    text = json.dumps(report.result)
    loaded = json.loads(text)
    # the real GX results: seven expectations over four frames, all evaluated by GX
    results = [r for frame in loaded.values() for r in frame["results"]]
    assert len(results) == 7 and all(r["success"] for r in results)
    assert {r["expectation_config"]["type"] for r in results} == {
        "expect_column_values_to_be_in_set",
        "expect_column_distinct_values_to_equal_set",
        "expect_column_values_to_be_between",
    }
    assert all(frame["meta"]["great_expectations_version"] for frame in loaded.values())


@pytest.mark.parametrize("kind", ["random_bytes", "truncated_png"])
def test_corrupt_image_fails_only_decodes(folder: Path, kind: str):
    if kind == "random_bytes":
        data = np.random.default_rng(1).bytes(200)
    else:
        whole = png_bytes(5, size=(64, 64))
        data = whole[: len(whole) // 2]
    (folder / "1" / "bad.png").write_bytes(data)
    report = run(folder)
    failure = only_failure(report)
    assert failure.check == CHECK_DECODES
    assert failure.expectation == "expect_column_values_to_be_in_set"
    assert failure.column == "decodable"
    assert (failure.unexpected_count, failure.element_count) == (1, len(CLASSES) * PER_CLASS + 1)
    assert "1/bad.png" in failure.details
    expected_error = "UnidentifiedImageError" if kind == "random_bytes" else "truncated"
    assert expected_error in failure.details
    assert f"{CHECK_DECODES}: 1 of 37 files unexpected" in report.summary()
    json.dumps(report.result)


def test_one_image_of_another_size_fails_only_size(folder: Path):
    (folder / "2" / "big.png").write_bytes(png_bytes(77, size=(9, 7)))
    failure = only_failure(run(folder))
    assert failure.check == CHECK_SIZE and failure.column == "size"
    assert (failure.unexpected_count, failure.element_count) == (1, 37)
    assert "2/big.png" in failure.details and "'9x7'" in failure.details
    assert "expected '8x8'" in failure.details


def test_one_rgb_image_among_grayscale_fails_only_mode(folder: Path):
    (folder / "0" / "colour.png").write_bytes(png_bytes(78, mode="RGB"))
    failure = only_failure(run(folder))
    assert failure.check == CHECK_MODE and failure.column == "mode"
    assert (failure.unexpected_count, failure.element_count) == (1, 37)
    assert "0/colour.png" in failure.details and "'RGB'" in failure.details


def test_allowed_sizes_and_modes_accept_a_mixed_dataset(folder: Path):
    for i in range(4):
        (folder / "0" / f"wide_{i}.png").write_bytes(png_bytes(500 + i, size=(10, 10), mode="RGB"))
    mixed = run(folder)
    assert {f.check for f in mixed.failures} == {CHECK_SIZE, CHECK_MODE}
    assert all(f.unexpected_count == 4 for f in mixed.failures)  # the minority, not the majority

    report = run(folder, allowed_sizes=("8x8", "10x10"), allowed_modes=("L", "RGB"))
    assert report.success, report.summary()

    narrow = run(folder, allowed_sizes=("10x10",), allowed_modes=("L", "RGB"))
    failure = only_failure(narrow)
    assert failure.check == "every image has an allowed size"
    assert failure.unexpected_count == len(CLASSES) * PER_CLASS


def test_empty_class_folder_fails_only_labels(folder: Path):
    (folder / "3").mkdir()
    report = run(folder)
    failure = only_failure(report)
    assert failure.check == CHECK_LABELS
    assert failure.expectation == "expect_column_distinct_values_to_equal_set"
    assert (failure.unexpected_count, failure.element_count) == (1, 4)
    assert "class folder(s) with no files: 3" in failure.details
    assert "with no files: 3" in report.summary()


def test_small_class_fails_only_min_per_class(folder: Path):
    (folder / "small").mkdir()
    for i in range(MIN_PER_CLASS - 2):
        (folder / "small" / f"s{i}.png").write_bytes(png_bytes(9000 + i))
    failure = only_failure(run(folder))
    assert failure.check == CHECK_MIN and failure.column == "count"
    assert (failure.unexpected_count, failure.element_count) == (1, 4)
    assert "small has 3" in failure.details
    # exactly at the minimum is fine
    (folder / "small" / "s_more_1.png").write_bytes(png_bytes(9100))
    (folder / "small" / "s_more_2.png").write_bytes(png_bytes(9101))
    assert run(folder).success


def test_same_bytes_in_train_and_test_fails_only_leakage(folder: Path):
    shutil.copy(folder / "0" / "img_000.png", folder / "0" / "img_000_copy.png")
    overrides = {"0/img_000.png": "train", "0/img_000_copy.png": "test"}
    report = run(folder, overrides)
    failure = only_failure(report)
    assert failure.check == CHECK_LEAK and failure.column == "n_splits"
    assert (failure.unexpected_count, failure.element_count) == (1, 36)
    assert "0/img_000.png [train]" in failure.details
    assert "0/img_000_copy.png [test]" in failure.details
    # the same duplicate inside one split is not leakage (and carries one label)
    same_split = {"0/img_000.png": "train", "0/img_000_copy.png": "train"}
    assert run(folder, same_split).success
    # nor is a copy that is in no split at all (never read by training or evaluation)
    unassigned = {"0/img_000.png": "test", "0/img_000_copy.png": ""}
    assert run(folder, unassigned).success


def test_same_bytes_in_two_class_folders_fails_only_label_conflict(folder: Path):
    shutil.copy(folder / "0" / "img_004.png", folder / "2" / "dupe.png")
    overrides = {"0/img_004.png": "val", "2/dupe.png": "val"}
    failure = only_failure(run(folder, overrides))
    assert failure.check == CHECK_CONFLICT and failure.column == "n_labels"
    assert (failure.unexpected_count, failure.element_count) == (1, 36)
    assert "0/img_004.png [val]" in failure.details and "2/dupe.png [val]" in failure.details


def test_several_faults_are_all_named_in_the_summary_and_error(folder: Path):
    (folder / "1" / "bad.png").write_bytes(b"not an image")
    (folder / "1" / "notes.txt").write_text("stray")
    (folder / "2" / "colour.png").write_bytes(png_bytes(31, mode="RGB"))
    (folder / "empty").mkdir()
    report = run(folder)
    assert [f.check for f in report.failures] == [CHECK_DECODES, CHECK_MODE, CHECK_LABELS]
    decodes = report.failures[0]
    assert decodes.unexpected_count == 2 and decodes.element_count == 39
    summary = report.summary()
    lines = summary.splitlines()
    assert lines[0] == "data validation failed (3 of 7 expectations):"
    assert lines[1].startswith(f" - {CHECK_DECODES}: 2 of 39 files unexpected")
    assert "1/bad.png" in lines[1] and "1/notes.txt" in lines[1]
    assert lines[2].startswith(f" - {CHECK_MODE}: 1 of 37 images unexpected")
    assert lines[3].startswith(f" - {CHECK_LABELS}:") and "empty" in lines[3]

    error = DataValidationError(report)
    assert isinstance(error, ValueError)
    assert str(error) == summary and error.report is report
    json.dumps(report.result)


def test_many_offenders_are_capped_in_details(folder: Path):
    for i in range(8):
        (folder / "0" / f"bad_{i}.png").write_bytes(b"x" * (i + 1))
    failure = only_failure(run(folder))
    assert failure.unexpected_count == 8
    assert failure.details.count("0/bad_") == 5
    assert failure.details.endswith("and 3 more")


def test_manifest_without_split_column_is_a_caller_error(folder: Path):
    df = build_manifest(folder)
    with pytest.raises(ValueError, match="'split'"):
        validate_manifest(df, list_classes(folder), MIN_PER_CLASS)
    df["split"] = "train"
    with pytest.raises(ValueError, match="min_per_class"):
        validate_manifest(df, list_classes(folder), -1)


def test_a_passed_suite_is_reused_for_the_same_bytes_and_a_failed_one_is_always_run_again(
    folder, tmp_path, monkeypatch
):
    from calibflow.pipeline import data_steps
    from calibflow.config import DataConfig, SplitConfig

    cache, calls = tmp_path / "cache", []
    real = data_steps.validate_manifest
    monkeypatch.setattr(data_steps, "validate_manifest", lambda *a, **k: calls.append(1) or real(*a, **k))
    manifest = data_steps.write_manifest(str(folder), str(tmp_path / "manifest.csv"))
    split = data_steps.write_split(manifest.path, SplitConfig(), 0, str(tmp_path / "splits.json"))
    data = DataConfig(min_per_class=MIN_PER_CLASS)

    def validate(name: str):
        return data_steps.validate_data(
            manifest.path, split.path, manifest.classes, data, str(tmp_path / name), cache_directory=cache
        )

    first, second = validate("first.json"), validate("second.json")
    assert first.success and second.success and len(calls) == 1
    assert second.statistics["reused_from_cache"] and "reused_from_cache" not in first.statistics
    assert (tmp_path / "first.json").read_text() == (tmp_path / "second.json").read_text()

    stricter = DataConfig(min_per_class=PER_CLASS + 1)  # another setting: run again, and it fails
    for _ in range(2):
        report = data_steps.validate_data(
            manifest.path, split.path, manifest.classes, stricter, str(tmp_path / "strict.json"), cache_directory=cache
        )
        assert not report.success and CHECK_MIN.replace(str(MIN_PER_CLASS), str(PER_CLASS + 1)) in report.summary()
    assert len(calls) == 3

    shutil.copy(folder / "0" / "img_000.png", folder / "1" / "img_copy.png")  # new bytes: a new manifest
    changed = data_steps.write_manifest(str(folder), str(tmp_path / "manifest.csv"))
    data_steps.write_split(changed.path, SplitConfig(), 0, str(tmp_path / "splits.json"))
    assert not validate("changed.json").success and len(calls) == 4


def test_a_dataset_of_one_class_folder_is_refused_before_anything_is_hashed_naming_the_folder(tmp_path):
    from calibflow.errors import ManifestError, is_refusal
    from calibflow.pipeline import data_steps

    root = tmp_path / "data"
    (root / "cats").mkdir(parents=True)
    for i in range(PER_CLASS):
        (root / "cats" / f"img_{i:03d}.png").write_bytes(png_bytes(i))
    with pytest.raises(ManifestError, match="one class folder \\('cats'\\).*at least two") as caught:
        data_steps.write_manifest(str(root), str(tmp_path / "manifest.csv"))
    assert str(root) in str(caught.value) and is_refusal(caught.value)  # exit 2, one line
    assert not (tmp_path / "manifest.csv").exists()


def test_a_forged_cache_entry_cannot_pass_data_that_fails(folder, tmp_path, monkeypatch):
    """The attack: a 'passed' entry written into the cache under the key of data that fails. Its
    signature was made for another key (or by nobody), so GX runs and the data fails."""
    import json

    from calibflow import disk_cache
    from calibflow.config import DataConfig, SplitConfig
    from calibflow.pipeline import data_steps

    cache, asked = tmp_path / "cache", []
    real_load = disk_cache.load
    monkeypatch.setattr(disk_cache, "load", lambda d, ns, key: asked.append(key) or real_load(d, ns, key))
    manifest = data_steps.write_manifest(str(folder), str(tmp_path / "manifest.csv"))
    split = data_steps.write_split(manifest.path, SplitConfig(), 0, str(tmp_path / "splits.json"))

    def validate(data: DataConfig):
        return data_steps.validate_data(
            manifest.path, split.path, manifest.classes, data, str(tmp_path / "v.json"), cache_directory=cache
        )

    assert validate(DataConfig(min_per_class=MIN_PER_CLASS)).success  # a genuine, signed entry
    [genuine] = (cache / "data_validation").iterdir()
    stricter = DataConfig(min_per_class=PER_CLASS + 1)
    assert not validate(stricter).success
    forged_path = disk_cache._json_path(cache, "data_validation", asked[-1])
    forged_path.write_text(json.dumps({**json.loads(genuine.read_text()), "key": asked[-1]}))
    report = validate(stricter)
    assert not report.success and "reused_from_cache" not in report.statistics
