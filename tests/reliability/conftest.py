"""Reliability fixtures: the shared Triton restored after faults (the gateway fixtures are tests/conftest.py's)."""
from __future__ import annotations

import pytest


@pytest.fixture
def restore_triton(triton):
    """Whatever a test does to the shared Triton (SIGKILL included), it is running and ready again afterwards."""
    yield triton
    if not triton.running:
        triton.server.stop()  # reap stubs left by a killed server, close its log
    triton.start()
