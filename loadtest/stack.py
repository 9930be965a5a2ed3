"""Start the gateway as a subprocess on free 127.0.0.1 ports (beside a Triton) for benchmarks and tests."""
from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from serving.process import ManagedProcess, NotReady
from serving.triton_server import free_ports

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class GatewayProcessConfig:
    triton_url: str  # Triton's gRPC endpoint host:port
    host: str = "127.0.0.1"  # where the gateway binds and clients connect
    grpc_port: int = 0  # 0 = a free port picked at start
    http_port: int = 0  # 0 = a free port picked at start
    startup_timeout_s: float = 120.0  # until /readyz answers 200 (Triton reachable, a model ready)
    stop_grace_s: float = 10.0  # SIGTERM, then SIGKILL after this long
    log_file: Path | None = None  # gateway stdout+stderr; None = inherit ours
    extra_args: tuple[str, ...] = ()  # more `python -m serving.gateway` options


class GatewayProcess(ManagedProcess):
    """`python -m serving.gateway` in its own process: start(), wait_ready(), stop(); a context manager."""

    def __init__(self, config: GatewayProcessConfig):
        self.config = config
        if not config.grpc_port or not config.http_port:
            g, h = free_ports(2, config.host)
            config.grpc_port, config.http_port = config.grpc_port or g, config.http_port or h

    grpc_target = property(lambda self: f"{self.config.host}:{self.config.grpc_port}")
    http_url = property(lambda self: f"http://{self.config.host}:{self.config.http_port}")
    metrics_url = property(lambda self: f"{self.http_url}/metrics")

    def command(self) -> list[str]:
        c = self.config
        return [sys.executable, "-m", "serving.gateway", "--host", c.host, "--grpc-port", str(c.grpc_port),
                "--http-port", str(c.http_port), "--triton-url", c.triton_url, "--log-level", "WARNING",
                *c.extra_args]

    def start(self) -> "GatewayProcess":
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        self._spawn(self.command(), self.config.log_file, cwd=REPO_ROOT, env=env)
        return self

    def describe(self) -> str:
        return f"gateway (grpc {self.config.grpc_port}, http {self.config.http_port})"

    def readiness(self) -> tuple[int, dict]:
        """(HTTP status of /readyz, its JSON body); (0, {}) while the gateway does not answer."""
        try:
            with urllib.request.urlopen(f"{self.http_url}/readyz", timeout=2) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")
        except (urllib.error.URLError, ConnectionError, OSError, ValueError):
            return 0, {}

    def _check_ready(self) -> bool:
        status, body = self.readiness()
        if status != 200:
            raise NotReady(f"/readyz {status} {body}")
        return True
