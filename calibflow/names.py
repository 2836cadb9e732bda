"""One vocabulary for what a run measures.

An MLflow metric, a registered version's tag and a key of reports/metrics.json name the same
quantity with the same slash-separated path: `test/calibrated/ece` is the metric, the version tag,
and `test.calibrated.ece` in `dvc metrics show` (metrics.json nests the path; DVC prints it with
dots). MLflow 3 groups a run's charts by the part before the last `/`, so the paths are chosen to
give one chart section each: `train/`, `val/`, `calibration/`, `test/uncalibrated/`,
`test/calibrated/`, `test/decision/`, `gate/`, `shift/uncalibrated/`, `shift/calibrated/`,
`ood/msp/`, `ood/energy/`.

Versions registered before this vocabulary carry their numbers under older tags (`ece_post`,
`accuracy`, ...); version_tag reads either, so `calibflow status`, `evaluate` and the gates keep
working on them.
"""

from __future__ import annotations

from collections.abc import Mapping

UNCALIBRATED = "uncalibrated"  # the network's plain softmax
CALIBRATED = "calibrated"  # after the fitted calibrator (temperature scaling by default)
STAGES = (UNCALIBRATED, CALIBRATED)

TEMPERATURE = "calibration/temperature"
CALIBRATION_METHOD = "calibration/method"
CALIBRATION_WARNING = "calibration/warning"  # a run tag, set when calibration made the test ECE or NLL worse


def on_test(stage: str, name: str) -> str:
    """`test/<uncalibrated|calibrated>/<name>`: a test-split metric before or after calibration."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r}: use one of {', '.join(STAGES)}")
    return f"test/{stage}/{name}"


def gate_metric(check: str, part: str) -> str:
    """`gate/<check>_<value|bound|threshold>`: what a gate read, the bound it decided on, the limit
    (one `gate` chart section for all of them)."""
    return f"gate/{check}_{part}"


def calibration_metric(stage: str, name: str) -> str:
    """`calibration/<stage>_<name>`: the calibration split's numbers, one chart section with T."""
    return f"calibration/{stage}_{name}"


def gate_tag(check: str) -> str:
    """`gate/<check>`: a run tag per gate, its verdict with the bound, e.g. "passed: upper 0.0235 <= 0.05"."""
    return f"gate/{check}"


GATE_AGAINST = "gate/against"  # the champion version the relative gates compared with, or why none

# The verdict, in three parts, under the same tags on the run and on the registered version, and as
# the `verdict` section of reports/metrics.json (VERDICT_JSON_KEYS): the gates that decide
# registration, the gates against the champion, and whether the version serves now. Nothing else
# states a verdict: a CD job reads these.
VERDICT_ABSOLUTE = "verdict/absolute"  # PASSED | FAILED
VERDICT_CHAMPION = "verdict/champion"  # PASSED | FAILED | NO_CHAMPION | NOT_COMPARED
VERDICT_PROMOTED = "verdict/promoted"  # PROMOTED | AT_CHALLENGER | NOT_REGISTERED | replaced_by(...)
VERDICT_FAILED = "verdict/failed"  # the failed checks, "max_ece_increase 0.0143 > 0.01; ...", or NONE_FAILED
VERDICT_TAGS = (VERDICT_ABSOLUTE, VERDICT_CHAMPION, VERDICT_PROMOTED, VERDICT_FAILED)
VERDICT_JSON_KEYS = {tag: tag.split("/", 1)[1] for tag in VERDICT_TAGS}  # metrics.json: verdict.absolute, ...

PASSED = "passed"
FAILED = "failed"
NO_CHAMPION = "no champion"  # there was no @champion to compare with
NOT_COMPARED = "not compared"  # a champion, but no gate against it configured, or no test image it was not fitted on
PROMOTED = "yes: @champion"
AT_CHALLENGER = "no: @challenger"  # registered, waiting for CD (calibflow gate / promote)
NOT_REGISTERED = "no: not registered"
NONE_FAILED = "none"


