"""The run's summary as people read it: the verdict line, the calibration warning, and the markdown
summary published as the flow run's artifact and the MLflow description.
"""

from __future__ import annotations


from calibflow.gates.checks import GateVerdict
from calibflow.names import (
    CALIBRATED,
    UNCALIBRATED,
)
from calibflow.pipeline.evaluation_steps import CalibrationRecord, Evaluation
from calibflow.pipeline.tagging import _bound_text


def calibration_warning(evaluation: Evaluation, fit: CalibrationRecord | None = None) -> str | None:
    """What calibration made worse on the test split (ECE or NLL), or None: a fit that lowers the
    calibration split's NLL can still raise the test split's, which nobody should learn from a chart."""
    worse = [
        f"{label} {evaluation.before[key]:.4f} -> {evaluation.after[key]:.4f}"
        for key, label in (("ece", "ECE"), ("nll", "NLL"))
        if evaluation.after[key] > evaluation.before[key]
    ]
    if not worse:
        return None
    fitted = (
        f" (T = {fit.temperature:.3f})"
        if fit is not None and fit.temperature
        else f" ({fit.method})"
        if fit is not None
        else ""
    )
    return (
        f"WARNING: calibration{fitted} made the test split worse: {', '.join(worse)}. The uncalibrated model "
        f"was already well calibrated, or the calibration split is too small to fit on."
    )


def verdict_line(evaluation: Evaluation, fit: CalibrationRecord | None, verdict: GateVerdict) -> str:
    """One line: the verdict, test ECE before -> after with the gate's bound, accuracy with its bound,
    T, and each other check that failed, e.g.
    "PASSED · ECE 0.0120 -> 0.0123 (95% upper 0.0235 <= 0.05) · acc 0.989 (lower 0.978 >= 0.9) · T 0.956"."""
    head = (
        "PASSED"
        if verdict.passed
        else "FAILED"
        if not verdict.absolute_passed
        else "PASSED, NOT PROMOTABLE (fails against @champion)"
    )
    parts = [head]
    by_name = {c.name: c for c in verdict.checks}
    ece = by_name.get("max_ece")
    text = f"ECE {evaluation.before['ece']:.4f} -> {evaluation.after['ece']:.4f}"
    if ece is not None:
        measure = ece.metric.split(" (")[0]  # "smooth ECE (sigma 0.0146)": the bandwidth is in the gate's tag
        text += f" ({'' if ece.passed else 'FAIL '}{measure} {_bound_text(ece, verdict.confidence)})"
    parts.append(text)
    accuracy = by_name.get("min_accuracy")
    text = f"acc {evaluation.after['accuracy']:.3f}"
    if accuracy is not None:
        text += (
            f" ({'' if accuracy.passed else 'FAIL '}lower {accuracy.bound:.3f} {accuracy.relation} "
            f"{accuracy.threshold:g})"
        )
    parts.append(text)
    if fit is not None:
        parts.append(f"T {fit.temperature:.3f}" if fit.temperature else fit.method)
    parts += [
        f"FAIL {c.name} ({_bound_text(c, verdict.confidence)})"
        for c in verdict.checks
        if not c.passed and c.name not in ("max_ece", "min_accuracy")
    ]
    return " · ".join(parts)


def summary_markdown(
    run_id: str,
    tracking_uri: str,
    outcome: str,
    evaluation: Evaluation | None,
    fit: CalibrationRecord | None,
    verdict: GateVerdict | None,
    version=None,
) -> str:
    """The run's description in MLflow (and the Prefect run summary): the verdict line first, then a
    warning when calibration made the test split worse, then the numbers. `tracking_uri` is shown as
    given: pass it with its credentials masked (store.configure_tracking returns it so)."""
    lines = []
    if verdict is not None and evaluation is not None:
        lines += [verdict_line(evaluation, fit, verdict), ""]
    else:
        lines += [outcome.upper() if outcome in ("registered", "failed") else outcome, ""]
    warning = calibration_warning(evaluation, fit) if evaluation is not None else None
    if warning:
        lines += [f"> **{warning}**", ""]
    lines += [f"## calibflow run: {outcome}", "", f"MLflow run `{run_id}` at `{tracking_uri}`", ""]
    if fit is not None:
        what = f"temperature **{fit.temperature:.4f}**" if fit.temperature else f"**{fit.method}** calibration"
        lines += [f"Calibrated with {what} (calibration NLL {fit.nll_before:.4f} -> {fit.nll_after:.4f})", ""]
    if evaluation is not None:
        lines += [f"| test split | {UNCALIBRATED} | {CALIBRATED} |", "| --- | --- | --- |"]
        lines += [
            f"| {name} | {evaluation.before[name]:.4f} | {evaluation.after[name]:.4f} |" for name in evaluation.after
        ]
        lines.append("")
    if verdict is not None:
        lines += [
            f"Gates at one-sided {verdict.confidence:.0%} confidence on {verdict.n_samples} test images:",
            "",
            "| gate | value | bound | threshold | verdict |",
            "| --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {c.name} | {c.value:.4f} | {c.bound:.4f} | {c.comparison} {c.threshold:.4f} | "
            f"{'pass' if c.passed else 'FAIL'} |"
            for c in verdict.checks
        ]
        lines.append("")
    if version is not None:
        lines.append(f"Registered **{version.name}** version {version.version} as `@{version.alias}`.")
    return "\n".join(lines)
