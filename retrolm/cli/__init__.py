"""The `retrolm` command: one subcommand per pipeline stage.

Each module in `SUBCOMMAND_MODULES` defines `register(subparsers)`, which adds its parser(s) and
sets `handler=<function(args) -> int>`. A handler parses nothing itself and calls the stage
function. User errors (`RetrolmError`, and `ValueError` from config validation) are printed as
`error: ...` with a non-zero exit code; `-v` adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
from collections.abc import Sequence

from retrolm import __version__
from retrolm.errors import RetrolmError
from retrolm.log import setup_logging

SUBCOMMAND_MODULES = (
    "retrolm.cli.db",
    "retrolm.cli.train",
    "retrolm.cli.evaluate",
    "retrolm.cli.generate",
    "retrolm.cli.plot",
    "retrolm.cli.quickstart",
    "retrolm.cli.serve",
)

log = logging.getLogger("retrolm")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retrolm",
        description="RETRO, the Retrieval-Enhanced Transformer: build a retrieval database, "
        "train, evaluate and generate with retrieval in the loop.",
    )
    parser.add_argument("--version", action="version", version=f"retrolm {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-v), tracebacks on errors"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        # `retrolm` or `retrolm db` alone: show the help of that level.
        (getattr(args, "help_parser", None) or parser).print_help(sys.stderr)
        return 2
    setup_logging(-1 if args.quiet else args.verbose)
    try:
        return int(args.handler(args) or 0)
    except RetrolmError as e:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except ValueError as e:  # config validation names the field and the fix
        if args.verbose:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted; finished work is kept, rerun the same command to resume", file=sys.stderr
        )
        return 130
