"""The run's summary as people read it: the verdict line, the calibration warning, and the markdown
summary published as the flow run's artifact and the MLflow description.
"""

from __future__ import annotations


from calibflow import names
from calibflow.gates.checks import GateVerdict
from calibflow.names import (
    CALIBRATED,
    UNCALIBRATED,
)
from calibflow.pipeline.evaluation_steps import CalibrationRecord, Evaluation
from calibflow.pipeline.tagging import RunVerdict, _bound_text, run_verdict


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


def headline(outcome: RunVerdict) -> str:
    """The verdict's first word, for a reader scanning a list of runs or versions."""
    if names.is_promoted(outcome.tags()):
        return "PROMOTED"
    if outcome.promoted == names.AT_CHALLENGER:
        return "NOT PROMOTED"
    if outcome.promoted == names.NOT_REGISTERED:
        return "REJECTED" if outcome.absolute == names.FAILED else "NOT REGISTERED"
    return "REPLACED"


HEADLINES = ("PROMOTED", "NOT PROMOTED", "REJECTED", "NOT REGISTERED", "REPLACED")


def verdict_line(
    evaluation: Evaluation | None,
    fit: CalibrationRecord | None,
    verdict: GateVerdict,
    outcome: RunVerdict | None = None,
) -> str:
    """One line: the headline, the three-part verdict in the words of the tags (RunVerdict.text),
    then test ECE before -> after with the gate's bound, accuracy with its bound, and T, e.g.
    "PROMOTED · absolute gates passed · no champion · promoted yes: @champion · ECE 0.0120 -> 0.0123
    (smooth ECE 95% upper 0.0235 <= 0.05) · acc 0.989 (lower 0.978 >= 0.9) · T 0.956". `outcome`
    defaults to the gates' verdict with nothing registered."""
    outcome = outcome or run_verdict(verdict, None)
    parts = [headline(outcome), outcome.text()]
    by_name = {c.name: c for c in verdict.checks}
    if evaluation is not None:
        ece = by_name.get("max_ece")
        text = f"ECE {evaluation.before['ece']:.4f} -> {evaluation.after['ece']:.4f}"
        if ece is not None:
            measure = ece.metric.split(" (")[0]  # "smooth ECE (sigma 0.0146)": the bandwidth is in the gate's tag
            text += f" ({measure} {_bound_text(ece, verdict.confidence)})"
        parts.append(text)
        accuracy = by_name.get("min_accuracy")
        text = f"acc {evaluation.after['accuracy']:.3f}"
        if accuracy is not None:
            text += f" (lower {accuracy.bound:.3f} {accuracy.relation} {accuracy.threshold:g})"
        parts.append(text)
    if fit is not None:
        parts.append(f"T {fit.temperature:.3f}" if fit.temperature else fit.method)
    return " · ".join(parts)


# Lines of a description that state a verdict or an alias as it was when they were written: a new
# verdict drops them (a verdict line, the version page's verdict row and its title with the alias,
# the run summary's closing "Registered ... now @alias").
STALE_LINE_STARTS = (*HEADLINES, "| verdict |", "Registered **")


def with_new_verdict(description: str, line: str, record: list[str], *, title: str = "") -> str:
    """A version's description after its verdict changed (a promotion, a rollback): `line` first,
    then `record` (what changed, by whom), then what it said before under a heading, without the
    lines that stated the old verdict or alias (STALE_LINE_STARTS, and `title`: the page's title
    line, which names the alias), so that nothing on the page contradicts the new verdict."""
    stale = (*STALE_LINE_STARTS, title) if title else STALE_LINE_STARTS
    kept = [text for text in (description or "").splitlines() if not text.startswith(stale)]
    old = "\n".join(kept).strip()
    while old.startswith("### Before"):  # the heading of an earlier change
        old = old.removeprefix("### Before").strip()
    lines = [line, "", *record]
    if old:
        lines += ["", "### Before", "", old]
    return "\n".join(lines)


def summary_markdown(
    run_id: str,
    tracking_uri: str,
    outcome: str,
    evaluation: Evaluation | None,
    fit: CalibrationRecord | None,
    verdict: GateVerdict | None,
    version=None,
    *,
    final: RunVerdict | None = None,
) -> str:
    """The run's description in MLflow (and the Prefect run summary): the verdict line first (or,
    for a run that ended before its gates, `outcome`, which carries the reason), then a warning when
    calibration made the test split worse, then the numbers. `final` is the three-part verdict as
    the run ended (by default: the gates' verdict, with `version`'s alias or nothing registered).
    `tracking_uri` is shown as given: pass it with its credentials masked (store.configure_tracking
    returns it so)."""
    lines = []
    if verdict is not None:
        if final is None:
            final = run_verdict(verdict, None, getattr(version, "alias", None))
        lines += [verdict_line(evaluation, fit, verdict, final), ""]
    else:
        lines += [outcome if outcome.startswith("skipped") else f"NOT REGISTERED · {outcome}", ""]
    warning = calibration_warning(evaluation, fit) if evaluation is not None else None
    if warning:
        lines += [f"> **{warning}**", ""]
    lines += [f"## calibflow run: {outcome}", "", f"MLflow run `{run_id}` at `{tracking_uri}`", ""]
    if fit is not None:
        what = f"temperature **{fit.temperature:.4f}**" if fit.temperature else f"**{fit.method}** calibration"
        against = " against the soft labels" if fit.objective == "soft_nll" else ""
        lines += [f"Calibrated with {what} (calibration NLL{against} {fit.nll_before:.4f} -> {fit.nll_after:.4f})", ""]
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
            "| gate | value | bound vs threshold | verdict |",
            "| --- | --- | --- | --- |",
        ]
        lines += [
            f"| {c.name} | {c.value:.4f} | {c.bound:.4f} {c.relation} {c.threshold:g} | {'pass' if c.passed else 'FAIL'} |"
            for c in verdict.checks
        ]
        lines.append("")
    if version is not None:
        alias = "champion" if final is not None and names.is_promoted(final.tags()) else version.alias
        lines.append(f"Registered **{version.name}** version {version.version}, now `@{alias}`.")
    return "\n".join(lines)
