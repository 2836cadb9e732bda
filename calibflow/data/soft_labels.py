"""Soft labels: for each image, a probability over the classes (annotators' votes, or a known
blend), read from a CSV at the root of the dataset's folder (data.soft_labels), so DVC's hash of
the folder covers it as it covers the images.

One-hot labels tell a network that nothing is uncertain; on an image annotators disagree about
they teach it to be sure anyway. Training on the distribution (train.targets: soft) or on a label
drawn from it each epoch (sampled) tells it what is ambiguous.

The CSV: a header `path,<class 1>,...,<class K>` naming every class folder, then one row per image,
`path` relative to the folder (`<class>/<file>`), the values either probabilities (summing to 1
within data.soft_label_tolerance) or annotator counts (whole numbers, normalised here). Great
Expectations checks it before anything trains (validate_soft_labels); the folder an image is in
must be among the row's most probable classes (data.soft_label_agreement: argmax), or is not
checked (none).
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from calibflow.data.validation import EXAMPLES, FailedExpectation, ValidationReport, run_gx_suites
from calibflow.errors import ManifestError

PATH = "path"
SOFT_LABEL_AGREEMENTS = ("argmax", "none")
# The checks, in report order: (key, what it says in words).
COLUMNS_ARE_CLASSES = "columns_are_classes"
ONE_ROW_PER_PATH = "one_row_per_path"
EVERY_ROW_AN_IMAGE = "every_row_an_image"
EVERY_IMAGE_A_ROW = "every_image_a_row"
VALUES_VALID = "values_valid"
ROWS_NORMALISED = "rows_normalised"
FOLDER_AGREES = "folder_agrees"
# A registered version's tag naming the CSV and tolerance its soft metrics were measured with, for
# `calibflow evaluate` and `calibflow gate` to read again from the same DVC-pinned folder.
SOFT_LABELS_TAG = "soft_labels"


def read_soft_labels(path: str | Path, classes: list[str]) -> pd.DataFrame:
    """The CSV as a table: `path` and one float column per class folder it names (as strings, so
    validation reports a value that is not a number, not a parser's traceback). ManifestError
    naming the file when it is missing or has no `path` column."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(
            f"data.soft_labels: {path} does not exist: put the CSV (path,<class 1>,...,<class K>) at the root of "
            f"the data folder, track it with the folder (dvc add), or set data.soft_labels to null"
        )
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows or not rows[0] or rows[0][0].strip() != PATH:
        raise ManifestError(
            f"{path}: the first column of the header must be `{PATH}`, then one column per class "
            f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}); got {rows[0][:6] if rows else 'an empty file'}"
        )
    header = [name.strip() for name in rows[0]]
    width = len(header)
    body = [row + [""] * (width - len(row)) if len(row) < width else row[:width] for row in rows[1:] if any(row)]
    return pd.DataFrame(body, columns=header, dtype=str)


