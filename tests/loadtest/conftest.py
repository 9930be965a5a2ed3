"""Fixtures for the load-test tests: a real gateway process in front of the session's Triton."""
from __future__ import annotations

import pytest

from loadtest.stack import GatewayProcess, GatewayProcessConfig


@pytest.fixture(scope="module")
def gateway(triton, tmp_path_factory) -> GatewayProcess:
    """`python -m serving.gateway` on free 127.0.0.1 ports, ready (Triton reachable, a model READY)."""
    cfg = GatewayProcessConfig(triton_url=triton.grpc_url, log_file=tmp_path_factory.mktemp("gateway") / "gateway.log")
    with GatewayProcess(cfg) as gw:
        yield gw
