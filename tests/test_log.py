"""The CLI's logging follows stderr: a record goes to the stderr of the moment it is emitted."""

import io
import logging

import pytest

from retrolm.log import setup_logging


@pytest.fixture
def fresh_logger():
    logger = logging.getLogger("retrolm")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    logger.handlers[:] = []
    yield logger
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


def test_records_go_to_the_current_stderr_not_a_closed_earlier_one(fresh_logger, monkeypatch):
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stderr", first)
    setup_logging(0)  # e.g. an in-process CLI call under a test's captured stderr
    first.close()  # that capture ends
    monkeypatch.setattr("sys.stderr", second)
    logging.getLogger("retrolm.database").info("embedded %d chunks", 7)
    assert "INFO retrolm.database: embedded 7 chunks" in second.getvalue()
    setup_logging(-1)  # set up again: no second handler, and the new level applies
    logging.getLogger("retrolm").info("hidden")
    logging.getLogger("retrolm").warning("shown")
    assert len(fresh_logger.handlers) == 1
    assert "hidden" not in second.getvalue() and "shown" in second.getvalue()
