"""Reliability fixtures: the shared Triton restored after faults (the gateway fixtures are tests/conftest.py's)."""
from __future__ import annotations

import pytest

from reliability_support import reliability_run  # noqa: F401  (session, autouse: out/reliability/tests_run.json)


@pytest.fixture
def restore_triton(triton):
    """Whatever a test does to the shared Triton (SIGKILL included), it is running and ready again afterwards."""
    yield triton
    if not triton.running:
        triton.server.stop()  # reap stubs left by a killed server, close its log
    triton.start()
