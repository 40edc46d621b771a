"""Exceptions that carry a message meant for the user.

The CLI prints `error: <message>` for these and exits with `exit_code`, never a traceback. A
message says what is wrong, where, and what to do about it.
"""

from __future__ import annotations


class RetrolmError(Exception):
    """A problem the user can fix (bad input, missing file, mismatched settings)."""

    exit_code = 2


class InputError(RetrolmError):
    """Bad input data or arguments: an unreadable corpus, an empty prompt, a wrong path."""


class MismatchError(RetrolmError):
    """An artifact was built with settings other than the ones requested."""


class CorruptArtifactError(RetrolmError):
    """A file on disk is truncated, corrupted or of an unknown format."""
