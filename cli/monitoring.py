"""After registration, on new images: `calibflow monitor` (has the model drifted?) and
`calibflow recalibrate` (a new calibrator for the same network)."""

from __future__ import annotations

import argparse
from pathlib import Path

from calibflow.errors import EXIT_OK, EXIT_REJECTED
from cli.options import add_json, add_model_uri, add_params, add_repo, json_on_stdout, say, write_json
from cli.registry import model_threads


def add_parsers(commands) -> None:
    monitor_parser = commands.add_parser(
        "monitor",
        help="has a registered model drifted on new images? exit 0 fine, "
        "1 calibration drifted, 3 accuracy drifted, 2 undecided",
    )
    add_model_uri(monitor_parser)
    monitor_parser.add_argument("--data", required=True, help="a DVC-tracked folder: <class>/<image> (labeled) or flat")
    add_params(monitor_parser, "monitor: tolerances, gates.confidence")
    add_repo(monitor_parser)
    add_json(monitor_parser, "the report")

    recalibrate_parser = commands.add_parser(
        "recalibrate",
        help="fit a new calibrator for a registered network on newly labeled images, gate it, register it: "
        "exit 0 registered, 1 rejected, 2 could not run",
    )
    add_model_uri(recalibrate_parser)
    recalibrate_parser.add_argument("--data", required=True, help="a DVC-tracked ImageFolder of newly labeled images")
    recalibrate_parser.add_argument(
        "--against", default="@champion", help="VERSION or @alias the relative gates compare with"
    )
    add_params(recalibrate_parser, "calibration:, gates:")
    add_repo(recalibrate_parser)


def monitor(args: argparse.Namespace) -> int:
    """The verdict's exit code (calibflow.lifecycle.monitor)."""
    from calibflow.config import load_config
    from calibflow.lifecycle.monitor import log_monitor_run, monitor_version
    from calibflow.tracking import store

    config = load_config(Path(args.repo) / args.params, args.overrides)
    store.configure_tracking(args.repo)
    with model_threads(config.train.threads):
        report = monitor_version(args.model, args.data, config, args.repo)
    run_id = log_monitor_run(report, args.repo)
    if not json_on_stdout(args):
        print(report.summary())
        print(f"logged as MLflow run {run_id} (experiment calibflow-monitoring)")
    write_json(args, {**report.to_json(), "run_id": run_id})
    return report.exit_code


def recalibrate(args: argparse.Namespace) -> int:
    from calibflow.config import load_config
    from calibflow.lifecycle.recalibrate import recalibrate as recalibrate_version
    from calibflow.tracking import store

    config = load_config(Path(args.repo) / args.params, args.overrides)
    store.configure_tracking(args.repo)
    with model_threads(config.train.threads):
        result = recalibrate_version(args.model, args.data, config, args.repo, args.against)
    shift = f"ECE {result.before['ece']:.4f} -> {result.after['ece']:.4f} on the new test half"
    if not result.registered:
        say(f"calibflow recalibrate: rejected, nothing registered ({shift}).\n{result.verdict.summary()}")
        return EXIT_REJECTED
    print(
        f"{result.version.name} version {result.version.version} (@{result.version.alias}): version "
        f"{result.source.version}'s network recalibrated, {shift}, in {result.seconds:.1f} s; MLflow run "
        f"{result.run_id}\n{result.verdict.summary()}"
    )
    return EXIT_OK
