"""reports/metrics.json and reports/plots, staged beside the old ones and published only when the run
succeeds: a failed run leaves the last good report as it was.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


from calibflow.gates.checks import GateVerdict
from calibflow.leftovers import ProcessId, alive, this_process
from calibflow.names import (
    nested,
)
from calibflow.errors import ReportError
from calibflow.pipeline.evaluation_steps import (
    CalibrationRecord,
    DecisionEvaluation,
    Evaluation,
    OODEvaluation,
    ShiftEvaluation,
)
from calibflow.pipeline.tagging import RunVerdict, fit_metrics, run_verdict, test_metrics


@dataclass(frozen=True)
class StagedReport:
    path: str  # where it goes: reports/metrics.json
    staged: str  # its new content, written beside it, not in place yet
    plots: tuple[tuple[str, str], ...] = ()  # (staged, where it goes): dvc.yaml's plots, published with it


def stage_metrics_report(
    path: str,
    evaluation: Evaluation,
    fit: CalibrationRecord,
    verdict: GateVerdict,
    *,
    decisions: DecisionEvaluation | None = None,
    shifted: ShiftEvaluation | None = None,
    ood: OODEvaluation | None = None,
    plots: dict[str, str] | None = None,
    champion: str | None = None,
) -> StagedReport:
    """Write the new reports/metrics.json (a DVC metric) beside the old one, before anything is
    registered: a report that cannot be written fails the run while the registry is untouched,
    and the previous report stays in place until publish_report renames this one over it.
    `champion`: the version the gates compared with."""
    report = metrics_report(
        evaluation, fit, verdict, run_verdict(verdict, champion), decisions=decisions, shifted=shifted, ood=ood
    )
    target = Path(path)
    if target.exists() and not target.is_file():
        raise ReportError(
            f"{target} is a {'directory' if target.is_dir() else 'special file'}, not a file: remove "
            f"it, as the run writes its metrics report (the DVC metric) there"
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_stages(target)
        staged = _write_beside(target, json.dumps(report, indent=2))
    except OSError as error:
        raise ReportError(f"cannot write {target}: {error}") from error
    staged_plots = []
    try:  # dvc.yaml's plots (`plots`: where it goes -> this run's file), staged the same way
        for destination, source in (plots or {}).items():
            plot = Path(destination)
            plot.parent.mkdir(parents=True, exist_ok=True)
            _remove_abandoned_stages(plot)
            staged_plots.append((_write_beside(plot, Path(source).read_bytes()), str(plot)))
    except OSError as error:
        discard_report(StagedReport(str(target), staged, tuple(staged_plots)))
        raise ReportError(f"cannot write {destination}: {error}") from error
    return StagedReport(path=str(target), staged=staged, plots=tuple(staged_plots))


def metrics_report(
    evaluation: Evaluation,
    fit: CalibrationRecord,
    verdict: GateVerdict,
    final: RunVerdict,
    *,
    decisions: DecisionEvaluation | None = None,
    shifted: ShiftEvaluation | None = None,
    ood: OODEvaluation | None = None,
) -> dict:
    """reports/metrics.json: small sections, so that `dvc metrics show` prints a row a reader can
    follow and `dvc metrics diff` compares the same keys between commits. The verdict in the words
    of the tags; the test split before and after calibration; T; each gate's bound (its threshold
    is in params.yaml, `dvc params diff`); the suite's means, not its cells, and the OOD scores (the
    MLflow run holds every number)."""
    report: dict = {"verdict": final.to_json(), **nested(test_metrics(evaluation))}
    # the calibration split's NLL before and after the fit, and T: the names of the run's metrics
    report["calibration"] = {"method": fit.method, **nested(fit_metrics(fit))["calibration"]}
    report["gate"] = {f"{c.name}_bound": float(c.bound) for c in verdict.checks if np.isfinite(c.bound)}
    if decisions is not None and decisions.metrics:
        report["test"]["decision"] = dict(decisions.metrics)
    if shifted is not None:
        means = {k: v for k, v in shifted.metrics.items() if "/mean_" in k}  # before and after calibration
        report["shift"] = nested(means)["shift"]
    if ood is not None:
        report["ood"] = {"n_images": ood.n_images, **nested(ood.metrics)["ood"]}
    return report


def publish_report(report: StagedReport, final: RunVerdict | None = None) -> str:
    """Put the staged report in place: one rename, so readers see the old report or the new one,
    never a mix or a truncated file. `final`: the verdict as the run ends (the staged report was
    written before anything was registered), written into the staged file first."""
    try:
        if final is not None:
            content = json.loads(Path(report.staged).read_text())
            content["verdict"] = final.to_json()
            Path(report.staged).write_text(json.dumps(content, indent=2))
        for staged, destination in report.plots:
            os.replace(staged, destination)
        os.replace(report.staged, report.path)
    except OSError as error:
        discard_report(report)
        raise ReportError(f"cannot replace {report.path}: {error}") from error
    return report.path


def discard_report(report: StagedReport) -> None:
    for staged in (report.staged, *(staged for staged, _ in report.plots)):
        Path(staged).unlink(missing_ok=True)
    for folder in {Path(staged).parent for staged, _ in report.plots}:
        try:  # the plots folder staging created, when nothing else is in it: a failed run leaves no trace
            folder.rmdir()
        except OSError:
            pass


def _stage_prefix(target: Path) -> str:
    return f".{target.name}."


def _write_beside(target: Path, text: str | bytes) -> str:
    """A new file beside `target` holding `text`, named after this process (pid and start time:
    see _remove_abandoned_stages). os.open with mode 0o666 lets the umask decide its permissions,
    as for any file the user's tools create (tempfile's are 0600: only the owner could read the
    report)."""
    me = this_process()
    owner = f"{me.pid}-{me.started}" if me else str(os.getpid())
    for attempt in range(1000):
        candidate = target.with_name(f"{_stage_prefix(target)}{owner}.{attempt}.tmp")
        try:
            descriptor = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            with os.fdopen(descriptor, "wb" if isinstance(text, bytes) else "w") as handle:
                handle.write(text)
        except BaseException:
            candidate.unlink(missing_ok=True)
            raise
        return str(candidate)
    raise ReportError(f"cannot stage {target}: 1000 staged copies of it already exist beside it")


def _remove_abandoned_stages(target: Path) -> None:
    """Staged reports of runs whose process is gone (killed between staging and publishing);
    those of a run still going on beside this one stay."""
    for staged in target.parent.glob(f"{_stage_prefix(target)}*.tmp"):
        owner = staged.name.removeprefix(_stage_prefix(target)).split(".")[0]
        pid, _, started = owner.partition("-")
        if pid.isdigit() and started and not alive(ProcessId(int(pid), started)):
            staged.unlink(missing_ok=True)