def _number(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def row_checks(table: pd.DataFrame, classes: list[str], tolerance: float) -> pd.DataFrame:
    """Per row: its values (NaN for one that is not a number), whether they are all finite and
    non-negative, whether they are counts (whole numbers), their total, and whether the row is
    normalised (probabilities summing to 1 within `tolerance`, or counts with a positive total)."""
    present = [name for name in classes if name in table.columns]
    values = np.array([[_number(v) for v in row] for row in table[present].itertuples(index=False)], dtype=float)
    values = values.reshape(len(table), len(present))
    valid = np.isfinite(values).all(axis=1) & (values >= 0).all(axis=1) if len(present) else np.zeros(len(table), bool)
    total = np.where(valid, np.nansum(values, axis=1), np.nan)
    counts = valid & (np.floor(values) == values).all(axis=1) & (total >= 1)
    # a row with a bad value is counted once, by values_valid, not again here
    normalised = ~valid | counts | (np.abs(total - 1.0) <= tolerance)
    return pd.DataFrame(
        {
            PATH: table[PATH].astype(str).to_numpy(),
            "values_valid": valid,
            "total": total,
            "normalised": normalised,
            "values": list(values),
        }
    )


def validate_soft_labels(
    table: pd.DataFrame,
    manifest: pd.DataFrame,
    classes: list[str],
    *,
    tolerance: float,
    agreement: str,
    source: str = "data.soft_labels",
) -> ValidationReport:
    """Great Expectations checks of the soft labels against the manifest's images: the columns are
    `path` and the class folders; a path appears once; every row names an image of the folder and
    every image has a row; every value is a finite non-negative number; every row is normalised
    (row_checks); with agreement "argmax", the image's folder is among the row's most probable
    classes. Bad rows are counted, with examples, per check."""
    import great_expectations as gx

    started = time.perf_counter()
    checks = row_checks(table, classes, tolerance)
    if set(table.columns) != {PATH, *classes}:
        # values under the wrong columns: the columns check says so, once, and no row is judged
        checks["values_valid"] = True
        checks["normalised"] = True
    images = set(manifest[PATH].astype(str))
    labelled = set(checks[PATH])
    label_of = dict(zip(manifest[PATH].astype(str), manifest["label"].astype(str)))
    present = [name for name in classes if name in table.columns]

    def agrees(path: str, values: np.ndarray, valid: bool) -> bool:
        if agreement == "none" or path not in label_of or not valid or len(values) != len(classes):
            return True  # judged by the checks that failed it, once
        top = values.max()
        return bool(values[present.index(label_of[path])] >= top - 1e-12 * max(1.0, top))

    if set(table.columns) != {PATH, *classes}:
        agreement = "none"

    rows = checks.assign(
        has_image=checks[PATH].isin(images),
        agrees=[agrees(p, v, ok) for p, v, ok in zip(checks[PATH], checks["values"], checks["values_valid"])],
        labelled_as=[label_of.get(p, "") for p in checks[PATH]],
    ).drop(columns=["values"])
    image_rows = pd.DataFrame({PATH: sorted(images), "has_row": [p in labelled for p in sorted(images)]})

    E = gx.expectations
    names = {
        COLUMNS_ARE_CLASSES: f"the columns are {PATH} and the {len(classes)} class folders",
        ONE_ROW_PER_PATH: "each image has one row",
        EVERY_ROW_AN_IMAGE: "every row names an image of the folder",
        EVERY_IMAGE_A_ROW: "every image has a row",
        VALUES_VALID: "every value is a non-negative number",
        ROWS_NORMALISED: f"every row sums to 1 (within {tolerance:g}) or holds counts",
        FOLDER_AGREES: "each image's folder is among its row's most probable classes",
    }

    def meta(key: str) -> dict[str, str]:
        return {"calibflow_check": key}

    suites: dict[str, tuple[pd.DataFrame, list[Any], list[str]]] = {
        "soft_table": (
            table.copy(),
            [
                E.ExpectTableColumnsToMatchSet(
                    column_set=[PATH, *classes], exact_match=True, meta=meta(COLUMNS_ARE_CLASSES)
                )
            ],
            [],  # a table-wide expectation: no rows to name
        ),
        "soft_rows": (
            rows,
            [
                E.ExpectColumnValuesToBeUnique(column=PATH, meta=meta(ONE_ROW_PER_PATH)),
                E.ExpectColumnValuesToBeInSet(column="has_image", value_set=[True], meta=meta(EVERY_ROW_AN_IMAGE)),
                E.ExpectColumnValuesToBeInSet(column="values_valid", value_set=[True], meta=meta(VALUES_VALID)),
                E.ExpectColumnValuesToBeInSet(column="normalised", value_set=[True], meta=meta(ROWS_NORMALISED)),
                E.ExpectColumnValuesToBeInSet(column="agrees", value_set=[True], meta=meta(FOLDER_AGREES)),
            ],
            [PATH],
        ),
        "soft_images": (
            image_rows,
            [E.ExpectColumnValuesToBeInSet(column="has_row", value_set=[True], meta=meta(EVERY_IMAGE_A_ROW))],
            [PATH],
        ),
    }
    results = run_gx_suites(suites)
    failures: list[FailedExpectation] = []
    for frame_name, outcome in results.items():
        frame = suites[frame_name][0]
        for result in outcome["results"]:
            if not result["success"]:
                key = result["expectation_config"]["meta"]["calibflow_check"]
                failures.append(_failure(key, names[key], result, frame, table.columns, classes, source))
    order = list(names)
    failures.sort(key=lambda failure: order.index(failure.column))
    statistics = {
        "soft_label_rows": int(len(table)),
        "images": int(len(images)),
        "evaluated_expectations": len(names),
        "unsuccessful_expectations": len(failures),
        "seconds": round(time.perf_counter() - started, 3),
    }
    return ValidationReport(success=not failures, failures=tuple(failures), statistics=statistics, result=results)


def _failure(
    key: str, check: str, result: dict, frame: pd.DataFrame, columns, classes: list[str], source: str
) -> FailedExpectation:
    outcome = result.get("result") or {}
    unexpected = outcome.get("unexpected_count")
    if key == COLUMNS_ARE_CLASSES:
        missing = [c for c in [PATH, *classes] if c not in columns]
        extra = [c for c in columns if c not in [PATH, *classes]]
        parts = []
        if missing:
            parts.append(f"no column for {', '.join(missing[:EXAMPLES])}")
        if extra:
            parts.append(f"columns that are not class folders: {', '.join(extra[:EXAMPLES])}")
        details = f"{source}: {'; '.join(parts)}"
        return FailedExpectation("expect_table_columns_to_match_set", check, key, None, None, details)
    examples = [str(row.get(PATH, "")) for row in (outcome.get("partial_unexpected_index_list") or [])[:EXAMPLES]]
    if key == ONE_ROW_PER_PATH:
        examples = sorted(set(str(v) for v in outcome.get("partial_unexpected_list") or []))[:EXAMPLES]
    more = (unexpected or 0) - len(examples)
    shown = f"e.g. {', '.join(examples)}" + (f" and {more} more" if more > 0 else "") if examples else ""
    details = f"{source}: {shown}" if shown else source
    return FailedExpectation(
        result["expectation_config"]["type"],
        check,
        key,
        None if unexpected is None else int(unexpected),
        None if outcome.get("element_count") is None else int(outcome["element_count"]),
        details,
    )


def soft_targets(
    table: pd.DataFrame, manifest: pd.DataFrame, classes: list[str], tolerance: float, dtype=np.float32
) -> np.ndarray:
    """(len(manifest), K): each manifest row's distribution over `classes` (counts normalised), in
    the manifest's order; float32 for training, float64 for the metrics. Call after
    validate_soft_labels passed."""
    checks = row_checks(table[[PATH, *classes]], classes, tolerance)
    by_path = {path: values / values.sum() for path, values in zip(checks[PATH], checks["values"])}
    return np.stack([by_path[str(path)] for path in manifest[PATH]]).astype(dtype)


def targets_from_file(
    path: str | Path, manifest: pd.DataFrame, classes: list[str], tolerance: float, dtype=np.float64
) -> np.ndarray:
    """soft_targets of `manifest`'s rows, read from the CSV at `path` (validated when it trained)."""
    return soft_targets(read_soft_labels(path, classes), manifest, classes, tolerance, dtype)


def soft_labels_tag(file: str, tolerance: float) -> dict[str, str]:
    return {SOFT_LABELS_TAG: json.dumps({"file": file, "tolerance": tolerance})}


def recorded_targets(
    tags: dict[str, str], data_dir: str | Path, manifest: pd.DataFrame, classes: list[str]
) -> np.ndarray | None:
    """(N, K) float64 targets of `manifest`'s rows from the CSV a registered version recorded
    (SOFT_LABELS_TAG) in `data_dir`, its folder at the recorded revision: DVC's hash of the folder,
    checked when it was rebuilt, covers the CSV, so these are the bytes that passed validation when
    the version trained. None for a version trained without soft labels."""
    if not tags.get(SOFT_LABELS_TAG):
        return None
    recorded = json.loads(tags[SOFT_LABELS_TAG])
    return targets_from_file(Path(data_dir) / recorded["file"], manifest, classes, recorded["tolerance"])
