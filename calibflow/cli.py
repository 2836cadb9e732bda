"""The `calibflow` command line.

Exit codes, for CD: 0 success; 1 the model was rejected (data validation, gates, or a registry
model whose metrics do not reproduce); 2 the command could not run as asked (bad params or
override, data not pinned by DVC, model not found).
"""

from __future__ import annotations

import argparse
import json
import sys

from calibflow.environment import apply_quiet_defaults

EXIT_OK, EXIT_REJECTED, EXIT_USAGE = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    apply_quiet_defaults()  # before Prefect, MLflow, DVC or GX is imported
    parser = argparse.ArgumentParser(prog="calibflow", description="Train, calibrate, gate and register image classifiers.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the pipeline flow (train -> calibrate -> gates -> registry)")
    run.add_argument("--params", default="params.yaml", help="params file, relative to --repo (default params.yaml)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a param for this run, e.g. --set train.epochs=3 (repeatable)")
    run.add_argument("--data-rev", default=None, help="git revision to read the dataset at (default: the working tree)")
    run.add_argument("--repo", default=".", help="repository root (default: current directory)")
    run.add_argument("--force", action="store_true",
                     help="retrain even when @champion was built from the same data, params and code")

    evaluate = commands.add_parser("evaluate", help="recompute a registered model's test metrics in this process")
    evaluate.add_argument("--model", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    evaluate.add_argument("--repo", default=".")
    evaluate.add_argument("--json", dest="json_path", default=None, help="also write the result to this file")

    predict = commands.add_parser("predict", help="calibrated top class and probability of image files")
    predict.add_argument("--model", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    predict.add_argument("--repo", default=".")
    predict.add_argument("images", nargs="+")

    prepare = commands.add_parser("prepare-digits", help="write scikit-learn's digits as an ImageFolder of PNGs")
    prepare.add_argument("--out", default="data/digits")

    args = parser.parse_args(argv)
    handler = {"run": _run, "evaluate": _evaluate, "predict": _predict, "prepare-digits": _prepare}[args.command]
    return handler(args)


def _run(args: argparse.Namespace) -> int:
    from calibflow.config import ConfigError, load_config

    try:  # fail on a bad key before Prefect and MLflow start
        load_config(f"{args.repo}/{args.params}", args.overrides)
    except ConfigError as error:
        print(f"calibflow: {error}", file=sys.stderr)
        return EXIT_USAGE

    from calibflow.manifest import ManifestError
    from calibflow.validation import DataValidationError
    from calibflow.versioning import DataVersionError
    from flows.train_calibrate import GatesFailed, train_calibrate_register

    try:
        result = train_calibrate_register(params_path=args.params, overrides=args.overrides, data_rev=args.data_rev,
                                          repo_root=args.repo, force=args.force)
    except (DataValidationError, GatesFailed) as error:
        print(f"\ncalibflow: model rejected, nothing registered.\n{error}", file=sys.stderr)
        return EXIT_REJECTED
    except (DataVersionError, ManifestError, ConfigError) as error:
        print(f"\ncalibflow: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(result, indent=2))
    return EXIT_OK


def _evaluate(args: argparse.Namespace) -> int:
    from calibflow import registry
    from calibflow.reproduce import reproduce
    from calibflow.versioning import DataVersionError

    registry.configure_tracking(args.repo)
    try:
        result = reproduce(args.model, args.repo)
    except (LookupError, ValueError, DataVersionError) as error:
        print(f"calibflow: {error}", file=sys.stderr)
        return EXIT_USAGE
    report = {"model": result.model_uri, "version": result.version, "recomputed": result.recomputed,
              "logged": result.logged, "mismatches": result.mismatches()}
    print(f"{'metric':<10} {'logged':>20} {'recomputed':>20}")
    for name, value in result.recomputed.items():
        print(f"{name:<10} {result.logged.get(name, float('nan')):>20.12f} {value:>20.12f}")
    print(json.dumps(report))
    if args.json_path:
        with open(args.json_path, "w") as handle:
            json.dump(report, handle, indent=2)
    if report["mismatches"]:
        print("calibflow: recomputed metrics differ from the logged ones: " + "; ".join(report["mismatches"]),
              file=sys.stderr)
        return EXIT_REJECTED
    return EXIT_OK


def _predict(args: argparse.Namespace) -> int:
    from calibflow import registry
    from calibflow.reproduce import predict_files

    registry.configure_tracking(args.repo)
    try:
        predictions = predict_files(args.model, args.images)
    except (LookupError, FileNotFoundError, OSError) as error:
        print(f"calibflow: {error}", file=sys.stderr)
        return EXIT_USAGE
    for prediction in predictions:
        print(f"{prediction.path}\t{prediction.label}\t{prediction.probability:.4f}")
    return EXIT_OK


def _prepare(args: argparse.Namespace) -> int:
    from calibflow.prepare import write_digits

    print(f"wrote {write_digits(args.out)} images to {args.out}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
