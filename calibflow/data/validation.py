"""Great Expectations validation of a split manifest, before anything trains.

`validate_manifest` runs seven real GX expectations in one ephemeral, in-memory GX context (no
files, no network, no data docs) and maps every GX result back to a `FailedExpectation` with a
human name, the GX unexpected/element counts, and a few offending examples:

  1. every file decodes as an image             manifest rows     decodable in {True}
  2. one image size (or an allowed size)        decodable rows    size in {most common | allowed}
  3. one image mode (or an allowed mode)        decodable rows    mode in {most common | allowed}
  4. labels equal the class folders             manifest rows     distinct label == classes
  5. every class has >= min_per_class images    one row per label count >= min_per_class
  6. no content appears in two splits           one row per hash  distinct splits <= 1
  7. no content carries two labels              one row per hash  distinct labels <= 1

Each check looks at its own frame, so one bad file is counted once: an undecodable file fails
check 1 only (sizes and modes are checked on decodable rows), an empty class folder fails check 4
only (check 5 counts the files of the labels that do occur, decodable or not), and a content
hash counts once however many copies of it there are (checks 6 and 7).

`ValidationReport.result` holds the GX validation results (`.to_json_dict()`, one per frame) and
is JSON-serialisable, for the caller to save as an artifact. Nothing here imports Prefect/MLflow.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from calibflow.data.images import COLOUR_MODES, GRAY_MODES
from calibflow.errors import DataValidationError

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("path", "label", "size", "mode", "sha256", "decodable", "error", "split")
EXAMPLES = 5  # offending examples named per failed check
EXAMPLE_CHARS = 240  # of each example's reason
_PARTIAL = 20  # GX partial_unexpected_count: examples GX returns per expectation

# Check keys, in report order. The key travels in each expectation's meta.
DECODES = "decodes"
SIZE = "size"
MODE = "mode"
LABELS = "labels"
MIN_PER_CLASS = "min_per_class"
SPLIT_LEAKAGE = "split_leakage"
LABEL_CONFLICT = "label_conflict"
CHECK_ORDER = (DECODES, SIZE, MODE, LABELS, MIN_PER_CLASS, SPLIT_LEAKAGE, LABEL_CONFLICT)

# What one element of the validated frame is, by the column a check looks at; for "N of M <unit>".
_UNITS_BY_COLUMN = {
    "decodable": "files",
    "size": "images",
    "shorter_side": "images",
    "mode": "images",
    "label": "class folders",
    "count": "classes",
    "n_splits": "distinct contents",
    "n_labels": "distinct contents",
}


@dataclass(frozen=True)
class FailedExpectation:
    """One failed GX expectation, in words a person can act on."""

    expectation: str  # GX expectation type, e.g. "expect_column_values_to_be_in_set"
    check: str  # human name, e.g. "every file decodes as an image"
    column: str
    unexpected_count: int | None
    element_count: int | None
    details: str  # observed values and up to EXAMPLES offending paths/labels

    def describe(self) -> str:
        if self.unexpected_count is not None and self.element_count is not None:
            unit = _UNITS_BY_COLUMN.get(self.column, "rows")
            counts = f"{self.unexpected_count} of {self.element_count} {unit} unexpected"
        elif self.unexpected_count is not None:
            counts = f"{self.unexpected_count} unexpected"
        else:
            counts = "failed"
        text = f"{self.check}: {counts} ({self.expectation} on {self.column})"
        return f"{text}: {self.details}" if self.details else text


@dataclass(frozen=True)
class ValidationReport:
    success: bool
    failures: tuple[FailedExpectation, ...]
    statistics: dict[str, Any]
    result: dict[str, Any] = field(repr=False)  # GX results by frame name, JSON-serialisable

    def summary(self) -> str:
        evaluated = self.statistics.get("evaluated_expectations", len(CHECK_ORDER))
        if self.success:
            return f"data validation passed ({evaluated} of {evaluated} expectations)"
        lines = [
            f"data validation failed ({len(self.failures)} of {evaluated} expectations):",
            *(f" - {failure.describe()}" for failure in self.failures),
        ]
        return "\n".join(lines)


def _check_names(
    min_per_class: int, allowed_sizes: Sequence[str], allowed_modes: Sequence[str], min_side: int | None = None
):
    if min_side is not None:
        size = f"every image is at least {min_side} px on its shorter side"
    else:
        size = "every image has an allowed size" if allowed_sizes else "every image has one size"
    return {
        DECODES: "every file decodes as an image",
        SIZE: size,
        MODE: "every image has an allowed mode"
        if allowed_modes
        else ("every image's mode converts to 8-bit gray or RGB" if min_side is not None else "every image has one mode"),
        LABELS: "labels equal the class folders",
        MIN_PER_CLASS: f"every class has at least {min_per_class} images",
        SPLIT_LEAKAGE: "no image content appears in two splits",
        LABEL_CONFLICT: "no image content carries two labels",
    }


def _most_common(values: pd.Series) -> str | None:
    """Most common value, ties broken by the smallest value, so the choice is deterministic."""
    if values.empty:
        return None
    counts = values.value_counts()
    top = counts.max()
    return min(str(v) for v, c in counts.items() if c == top)


def _files_by_content(manifest: pd.DataFrame) -> pd.DataFrame:
    """One row per distinct sha256 (unreadable files, which have none, are left out): number of
    files, distinct splits and labels, and for duplicated contents a readable list of the files
    ("path [split]")."""
    hashed = manifest.loc[manifest["sha256"] != "", ["sha256", "path", "label", "split"]].copy()
    # A row in no split ("" or missing) is not used by any split, so it cannot leak.
    split = hashed["split"].astype("str")
    hashed["split"] = split.mask(split == "")
    contents = hashed.groupby("sha256", sort=True).agg(
        n_files=("path", "size"),
        n_splits=("split", "nunique"),
        n_labels=("label", "nunique"),
        files=("path", "first"),
    )
    dup = contents.index[contents["n_files"] > 1]
    if len(dup):
        rows = hashed[hashed["sha256"].isin(dup)].sort_values(["sha256", "path"])
        shown = rows["path"] + " [" + rows["split"].fillna("no split") + "]"
        listed = shown.groupby(rows["sha256"]).agg(", ".join)
        contents.loc[listed.index, "files"] = listed
    contents = contents.reset_index()
    for col in ("n_files", "n_splits", "n_labels"):
        contents[col] = contents[col].astype("int64")
    return contents


def _example(row: dict[str, Any], keys: Sequence[str]) -> str:
    parts = [str(row.get(k, "")) for k in keys]
    head, rest = parts[0], [p for p in parts[1:] if p]
    if rest:
        # long enough for a decoder's reason and its fix, which a shorter cut lost
        extra = "; ".join(p if len(p) <= EXAMPLE_CHARS else p[: EXAMPLE_CHARS - 3] + "..." for p in rest)
        return f"{head} ({extra})"
    return head


def _examples(result: dict[str, Any], keys: Sequence[str], total: int | None) -> str:
    rows = result.get("partial_unexpected_index_list") or []
    shown = [_example(row, keys) for row in rows[:EXAMPLES]]
    if not shown:
        return ""
    more = (total or 0) - len(shown)
    return "e.g. " + ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def _observed(result: dict[str, Any]) -> str:
    counts = result.get("partial_unexpected_counts") or []
    return ", ".join(f"{c['value']!r} x{c['count']}" for c in counts[:EXAMPLES])


def _details(key: str, result: dict[str, Any], expected: dict[str, Any]) -> str:
    unexpected = result.get("unexpected_count")
    if key == DECODES:
        return _examples(result, ("path", "error"), unexpected)
    if key == SIZE and "min_side" in expected:
        head = f"expected a shorter side of at least {expected['min_side']} px (data.min_side)"
        examples = _examples(result, ("path", "size"), unexpected)
        fix = "remove them from the folder or lower data.min_side"
        return f"{head}; {examples}; {fix}" if examples else f"{head}; {fix}"
    if key in (SIZE, MODE):
        wanted = ", ".join(repr(v) for v in expected[key]) or "(none)"
        head = f"expected {wanted}; got {_observed(result)}"
        examples = _examples(result, ("path", key), unexpected)
        text = f"{head}; {examples}" if examples else head
        if key == SIZE:
            text += "; for photos of many sizes set data.image_size (for example 224): each is then resized and cropped to it"
        return text
    if key == LABELS:
        missing = sorted(str(v) for v in result.get("partial_missing_list") or [])
        extra = sorted(str(v) for v in result.get("partial_unexpected_list") or [])
        parts = []
        if missing:
            parts.append(
                "class folder(s) with no files: "
                + ", ".join(missing[:EXAMPLES])
                + (f" and {len(missing) - EXAMPLES} more" if len(missing) > EXAMPLES else "")
            )
        if extra:
            parts.append("labels that are not class folders: " + ", ".join(extra[:EXAMPLES]))
        return "; ".join(parts)
    if key == MIN_PER_CLASS:
        rows = result.get("partial_unexpected_index_list") or []
        small = ", ".join(f"{r['label']!s} has {r['count']}" for r in rows[:EXAMPLES])
        more = (unexpected or 0) - min(len(rows), EXAMPLES)
        return small + (f" and {more} more" if more > 0 else "")
    if key in (SPLIT_LEAKAGE, LABEL_CONFLICT):
        rows = result.get("partial_unexpected_index_list") or []
        shown = [f"{{{r['files']}}}" for r in rows[:EXAMPLES]]
        what = "split" if key == SPLIT_LEAKAGE else "label"
        head = f"{unexpected} content hash(es) in more than one {what}"
        more = (unexpected or 0) - len(shown)
        tail = f"; e.g. {', '.join(shown)}" if shown else ""
        return head + tail + (f" and {more} more" if more > 0 else "")
    return ""


def _failure(
    key: str, check: str, gx_result: dict[str, Any], expected: dict[str, Any], n_classes: int
) -> FailedExpectation:
    config = gx_result["expectation_config"]
    column = str(config["kwargs"].get("column", ""))
    result = gx_result.get("result") or {}
    exc = gx_result.get("exception_info") or {}
    if exc.get("raised_exception"):
        message = str(exc.get("exception_message") or "unknown error").strip().splitlines()
        return FailedExpectation(
            expectation=config["type"],
            check=check,
            column=column,
            unexpected_count=None,
            element_count=None,
            details=f"GX raised an error evaluating it: {message[-1] if message else ''}",
        )
    if key == LABELS:
        # Set equality: GX reports labels missing from and extra to the expected set.
        missing = int(result.get("missing_count") or 0)
        unexpected = missing + int(result.get("unexpected_count") or 0)
        element_count: int | None = n_classes
    else:
        unexpected = result.get("unexpected_count")
        element_count = result.get("element_count")
    return FailedExpectation(
        expectation=config["type"],
        check=check,
        column=column,
        unexpected_count=None if unexpected is None else int(unexpected),
        element_count=None if element_count is None else int(element_count),
        details=_details(key, result, expected),
    )


def _gx_context():
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        # No temporary data-docs site on disk, no usage statistics, no tqdm bars on stderr.
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
    )
    return gx.get_context(project_config=config, mode="ephemeral")


def run_gx_suites(suites: dict[str, tuple[pd.DataFrame, list[Any], list[str]]]) -> dict[str, Any]:
    """Each frame validated against its expectations in one ephemeral GX context, with up to
    _PARTIAL examples named by the frame's index columns: frame name -> GX's result as JSON."""
    import great_expectations as gx

    source = _gx_context().data_sources.add_pandas("calibflow")
    results: dict[str, Any] = {}
    for frame_name, (frame, expectations, index_columns) in suites.items():
        definition = source.add_dataframe_asset(frame_name).add_batch_definition_whole_dataframe("whole")
        batch = definition.get_batch(batch_parameters={"dataframe": frame})
        suite = gx.ExpectationSuite(name=f"calibflow.{frame_name}", expectations=expectations)
        outcome = batch.validate(
            suite,
            result_format={
                "result_format": "SUMMARY",
                "unexpected_index_column_names": index_columns,
                "partial_unexpected_count": _PARTIAL,
            },
        )
        results[frame_name] = outcome.to_json_dict()
    return results


def validate_manifest(
    manifest: pd.DataFrame,
    classes: list[str],
    min_per_class: int,
    allowed_sizes: Sequence[str] = (),
    allowed_modes: Sequence[str] = (),
    min_side: int | None = None,
) -> ValidationReport:
    """Validate a split manifest (build_manifest's columns plus `split`) with Great Expectations.

    allowed_sizes ("WxH") / allowed_modes (PIL modes): when empty, every decodable image must have
    the most common size / mode among decodable images. With `min_side` (data.image_size: images
    of any size are framed to the model's), the size check is instead that every image's shorter
    side is at least min_side pixels. Returns the report; raising is the caller's choice (`raise
    DataValidationError(report)` when not report.success).
    """
    missing = [col for col in REQUIRED_COLUMNS if col not in manifest.columns]
    if missing:
        raise ValueError(
            f"manifest lacks column(s) {missing}; validate_manifest needs build_manifest's "
            "columns plus a 'split' column assigned by the splitter"
        )
    if isinstance(min_per_class, bool) or not isinstance(min_per_class, int) or min_per_class < 0:
        raise ValueError(f"min_per_class must be an int >= 0, got {min_per_class!r}")
    if isinstance(allowed_sizes, str) or isinstance(allowed_modes, str):
        raise TypeError("allowed_sizes/allowed_modes must be sequences of strings, not a string")

    started = time.perf_counter()
    import great_expectations as gx

    names = _check_names(min_per_class, allowed_sizes, allowed_modes, min_side)

    # --- the frames GX validates -------------------------------------------------------------
    manifest = manifest.reset_index(drop=True)
    files = manifest[["path", "label", "decodable", "error"]].copy()
    files["decodable"] = files["decodable"].astype("bool")
    images = manifest.loc[files["decodable"], ["path", "size", "mode"]].reset_index(drop=True)
    images["shorter_side"] = [min(int(v) for v in size.split("x")) for size in images["size"]]
    counts = files["label"].value_counts(sort=False)
    per_class = pd.DataFrame(
        {"label": [str(v) for v in counts.index], "count": counts.to_numpy().astype("int64")}
    ).sort_values("label", ignore_index=True)
    contents = _files_by_content(manifest)

    common_size = _most_common(images["size"])
    common_mode = _most_common(images["mode"])
    expected = {
        SIZE: list(allowed_sizes) if allowed_sizes else ([common_size] if common_size else []),
        MODE: list(allowed_modes) if allowed_modes else ([common_mode] if common_mode else []),
    }
    if min_side is not None:
        expected["min_side"] = min_side
        if not allowed_modes:
            # photos are framed and converted one by one: any mode with a defined conversion to the
            # model's (images.model_mode), gray JPEGs among colour ones included
            expected[MODE] = sorted(GRAY_MODES | COLOUR_MODES)

    E = gx.expectations

    def meta(key: str) -> dict[str, str]:
        return {"calibflow_check": key, "check": names[key]}

    suites: dict[str, tuple[pd.DataFrame, list[Any], list[str]]] = {
        "files": (
            files,
            [
                E.ExpectColumnValuesToBeInSet(column="decodable", value_set=[True], meta=meta(DECODES)),
                E.ExpectColumnDistinctValuesToEqualSet(
                    column="label", value_set=sorted(set(classes)), meta=meta(LABELS)
                ),
            ],
            ["path", "error"],
        ),
        "images": (
            images,
            [
                (
                    E.ExpectColumnValuesToBeBetween(column="shorter_side", min_value=min_side, meta=meta(SIZE))
                    if min_side is not None
                    else E.ExpectColumnValuesToBeInSet(column="size", value_set=expected[SIZE], meta=meta(SIZE))
                ),
                E.ExpectColumnValuesToBeInSet(column="mode", value_set=expected[MODE], meta=meta(MODE)),
            ],
            ["path", "size"] if min_side is not None else ["path"],
        ),
        "classes": (
            per_class,
            [E.ExpectColumnValuesToBeBetween(column="count", min_value=min_per_class, meta=meta(MIN_PER_CLASS))],
            ["label"],
        ),
        "contents": (
            contents,
            [
                E.ExpectColumnValuesToBeBetween(column="n_splits", max_value=1, meta=meta(SPLIT_LEAKAGE)),
                E.ExpectColumnValuesToBeBetween(column="n_labels", max_value=1, meta=meta(LABEL_CONFLICT)),
            ],
            ["files"],
        ),
    }

    # --- run them in one ephemeral context ----------------------------------------------------
    results = run_gx_suites(suites)
    by_key: dict[str, dict[str, Any]] = {}
    for as_json in results.values():
        for gx_result in as_json["results"]:
            key = (gx_result["expectation_config"].get("meta") or {}).get("calibflow_check")
            if key not in CHECK_ORDER:
                raise RuntimeError(f"GX result without a calibflow check key: {gx_result}")
            by_key[key] = gx_result

    if set(by_key) != set(CHECK_ORDER):
        raise RuntimeError(f"GX returned results for {sorted(by_key)}, expected {CHECK_ORDER}")

    failures = tuple(
        _failure(key, names[key], by_key[key], expected, len(set(classes)))
        for key in CHECK_ORDER
        if not by_key[key]["success"]
    )
    seconds = round(time.perf_counter() - started, 3)
    statistics = {
        "evaluated_expectations": len(CHECK_ORDER),
        "successful_expectations": len(CHECK_ORDER) - len(failures),
        "unsuccessful_expectations": len(failures),
        "success_percent": round(100.0 * (len(CHECK_ORDER) - len(failures)) / len(CHECK_ORDER), 2),
        "files": int(len(files)),
        "decodable_files": int(len(images)),
        "classes": int(len(set(classes))),
        "distinct_contents": int(len(contents)),
        "expected_size": f"shorter side >= {min_side}" if min_side is not None else expected[SIZE],
        "expected_mode": expected[MODE],
        "seconds": seconds,
    }
    report = ValidationReport(success=not failures, failures=failures, statistics=statistics, result=results)
    logger.info("%s (%.2fs)", report.summary().splitlines()[0], seconds)
    return report
