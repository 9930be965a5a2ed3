"""Gateway lifecycle: readiness (GatewayState), start() of both servers, serve() until a signal, drain, main()."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from dataclasses import dataclass

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..generated.mnistgen.v1 import generation_pb2 as pb
from ..metrics import GatewayMetrics
from mnistgen import catalog

from .admission import Admission
from .auth import AuthInterceptor, ConfigError, TlsMaterial, TokenAuth
from .config import GatewayConfig, parse_args, unauthenticated_refusal
from .http_api import HttpApi
from .service import GenerationServicer, add_to_server
from .backends import READY, BackendSet

log = logging.getLogger("mnistgen.gateway")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name  # "mnistgen.v1.GenerationService"


class GatewayState:
    """Triton readiness as seen by /readyz, gRPC health and the triton_up gauge; draining on shutdown. Each probe
    also ejects and readmits the backends of the set: the gateway is ready while at least one backend is."""

    def __init__(self, triton: BackendSet, metrics: GatewayMetrics, health_servicer, config: GatewayConfig):
        self.triton, self.metrics, self.health, self.config = triton, metrics, health_servicer, config
        self.draining = self.ready = False
        self.models = list(catalog.SERVED)

    async def check(self) -> tuple[bool, dict]:
        backends = await self.triton.probe(self.models, self.config.readiness_timeout_s)
        # a backend is ready when Triton is and one of our models is (the others are listed as missing: never
        # exported, unloaded or failing, their calls answer UNAVAILABLE); server/models: the union over the backends
        server = any(b["triton_ready"] for b in backends)
        models = {m: any(b["models"].get(m, False) for b in backends) for m in self.models}
        up = any(b["state"] == READY for b in backends)
        ready = up and not self.draining
        self.metrics.triton_up.set(1 if up else 0)
        if ready != self.ready:
            log.info("readiness %s -> %s (triton server ready %s, models %s)", self.ready, ready, server, models)
        self.ready = ready
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)
        missing = sorted(m for m, ok in models.items() if not ok)  # their calls answer UNAVAILABLE / 503
        return ready, {"triton_ready": server, "models": models, "missing": missing,
                       "reason": self.reason(server, models),
                       "backends_ready": sum(b["state"] == READY for b in backends), "backends": backends}

    def reason(self, server: bool, models: dict[str, bool]) -> str:
        """Why the gateway is (not) ready, in words for /readyz."""
        if self.draining:
            return "draining: the gateway is shutting down"
        if not server:
            return f"Triton at {self.config.triton_url} is not answering (down or restarting)"
        if not any(models.values()):
            return f"Triton is up but none of the models {sorted(models)} is ready (loading, or not exported)"
        missing = sorted(m for m, ok in models.items() if not ok)
        return f"ready; Triton does not serve {missing} (unloaded, failed or not exported)" if missing else "ready"

    async def probe_forever(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.check()
            await asyncio.sleep(self.config.probe_interval_s)


@dataclass
class RunningGateway:
    grpc_server: grpc.aio.Server
    http_runner: web.AppRunner
    state: GatewayState  # (its triton and metrics are the servicer's)
    servicer: GenerationServicer
    grpc_port: int
    http_port: int
    probe: asyncio.Task
    auth: TokenAuth | None = None

    async def stop(self, grace: float) -> None:
        """Drain: report not-ready, stop accepting, let in-flight requests finish for up to `grace` s."""
        self.state.draining = True
        for service in ("", SERVICE_NAME):
            await self.state.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.probe.cancel()
        deadline = time.monotonic() + grace
        http_stop = asyncio.ensure_future(self._stop_http(deadline))
        await self.grpc_server.stop(grace)
        await http_stop
        await self.state.triton.close()

    async def _stop_http(self, deadline: float) -> None:
        for site in list(self.http_runner.sites):
            await site.stop()  # no new connections
        while self.servicer.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # aiohttp's shutdown then waits for running handlers up to its shutdown_timeout, twice (finish, then
        # cancel); its default of 60 s would let one slow HTTP request outlive the grace period by minutes
        self.http_runner._shutdown_timeout = max(deadline - time.monotonic(), 0.25)
        await self.http_runner.cleanup()


async def start(config: GatewayConfig) -> RunningGateway:
    """Start both servers on the running loop (ports 0 = pick free ones) and return handles to them; ConfigError
    (before anything listens) for unusable tokens or TLS files."""
    metrics = GatewayMetrics()
    auth = TokenAuth.from_config(config, metrics)  # None: auth off
    refusal = unauthenticated_refusal(config, auth is not None and auth.enabled)
    if refusal:
        raise ConfigError(refusal)
    tls = TlsMaterial.from_config(config)  # None: plain text
    limiter = Admission(config.max_concurrency, config.max_queue, config.max_cost_in_flight)

    def healthy_backends(n: int) -> None:
        """The backend set's healthy count changed: admission's budgets follow it (at least one backend's)."""
        log.info("healthy Triton backends: %d", n)
        limiter.set_backends(max(n, 1))

    triton = BackendSet(config.triton_url, config.max_response_bytes, metrics, config.resolve_interval_s,
                        on_change=healthy_backends, key=config.triton_key)
    metrics.watch_admission(limiter)  # cost gauges, per-class queues and refusals
    servicer = GenerationServicer(triton, metrics, limiter, config, access_logger(config.access_log))
    server = grpc.aio.server(interceptors=[AuthInterceptor(auth)] if auth is not None else None, options=[
        ("grpc.max_receive_message_length", config.max_request_bytes),
        ("grpc.max_send_message_length", config.max_response_bytes),
        ("grpc.so_reuseport", 0),
    ])
    add_to_server(servicer, server)  # the generated add_..._to_server, but bad bytes -> INVALID_ARGUMENT
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    address = f"{config.host}:{config.grpc_port}"
    grpc_port = (server.add_secure_port(address, tls.grpc_credentials()) if tls is not None
                 else server.add_insecure_port(address))
    if grpc_port == 0:
        raise OSError(f"cannot bind gRPC port {config.host}:{config.grpc_port}")
    await server.start()
    state = GatewayState(triton, metrics, health_servicer, config)
    runner = web.AppRunner(HttpApi(servicer, state, auth).app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.http_port, reuse_port=False,
                       ssl_context=tls.ssl_context() if tls is not None else None)
    await site.start()
    http_port = runner.addresses[0][1]
    await state.check()
    probe = asyncio.create_task(state.probe_forever())
    return RunningGateway(server, runner, state, servicer, grpc_port, http_port, probe, auth)


def access_logger(target: str) -> logging.Logger | None:
    """The access log: None for "", standard error for "-", else the file `target` (appended to; its folder must
    exist). Records are bare JSON lines (no level or logger prefix), apart from the gateway's own log."""
    if not target:
        return None
    logger = logging.getLogger("mnistgen.access")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    try:
        handler = logging.StreamHandler(sys.stderr) if target == "-" else logging.FileHandler(target)
    except OSError as e:
        raise ConfigError(f"--access-log {target!r}: {e}") from None
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    return logger


async def serve(config: GatewayConfig) -> None:
    """Run until SIGTERM/SIGINT, then drain with config.stop_grace_s."""
    gw = await start(config)
    scheme = "https" if config.tls_cert else "http"
    auth = gw.auth.describe() if gw.auth is not None else "auth off"
    print(f"gateway listening: grpc {config.host}:{gw.grpc_port}, http {scheme}://{config.host}:{gw.http_port} "
          f"(triton {config.triton_url}, ready {gw.state.ready}; tls {'on' if config.tls_cert else 'off'}, {auth})",
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received: draining for up to %.1f s", config.stop_grace_s)
    await gw.stop(config.stop_grace_s)
    log.info("gateway stopped")


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(config))
    except ConfigError as e:
        raise SystemExit(f"gateway: {e}") from None
    return 0
