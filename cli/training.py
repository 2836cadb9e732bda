"""`calibflow run` (the pipeline flow) and `calibflow schedule` (its deployments)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from calibflow import errors
from calibflow.errors import EXIT_OK, EXIT_USAGE
from cli import process
from cli.options import add_json, add_params, add_repo, json_on_stdout, say, write_json


def add_parsers(commands) -> None:
    run_parser = commands.add_parser("run", help="run the pipeline flow (train -> calibrate -> gates -> registry)")
    add_params(run_parser, "the run's settings")
    run_parser.add_argument(
        "--data-rev", default=None, help="git revision to read the dataset at (default: the working tree)"
    )
    add_repo(run_parser)
    run_parser.add_argument(
        "--force",
        action="store_true",
        help="retrain even when a registered version was built from the same data, params, initial weights and code",
    )
    add_json(run_parser, "the result")

    schedule_parser = commands.add_parser(
        "schedule",
        help="serve the scheduled retraining deployment (params.yaml `schedule:`) from this machine, "
        "or register it with a work pool (--deploy); needs a Prefect server (PREFECT_API_URL)",
    )
    add_repo(schedule_parser, help="the checkout scheduled runs use (stored as an absolute path)")
    add_params(schedule_parser, "schedule.* keys shape the deployment; other keys are passed to every run")
    schedule_parser.add_argument(
        "--deploy",
        action="store_true",
        help="register with the work pool schedule.work_pool and exit; a worker runs the flow runs",
    )


def run(args: argparse.Namespace) -> int:
    # Servers named in the environment are asked first, before torch is imported (~6 s): a hung one
    # is named sooner. A Prefect profile's server is asked after the params are read.
    check_servers_answer(args.repo, environment_only=True)
    from calibflow.config import load_config

    load_config(Path(args.repo) / args.params, args.overrides)  # a bad key fails before Prefect and MLflow start
    check_servers_answer(args.repo)

    from flows.train_calibrate import train_calibrate_register
    from tasks.tracking import registry_changes

    process.imports_done()
    registry_changes.forget()
    try:
        result = train_calibrate_register(
            params_path=args.params,
            overrides=args.overrides,
            data_rev=args.data_rev,
            repo_root=args.repo,
            force=args.force,
        )
    except Exception as error:
        refused = errors.run_result_of(error)
        if refused is not None:  # the numbers it was refused on, for the CD job's artifact
            write_json(args, _without_credentials(refused))
        reported = what_stands_after(error, registry_changes.standing())
        if reported is error:
            raise
        raise reported from error
    result = _without_credentials(result)
    if not json_on_stdout(args):
        print("\n" + run_summary(result))
    write_json(args, result)
    return EXIT_OK


def _without_credentials(result: dict) -> dict:
    """The --json file is an artifact of CI jobs: no credentials in its tracking URI, nor in a
    refusal's line (a store's or git's error may quote a URL with its password)."""
    from calibflow.tracking.store import display_uri, redact

    shown = dict(result)
    if shown.get("tracking_uri"):
        shown["tracking_uri"] = display_uri(shown["tracking_uri"])
    if shown.get("refused"):
        shown["refused"] = redact(shown["refused"])
    return shown


def check_servers_answer(repo: str, *, environment_only: bool = False) -> None:
    """Before the flow's imports and Prefect's start: a Prefect API or MLflow tracking server that
    does not answer is named after one wait (CALIBFLOW_FIRST_ANSWER_TIMEOUT, 10 s), not after every
    retry of every request (minutes). `environment_only`: only the servers the environment names
    (PREFECT_API_URL, an http(s) MLFLOW_TRACKING_URI), without importing Prefect's settings or
    MLflow (2-3 s each) when it names none; else the active Prefect profile's too. A tracking
    server that answered is not asked again (store.check_answers)."""
    from calibflow.environment import first_answer_timeout_s
    from flows.local_server import check_api_answers

    api = os.environ.get("PREFECT_API_URL")
    if not api and not environment_only:
        from prefect.settings import PREFECT_API_URL

        api = PREFECT_API_URL.value()  # the active Prefect profile's
    if api:
        check_api_answers(api, first_answer_timeout_s())
    if environment_only and not os.environ.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://")):
        return
    from calibflow.tracking import store

    store.configure_tracking(repo)
    store.check_answers()


def what_stands_after(error: Exception, standing) -> Exception:
    """The error `calibflow run` reports for `error`, raised by the flow. After the run registered a
    version (`standing`: tasks.tracking.registry_changes, what the run did, not read back from a
    store that may be what failed), it says which version stands and which alias points to it,
    never "nothing was registered"; an unexpected error's traceback is shown first."""
    if standing is None or isinstance(error, (errors.RegistrationLeftBehind, errors.FailedAfterRegistration)):
        return error  # nothing stands, or the error says itself what does
    if errors.policy_of(error) is None:
        import traceback

        from cli.main import redacted

        sys.stderr.write(redacted("".join(traceback.format_exception(error))))
    return errors.FailedAfterRegistration(
        f"{standing}; then the run failed ({type(error).__name__}: {errors.one_line(error)}), "
        f"so its summary or Prefect's record of it may be missing: see `calibflow status --model {standing.name}`"
    )


def run_summary(result: dict) -> str:
    """`calibflow run`'s closing lines: what was registered, the calibration and the gate that
    reads it, where to look. The whole result: --json."""
    from calibflow.gates.checks import shown_relation

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
                f"bound {check['bound']:.4f} {shown_relation(check['comparison'], check['passed'])} {check['threshold']:.4f}"
            )
    where = "the tracking store"
    if result.get("tracking_uri"):
        from calibflow.tracking.store import display_uri

        where = display_uri(result["tracking_uri"])
    lines.append(
        f"  MLflow run {result['run_id']} at {where} (make ui); "
        f"reports/metrics.json; every check: calibflow gate --model {result['model_name']} --candidate "
        f"{result['version']}"
    )
    return "\n".join(lines)


def schedule(args: argparse.Namespace) -> int:
    from calibflow.config import load_config

    config = load_config(Path(args.repo) / args.params, args.overrides)  # said first, whatever else is missing

    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()  # the environment or the active Prefect profile
    if not api:
        say(
            "calibflow schedule: a schedule needs a Prefect server (Prefect's temporary API runs no scheduler), and "
            "PREFECT_API_URL is not set: start one (`make prefect-ui` or `prefect server start`) and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
        return EXIT_USAGE
    from flows.deployment import build_deployment, build_monitor_deployment, deploy, full_name, serve

    process.imports_done()  # serving runs for days: the collector must run
    deployment = build_deployment(config, args.repo, args.params, args.overrides)
    monitoring = build_monitor_deployment(config, args.repo, args.params, args.overrides)
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
        say(f"calibflow schedule: {error} (create it: prefect work-pool create {pool} --type process)")
        return EXIT_USAGE
    return EXIT_OK
