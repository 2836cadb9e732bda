"""`calibflow`: the parser of every subcommand, one dispatcher that turns errors into exit codes by
calibflow.errors' policy, and the console script's process policy."""

from __future__ import annotations

import argparse
import gc
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from calibflow import errors
from calibflow.environment import apply_quiet_defaults
from calibflow.errors import EXIT_OK, EXIT_REJECTED, EXIT_USAGE  # noqa: F401  (the codes, for callers of main)
from cli import data, monitoring, process, registry, training
from cli.options import say


@dataclass(frozen=True)
class Command:
    handler: Callable[[argparse.Namespace], int]
    # What a refusal means for this command, said before the error's message ("could not decide: ").
    # Not before AFTER_THE_DECISION's errors, which say themselves what stands in the registry.
    refused: str = ""
    # Said on a rejection (exit 1) before the error's whole message (a failed gate lists every check).
    rejected: str = "rejected"
    # Said when the tracking store failed (default: what a refusal says).
    store_failed: str | None = None
    # Errors this command's input can raise beyond the policy's (a URI or an image that is not one):
    # refusals with exit 2 here, unexpected anywhere else.
    input_errors: tuple[type[Exception], ...] = ()


# Errors raised once a command has decided, about what the registry holds now (a version left
# behind, an alias another process moved): said as they are, with no "could not decide".
AFTER_THE_DECISION = (errors.RegistrationLeftBehind, errors.FailedAfterRegistration, errors.PromotionConflict)

COMMANDS = {
    "run": Command(
        training.run,
        rejected="model rejected, nothing registered.",
        store_failed="the MLflow store failed; nothing was registered and no alias moved. ",
    ),
    "schedule": Command(training.schedule, input_errors=(ValueError,)),  # a cron or timezone Prefect refuses
    "evaluate": Command(registry.evaluate, input_errors=(ValueError,)),
    "predict": Command(registry.predict, input_errors=(ValueError, OSError)),  # OSError: an image Pillow cannot read
    "gate": Command(registry.gate, refused="could not decide: "),
    "gate plan": Command(registry.gate_plan, input_errors=(ValueError,)),
    "promote": Command(registry.promote, refused="could not decide: "),
    "rollback": Command(registry.rollback),
    "status": Command(registry.status),
    "monitor": Command(monitoring.monitor, refused="could not decide: ", input_errors=(ValueError,)),
    # A store failure may come after the registration: the store's message says what happened.
    "recalibrate": Command(monitoring.recalibrate, refused="nothing registered: ", store_failed=""),
    "data": Command(data.add, input_errors=(OSError,)),  # a file that cannot be read or written while copying
    "prepare-digits": Command(data.prepare_digits),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="calibflow", description="Train, calibrate, gate and register image classifiers."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    training.add_parsers(commands)
    registry.add_parsers(commands)
    monitoring.add_parsers(commands)
    data.add_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    apply_quiet_defaults()  # before Prefect, MLflow, DVC or GX is imported
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["gate", "plan"]:  # a form of `gate` with arguments of its own
        args = registry.gate_plan_parser().parse_args(argv[2:])
        args.command = "gate plan"
    else:
        args = build_parser().parse_args(argv)  # a usage error exits 2 here (argparse's own code)
    return dispatch(COMMANDS[args.command], args)


def dispatch(command: Command, args: argparse.Namespace) -> int:
    """Run the command; an error becomes its exit code by calibflow.errors' policy, said on one line
    (a rejection with its whole message). An error nobody anticipated decided nothing: exit 2 with
    its traceback, never Python's 1, which CD reads as "rejected, keep the champion"."""
    name = args.command
    repo = getattr(args, "repo", None)
    if repo is not None and not Path(repo).is_dir():
        say(f"calibflow {name}: --repo {repo} is not a directory: run in the repository root or pass --repo PATH")
        return EXIT_USAGE
    try:
        return command.handler(args)
    except Exception as error:  # noqa: BLE001
        return _said(command, name, error)


def _said(command: Command, name: str, error: Exception) -> int:
    """Say what went wrong, with the tracking store's credentials masked in every line (redacted):
    MLflow's messages quote the URL they requested, password and all. The exit code."""
    policy = errors.policy_of(error)
    if policy in (None, errors.STORE_FAILED) and isinstance(error, command.input_errors):
        policy = errors.REFUSED
    if policy is None:
        sys.stderr.write(redacted("".join(traceback.format_exception(error))))
        say_redacted(
            f"calibflow {name}: unexpected {type(error).__name__}, nothing decided (exit 2); please report "
            f"it with the traceback above: {errors.one_line(error)}"
        )
        return EXIT_USAGE
    if policy.exit_code == EXIT_REJECTED:
        say_redacted(f"\ncalibflow {name}: {command.rejected}\n{error}")
    elif isinstance(error, AFTER_THE_DECISION):
        say_redacted(f"calibflow {name}: {errors.one_line(error)}")
    elif policy.refusal:
        say_redacted(f"calibflow {name}: {command.refused}{errors.one_line(error)}")
    else:  # the store failed: say which one
        from calibflow.tracking import store

        say_redacted(
            f"calibflow {name}: {command.store_failed if command.store_failed is not None else command.refused}"
            f"{type(error).__name__}: "
            f"{errors.one_line(error)} "
            f"(MLflow registry at {store.tracking_uri_for_display()})"
        )
    return policy.exit_code


def redacted(text: str) -> str:
    """`text` with the tracking store's credentials masked (store.redact). Credentials come from a
    URL in the text or from MLflow's configured URIs: with neither, MLflow is not imported for it."""
    configured = any(os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"))
    if "://" not in text and not configured and "mlflow" not in sys.modules:
        return text
    from calibflow.tracking import store

    return store.redact(text)


def say_redacted(message: str) -> None:
    say(redacted(message))


def entry_point() -> None:
    """The `calibflow` console script: main() under the console script's collector policy (cli.process)."""
    process.pause_collector()
    code = main()
    gc.freeze()  # exit now frees the objects by reference count alone
    sys.exit(code)
