"""Overload: beyond --max-concurrency + --max-queue the excess is refused at once, accepted work succeeds, deadlines hold."""
from __future__ import annotations

import base64
import re
import threading
import time

import grpc
import pytest

from serving.generated.mnistgen.v1 import generation_pb2 as pb
from serving.process import wait_until

from reliability_support import percentile, rss_bytes, write_figures

pytestmark = pytest.mark.timeout(240)

CONCURRENCY, QUEUE = 2, 2  # the small gateway's admission bound
FLOOD_S = 5.0  # seconds of flooding
GRPC_CLIENTS, HTTP_CLIENTS = 6, 4  # 10 closed-loop clients against 4 places
SLOW = {"model": "ddpm", "num_samples": 1, "steps": 8, "sampler": "ddim"}  # a fraction of a second of CPU each
REJECT_P99_S = 0.100  # refusals must be fast
RSS_GROWTH_MAX = 64 << 20  # the gateway's RSS may not grow more than this over the flood
PAUSE_AFTER_REJECT_S = 0.005  # a rejected client retries almost at once (a flood, not a spin)


def count_metric(metrics: str, code: str) -> float:
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("mnistgen_gateway_requests_total{") and f'code="{code}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def in_flight(metrics: str) -> float:
    m = re.search(r"^mnistgen_gateway_in_flight_requests ([\d.]+)", metrics, re.M)
    return float(m.group(1)) if m else -1.0


def test_flood_beyond_the_bound(make_gateway, triton):
    triton.require("ddpm_generate")
    gw = make_gateway("--max-concurrency", str(CONCURRENCY), "--max-queue", str(QUEUE))
    gw.stub.Generate(pb.GenerateRequest(**SLOW, seed=0), timeout=60)  # warm: model config cached, channels up
    gw.http("POST", "/v1/generate", dict(SLOW, seed=0), timeout=60)
    rss0 = rss_bytes(gw.proc.pid)
    rss_peak = rss0
    outcomes: list[tuple[str, str, float]] = []  # (transport, code, seconds)
    lock = threading.Lock()
    stop = threading.Event()

    def grpc_client(i: int) -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                r = gw.stub.Generate(pb.GenerateRequest(**SLOW, seed=i), timeout=60)
                code = "OK" if r.images.count == 1 and len(r.images.raw) == 784 * 4 else "WRONG"
            except grpc.RpcError as e:
                code = e.code().name
            with lock:
                outcomes.append(("grpc", code, time.monotonic() - t0))
            if code != "OK":
                time.sleep(PAUSE_AFTER_REJECT_S)

    def http_client(i: int) -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            r = gw.http("POST", "/v1/generate", dict(SLOW, seed=i), headers={"X-Request-Timeout": "60"}, timeout=60)
            if r.status == 200:
                code = "OK" if len(base64.b64decode(r.json()["images"]["raw"])) == 784 * 4 else "WRONG"
            else:
                code = r.json()["error"]["code"] if r.status == 429 else f"HTTP{r.status}"
            with lock:
                outcomes.append(("http", code, time.monotonic() - t0))
            if code != "OK":
                time.sleep(PAUSE_AFTER_REJECT_S)

    threads = [threading.Thread(target=grpc_client, args=(i,)) for i in range(GRPC_CLIENTS)]
    threads += [threading.Thread(target=http_client, args=(100 + i,)) for i in range(HTTP_CLIENTS)]
    for t in threads:
        t.start()
    t_end = time.monotonic() + FLOOD_S
    while time.monotonic() < t_end:
        rss_peak = max(rss_peak, rss_bytes(gw.proc.pid))
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads), "a client hung"
    rss1 = rss_bytes(gw.proc.pid)

    codes = {c: sum(1 for _, code, _ in outcomes if code == c) for c in {code for _, code, _ in outcomes}}
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert codes.get("OK", 0) > 0 and codes.get("RESOURCE_EXHAUSTED", 0) > 0, codes
    rejected = {tr: [s for t, c, s in outcomes if c == "RESOURCE_EXHAUSTED" and t == tr] for tr in ("grpc", "http")}
    accepted = [s for _, c, s in outcomes if c == "OK"]
    all_rejected = rejected["grpc"] + rejected["http"]
    p99 = percentile(all_rejected, 99)
    metrics = gw.metrics()
    figures = {
        "gateway": {"max_concurrency": CONCURRENCY, "max_queue": QUEUE}, "flood_s": FLOOD_S,
        "clients": {"grpc": GRPC_CLIENTS, "http": HTTP_CLIENTS}, "request": SLOW, "codes": codes,
        "rejection_ms": {tr: {"p50": round(1e3 * percentile(v, 50), 2), "p99": round(1e3 * percentile(v, 99), 2),
                              "n": len(v)} for tr, v in rejected.items()},
        "rejection_p99_ms_all": round(1e3 * p99, 2),
        "accepted_ms": {"p50": round(1e3 * percentile(accepted, 50), 1), "p99": round(1e3 * percentile(accepted, 99), 1)},
        "gateway_rss_mib": {"before": round(rss0 / 2**20, 1), "peak": round(rss_peak / 2**20, 1),
                            "after": round(rss1 / 2**20, 1)},
    }
    write_figures("overload", figures)
    assert p99 < REJECT_P99_S, figures["rejection_ms"]
    assert rss_peak - rss0 < RSS_GROWTH_MAX, figures["gateway_rss_mib"]
    # the gateway counted exactly what the clients saw (the two warm-up calls were OK)
    assert count_metric(metrics, "RESOURCE_EXHAUSTED") == codes["RESOURCE_EXHAUSTED"]
    assert count_metric(metrics, "OK") == codes["OK"] + 2
    assert in_flight(metrics) == 0.0
    # and it still serves normally afterwards
    assert gw.stub.Generate(pb.GenerateRequest(num_samples=3, seed=1), timeout=30).images.count == 3


