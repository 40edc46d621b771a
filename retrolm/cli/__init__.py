"""The `retrolm` command: one subcommand per pipeline stage.

Each module in `SUBCOMMAND_MODULES` defines `register(subparsers)`, which adds its parser(s) and
sets `handler=<function(args) -> int>`. A handler parses nothing itself and calls the stage
function. A user's problem is printed as one line, `error: ...`, with exit code 2: the project's
own `UserError`s (config validation raises `ConfigError`) and the operating system's refusals to
write (disk full, read-only or unwritable folder, a closed pipe). `-v` adds the traceback. Any
other exception is a bug: its traceback is printed with a request to report it, exit code 1.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence

from retrolm import __version__
from retrolm.errors import UserError
from retrolm.io import disk_full_error, is_disk_full
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

BUG_HINT = (
    "this is a bug in retrolm, not a problem with your input; please report it with the "
    "command and the traceback above"
)
# errno -> what to do about it (a full disk is `io.disk_full_error`); other OSErrors are bugs
OS_ERRORS = {
    errno.EFBIG: "the file is too large for this filesystem; choose another output folder",
    errno.EROFS: "the filesystem is read-only; choose another output folder",
    errno.EACCES: "permission denied; choose a folder you can write, or change its permissions",
    errno.EPERM: "operation not permitted; choose a folder you can write",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "the path is a folder, not a file; choose a file name",
    errno.ENAMETOOLONG: "the path is too long; choose a shorter one",
    errno.EIO: "input/output error: the disk or filesystem failed; check it and rerun",
}


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
    except UserError as e:
        return _user_error(args, str(e), e.exit_code)
    except BrokenPipeError:
        _silence_stdout()
        return _user_error(args, "the output pipe was closed early; the output is incomplete", 2)
    except OSError as e:
        if is_disk_full(e):  # a write outside io's atomic writers: name the output folder
            where = e.filename or getattr(args, "out", None) or os.getcwd()
            return _user_error(args, str(disk_full_error(where)), 2)
        hint = OS_ERRORS.get(e.errno) if e.errno != errno.EPIPE else "the output pipe was closed"
        if hint is None:
            return _bug(args)
        where = f" ({e.filename})" if e.filename else ""
        return _user_error(args, f"{e.strerror or e}{where}: {hint}", 2)
    except KeyboardInterrupt:
        hint = getattr(args, "interrupt_hint", "rerun the same command to resume")
        print(f"interrupted; finished work is kept; {hint}", file=sys.stderr)
        return 130
    except Exception:
        return _bug(args)


def _user_error(args: argparse.Namespace, message: str, code: int) -> int:
    if args.verbose:
        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr)
    return code


def _bug(args: argparse.Namespace) -> int:
    traceback.print_exc()
    print(f"error: {BUG_HINT}", file=sys.stderr)
    return 1


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush raises nothing more."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
