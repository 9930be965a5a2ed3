"""Start the gateway as a subprocess on free 127.0.0.1 ports (beside a Triton) for benchmarks and tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from serving.process import terminate
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


class GatewayProcess:
    """`python -m serving.gateway` in its own process: start(), wait_ready(), stop(); a context manager."""

    def __init__(self, config: GatewayProcessConfig):
        self.config = config
        self.proc: subprocess.Popen | None = None
        self._log = None
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
        out = None
        if self.config.log_file is not None:
            Path(self.config.log_file).parent.mkdir(parents=True, exist_ok=True)
            self._log = out = open(self.config.log_file, "ab")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(self.command(), cwd=REPO_ROOT, env=env, stdout=out,
                                     stderr=subprocess.STDOUT if out else None, stdin=subprocess.DEVNULL)
        return self

    def readiness(self) -> tuple[int, dict]:
        """(HTTP status of /readyz, its JSON body); (0, {}) while the gateway does not answer."""
        try:
            with urllib.request.urlopen(f"{self.http_url}/readyz", timeout=2) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")
        except (urllib.error.URLError, ConnectionError, OSError, ValueError):
            return 0, {}

    def wait_ready(self, timeout: float | None = None) -> "GatewayProcess":
        timeout = self.config.startup_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        status, body = 0, {}
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise RuntimeError(f"gateway exited with code {code} before becoming ready "
                                   f"(grpc {self.config.grpc_port}, http {self.config.http_port}); "
                                   f"log: {self.config.log_file or 'stderr'}")
            status, body = self.readiness()
            if status == 200:
                return self
            time.sleep(0.25)
        raise TimeoutError(f"gateway not ready after {timeout:.0f} s: /readyz {status} {body}")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        terminate(self.proc, self.config.stop_grace_s)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def __enter__(self) -> "GatewayProcess":
        return self.start().wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()
