"""The one launcher of Triton + gateway (Stack, GatewayProcess): `make run`, the bench, the soak, the test fixtures.

`make run` exports, starts, supervises (Triton restarted when it exits or fails its health check, the gateway when
it exits, with exponential backoff; meanwhile the gateway answers 503 + Retry-After) and stops on a signal."""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import secrets
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from mnistgen.cli import add_dataclass_args, dataclass_from_args

from .client import grpc_channel
from .generated.mnistgen.v1 import generation_pb2_grpc as pb_grpc
from .process import ManagedProcess, http_ok, run_in_foreground, wait_until
from .triton_access import ALL_BUT_HEALTH, KEY_ENV
from .triton_server import DEFAULT_MODEL_REPOSITORY, REPO_ROOT, TritonConfig, TritonServer, free_ports

LISTENING = re.compile(r"gateway listening: grpc [\d.]+:(\d+), http https?://[\d.]+:(\d+)")  # its first stdout line


@dataclass
class HttpReply:
    status: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)


@dataclass
class GatewayProcessConfig:
    triton_url: str  # Triton's gRPC endpoint host:port
    host: str = "127.0.0.1"  # where the gateway binds (clients connect to 127.0.0.1 when it is 0.0.0.0)
    grpc_port: int = 0  # 0 = the OS picks a free one, read back from the gateway's log (needs log_file)
    http_port: int = 0
    startup_timeout_s: float = 120.0  # until /readyz answers 200 (Triton reachable, a model ready)
    stop_grace_s: float = 30.0  # SIGTERM (the gateway drains), then SIGKILL after this long
    log_file: Path | None = None  # gateway stdout + stderr; None = ours
    extra_args: tuple[str, ...] = ()  # more `python -m serving.gateway` options
    env: dict | None = None  # extra environment (e.g. MNISTGEN_API_TOKENS)
    ca: Path | None = None  # the gateway serves TLS signed by this CA: http() and the channel trust it

    def __post_init__(self) -> None:
        if not (self.grpc_port and self.http_port) and self.log_file is None:
            raise ValueError("ports chosen by the OS are read from the gateway's log: give log_file")