def test_deadlines_while_queued_and_the_server_cap(make_gateway, triton):
    """One slot held by a long DDPM call: queued requests expire at their own deadline; no deadline -> the server cap."""
    triton.require("ddpm_generate")
    cap_s, deadline_s, slack_s = 1.5, 0.6, 0.4
    gw = make_gateway("--max-concurrency", "1", "--max-queue", "4", "--request-timeout-s", str(cap_s))
    long = pb.GenerateRequest(model="ddpm", num_samples=2, steps=1000, sampler="ddpm", seed=1)  # 4+ s of work
    results: dict[str, tuple[str, float]] = {}

    def holder() -> None:  # no client deadline: the gateway's --request-timeout-s applies
        t0 = time.monotonic()
        try:
            gw.stub.Generate(long, timeout=None)
            results["holder"] = ("OK", time.monotonic() - t0)
        except grpc.RpcError as e:
            results["holder"] = (e.code().name, time.monotonic() - t0)

    h = threading.Thread(target=holder)
    h.start()
    wait_until(lambda: in_flight(gw.metrics()) >= 1, 30, "the long request in flight", proc=gw.proc, interval_s=0.01)

    def queued_grpc(name: str, req: pb.GenerateRequest) -> None:
        t0 = time.monotonic()
        try:
            gw.stub.Generate(req, timeout=deadline_s)
            results[name] = ("OK", time.monotonic() - t0)
        except grpc.RpcError as e:
            results[name] = (e.code().name, time.monotonic() - t0)

    def queued_http(name: str, body: dict) -> None:
        t0 = time.monotonic()
        r = gw.http("POST", "/v1/generate", body, headers={"X-Request-Timeout": str(deadline_s)}, timeout=30)
        results[name] = ((r.json()["error"]["code"] if r.status != 200 else "OK"), time.monotonic() - t0)
        results[name + "-status"] = (str(r.status), 0.0)

    qs = [threading.Thread(target=queued_grpc, args=("grpc-ddpm", pb.GenerateRequest(model="ddpm", steps=50, seed=2))),
          threading.Thread(target=queued_grpc, args=("grpc-gan", pb.GenerateRequest(num_samples=4, seed=2))),
          threading.Thread(target=queued_http, args=("http-ddpm", {"model": "ddpm", "steps": 50, "seed": 3}))]
    for q in qs:
        q.start()
    for q in qs:
        q.join(30)
    h.join(60)
    assert not h.is_alive() and not any(q.is_alive() for q in qs)
    write_figures("deadlines", {"cap_s": cap_s, "client_deadline_s": deadline_s,
                                "results_s": {k: [c, round(s, 3)] for k, (c, s) in results.items()}})
    for name in ("grpc-ddpm", "grpc-gan", "http-ddpm"):
        code, took = results[name]
        assert code == "DEADLINE_EXCEEDED", (name, results)
        assert deadline_s - 0.05 <= took < deadline_s + slack_s, (name, results)
    assert results["http-ddpm-status"][0] == "504"
    code, took = results["holder"]
    assert code == "DEADLINE_EXCEEDED" and cap_s - 0.05 <= took < cap_s + slack_s, results
    # the slot was given back: the next request is served
    time.sleep(0.2)
    assert gw.stub.Generate(pb.GenerateRequest(num_samples=2, seed=5), timeout=30).images.count == 2
