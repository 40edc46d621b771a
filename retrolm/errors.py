"""Exceptions that carry a message meant for the user.

The CLI prints `error: <message>` for a `UserError` and exits with its `exit_code` (2), never a
traceback. A message says what is wrong, where, and what to do about it. Any other exception is
a bug: the CLI prints its traceback and asks for a report (exit 1).
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad input, missing file, mismatched settings)."""

    exit_code = 2


class InputError(UserError):
    """Bad input data or arguments: an unreadable corpus, an empty prompt, a wrong path."""


class ConfigError(UserError, ValueError):
    """A config field out of range; a `ValueError` too, so `except ValueError` still catches it."""


class MismatchError(UserError):
    """An artifact was built with settings other than the ones requested."""


class CorruptArtifactError(UserError):
    """A file on disk is truncated, corrupted or of an unknown format."""


class LockedError(UserError):
    """Another process is writing the same database or run folder."""


class WriteError(UserError):
    """An output could not be written (disk full, read-only or unwritable folder)."""


class DivergedError(UserError, FloatingPointError):
    """Training produced a non-finite loss; a `FloatingPointError` too."""
