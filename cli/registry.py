"""The commands over registered versions: evaluate, predict, gate (and gate plan), promote,
rollback, status."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from calibflow.errors import EXIT_OK, EXIT_REJECTED, EXIT_USAGE
from cli.options import (
    add_json,
    add_model_name,
    add_model_uri,
    add_params,
    add_repo,
    json_on_stdout,
    printable,
    say,
    write_json,
)

GATE_PARAMS = "where the gates: thresholds are read"


def add_parsers(commands) -> None:
    evaluate_parser = commands.add_parser(
        "evaluate", help="recompute a registered model's test metrics in this process"
    )
    add_model_uri(evaluate_parser)
    add_repo(evaluate_parser)
    add_json(evaluate_parser, "the logged and recomputed metrics")

    predict_parser = commands.add_parser("predict", help="calibrated top class and probability of image files")
    add_model_uri(predict_parser)
    add_repo(predict_parser)
    predict_parser.add_argument("images", nargs="+")

    gate_parser = commands.add_parser(
        "gate",
        help="may this version replace the champion? exit 0 pass, 1 fail, 2 undecided "
        "(`calibflow gate plan --help`: how many test images the gates need)",
    )
    add_gate_arguments(gate_parser)
    add_json(gate_parser, "the gate report")

    promote_parser = commands.add_parser("promote", help="gate the candidate, then move @champion to it if it passes")
    add_gate_arguments(promote_parser)
    promote_parser.add_argument("--force", action="store_true", help="promote even if the gate fails (needs --reason)")
    promote_parser.add_argument(
        "--reason", default=None, help="why a failed gate is overridden (recorded on the version)"
    )

    rollback_parser = commands.add_parser("rollback", help="move @champion back to the version it replaced")
    add_model_name(rollback_parser)
    add_repo(rollback_parser)

    status_parser = commands.add_parser(
        "status", help="versions with their aliases, ECE, accuracy, temperature, data hash"
    )
    add_model_name(status_parser)
    add_repo(status_parser)


def add_gate_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    add_model_name(parser, required=required)
    parser.add_argument("--candidate", required=required, help="VERSION or @alias, e.g. 7 or @challenger")
    parser.add_argument("--against", default="@champion", help="VERSION or @alias to compare with (default @champion)")
    add_params(parser, GATE_PARAMS)
    add_repo(parser)


def gate_plan_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="calibflow gate plan",
        description="How many test images the configured gates need to pass a model with the given power, by "
        "simulation: under a registered version's own estimated calibration (--model, --candidate), or "
        "for a model halfway inside every threshold (--thresholds).",
    )
    add_gate_arguments(parser, required=False)
    parser.add_argument("--thresholds", action="store_true", help="plan from the thresholds alone, no model")
    parser.add_argument("--classes", type=int, default=10, help="classes of the --thresholds model (default 10)")
    parser.add_argument("--power", type=float, default=0.8, help="wanted pass rate (default 0.8)")
    shape = parser.add_argument_group("the --thresholds model's shape (default: halfway inside every threshold)")
    shape.add_argument("--accuracy", type=float, default=None, help="its accuracy, above chance and below 1")
    shape.add_argument(
        "--calibration-gap", type=float, default=None, help="its over-confidence at every confidence, in [0, 1)"
    )
    shape.add_argument("--test-images", type=int, default=None, help="the test split at hand: advice for this size")
    parser.add_argument(
        "--retrain-fresh-share",
        type=float,
        default=0.0,
        help="share of images on which the next retrain's predictions are independent of this model's, for the "
        "champion comparison when there is no champion to compare with (default 0: an identical retrain)",
    )
    add_json(parser, "the plan")
    return parser


def model_threads(threads: int | None = None):
    """torch's threads while a command runs a registered model: train.threads (its default when
    the command reads no params), as the pipeline collected the logits being reproduced. Beside
    another busy process, torch's default of one thread per core is several times slower
    (docs/results/train_step.md); the logits are the same at any count."""
    from calibflow.config import TrainConfig
    from calibflow.training.loop import intra_op_threads

    return intra_op_threads(TrainConfig.threads if threads is None else threads)


def evaluate(args: argparse.Namespace) -> int:
    from calibflow.lifecycle.reproduce import reproduce
    from calibflow.tracking import store

    store.configure_tracking(args.repo)
    with model_threads():
        result = reproduce(args.model, args.repo)
    report = {
        "model": result.model_uri,
        "version": result.version,
        "verdict": evaluate_verdict(result.model_uri, result.version, result.mismatches(), result.gates),
        "gates": result.gates,
        "recomputed": result.recomputed,
        "logged": result.logged,
        "mismatches": result.mismatches(),
    }
    if json_on_stdout(args):
        say(report["verdict"])  # stdout holds the JSON alone
    else:
        print(report["verdict"])
        width = max(10, *(len(name) for name in result.recomputed))
        print(f"{'metric':<{width}} {'logged':>20} {'recomputed':>20}")
        for name, value in result.recomputed.items():
            print(f"{name:<{width}} {result.logged.get(name, float('nan')):>20.12f} {value:>20.12f}")
    write_json(args, report)
    if report["mismatches"]:
        say("calibflow evaluate: recomputed metrics differ from the logged ones: " + "; ".join(report["mismatches"]))
        return EXIT_REJECTED
    return EXIT_OK


def evaluate_verdict(model_uri: str, version: str, mismatches: list[str], gates: str | None) -> str:
    """`calibflow evaluate`'s first line: did the metrics reproduce, and what the version's gates
    said at registration, failed checks as "max_ece_increase 0.0143 > 0.01"."""
    reproduced = "metrics DIFFER from the logged ones" if mismatches else "metrics reproduced"
    return (
        f"calibflow evaluate: {model_uri} is version {version}: {reproduced}; at registration, "
        f"{gates or 'no gate verdict was recorded for it'}"
    )


def predict(args: argparse.Namespace) -> int:
    from calibflow.lifecycle.reproduce import predict_files
    from calibflow.tracking import store

    store.configure_tracking(args.repo)
    missing = [path for path in args.images if not Path(path).is_file()]
    if missing:  # before the model loads: a typo in a path should not cost a model load
        say(f"calibflow predict: no such file: {', '.join(missing)}")
        return EXIT_USAGE
    with model_threads():
        predictions = predict_files(args.model, args.images)
    for prediction in predictions:
        print(prediction_line(prediction))
    return EXIT_OK


def prediction_line(prediction) -> str:
    """One image's line of `calibflow predict`: path, top class, probability, then name=value of each
    other decision, tab-separated. Paths and class names come from users (a folder named by whoever
    made the dataset): printable() escapes what would add a line or a field, or reorder the text."""
    extra = "".join(f"\t{printable(name)}={_shown(value)}" for name, value in prediction.decisions.items())
    return f"{printable(prediction.path)}\t{printable(prediction.label)}\t{prediction.probability:.4f}{extra}"


def _shown(value) -> str:
    """A decision as predict prints it: a prediction set as {a,b}, anything else as itself."""
    if isinstance(value, list):
        return "{" + ",".join(printable(str(v)) for v in value) + "}"
    return printable(str(value))


def _gate_report(args: argparse.Namespace):
    from calibflow.config import load_config
    from calibflow.lifecycle.promotion import gate_version
    from calibflow.tracking import store

    config = load_config(Path(args.repo) / args.params, args.overrides)
    store.configure_tracking(args.repo)
    with model_threads(config.train.threads):
        return gate_version(args.model, args.candidate, config.gates, args.against, args.repo, config.evaluation.n_bins)


def _print_gate(report) -> None:
    against = f"champion version {report.champion}" if report.champion else "no champion"
    print(
        f"{report.model}: candidate version {report.candidate} against {against}; "
        f"{report.verdict.n_samples} test images ({report.excluded_seen_by_champion} seen by the champion left out)"
    )
    print(report.verdict.table())
    print(", ".join(f"{k} {v:.4f}" for k, v in report.verdict.estimates.items()))
    print("PASS" if report.passed else "FAIL: " + "; ".join(c.name for c in report.verdict.checks if not c.passed))


def gate(args: argparse.Namespace) -> int:
    report = _gate_report(args)
    if not json_on_stdout(args):
        _print_gate(report)
    write_json(args, report.to_json())
    return EXIT_OK if report.passed else EXIT_REJECTED


def gate_plan(args: argparse.Namespace) -> int:
    """`calibflow gate plan`: how many test images the configured gates need to pass a model."""
    if args.thresholds == bool(args.model or args.candidate) or (args.model is None) != (args.candidate is None):
        say("calibflow gate plan: give --model NAME --candidate REF, or --thresholds")
        return EXIT_USAGE

    from calibflow.config import load_config
    from calibflow.gates.plan import plan_from_thresholds
    from calibflow.lifecycle.promotion import plan_version
    from calibflow.tracking import store

    shape = {"--accuracy": args.accuracy, "--calibration-gap": args.calibration_gap, "--test-images": args.test_images}
    given = [flag for flag, value in shape.items() if value is not None]
    if given and not args.thresholds:
        say(
            f"calibflow gate plan: {', '.join(given)} describe the --thresholds model; a registered one is planned as measured"
        )
        return EXIT_USAGE
    config = load_config(Path(args.repo) / args.params, args.overrides)
    if args.thresholds:
        plan = plan_from_thresholds(
            config.gates,
            args.classes,
            config.evaluation.n_bins,
            args.power,
            config.gates.n_resamples,
            accuracy=args.accuracy,
            calibration_gap=args.calibration_gap,
            retrain_fresh_share=args.retrain_fresh_share,
            test_images=args.test_images,
        )
    else:
        store.configure_tracking(args.repo)
        plan = plan_version(
            args.model,
            args.candidate,
            config.gates,
            args.against,
            args.repo,
            config.evaluation.n_bins,
            args.power,
            retrain_fresh_share=args.retrain_fresh_share,
        )
    if not json_on_stdout(args):
        print(plan.describe())
    write_json(args, plan.to_json())
    return EXIT_OK


def promote(args: argparse.Namespace) -> int:
    from calibflow.lifecycle.promotion import gates_set, promote as promote_version

    if args.force and not args.reason:
        say('calibflow promote: --force needs --reason "why the gate is overridden"')
        return EXIT_USAGE
    report = _gate_report(args)
    _print_gate(report)
    if not report.passed and not args.force:
        say("calibflow promote: gate failed, @champion not moved")
        return EXIT_REJECTED
    with tempfile.TemporaryDirectory() as tmp:
        moved = promote_version(
            args.model,
            report.candidate,
            report.champion,
            report.save(f"{tmp}/gate_report.json"),
            force_reason=args.reason if (args.force and not report.passed) else None,
            gate=report,
            changed_gates=gates_set(Path(args.repo) / args.params, args.overrides),
        )
    print(
        f"@champion of {moved.model} is now version {moved.champion} (was {moved.previous_champion})"
        + (" [forced]" if moved.forced else "")
    )
    return EXIT_OK


def rollback(args: argparse.Namespace) -> int:
    from calibflow.lifecycle.promotion import rollback as roll_back
    from calibflow.tracking import store

    store.configure_tracking(args.repo)
    moved = roll_back(args.model)
    print(f"@champion of {moved.model} is back at version {moved.champion} (was {moved.previous_champion})")
    return EXIT_OK


def status(args: argparse.Namespace) -> int:
    from calibflow.tracking import store
    from calibflow.tracking.registration import STATUS_COLUMNS, status as version_status

    store.configure_tracking(args.repo)
    rows = version_status(args.model)
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) if rows else len(c) for c in STATUS_COLUMNS}
    print("  ".join(c.ljust(widths[c]) for c in STATUS_COLUMNS))
    for row in rows:
        print("  ".join(row[c].ljust(widths[c]) for c in STATUS_COLUMNS))
    return EXIT_OK
