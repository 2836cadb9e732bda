"""The `calibflow` command line.

Exit codes, for CD: 0 success (gate passed, model registered or promoted); 1 the model was
rejected (data validation, a gate, or a registry model whose metrics do not reproduce); 2 the
command could not decide or run as asked (bad params, data not pinned by DVC, a version or the
data at its recorded revision not found, the registry unreachable, a promotion that lost a race).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import traceback
from pathlib import Path

from calibflow.environment import apply_quiet_defaults
from calibflow import errors
from calibflow.errors import EXIT_OK, EXIT_REJECTED, EXIT_USAGE
from calibflow.errors import one_line as _one_line


def main(argv: list[str] | None = None) -> int:
    apply_quiet_defaults()  # before Prefect, MLflow, DVC or GX is imported
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["gate", "plan"]:  # a form of `gate` with arguments of its own
        args, handler = _gate_plan_parser().parse_args(argv[2:]), _gate_plan
        args.command = "gate plan"
        return _dispatch(handler, args)
    parser = argparse.ArgumentParser(
        prog="calibflow", description="Train, calibrate, gate and register image classifiers."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the pipeline flow (train -> calibrate -> gates -> registry)")
    run.add_argument("--params", default="params.yaml", help="params file, relative to --repo (default params.yaml)")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param for this run, e.g. --set train.epochs=3 (repeatable)",
    )
    run.add_argument("--data-rev", default=None, help="git revision to read the dataset at (default: the working tree)")
    run.add_argument("--repo", default=".", help="repository root (default: current directory)")
    run.add_argument(
        "--force", action="store_true", help="retrain even when @champion was built from the same data, params and code"
    )
    run.add_argument(
        "--json",
        nargs="?",
        const="-",
        default=None,
        metavar="PATH",
        help="the result as JSON: on stdout instead of the summary, or written to PATH",
    )

    evaluate = commands.add_parser("evaluate", help="recompute a registered model's test metrics in this process")
    evaluate.add_argument("--model", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    evaluate.add_argument("--repo", default=".")
    evaluate.add_argument("--json", dest="json_path", default=None, help="also write the result to this file")

    predict = commands.add_parser("predict", help="calibrated top class and probability of image files")
    predict.add_argument("--model", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    predict.add_argument("--repo", default=".")
    predict.add_argument("images", nargs="+")

    gate = commands.add_parser(
        "gate",
        help="may this version replace the champion? exit 0 pass, 1 fail, 2 undecided "
        "(`calibflow gate plan --help`: how many test images the gates need)",
    )
    _add_gate_arguments(gate)
    gate.add_argument("--json", dest="json_path", default=None, help="also write the report to this file")

    promote = commands.add_parser("promote", help="gate the candidate, then move @champion to it if it passes")
    _add_gate_arguments(promote)
    promote.add_argument("--force", action="store_true", help="promote even if the gate fails (needs --reason)")
    promote.add_argument("--reason", default=None, help="why a failed gate is overridden (recorded on the version)")

    rollback = commands.add_parser("rollback", help="move @champion back to the version it replaced")
    rollback.add_argument("--model", required=True)
    rollback.add_argument("--repo", default=".")

    monitor = commands.add_parser(
        "monitor",
        help="has a registered model drifted on new images? exit 0 fine, "
        "1 calibration drifted, 3 accuracy drifted, 2 undecided",
    )
    monitor.add_argument("--model", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    monitor.add_argument("--data", required=True, help="a DVC-tracked folder: <class>/<image> (labeled) or flat")
    monitor.add_argument(
        "--params", default="params.yaml", help="monitor: tolerances, gates.confidence (relative to --repo)"
    )
    monitor.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    monitor.add_argument("--repo", default=".")
    monitor.add_argument("--json", dest="json_path", default=None, help="also write the report to this file")

    recal = commands.add_parser(
        "recalibrate",
        help="fit a new calibrator for a registered network on newly labeled "
        "images, gate it, register it: exit 0 registered, 1 rejected, "
        "2 could not run",
    )
    recal.add_argument("--model", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    recal.add_argument("--data", required=True, help="a DVC-tracked ImageFolder of newly labeled images")
    recal.add_argument("--against", default="@champion", help="VERSION or @alias the relative gates compare with")
    recal.add_argument("--params", default="params.yaml", help="calibration:, gates: (relative to --repo)")
    recal.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    recal.add_argument("--repo", default=".")

    status = commands.add_parser("status", help="versions with their aliases, ECE, accuracy, temperature, data hash")
    status.add_argument("--model", required=True)
    status.add_argument("--repo", default=".")

    prepare = commands.add_parser(
        "prepare-digits", help="write the default dataset: scikit-learn's digits with pixel noise, as PNGs"
    )
    prepare.add_argument("--out", default="data/digits")

    schedule = commands.add_parser(
        "schedule",
        help="serve the scheduled retraining deployment (params.yaml `schedule:`) from this machine, "
        "or register it with a work pool (--deploy); needs a Prefect server (PREFECT_API_URL)",
    )
    schedule.add_argument("--repo", default=".", help="the checkout scheduled runs use (stored as an absolute path)")
    schedule.add_argument("--params", default="params.yaml", help="params file, relative to --repo")
    schedule.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="schedule.* keys shape the deployment; other keys are passed to every run (repeatable)",
    )
    schedule.add_argument(
        "--deploy",
        action="store_true",
        help="register with the work pool schedule.work_pool and exit; a worker runs the flow runs",
    )

    data = commands.add_parser("data", help="manage the DVC-tracked datasets under data/")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    data_add = data_commands.add_parser(
        "add", help="copy an ImageFolder into data/NAME, `dvc add` it and commit the .dvc file with git"
    )
    data_add.add_argument("source", metavar="PATH", help="an ImageFolder directory (<class>/<image>)")
    data_add.add_argument("--name", required=True, help="the dataset's name: it becomes data/NAME (data.path)")
    data_add.add_argument("--repo", default=".", help="repository root (default: current directory)")
    data_add.add_argument("--message", "-m", default=None, help="git commit message")
    data_add.add_argument(
        "--replace",
        action="store_true",
        help="replace an existing, different data/NAME (its new version gets a new commit)",
    )
    data_add.add_argument("--push", action="store_true", help="also `dvc push` it to the default DVC remote")

    args = parser.parse_args(argv)  # a usage error exits 2 here (argparse's own code)
    handler = {
        "run": _run,
        "evaluate": _evaluate,
        "predict": _predict,
        "gate": _gate,
        "promote": _promote,
        "rollback": _rollback,
        "status": _status,
        "monitor": _monitor,
        "recalibrate": _recalibrate,
        "prepare-digits": _prepare,
        "schedule": _schedule,
        "data": _data,
    }[args.command]
    return _dispatch(handler, args)


# Garbage collection policy of the console script (entry_point), not of main(): tests and
# embedders call main() and keep their interpreter's collector as it was. A command imports torch,
# MLflow, Prefect and their dependencies (~700k objects that live until exit); CPython's full
# collections traverse every one of them each time the heap grows by a quarter, which measured 2.7 s
# of collections in one default run, and 2-4 s more for the final collection at exit.
_COLLECTOR_PAUSED = False
YOUNG_COLLECTION_THRESHOLDS = (5_000, 20, 20)  # CPython's default (700, 10, 10): fewer, larger young passes


def entry_point() -> None:
    """The `calibflow` console script: main() with the collector paused while the command imports
    (imports create next to no cyclic garbage), and exit without the final traversal."""
    global _COLLECTOR_PAUSED
    gc.disable()
    _COLLECTOR_PAUSED = True
    code = main()
    gc.freeze()  # exit now frees the objects by reference count alone
    sys.exit(code)


def _imports_done() -> None:
    """After a long command's heavy imports (`run`, `schedule`; the short ones end with the
    collector paused, as a short script may): move every object alive now to the collector's permanent
    generation (never traversed again; cycles made from here on are still collected) and resume
    collecting, less often. A no-op outside the console script."""
    global _COLLECTOR_PAUSED
    if _COLLECTOR_PAUSED:
        gc.freeze()
        gc.set_threshold(*YOUNG_COLLECTION_THRESHOLDS)
        gc.enable()
        _COLLECTOR_PAUSED = False


def _model_threads(threads=None):
    """torch's threads while a command runs a registered model: train.threads (its default when
    the command reads no params), as the pipeline collected the logits being reproduced. Beside
    another busy process, torch's default of one thread per core is several times slower (README,
    "Training loop and threads"); the logits are the same at any count."""
    from calibflow.config import TrainConfig
    from calibflow.training.loop import intra_op_threads

    return intra_op_threads(TrainConfig.threads if threads is None else threads)


def _dispatch(handler, args: argparse.Namespace) -> int:
    repo = getattr(args, "repo", None)
    if repo is not None and not Path(repo).is_dir():
        print(
            f"calibflow {args.command}: --repo {repo} is not a directory: run in the repository root or pass "
            f"--repo PATH",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        return handler(args)
    except Exception as error:  # noqa: BLE001
        # Python exits 1 on an uncaught exception, and CD reads 1 as "rejected, keep the
        # champion". An error nobody anticipated decided nothing: exit 2, with the traceback,
        # because it is a bug to report rather than a user mistake.
        traceback.print_exc()
        print(
            f"calibflow {args.command}: unexpected {type(error).__name__}, nothing decided (exit 2); please "
            f"report it with the traceback above: {_one_line(error)}",
            file=sys.stderr,
        )
        return EXIT_USAGE


def _store_failed(command: str, error: Exception) -> int:
    """A registry error (a missing model, version or alias, or a tracking server that failed) on
    stderr as one line; exit 2: nothing could be decided."""
    from calibflow.tracking import store

    print(f"calibflow {command}: {_one_line(error)} (MLflow registry at {store.tracking_uri()})", file=sys.stderr)
    return EXIT_USAGE


def _run(args: argparse.Namespace) -> int:
    from calibflow.config import load_config
    from calibflow.errors import ConfigError

    try:  # fail on a bad key before Prefect and MLflow start
        load_config(Path(args.repo) / args.params, args.overrides)
    except ConfigError as error:
        print(f"calibflow: {error}", file=sys.stderr)
        return EXIT_USAGE

    from calibflow import errors
    from calibflow.tracking import store
    from flows.train_calibrate import train_calibrate_register

    _imports_done()
    try:
        result = train_calibrate_register(
            params_path=args.params,
            overrides=args.overrides,
            data_rev=args.data_rev,
            repo_root=args.repo,
            force=args.force,
        )
    except Exception as error:
        policy = errors.policy_of(error)  # which errors are refusals, and their exit codes
        if policy is None:
            raise  # unexpected: _dispatch prints the traceback and exits 2
        if policy.exit_code == EXIT_REJECTED:  # the whole message: a failed gate's lists every check
            print(f"\ncalibflow: model rejected, nothing registered.\n{error}", file=sys.stderr)
        elif policy.refusal:
            print(f"\ncalibflow: {_one_line(error)}", file=sys.stderr)
        else:
            print(
                f"\ncalibflow: the MLflow store at {store.tracking_uri()} failed; nothing was registered and no "
                f"alias moved. {type(error).__name__}: {error}",
                file=sys.stderr,
            )
        return policy.exit_code
    if args.json is None:
        print("\n" + run_summary(result))
    elif args.json == "-":
        print(json.dumps(result, indent=2))
    else:
        try:
            Path(args.json).write_text(json.dumps(result, indent=2))
        except OSError as error:  # the run itself succeeded: say so, and exit 2 for the missing file
            print(run_summary(result))
            print(f"calibflow run: cannot write --json {args.json}: {error.strerror or error}", file=sys.stderr)
            return EXIT_USAGE
        print("\n" + run_summary(result))
    return EXIT_OK


def run_summary(result: dict) -> str:
    """`calibflow run`'s closing lines: what was registered, the calibration and the gate that
    reads it, where to look. The whole result: --json."""
    if result.get("skipped"):
        return f"calibflow run: skipped. {result['reason']}"
    before, after, gates = result["test_before"], result["test_after"], result.get("gates", {})
    verdict = (
        "every gate passed"
        if gates.get("passed")
        else "the absolute gates passed, not those against the champion: CD decides (calibflow promote)"
    )
    lines = [
        f"calibflow run: registered {result['model_name']} version {result['version']} as @{result['alias']}; "
        f"{verdict}",
        f"  test ECE {before['ece']:.4f} -> {after['ece']:.4f}, accuracy {after['accuracy']:.4f}; calibration "
        f"{result['calibration_method']}" + (f", T = {result['temperature']:.4f}" if result.get("temperature") else ""),
    ]
    for check in gates.get("checks", []):
        if check["name"] == "max_ece":  # the calibration gate: its bound, not only its estimate
            lines.append(
                f"  gate max_ece: {check['metric']} {check['value']:.4f}, {gates['confidence']:.0%} upper "
                f"bound {check['bound']:.4f} {check['comparison']} {check['threshold']:.4f}"
            )
    lines.append(
        f"  MLflow run {result['run_id']} at {result.get('tracking_uri', 'the tracking store')} (make ui); "
        f"reports/metrics.json; every check: calibflow gate --model {result['model_name']} --candidate "
        f"{result['version']}"
    )
    return "\n".join(lines)


def _evaluate(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from calibflow.tracking import store
    from calibflow.lifecycle.reproduce import reproduce
    from calibflow.errors import DataVersionError

    store.configure_tracking(args.repo)
    try:
        with _model_threads():
            result = reproduce(args.model, args.repo)
    except (LookupError, ValueError, DataVersionError) as error:
        print(f"calibflow: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except (MlflowException, OSError) as error:
        return _store_failed("evaluate", error)
    report = {
        "model": result.model_uri,
        "version": result.version,
        "recomputed": result.recomputed,
        "logged": result.logged,
        "mismatches": result.mismatches(),
    }
    width = max(10, *(len(name) for name in result.recomputed))
    print(f"{'metric':<{width}} {'logged':>20} {'recomputed':>20}")
    for name, value in result.recomputed.items():
        print(f"{name:<{width}} {result.logged.get(name, float('nan')):>20.12f} {value:>20.12f}")
    print(json.dumps(report))
    if args.json_path:
        try:
            with open(args.json_path, "w") as handle:
                json.dump(report, handle, indent=2)
        except OSError as error:
            print(
                f"calibflow evaluate: cannot write --json {args.json_path}: {error.strerror or error}", file=sys.stderr
            )
            return EXIT_USAGE
    if report["mismatches"]:
        print(
            "calibflow: recomputed metrics differ from the logged ones: " + "; ".join(report["mismatches"]),
            file=sys.stderr,
        )
        return EXIT_REJECTED
    return EXIT_OK


def _predict(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from calibflow.tracking import store
    from calibflow.lifecycle.reproduce import predict_files

    store.configure_tracking(args.repo)
    missing = [path for path in args.images if not Path(path).is_file()]
    if missing:  # before the model loads: a typo in a path should not cost a model load
        print(f"calibflow predict: no such file: {', '.join(missing)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with _model_threads():
            predictions = predict_files(args.model, args.images)
    except (LookupError, ValueError, OSError) as error:  # OSError: also an image Pillow cannot read
        print(f"calibflow predict: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except MlflowException as error:  # the model, its version or its alias is not in the registry
        return _store_failed("predict", error)
    for prediction in predictions:
        extra = "".join(f"\t{name}={_shown(value)}" for name, value in prediction.decisions.items())
        print(f"{prediction.path}\t{prediction.label}\t{prediction.probability:.4f}{extra}")
    return EXIT_OK


def _shown(value) -> str:
    """A decision as predict prints it: a prediction set as {a,b}, anything else as itself."""
    return "{" + ",".join(map(str, value)) + "}" if isinstance(value, list) else str(value)


def _add_gate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="registered model name")
    parser.add_argument("--candidate", required=True, help="VERSION or @alias, e.g. 7 or @challenger")
    parser.add_argument("--against", default="@champion", help="VERSION or @alias to compare with (default @champion)")
    parser.add_argument(
        "--params", default="params.yaml", help="where the gates: thresholds are read (relative to --repo)"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--repo", default=".")


def _run_gate(args: argparse.Namespace):
    """The gate report, or an exit code when the gate could not decide (printed to stderr)."""
    from mlflow.exceptions import MlflowException

    from calibflow.tracking import store
    from calibflow.config import load_config
    from calibflow.errors import ConfigError
    from calibflow.lifecycle.promotion import gate_version
    from calibflow.errors import GateUndecided

    try:
        config = load_config(Path(args.repo) / args.params, args.overrides)
        store.configure_tracking(args.repo)
        with _model_threads(config.train.threads):
            return gate_version(
                args.model, args.candidate, config.gates, args.against, args.repo, config.evaluation.n_bins
            )
    except (ConfigError, GateUndecided, LookupError) as error:
        print(f"calibflow gate: could not decide: {error}", file=sys.stderr)
    except (MlflowException, OSError) as error:  # OSError covers refused connections to a tracking server
        print(f"calibflow gate: could not decide, the registry did not answer: {error}", file=sys.stderr)
    return EXIT_USAGE


def _gate_plan_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="calibflow gate plan",
        description="How many test images the configured gates need to pass a model with the given power, by "
        "simulation: under a registered version's own estimated calibration (--model, --candidate), or "
        "for a model halfway inside every threshold (--thresholds).",
    )
    parser.add_argument("--model", help="registered model name")
    parser.add_argument("--candidate", help="VERSION or @alias, e.g. @champion")
    parser.add_argument("--against", default="@champion", help="VERSION or @alias to compare with (default @champion)")
    parser.add_argument("--thresholds", action="store_true", help="plan from the thresholds alone, no model")
    parser.add_argument("--classes", type=int, default=10, help="classes of the --thresholds model (default 10)")
    parser.add_argument("--power", type=float, default=0.8, help="wanted pass rate (default 0.8)")
    parser.add_argument(
        "--params", default="params.yaml", help="where the gates: thresholds are read (relative to --repo)"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--repo", default=".")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the plan to this file")
    return parser


def _gate_plan(args: argparse.Namespace) -> int:
    """`calibflow gate plan`: how many test images the configured gates need to pass a model."""
    if args.thresholds == bool(args.model or args.candidate) or (args.model is None) != (args.candidate is None):
        print("calibflow gate plan: give --model NAME --candidate REF, or --thresholds", file=sys.stderr)
        return EXIT_USAGE

    from mlflow.exceptions import MlflowException

    from calibflow.tracking import store
    from calibflow.config import load_config
    from calibflow.errors import ConfigError
    from calibflow.gates.plan import plan_from_thresholds
    from calibflow.lifecycle.promotion import plan_version
    from calibflow.errors import GateUndecided

    try:
        config = load_config(Path(args.repo) / args.params, args.overrides)
        if args.thresholds:
            plan = plan_from_thresholds(
                config.gates, args.classes, config.evaluation.n_bins, args.power, config.gates.n_resamples
            )
        else:
            store.configure_tracking(args.repo)
            plan = plan_version(
                args.model, args.candidate, config.gates, args.against, args.repo, config.evaluation.n_bins, args.power
            )
    except (ConfigError, GateUndecided, LookupError, ValueError) as error:
        print(f"calibflow gate plan: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except (MlflowException, OSError) as error:
        print(f"calibflow gate plan: the registry did not answer: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    print(plan.describe())
    if args.json_path:
        try:
            Path(args.json_path).write_text(json.dumps(plan.to_json(), indent=2))
        except OSError as error:
            print(
                f"calibflow gate plan: cannot write --json {args.json_path}: {error.strerror or error}", file=sys.stderr
            )
            return EXIT_USAGE
    return EXIT_OK


def _print_gate(report) -> None:
    against = f"champion version {report.champion}" if report.champion else "no champion"
    print(
        f"{report.model}: candidate version {report.candidate} against {against}; "
        f"{report.verdict.n_samples} test images ({report.excluded_seen_by_champion} seen by the champion left out)"
    )
    print(report.verdict.table())
    print(", ".join(f"{k} {v:.4f}" for k, v in report.verdict.estimates.items()))
    print("PASS" if report.passed else "FAIL: " + "; ".join(c.name for c in report.verdict.checks if not c.passed))


def _gate(args: argparse.Namespace) -> int:
    report = _run_gate(args)
    if isinstance(report, int):
        return report
    _print_gate(report)
    if args.json_path:
        try:
            report.save(args.json_path)
        except OSError as error:  # CD reads the file: without it the job has no decision to act on
            print(f"calibflow gate: cannot write --json {args.json_path}: {error.strerror or error}", file=sys.stderr)
            return EXIT_USAGE
    return EXIT_OK if report.passed else EXIT_REJECTED


def _promote(args: argparse.Namespace) -> int:
    import tempfile

    from mlflow.exceptions import MlflowException

    from calibflow.lifecycle.promotion import promote

    if args.force and not args.reason:
        print('calibflow promote: --force needs --reason "why the gate is overridden"', file=sys.stderr)
        return EXIT_USAGE
    report = _run_gate(args)
    if isinstance(report, int):
        return report
    _print_gate(report)
    if not report.passed and not args.force:
        print("calibflow promote: gate failed, @champion not moved", file=sys.stderr)
        return EXIT_REJECTED
    with tempfile.TemporaryDirectory() as tmp:
        try:
            moved = promote(
                args.model,
                report.candidate,
                report.champion,
                report.save(f"{tmp}/gate_report.json"),
                force_reason=args.reason if (args.force and not report.passed) else None,
            )
        except errors.PromotionConflict as error:
            print(f"calibflow promote: {_one_line(error)}", file=sys.stderr)
            return EXIT_USAGE
        except (MlflowException, OSError) as error:  # the aliases were restored (registration.apply_aliases)
            return _store_failed("promote", error)
    print(
        f"@champion of {moved.model} is now version {moved.champion} (was {moved.previous_champion})"
        + (" [forced]" if moved.forced else "")
    )
    return EXIT_OK


def _rollback(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from calibflow.tracking import store
    from calibflow.lifecycle.promotion import rollback

    store.configure_tracking(args.repo)
    try:
        moved = rollback(args.model)
    except (LookupError, errors.PromotionConflict) as error:
        print(f"calibflow rollback: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except (MlflowException, OSError) as error:
        return _store_failed("rollback", error)
    print(f"@champion of {moved.model} is back at version {moved.champion} (was {moved.previous_champion})")
    return EXIT_OK


def _monitor(args: argparse.Namespace) -> int:
    """`calibflow monitor`: the verdict's exit code (calibflow.lifecycle.monitor), 2 when it cannot run."""
    from mlflow.exceptions import MlflowException

    from calibflow.tracking import store
    from calibflow.config import load_config
    from calibflow.errors import ConfigError
    from calibflow.lifecycle.monitor import log_monitor_run, monitor_version
    from calibflow.errors import MonitorDataError
    from calibflow.errors import DataVersionError

    try:
        config = load_config(Path(args.repo) / args.params, args.overrides)
        store.configure_tracking(args.repo)
        with _model_threads(config.train.threads):
            report = monitor_version(args.model, args.data, config, args.repo)
        run_id = log_monitor_run(report, args.repo)
    except (ConfigError, MonitorDataError, DataVersionError, LookupError, ValueError) as error:
        print(f"calibflow monitor: could not decide: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except (MlflowException, OSError) as error:
        return _store_failed("monitor", error)
    print(report.summary())
    print(f"logged as MLflow run {run_id} (experiment calibflow-monitoring)")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({**report.to_json(), "run_id": run_id}, indent=2))
    return report.exit_code


