"""Triton SIGKILLed under load: fast UNAVAILABLE / 503, /readyz false, self-recovery within 5 s, never a wrong image."""
from __future__ import annotations

import base64
import random
import threading
import time
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

from serving.generated.mnistgen.v1 import generation_pb2 as pb

from reliability_support import kill_triton, percentile, restart_triton, write_figures

pytestmark = pytest.mark.timeout(300)

SEEDS = tuple(range(100, 108))  # requests draw their seed from these: every success is checked against a reference
MAX_N = 16  # batch sizes 1..MAX_N
DEADLINE_S = 2.0  # client deadline of every request under load
SLACK_S = 0.5  # a failure may take this much longer than the deadline (2 loaded cores, thread scheduling)
RECOVERY_S = 5.0  # service must resume within this long after Triton reports ready again
ATOL = 1e-5  # same seed and size, same model: equal up to float noise of batching inside Triton
GRPC_CLIENTS, HTTP_CLIENTS = 2, 2
PAUSE_AFTER_ERROR_S = 0.02  # clients keep retrying during the outage, without spinning the CPU


@dataclass
class Outcome:
    client: str
    start: float  # time.monotonic()
    end: float
    code: str  # "OK" or a gRPC status code name (HTTP statuses mapped back from the error body)
    seed: int
    n: int
    detail: str = ""


def grpc_call(stub, seed: int, n: int) -> tuple[str, np.ndarray | None, str]:
    try:
        r = stub.Generate(pb.GenerateRequest(num_samples=n, seed=seed), timeout=DEADLINE_S)
    except grpc.RpcError as e:
        return e.code().name, None, e.details() or ""
    return "OK", decode(r.images.raw, list(r.images.shape), r.images.count), ""


def http_call(gw, seed: int, n: int) -> tuple[str, np.ndarray | None, str]:
    try:
        r = gw.http("POST", "/v1/generate", {"num_samples": n, "seed": seed},
                    headers={"X-Request-Timeout": str(DEADLINE_S)}, timeout=DEADLINE_S + SLACK_S)
    except OSError as e:  # connection trouble or a client-side timeout (a hang)
        return f"CLIENT:{type(e).__name__}", None, str(e)
    if r.status != 200:
        try:
            err = r.json()["error"]
            return err["code"], None, f"{r.status} {err['message']}"
        except (ValueError, KeyError):
            return f"HTTP{r.status}", None, r.body[:200].decode(errors="replace")
    images = r.json()["images"]
    return "OK", decode(base64.b64decode(images["raw"]), images["shape"], images["count"]), ""


def decode(raw: bytes, shape: list, count: int) -> np.ndarray:
    assert list(map(int, shape)) == [count, 1, 28, 28], shape
    assert len(raw) == count * 784 * 4, f"{len(raw)} bytes for {count} images: a partial image"
    return np.frombuffer(raw, "<f4").reshape(count, 1, 28, 28)