def replaced_by(version: str) -> str:
    """verdict/promoted of a champion that another version replaced (promotion or rollback)."""
    return f"no: replaced as @champion by version {version}"


def is_promoted(tags: Mapping[str, str]) -> bool:
    return tags.get(VERDICT_PROMOTED, "").startswith("yes")


# Written by runs before the three-part verdict (read only, for versions registered then).
GATE_VERDICT = "gate/verdict"
GATE_ABSOLUTE = "gate/absolute"


def verdict_text(tags: Mapping[str, str]) -> str | None:
    """The verdict a run's or a version's tags record, in one line, e.g. "absolute gates passed ·
    against champion version 1: failed · promoted no: @challenger · failed: max_ece_increase 0.0143 >
    0.01"; None when they record none."""
    absolute = tags.get(VERDICT_ABSOLUTE) or tags.get(GATE_ABSOLUTE)
    if not absolute:
        return None
    champion = tags.get(VERDICT_CHAMPION)
    if champion is None:  # a version registered before the three-part verdict
        return f"absolute gates {absolute} · all gates {tags.get(GATE_VERDICT, '?')} · promoted not recorded"
    against = tags.get(GATE_AGAINST, "")
    if champion != NO_CHAMPION:
        champion = (
            f"against champion {against}: {champion}" if against.startswith("version") else f"champion {champion}"
        )
    failed = tags.get(VERDICT_FAILED, NONE_FAILED)
    return f"absolute gates {absolute} · {champion} · promoted {tags.get(VERDICT_PROMOTED, NOT_REGISTERED)}" + (
        "" if failed == NONE_FAILED else f" · failed: {failed}"
    )


def shift_metric(cell: str, stage: str, name: str) -> str:
    """`shift/<stage>/<corruption>_s<severity>_<name>` or `shift/<stage>/mean_<name>`: a chart
    section per stage rather than one per cell."""
    return f"shift/{stage}/{cell}_{name}"


def ood_metric(score: str, name: str) -> str:
    """`ood/<msp|energy>/<auroc|aupr|fpr95>`."""
    return f"ood/{score}/{name}"


def nested(flat: Mapping[str, object]) -> dict:
    """{"test/calibrated/ece": 0.01} -> {"test": {"calibrated": {"ece": 0.01}}}: metrics.json's shape."""
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


# The tags of versions registered before this vocabulary: new name -> old name.
LEGACY_VERSION_TAGS = {
    on_test(UNCALIBRATED, "ece"): "ece_pre",
    on_test(CALIBRATED, "ece"): "ece_post",
    on_test(CALIBRATED, "accuracy"): "accuracy",
    on_test(UNCALIBRATED, "nll"): "nll_pre",
    on_test(CALIBRATED, "nll"): "nll_post",
    on_test(CALIBRATED, "brier"): "brier_post",
    on_test(CALIBRATED, "mce"): "mce_post",
    TEMPERATURE: "temperature",
    CALIBRATION_METHOD: "calibration_method",
    **{shift_metric("mean", CALIBRATED, m): f"shift_mean_{m}" for m in ("accuracy", "ece", "nll")},
}


def version_tag(tags: Mapping[str, str], name: str, default: str | None = None) -> str | None:
    """The version tag `name`, or, for a version registered before this vocabulary, its old tag."""
    if name in tags:
        return tags[name]
    legacy = LEGACY_VERSION_TAGS.get(name)
    if legacy is not None and legacy in tags:
        return tags[legacy]
    return default


# A registered version's digests of the files its run logged that later commands read back
# (manifest, split, checkpoint, the corruption suite's numbers): JSON {artifact path: sha256}.
# The run's artifacts live in the artifact store, the tags in the tracking database: a file
# edited in the store after registration no longer matches (calibflow.lifecycle.reproduce).
RUN_ARTIFACTS_TAG = "run_artifacts_sha256"