def _recalibrate(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from calibflow.tracking import store
    from calibflow.errors import CalibrationError
    from calibflow.config import load_config
    from calibflow.errors import ConfigError
    from calibflow.lifecycle.recalibrate import recalibrate
    from calibflow.errors import RecalibrationError
    from calibflow.errors import DataVersionError

    try:
        config = load_config(Path(args.repo) / args.params, args.overrides)
        store.configure_tracking(args.repo)
        with _model_threads(config.train.threads):
            result = recalibrate(args.model, args.data, config, args.repo, args.against)
    except (ConfigError, RecalibrationError, CalibrationError, DataVersionError, LookupError) as error:
        print(f"calibflow recalibrate: nothing registered: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except (MlflowException, OSError) as error:
        return _store_failed("recalibrate", error)
    shift = f"ECE {result.before['ece']:.4f} -> {result.after['ece']:.4f} on the new test half"
    if not result.registered:
        print(
            f"calibflow recalibrate: rejected, nothing registered ({shift}).\n{result.verdict.summary()}",
            file=sys.stderr,
        )
        return EXIT_REJECTED
    print(
        f"{result.version.name} version {result.version.version} (@{result.version.alias}): version "
        f"{result.source.version}'s network recalibrated, {shift}, in {result.seconds:.1f} s; MLflow run "
        f"{result.run_id}\n{result.verdict.summary()}"
    )
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from calibflow.tracking import store
    from calibflow.tracking.registration import STATUS_COLUMNS, status

    store.configure_tracking(args.repo)
    try:
        rows = status(args.model)
    except (MlflowException, OSError) as error:
        return _store_failed("status", error)
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) if rows else len(c) for c in STATUS_COLUMNS}
    print("  ".join(c.ljust(widths[c]) for c in STATUS_COLUMNS))
    for row in rows:
        print("  ".join(row[c].ljust(widths[c]) for c in STATUS_COLUMNS))
    return EXIT_OK