def test_triton_sigkill_under_load(ready_gateway, restore_triton):
    triton = restore_triton
    triton.require("dcgan_generator")
    gw = ready_gateway
    # before any fault, each (seed, n) alone: a request's images depend on its seed and size only, not on what Triton
    # batched it with under load (each request runs on the engine its own size selects)
    reference = {(s, n): grpc_call(gw.stub, s, n)[1] for s in SEEDS for n in range(1, MAX_N + 1)}  # (n, 1, 28, 28)
    assert all(r is not None for r in reference.values())

    outcomes: list[Outcome] = []
    wrong: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client(name: str, call) -> None:
        rng = random.Random(name)
        while not stop.is_set():
            seed, n = rng.choice(SEEDS), rng.randint(1, MAX_N)
            t0 = time.monotonic()
            code, x, detail = call(seed, n)
            t1 = time.monotonic()
            if code == "OK":
                if x.shape != (n, 1, 28, 28) or not np.allclose(x, reference[seed, n], atol=ATOL, rtol=0):
                    with lock:
                        wrong.append(f"{name} seed {seed} n {n}: shape {x.shape}, "
                                     f"max|diff| {np.abs(x[:n] - reference[seed, n][:len(x)]).max():.3g}")
            with lock:
                outcomes.append(Outcome(name, t0, t1, code, seed, n, detail))
            if code != "OK":
                time.sleep(PAUSE_AFTER_ERROR_S)

    threads = [threading.Thread(target=client, args=(f"grpc{i}", lambda s, n: grpc_call(gw.stub, s, n)))
               for i in range(GRPC_CLIENTS)]
    threads += [threading.Thread(target=client, args=(f"http{i}", lambda s, n: http_call(gw, s, n)))
                for i in range(HTTP_CLIENTS)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)  # steady load first
        t_kill = kill_triton(triton)
        t_not_ready = None
        while time.monotonic() - t_kill < 10:
            if gw.http("GET", "/readyz", timeout=5).status == 503:
                t_not_ready = time.monotonic()
                break
            time.sleep(0.05)
        assert t_not_ready is not None, "/readyz still 200 10 s after Triton was killed"
        assert gw.http("GET", "/healthz").status == 200  # the gateway process itself is fine
        time.sleep(1.0)  # requests during the outage
        t_restart = time.monotonic()
        t_ready = restart_triton(triton)
        # service must come back by itself: wait for the first success that started after Triton was ready
        while time.monotonic() - t_ready < RECOVERY_S + 5:
            with lock:
                if any(o.code == "OK" and o.start >= t_ready for o in outcomes):
                    break
            time.sleep(0.02)
        time.sleep(1.0)  # a little steady load after recovery
    finally:
        stop.set()
        for t in threads:
            t.join(DEADLINE_S + 10)
    assert not any(t.is_alive() for t in threads), "a client thread hung"

    assert not wrong, wrong[:5]
    codes = {}
    for o in outcomes:
        codes[o.code] = codes.get(o.code, 0) + 1
    bad = [o for o in outcomes if o.code not in ("OK", "UNAVAILABLE")]
    assert not bad, [(o.client, o.code, o.detail, round(o.end - o.start, 3)) for o in bad[:10]]
    slow = [o for o in outcomes if o.code != "OK" and o.end - o.start > DEADLINE_S + SLACK_S]
    assert not slow, [(o.client, o.code, round(o.end - o.start, 3)) for o in slow[:10]]
    failures = [o for o in outcomes if o.code != "OK"]
    assert failures, "no request failed: Triton was not down while clients were sending"
    early = [(o.client, o.code, o.detail, round(o.end - t_kill, 3)) for o in failures if o.end < t_kill]
    assert not early, f"requests failed before the fault: {early[:5]}"
    first_ok = min((o.end for o in outcomes if o.code == "OK" and o.start >= t_ready), default=None)
    assert first_ok is not None, f"no successful request within {RECOVERY_S + 5} s of Triton being ready again"
    recovery_s = first_ok - t_ready
    last_fail = max(o.end for o in failures)
    assert recovery_s < RECOVERY_S, f"service resumed {recovery_s:.2f} s after Triton was ready"
    assert all(o.code == "OK" for o in outcomes if o.start > first_ok + 0.5), "failures after recovery"
    assert gw.http("GET", "/readyz", timeout=5).status == 200

    before = [o for o in outcomes if o.end < t_kill]
    fail_ms = [1e3 * (o.end - o.start) for o in failures]
    write_figures("triton_faults", {
        "clients": {"grpc": GRPC_CLIENTS, "http": HTTP_CLIENTS}, "batch_sizes": f"1..{MAX_N}",
        "deadline_s": DEADLINE_S, "requests": len(outcomes), "codes": codes,
        "ok_checked_against_reference": codes.get("OK", 0), "wrong_or_partial_images": len(wrong),
        "ok_before_kill": sum(o.code == "OK" for o in before),
        "readyz_false_after_kill_s": round(t_not_ready - t_kill, 3),
        "triton_restart_to_ready_s": round(t_ready - t_restart, 2),
        "recovery_after_triton_ready_s": round(recovery_s, 3),
        "outage_kill_to_first_ok_s": round(first_ok - t_kill, 2),
        "last_failure_after_triton_ready_s": round(last_fail - t_ready, 3),
        "failed_request_latency_ms": {"p50": round(percentile(fail_ms, 50), 1),
                                      "p99": round(percentile(fail_ms, 99), 1), "max": round(max(fail_ms), 1)},
    })
