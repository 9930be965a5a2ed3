"""Triton SIGKILLed under load: UNAVAILABLE / 503 within the request's deadline, /readyz false, recovery by itself
(no gateway restart), never a wrong image. How fast it recovers is measured into the report (docs/reliability.md),
not asserted: the phases are ordered by events (each client's successes and failures), never by sleeps."""
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
from serving.process import wait_until

from reliability_support import kill_triton, percentile, restart_triton, write_figures

pytestmark = pytest.mark.timeout(300)

SEEDS = tuple(range(100, 108))  # requests draw their seed from these: every success is checked against a reference
MAX_N = 16  # batch sizes 1..MAX_N
DEADLINE_S = 2.0  # client deadline of every request under load
HANG_S = 3 * DEADLINE_S  # a failure ends near its own deadline: only a hang takes this long, even on busy cores
WAIT_S = 120  # the longest any phase may take to show (a generous poll bound, not a promise)
STEADY_OK = 3  # successes per client that make a phase "steady"
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
                    headers={"X-Request-Timeout": str(DEADLINE_S)}, timeout=HANG_S)
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

    calls = {f"grpc{i}": lambda s, n: grpc_call(gw.stub, s, n) for i in range(GRPC_CLIENTS)}
    calls |= {f"http{i}": lambda s, n: http_call(gw, s, n) for i in range(HTTP_CLIENTS)}
    threads, names = [threading.Thread(target=client, args=item) for item in calls.items()], list(calls)

    def each_client(ok: bool, since: float, count: int):
        """A poll: every client has `count` outcomes (successes or failures) that started at `since` or later."""
        def check() -> bool:
            with lock:
                return all(sum((o.code == "OK") == ok and o.start >= since and o.client == c for o in outcomes)
                           >= count for c in names)
        return check

    for t in threads:
        t.start()
    try:
        wait_until(each_client(True, 0, STEADY_OK), WAIT_S, "steady load before the fault")
        t_kill = kill_triton(triton)
        wait_until(lambda: gw.http("GET", "/readyz", timeout=5).status == 503, WAIT_S, "/readyz 503 after the kill")
        t_not_ready = time.monotonic()
        assert gw.http("GET", "/healthz").status == 200  # the gateway process itself is fine
        wait_until(each_client(False, t_kill, 1), WAIT_S, "every client failing during the outage")
        t_restart = time.monotonic()
        t_ready = restart_triton(triton)
        # service comes back by itself, then stays: every client succeeds a few times after Triton is ready
        wait_until(each_client(True, t_ready, STEADY_OK), WAIT_S, "steady load after Triton is back")
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
    slow = [o for o in outcomes if o.code != "OK" and o.end - o.start > HANG_S]
    assert not slow, [(o.client, o.code, round(o.end - o.start, 3)) for o in slow[:10]]
    failures = [o for o in outcomes if o.code != "OK"]
    assert failures, "no request failed: Triton was not down while clients were sending"
    early = [(o.client, o.code, o.detail, round(o.end - t_kill, 3)) for o in failures if o.end < t_kill]
    assert not early, f"requests failed before the fault: {early[:5]}"
    first_ok = min(o.end for o in outcomes if o.code == "OK" and o.start >= t_ready)
    recovery_s = first_ok - t_ready
    last_fail = max(o.end for o in failures)
    for c in names:  # once a client has succeeded again, it does not fail again
        mine = [o for o in outcomes if o.client == c and o.start >= t_ready]
        back = min(o.start for o in mine if o.code == "OK")
        assert all(o.code == "OK" for o in mine if o.start >= back), f"{c} failed again after recovering"
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
