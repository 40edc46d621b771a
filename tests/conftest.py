"""Shared test set-up."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Run the suite on one torch thread.

    The tests use tiny models and tiny BERTs, which are overhead-bound: on a 2-core machine that
    is busy with anything else, torch's second thread spin-waits and makes them 10-50x slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
