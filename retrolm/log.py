"""Logging set-up and progress bars (tqdm), with no global state beyond the `logging` module."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


class StderrHandler(logging.StreamHandler):
    """A handler on whatever `sys.stderr` is when a record is emitted, not the stream of the
    moment it was made: a caller that redirects stderr (a test's capture, a notebook) after
    `setup_logging` still gets the records, and never a write to a closed file."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_logging(verbosity: int = 0) -> None:
    """Configure the `retrolm` logger: 0 = INFO, >= 1 = DEBUG, < 0 = WARNING."""
    level = logging.INFO if verbosity == 0 else logging.DEBUG if verbosity > 0 else logging.WARNING
    logger = logging.getLogger("retrolm")
    logger.setLevel(level)
    if not logger.handlers:
        handler = StderrHandler()
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )
        logger.addHandler(handler)
    logger.propagate = False


def progress(
    iterable: Iterable[T] | None = None,
    *,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    show: bool = True,
    **kwargs: Any,
) -> Iterator[T] | tqdm:
    """A tqdm progress bar on stderr that is silenced by `show=False`."""
    return tqdm(
        iterable, desc=desc, total=total, unit=unit, disable=not show, dynamic_ncols=True, **kwargs
    )
