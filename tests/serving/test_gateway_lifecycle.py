"""Gateway lifecycle: Triton stopped -> UNAVAILABLE / 503 fast and not ready, recovery once back; SIGTERM drains."""
from __future__ import annotations

import concurrent.futures
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.generated.mnistgen.v1 import generation_pb2 as pb
from serving.process import wait_until
from serving.run import start_gateway

DEADLINE_S = 30  # the requests' own deadline (HTTP: the default 60 s)
FAST_S = DEADLINE_S / 2  # "at once": a refusal, not a wait that ends with the deadline (generous on busy cores)


def test_triton_down_then_back(ready_gateway, triton):
    triton.require("dcgan_generator")
    gw = ready_gateway
    health = health_pb2_grpc.HealthStub(gw.channel)
    try:
        triton.stop()
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            gw.stub.Generate(pb.GenerateRequest(num_samples=2, seed=1), timeout=DEADLINE_S)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "Triton" in e.value.details()
        assert time.monotonic() - t0 < FAST_S
        t0 = time.monotonic()
        r = gw.http("POST", "/v1/generate", {"num_samples": 2})
        assert r.status == 503 and r.json()["error"]["code"] == "UNAVAILABLE"
        assert time.monotonic() - t0 < FAST_S
        ready = gw.http("GET", "/readyz")
        assert ready.status == 503 and ready.json()["triton_ready"] is False
        assert gw.http("GET", "/healthz").status == 200  # the process itself is fine
        wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                   == health_pb2.HealthCheckResponse.NOT_SERVING, 10, "gRPC health NOT_SERVING")
        assert "mnistgen_gateway_triton_up 0.0" in gw.metrics()
        models = gw.stub.ListModels(pb.ListModelsRequest(), timeout=10)
        assert not any(m.ready for m in models.models)
    finally:
        triton.start()
    wait_until(lambda: gw.http("GET", "/readyz").status == 200, 60, "/readyz 200 after Triton restart")
    assert gw.stub.Generate(pb.GenerateRequest(num_samples=2, seed=1), timeout=30).images.count == 2
    wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
               == health_pb2.HealthCheckResponse.SERVING, 10, "gRPC health SERVING")
    assert "mnistgen_gateway_triton_up 1.0" in gw.metrics()


def test_sigterm_drains_in_flight_requests(make_gateway, triton):
    """SIGTERM: requests already running finish (gRPC and HTTP), then the process exits 0."""
    triton.require("ddpm_generate")
    gw = make_gateway("--stop-grace-s", "60")
    req = pb.GenerateRequest(model="ddpm", sampler="ddpm", num_samples=4, steps=1000, seed=1)  # seconds of CPU work
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        g = pool.submit(gw.stub.Generate, req, timeout=120)
        h = pool.submit(gw.http, "POST", "/v1/generate",
                        {"model": "ddpm", "sampler": "ddpm", "num_samples": 4, "steps": 1000, "seed": 2})
        wait_until(lambda: "mnistgen_gateway_in_flight_requests 2.0" in gw.metrics(), 30, "two requests in flight")
        gw.proc.send_signal(signal.SIGTERM)
        assert g.result().images.count == 4
        r = h.result()
        assert r.status == 200, r.body
    assert gw.proc.wait(30) == 0, gw.log_tail()
    assert "draining" in gw.log_path.read_text()


def test_launcher_reads_its_own_ports_from_a_reused_log(tmp_path):
    """A log file is appended to: a second gateway started on it must not pick up the first one's 'listening' line.
    (No Triton needed: the gateway listens, and /healthz answers, before Triton is reachable.)"""
    log = tmp_path / "gateway.log"
    first = start_gateway("127.0.0.1:9", log)
    first.stop(10)
    second = start_gateway("127.0.0.1:9", log)
    try:
        assert log.read_text().count("gateway listening") == 2
        assert second.http("GET", "/healthz", timeout=5).status == 200
        assert second.http("GET", "/readyz", timeout=5).status == 503  # Triton unreachable: not ready
    finally:
        assert second.stop(10) == 0
