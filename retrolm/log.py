"""Logging set-up and progress bars (tqdm), with no global state beyond the `logging` module."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def setup_logging(verbosity: int = 0) -> None:
    """Configure the `retrolm` logger: 0 = INFO, >= 1 = DEBUG, < 0 = WARNING."""
    level = logging.INFO if verbosity == 0 else logging.DEBUG if verbosity > 0 else logging.WARNING
    logger = logging.getLogger("retrolm")
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
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
