"""The gateway handling some test modules load from here by path (the fixtures live in tests/conftest.py)."""
from __future__ import annotations

from serving.run import LISTENING, GatewayProcess, HttpReply, start_gateway  # noqa: F401  (re-exported)

Gateway = GatewayProcess
GATEWAY_STARTUP_TIMEOUT_S = 60.0


def wait_ready(gw: GatewayProcess, timeout: float = 60.0) -> None:
    gw.wait_ready(timeout)