def _schedule(args: argparse.Namespace) -> int:
    from calibflow.config import load_config
    from calibflow.errors import ConfigError

    try:  # a bad params file is the first thing to say, whatever else is missing
        config = load_config(Path(args.repo) / args.params, args.overrides)
    except ConfigError as error:
        print(f"calibflow: {error}", file=sys.stderr)
        return EXIT_USAGE

    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()  # the environment or the active Prefect profile
    if not api:
        print(
            "calibflow: a schedule needs a Prefect server (Prefect's temporary API runs no scheduler), and "
            "PREFECT_API_URL is not set: start one (`make prefect-ui` or `prefect server start`) and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        from flows.deployment import build_deployment, build_monitor_deployment, deploy, full_name, serve

        _imports_done()  # serving runs for days: the collector must run
        deployment = build_deployment(config, args.repo, args.params, args.overrides)
        monitoring = build_monitor_deployment(config, args.repo, args.params, args.overrides)
    except (ConfigError, ValueError) as error:  # ValueError: a cron or timezone Prefect refuses
        print(f"calibflow: {error}", file=sys.stderr)
        return EXIT_USAGE
    pool = config.schedule.work_pool
    where = f"work pool {pool!r} (workers: prefect worker start --pool {pool})" if args.deploy else "this process"
    print(
        f"{full_name(deployment)}: cron {config.schedule.cron!r} ({config.schedule.timezone}), runs in {where}, "
        f"repo {deployment.parameters['repo_root']}, Prefect API {api}",
        flush=True,
    )
    if monitoring is not None:
        print(
            f"{full_name(monitoring)}: cron {config.schedule.monitor_cron!r} on {config.schedule.monitor_data}",
            flush=True,
        )
    deployments = [deployment] + ([monitoring] if monitoring is not None else [])
    if not args.deploy:
        serve(*deployments)  # until interrupted
        return EXIT_OK
    try:
        for each in deployments:
            deploy(each, pool)
    except ValueError as error:  # the work pool does not exist
        print(f"calibflow: {error} (create it: prefect work-pool create {pool} --type process)", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def _data(args: argparse.Namespace) -> int:
    from calibflow.data.datasets import add_dataset
    from calibflow.errors import DatasetError

    try:
        added = add_dataset(
            args.repo, args.source, args.name, message=args.message, replace=args.replace, push=args.push
        )
    except (DatasetError, OSError) as error:  # OSError: a file that cannot be read or written while copying
        print(f"calibflow data add: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    recorded = f"committed {added.commit[:12]}" if added.commit else "already recorded at HEAD, nothing to commit"
    print(
        f"{added.path}: {added.n_images} images in {added.n_classes} classes, DVC {added.dvc_hash}; {recorded}"
        f"{'; pushed to the DVC remote' if added.pushed else ''}"
    )
    print(f"train on it: calibflow run --set data.path={added.path}")
    return EXIT_OK


def _prepare(args: argparse.Namespace) -> int:
    from calibflow.data.prepare import NOISE_SD, write_digits

    try:
        written = write_digits(args.out, noise_sd=NOISE_SD)
    except OSError as error:
        print(f"calibflow prepare-digits: cannot write {args.out}: {error.strerror or error}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {written} images to {args.out}")
    return EXIT_OK


if __name__ == "__main__":
    entry_point()
