"""Reliability fixtures: the serving tests' gateway fixtures reused, and the shared Triton restored after faults."""
from __future__ import annotations

import pytest

from reliability_support import serving_conftest

gateway = serving_conftest.gateway  # session: one gateway in front of the session's Triton
ready_gateway = serving_conftest.ready_gateway  # that gateway, Triton restarted and ready first
make_gateway = serving_conftest.make_gateway  # extra gateways with other options, stopped after the test


@pytest.fixture
def restore_triton(triton):
    """Whatever a test does to the shared Triton (SIGKILL included), it is running and ready again afterwards."""
    yield triton
    if not triton.running:
        triton.server.stop()  # reap stubs left by a killed server, close its log
    triton.start()
