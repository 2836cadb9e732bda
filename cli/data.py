"""The datasets: `calibflow data add` (a folder into data/, DVC-tracked and committed) and
`calibflow prepare-digits` (the embedded default data)."""

from __future__ import annotations

import argparse

from calibflow.errors import EXIT_OK, ReportError
from cli.options import add_repo


def add_parsers(commands) -> None:
    data_parser = commands.add_parser("data", help="manage the DVC-tracked datasets under data/")
    data_commands = data_parser.add_subparsers(dest="data_command", required=True)
    add_parser = data_commands.add_parser(
        "add", help="copy an ImageFolder into data/NAME, `dvc add` it and commit the .dvc file with git"
    )
    add_parser.add_argument("source", metavar="PATH", help="an ImageFolder directory (<class>/<image>)")
    add_parser.add_argument("--name", required=True, help="the dataset's name: it becomes data/NAME (data.path)")
    add_repo(add_parser)
    add_parser.add_argument("--message", "-m", default=None, help="git commit message")
    add_parser.add_argument(
        "--replace",
        action="store_true",
        help="replace an existing, different data/NAME (its new version gets a new commit)",
    )
    add_parser.add_argument("--push", action="store_true", help="also `dvc push` it to the default DVC remote")

    prepare_parser = commands.add_parser(
        "prepare-digits", help="write the default dataset: scikit-learn's digits with pixel noise, as PNGs"
    )
    prepare_parser.add_argument("--out", default="data/digits")


def add(args: argparse.Namespace) -> int:
    from calibflow.data.datasets import add_dataset

    added = add_dataset(args.repo, args.source, args.name, message=args.message, replace=args.replace, push=args.push)
    recorded = f"committed {added.commit[:12]}" if added.commit else "already recorded at HEAD, nothing to commit"
    print(
        f"{added.path}: {added.n_images} images in {added.n_classes} classes, DVC {added.dvc_hash}; {recorded}"
        f"{'; pushed to the DVC remote' if added.pushed else ''}"
    )
    print(f"train on it: calibflow run --set data.path={added.path}")
    return EXIT_OK


def prepare_digits(args: argparse.Namespace) -> int:
    from calibflow.data.prepare import NOISE_SD, write_digits

    try:
        written = write_digits(args.out, noise_sd=NOISE_SD)
    except OSError as error:
        raise ReportError(f"cannot write {args.out}: {error.strerror or error}") from error
    print(f"wrote {written} images to {args.out}")
    return EXIT_OK
