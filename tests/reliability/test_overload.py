"""Overload: beyond --max-concurrency + --max-queue the excess is refused without waiting, accepted work succeeds,
deadlines hold, and a GAN request is not held up by a diffusion request's queue."""
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


def series_total(metrics: str, name: str, **labels: str) -> float:
    """Sum of mnistgen_gateway_<name> over the series carrying these labels."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith(f"mnistgen_gateway_{name}{{") and all(w in line for w in want))


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
    assert rss_peak - rss0 < RSS_GROWTH_MAX, figures["gateway_rss_mib"]
    # the gateway counted exactly what the clients saw (the two warm-up calls were OK)
    assert count_metric(metrics, "RESOURCE_EXHAUSTED") == codes["RESOURCE_EXHAUSTED"]
    assert count_metric(metrics, "OK") == codes["OK"] + 2
    # every refusal was admission's, of a full queue (none over budget; none waited: only admitted requests have a
    # queue wait, and with 60 s deadlines none was refused by its deadline)
    refusals = {r: series_total(metrics, "admission_refusals_total", reason=r) for r in ("queue_full", "deadline")}
    assert refusals == {"queue_full": codes["RESOURCE_EXHAUSTED"], "deadline": 0}, refusals
    assert series_total(metrics, "queue_wait_seconds_count", **{"class": "ddpm_generate"}) == codes["OK"] + 2
    assert in_flight(metrics) == 0.0
    # and it still serves normally afterwards
    assert gw.stub.Generate(pb.GenerateRequest(num_samples=3, seed=1), timeout=30).images.count == 3


def test_deadlines_while_queued_and_the_server_cap(make_gateway, triton):
    """One DDPM slot held by a long call: DDPM requests queued behind it (no throughput measured yet, so admitted
    to the queue) expire at their own deadline, before the holder, which stops at the server cap (no deadline of
    its own); a GAN request meanwhile is served at once from its own pool."""
    triton.require("ddpm_generate", "dcgan_generator")
    cap_s, deadline_s = 1.5, 0.6
    gw = make_gateway("--max-concurrency", "1", "--max-queue", "4", "--request-timeout-s", str(cap_s))
    long = pb.GenerateRequest(model="ddpm", num_samples=2, steps=1000, sampler="ddpm", seed=1)  # 4+ s of work
    results: dict[str, tuple[str, float, float]] = {}  # name -> (code, seconds taken, time.monotonic() at the end)

    def record(name: str, t0: float, code: str) -> None:
        now = time.monotonic()
        results[name] = (code, now - t0, now)

    def grpc_call(name: str, req: pb.GenerateRequest, timeout: float | None) -> None:
        t0 = time.monotonic()
        try:
            gw.stub.Generate(req, timeout=timeout)
            record(name, t0, "OK")
        except grpc.RpcError as e:
            record(name, t0, e.code().name)

    def queued_http(name: str, body: dict) -> None:
        t0 = time.monotonic()
        r = gw.http("POST", "/v1/generate", body, headers={"X-Request-Timeout": str(deadline_s)}, timeout=30)
        record(name, t0, r.json()["error"]["code"] if r.status != 200 else "OK")
        results[name + "-status"] = (str(r.status), 0.0, 0.0)

    h = threading.Thread(target=grpc_call, args=("holder", long, None))  # the gateway's --request-timeout-s applies
    h.start()
    wait_until(lambda: in_flight(gw.metrics()) >= 1, 30, "the long request in flight", proc=gw.proc, interval_s=0.01)
    qs = [threading.Thread(target=grpc_call, args=("grpc-ddpm", pb.GenerateRequest(model="ddpm", steps=50, seed=2),
                                                   deadline_s)),
          threading.Thread(target=grpc_call, args=("grpc-gan", pb.GenerateRequest(num_samples=4, seed=2), deadline_s)),
          threading.Thread(target=queued_http, args=("http-ddpm", {"model": "ddpm", "steps": 50, "seed": 3}))]
    for q in qs:
        q.start()
    for q in qs:
        q.join(30)
    h.join(60)
    assert not h.is_alive() and not any(q.is_alive() for q in qs)
    write_figures("deadlines", {"cap_s": cap_s, "client_deadline_s": deadline_s,
                                "results_s": {k: [c, round(s, 3)] for k, (c, s, _) in results.items()}})
    holder_code, holder_took, holder_end = results["holder"]
    assert holder_code == "DEADLINE_EXCEEDED" and holder_took >= cap_s, results  # the server cap, not before
    for name in ("grpc-ddpm", "http-ddpm"):
        code, took, end = results[name]
        assert code == "DEADLINE_EXCEEDED", (name, results)
        assert took >= deadline_s and end < holder_end, (name, results)  # its own deadline: after it, before the cap
    assert results["http-ddpm-status"][0] == "504"
    assert results["grpc-gan"][0] == "OK" and results["grpc-gan"][2] < holder_end, results  # not queued behind
    # the slot was given back: the next DDPM request is served
    wait_until(lambda: in_flight(gw.metrics()) == 0, 30, "every request finished", proc=gw.proc, interval_s=0.01)
    r = gw.stub.Generate(pb.GenerateRequest(model="ddpm", num_samples=1, steps=2, sampler="ddim", seed=5), timeout=60)
    assert r.images.count == 1
