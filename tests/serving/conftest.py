"""Gateway fixtures: the real `python -m serving.gateway` process on free ports of 127.0.0.1, in front of `triton`."""
from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from serving.generated.mnistgen.v1 import generation_pb2_grpc as pb_grpc
from serving.process import NotReady, log_tail, terminate, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
GATEWAY_STARTUP_TIMEOUT_S = 60.0
LISTENING = re.compile(r"gateway listening: grpc [\d.]+:(\d+), http https?://[\d.]+:(\d+)")


@dataclass
class HttpReply:
    status: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)


class Gateway:
    """A running gateway subprocess: its addresses, a gRPC stub, a tiny HTTP helper and stop().

    With `ca` (the PEM CA of a gateway started with --tls-cert/--tls-key) the channel and http() use TLS."""

    def __init__(self, proc: subprocess.Popen, grpc_port: int, http_port: int, log_path: Path,
                 ca: Path | None = None):
        self.proc, self.log_path, self.ca = proc, log_path, ca
        self.grpc_target = f"127.0.0.1:{grpc_port}"
        self.http_target = f"127.0.0.1:{http_port}"
        options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
        if ca is None:
            self.channel = grpc.insecure_channel(self.grpc_target, options=options)
        else:
            self.channel = grpc.secure_channel(self.grpc_target, grpc.ssl_channel_credentials(ca.read_bytes()),
                                               options=options)
        self.stub = pb_grpc.GenerationServiceStub(self.channel)
        self.scheme = "http" if ca is None else "https"
        self._ssl = None if ca is None else ssl.create_default_context(cafile=str(ca))

    def http(self, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None,
             timeout: float = 60.0) -> HttpReply:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        h = {"Content-Type": "application/json"} if isinstance(body, dict) else {}
        req = urllib.request.Request(f"{self.scheme}://{self.http_target}{path}", data=data, method=method,
                                     headers=h | (headers or {}))
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self._ssl) as r:
                return HttpReply(r.status, dict(r.headers), r.read())
        except urllib.error.HTTPError as e:
            return HttpReply(e.code, dict(e.headers), e.read())

    def metrics(self) -> str:
        return self.http("GET", "/metrics").body.decode()

    def log_tail(self, n: int = 40) -> str:
        return log_tail(self.log_path, n)

    def stop(self, timeout: float = 20.0) -> int:
        self.channel.close()
        return terminate(self.proc, timeout)


def start_gateway(triton_url: str, log_path: Path, *extra: str, env: dict | None = None,
                  ca: Path | None = None) -> Gateway:
    """`python -m serving.gateway` on ports chosen by the OS (0), read back from its first stdout line.

    `env`: extra environment (e.g. MNISTGEN_API_TOKENS); `ca`: the gateway serves TLS signed by this CA."""
    cmd = [sys.executable, "-m", "serving.gateway", "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0",
           "--triton-url", triton_url, "--probe-interval-s", "0.5", "--stop-grace-s", "5", *extra]
    log = open(log_path, "wb")
    env = dict(os.environ, PYTHONUNBUFFERED="1") | (env or {})
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    log.close()

    def listening() -> re.Match:
        m = LISTENING.search(log_path.read_text(errors="replace"))
        if m is None:
            raise NotReady("no 'gateway listening' line in its log yet")
        return m

    try:
        m = wait_until(listening, GATEWAY_STARTUP_TIMEOUT_S, f"gateway {cmd}", proc=proc, log=log_path, interval_s=0.1)
    except (RuntimeError, TimeoutError):
        terminate(proc, 5)
        raise
    return Gateway(proc, int(m.group(1)), int(m.group(2)), log_path, ca)


def wait_ready(gw: Gateway, timeout: float = 60.0) -> None:
    def ready() -> bool:
        r = gw.http("GET", "/readyz", timeout=5)
        if r.status != 200:
            raise NotReady(f"/readyz {r.status} {r.body!r}")
        return True

    wait_until(ready, timeout, f"gateway {gw.http_target}", proc=gw.proc, log=gw.log_path, interval_s=0.2)


@pytest.fixture(scope="session")
def gateway(triton, tmp_path_factory) -> Gateway:
    """One gateway for the session in front of the session's Triton."""
    gw = start_gateway(triton.grpc_url, tmp_path_factory.mktemp("gateway") / "gateway.log")
    try:
        wait_ready(gw)
        yield gw
    finally:
        code = gw.stop()
        assert code == 0, f"gateway exited with {code} after SIGTERM:\n{gw.log_tail()}"


@pytest.fixture
def ready_gateway(gateway, triton) -> Gateway:
    """The session gateway, with Triton running and ready again (after a test that stopped it)."""
    triton.start()
    wait_ready(gateway, 120)
    return gateway


@pytest.fixture
def make_gateway(triton, tmp_path):
    """Start extra gateways with other options (`make_gateway("--max-queue", "0")`, env=/ca= as start_gateway);
    stopped after the test."""
    started: list[Gateway] = []

    def make(*extra: str, env: dict | None = None, ca: Path | None = None) -> Gateway:
        gw = start_gateway(triton.grpc_url, tmp_path / f"gateway{len(started)}.log", *extra, env=env, ca=ca)
        started.append(gw)
        wait_ready(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()