class GatewayProcess(ManagedProcess):
    """`python -m serving.gateway`: start() (returns once it listens), wait_ready() (/readyz 200), stop(); http() and
    a gRPC `stub` to talk to it."""

    def __init__(self, config: GatewayProcessConfig):
        self.config = config
        self.host = "127.0.0.1" if config.host in ("0.0.0.0", "") else config.host
        self._ssl = ssl.create_default_context(cafile=str(config.ca)) if config.ca else None

    grpc_target = property(lambda self: f"{self.host}:{self.config.grpc_port}")
    http_target = property(lambda self: f"{self.host}:{self.config.http_port}")
    http_url = property(lambda self: f"{'https' if self.config.ca else 'http'}://{self.http_target}")

    def describe(self) -> str:
        return f"gateway (grpc {self.config.grpc_port}, http {self.config.http_port})"

    def start(self) -> "GatewayProcess":
        c = self.config
        cmd = [sys.executable, "-m", "serving.gateway", "--host", c.host, "--grpc-port", str(c.grpc_port),
               "--http-port", str(c.http_port), "--triton-url", c.triton_url, *c.extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1") | (c.env or {})
        seen = c.log_file.stat().st_size if c.log_file and c.log_file.exists() else 0  # (the log is appended to)
        self._spawn(cmd, c.log_file, cwd=REPO_ROOT, env=env, start_new_session=True)  # Ctrl-C reaches it via us
        if not (c.grpc_port and c.http_port):
            def listening() -> re.Match | None:
                return LISTENING.search(self.log_path.read_bytes()[seen:].decode(errors="replace"))

            try:
                m = wait_until(listening, c.startup_timeout_s, f"gateway {cmd}", proc=self.proc, log=self.log_path,
                               interval_s=0.1)
            except (RuntimeError, TimeoutError):
                self.stop()
                raise
            c.grpc_port, c.http_port = int(m.group(1)), int(m.group(2))  # a restart keeps them
        return self

    def http(self, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None,
             timeout: float = 60.0) -> HttpReply:
        """One HTTP call (a dict body is sent as JSON); error statuses are replies, not exceptions."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        h = ({"Content-Type": "application/json"} if isinstance(body, dict) else {}) | (headers or {})
        req = urllib.request.Request(f"{self.http_url}{path}", data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self._ssl) as r:
                return HttpReply(r.status, dict(r.headers), r.read())
        except urllib.error.HTTPError as e:
            return HttpReply(e.code, dict(e.headers), e.read())

    def metrics(self) -> str:
        return self.http("GET", "/metrics").body.decode()

    def _check_ready(self) -> bool:
        return http_ok(f"{self.http_url}/readyz", 5, self._ssl)

    @functools.cached_property
    def channel(self):
        return grpc_channel(self.grpc_target, ca=self.config.ca)

    @functools.cached_property
    def stub(self):
        return pb_grpc.GenerationServiceStub(self.channel)

    def stop(self, timeout: float | None = None) -> int | None:
        if "channel" in self.__dict__:
            self.__dict__.pop("channel").close()
            self.__dict__.pop("stub", None)
        self.config.stop_grace_s = timeout or self.config.stop_grace_s
        return super().stop()


def start_gateway(triton_url: str, log_file: Path, *extra_args: str, env: dict | None = None,
                  ca: Path | None = None) -> GatewayProcess:
    """A gateway for tests and benchmarks: ports the OS picks on 127.0.0.1, Triton probed every 0.5 s, a 5 s drain;
    returned listening (call wait_ready() for /readyz 200). RuntimeError with its log tail when it exits first."""
    return GatewayProcess(GatewayProcessConfig(
        triton_url, log_file=log_file, env=env, ca=ca,
        extra_args=("--probe-interval-s", "0.5", "--stop-grace-s", "5", *extra_args))).start()


@dataclass
class RunConfig:
    host: str = "127.0.0.1"  # where the gateway binds (0.0.0.0: other machines); Triton: always loopback
    grpc_port: int = 50051  # gateway gRPC (0 = a free port)
    http_port: int = 8080  # gateway HTTP/JSON, /metrics, /readyz (0 = a free port)
    triton_http_port: int = 8000  # (Triton's HTTP is off; 0 = free ports for all three Triton ports)
    triton_grpc_port: int = 8001
    triton_metrics_port: int = 8002
    model_repository: Path = DEFAULT_MODEL_REPOSITORY
    # tritonserver processes, each supervised on its own: the first on the ports above, the others on free ports;
    # the gateway spreads requests over them and routes around a dead one (serving/gateway/backends.py)
    triton_replicas: int = 1
    models: tuple[str, ...] | None = None  # Triton models to load; None = every exported one
    export: bool = True  # run `python -m training.export` first (it skips up-to-date exports)
    startup_timeout_s: float = 300.0  # Triton loading every model on a small CPU machine
    log_dir: Path = REPO_ROOT / "out" / "run"  # tritonserver.log goes here
    gateway_log: Path | None = None  # gateway stdout + stderr; None = ours
    gateway_args: tuple[str, ...] = ()  # more `python -m serving.gateway` options
    unhealthy_after_s: float = 10.0  # Triton alive but failing gRPC ServerReady this long: kill and restart it
    backoff_s: float = 1.0  # first restart delay; doubles per restart in a row, up to backoff_max_s
    backoff_max_s: float = 30.0
    stable_after_s: float = 60.0  # healthy this long: the next failure starts the backoff from backoff_s again


class Stack:
    """Triton, then the gateway in front of it: start(), wait_ready(), close(); alive() supervises (run_in_foreground
    calls it every poll); also a context manager (no supervision: the bench and the soak)."""

    def __init__(self, c: RunConfig):
        if c.triton_replicas < 1:
            raise ValueError(f"triton_replicas must be >= 1, got {c.triton_replicas!r}")
        self.c = c
        self.key = secrets.token_urlsafe(24)  # the restricted APIs' key, one for every replica (the gateway holds one)
        tports = (c.triton_http_port, c.triton_grpc_port, c.triton_metrics_port)
        self.triton = self.triton_server(0, tports if all(tports) else free_ports(3))
        # the Stack supervises the first Triton itself (its state below), each other one is a TritonReplica
        self.replicas = [self] + [TritonReplica(self, self.triton_server(i, free_ports(3)))
                                  for i in range(1, c.triton_replicas)]
        self.tritons = [r.triton for r in self.replicas]
        self.gateway = GatewayProcess(GatewayProcessConfig(
            ",".join(t.grpc_url for t in self.tritons), c.host, c.grpc_port, c.http_port, log_file=c.gateway_log,
            extra_args=c.gateway_args, env={KEY_ENV: self.key}))  # the key: env only, one for all
        self.restarts = {"triton": 0, "gateway": 0}
        self.failures = {"triton": (0, float("-inf")), "gateway": (0, float("-inf"))}  # (in a row, last at)
        self.triton_state = "ready"  # ready | down (restart at triton_due) | starting (since triton_due)
        self.triton_due = 0.0
        self.unhealthy_since: float | None = None
        self.gateway_due: float | None = None  # gateway exited: restart at this time

    def triton_server(self, i: int, ports: tuple[int, int, int]) -> TritonServer:
        c = self.c
        return TritonServer(TritonConfig(
            model_repository=c.model_repository, models=c.models, http_port=ports[0], grpc_port=ports[1],
            metrics_port=ports[2], startup_timeout_s=c.startup_timeout_s, restricted=ALL_BUT_HEALTH, key=self.key,
            log_file=c.log_dir / (f"tritonserver-{i}.log" if i else "tritonserver.log")))

    def start(self) -> "Stack":
        for t in self.tritons:
            print(f"starting Triton (log {t.config.log_file}) ...", flush=True)
            t.start()
        return self

    def wait_ready(self, timeout: float | None = None, abort=None) -> "Stack":
        for t in self.tritons:
            t.wait_ready(abort=abort)
            print(f"Triton ready with {t.models} (pid {t.proc.pid}) on grpc {t.grpc_url}", flush=True)
        print("starting the gateway ...", flush=True)
        self.gateway.start().wait_ready(60, abort=abort)
        return self

    __enter__, __exit__ = ManagedProcess.__enter__, ManagedProcess.__exit__

    # -- supervision: never blocks for long ----------------------------------------------------------------
    def alive(self) -> bool:
        now = time.monotonic()
        for r in self.replicas:
            r._supervise_triton(now)
        self._supervise_gateway(now)
        return True  # a supervisor keeps trying; only a signal stops the stack

    def _delay(self, what: str, now: float, why: str) -> float:
        """Backoff: backoff_s, twice that, 4x ... up to backoff_max_s; from backoff_s again once stable_after_s
        passed without a failure."""
        n, last = self.failures[what]
        n = 1 if now - last > self.c.stable_after_s else n + 1
        self.failures[what], self.restarts[what] = (n, now), self.restarts[what] + 1
        delay = min(self.c.backoff_max_s, self.c.backoff_s * 2 ** (n - 1))
        print(f"supervisor: {why}; restarting {dict(triton='Triton', gateway='the gateway')[what]} in {delay:g} s "
              f"(restart #{self.restarts[what]})", flush=True)
        return delay

    def _restart_triton(self, now: float, why: str) -> None:
        delay = self._delay("triton", now, why)
        self.triton.stop()  # SIGTERM, then SIGKILL; a dead one is only reaped
        self.triton_state, self.triton_due, self.unhealthy_since = "down", now + delay, None

    def _supervise_triton(self, now: float) -> None:
        if self.triton_state == "down":
            if now >= self.triton_due:
                self.triton.start()
                self.triton_state, self.triton_due = "starting", now
            return
        if not self.triton.running:
            return self._restart_triton(now, f"Triton exited with code {self.triton.proc.returncode}")
        healthy = self.triton.healthy(timeout_s=1.0)  # gRPC ServerReady
        if self.triton_state == "starting":
            if healthy:
                self.triton_state = "ready"
                print(f"supervisor: Triton ready again after {now - self.triton_due:.1f} s "
                      f"(pid {self.triton.proc.pid})", flush=True)
            elif now - self.triton_due > self.c.startup_timeout_s:
                self._restart_triton(now, f"Triton not ready {self.c.startup_timeout_s:g} s after start")
        elif healthy:
            self.unhealthy_since = None
        elif self.unhealthy_since is None:
            self.unhealthy_since = now
        elif now - self.unhealthy_since > self.c.unhealthy_after_s:
            self._restart_triton(now, f"Triton failing its gRPC ServerReady for {self.c.unhealthy_after_s:g} s")

    def _supervise_gateway(self, now: float) -> None:
        if self.gateway_due is not None:
            if now >= self.gateway_due:
                self.gateway.start()
                self.gateway_due = None
        elif self.gateway.proc is not None and not self.gateway.running:
            why = f"gateway exited with code {self.gateway.proc.returncode}"
            self.gateway_due = now + self._delay("gateway", now, why)

    def exit_message(self) -> str:
        return "".join(f"stack stopped; Triton log {t.log_path}:\n{t.log_tail()}" for t in self.tritons)

    def close(self) -> None:
        if self.gateway.running:
            print("stopping the gateway (draining in-flight requests) ...", flush=True)
        self.gateway.stop()
        print("stopping Triton ...", flush=True)
        for t in self.tritons:
            t.close()
        print("stopped.", flush=True)


class TritonReplica:
    """A Stack's second, third ... Triton, supervised like its first (the Stack's own per-Triton methods, run on this
    replica's state): restarted on its own when it exits or fails its health check, with its own backoff."""

    def __init__(self, stack: Stack, server: TritonServer):
        self.c, self.triton = stack.c, server
        self.restarts, self.failures = {"triton": 0}, {"triton": (0, float("-inf"))}
        self.triton_state, self.triton_due, self.unhealthy_since = "ready", 0.0, None

    _delay, _restart_triton, _supervise_triton = Stack._delay, Stack._restart_triton, Stack._supervise_triton


def banner(stack: Stack) -> str:
    gw, t = stack.gateway, stack.triton
    return "\n".join([
        "", "mnistgen-serve is up (Ctrl-C stops both servers)",
        f"  gateway gRPC     {gw.grpc_target}   (mnistgen.v1.GenerationService, health, reflection)",
        f"  gateway HTTP     {gw.http_url}   (/v1/generate, /v1/denoise, /v1/models, /readyz, /metrics)",
        *(f"  Triton           grpc {t.grpc_url}, metrics {t.metrics_url} (loopback; HTTP off; all APIs but health need "
          "the launch key, which only the gateway has)"
          for t in stack.tritons),
        f"  Triton models    {', '.join(t.models)}",
        f"  Triton log       {t.log_path}",
        "  supervised       Triton and the gateway restart on their own (backoff), Ctrl-C / SIGTERM / SIGHUP stop",
        "try:",
        f"  .venv/bin/python -m serving.client generate --n 64 --out out/grid.png --target {gw.grpc_target}",
        f"  curl -s -X POST {gw.http_url}/v1/generate -H 'Accept: image/png' -d '{{\"num_samples\": 64}}' "
        "> out/grid.png",
        "  make demo", ""])


def run(c: RunConfig) -> int:
    if c.export:
        print("exporting checkpoints that changed (python -m training.export) ...", flush=True)
        r = subprocess.run([sys.executable, "-m", "training.export"], cwd=REPO_ROOT)
        if r.returncode != 0:
            print(f"error: python -m training.export failed with exit code {r.returncode}", file=sys.stderr)
            return 1
    stack = Stack(c)
    return run_in_foreground(stack, "mnistgen-serve", lambda: banner(stack), alive=stack.alive,
                             exit_message=stack.exit_message)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    add_dataclass_args(p, RunConfig, names={"startup_timeout_s": "--startup-timeout"}, exclude=("models",),
                       help={"export": "run `python -m training.export` first"})
    return run(dataclass_from_args(RunConfig, p.parse_args(argv), parser=p))


if __name__ == "__main__":
    sys.exit(main())
