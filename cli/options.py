"""Options shared by the subcommands, each with one meaning wherever it appears."""

from __future__ import annotations

import argparse
import json
import sys
import unicodedata
from pathlib import Path

from calibflow.errors import ReportError

MODEL_URI_HELP = "models:/NAME@ALIAS or models:/NAME/VERSION"


def add_repo(parser: argparse.ArgumentParser, help: str = "repository root (default: the current directory)") -> None:
    parser.add_argument("--repo", default=".", help=help)


def add_params(parser: argparse.ArgumentParser, what: str) -> None:
    """--params FILE and --set KEY=VALUE: the params file (relative to --repo) and overrides of it."""
    parser.add_argument("--params", default="params.yaml", help=f"params file, relative to --repo: {what}")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param, e.g. --set train.epochs=3 (repeatable)",
    )


def add_model_uri(parser: argparse.ArgumentParser) -> None:
    """--model naming one registered version."""
    parser.add_argument("--model", required=True, help=MODEL_URI_HELP)


def add_model_name(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """--model naming the registered model whose versions the command compares or moves (NAME, or
    models:/NAME: the same registered model --model names elsewhere, without a version)."""
    parser.add_argument("--model", required=required, type=model_name, help="registered model: NAME or models:/NAME")


def model_name(value: str) -> str:
    return value.removeprefix("models:/")


def add_json(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--json",
        dest="json_path",
        nargs="?",
        const="-",
        default=None,
        metavar="PATH",
        help=f"{what} as JSON: on stdout in place of the text (no PATH, or -), or also written to PATH",
    )


def json_on_stdout(args: argparse.Namespace) -> bool:
    """True when --json asks for the JSON on stdout, in place of the text."""
    return args.json_path == "-"


def write_json(args: argparse.Namespace, payload) -> None:
    """The command's result where --json asked for it (nothing without --json). A file that cannot
    be written is a ReportError (exit 2): a CD job reading it has no decision to act on."""
    if args.json_path is None:
        return
    text = json.dumps(payload, indent=2)
    if args.json_path == "-":
        print(text)
        return
    try:
        Path(args.json_path).write_text(text)
    except OSError as error:
        raise ReportError(f"cannot write --json {args.json_path}: {error.strerror or error}") from error


def say(message: str) -> None:
    """A line for the user on stderr (stdout stays the command's result)."""
    print(message, file=sys.stderr)


_NAMED_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Control characters (Cc), format characters (Cf: the bidi overrides and isolates such as U+202E,
# zero-width characters), line and paragraph separators, and lone surrogates (a file name's
# undecodable bytes): each can break a line, split a tab-separated field, or make text read as
# other text.
_HIDDEN_CATEGORIES = {"Cc", "Cf", "Zl", "Zp", "Cs"}


def printable(text: str) -> str:
    """`text` safe on one line of tab-separated output: control, bidi and other invisible characters
    as visible escapes (\\n, \\t, \\u202e), and a backslash as \\\\ so that an escape in the
    output always stands for that character, never for the text of an escape."""
    return "".join(
        _NAMED_ESCAPES.get(char) or (_escape(char) if unicodedata.category(char) in _HIDDEN_CATEGORIES else char)
        for char in text
    )


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
