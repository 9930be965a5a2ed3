"""The one closed-loop load generator: N clients, each sending its next request as soon as its last one is answered
(the bench's concurrency sweep, the soak's capacity ramp), and what both record about a run."""
from __future__ import annotations

import itertools
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

from mnistgen.files import repo_relative


def relative_paths(config: dict) -> dict:
    return {k: repo_relative(v) if isinstance(v, Path) else v for k, v in config.items()}


class FifoLock:
    """A lock granted in arrival order (threading.Lock is not fair: the thread that releases it usually takes it
    again at once, so one client would run its whole stream while the others wait, which is not a server's queue)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._next_ticket = self._serving = 0

    def __enter__(self) -> None:
        with self._cv:
            ticket, self._next_ticket = self._next_ticket, self._next_ticket + 1
            self._cv.wait_for(lambda: self._serving == ticket)

    def __exit__(self, *exc) -> None:
        with self._cv:
            self._serving += 1
            self._cv.notify_all()


def pct_ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(seconds, q) * 1e3) if len(seconds) else float("nan")


def closed_loop(make_call: Callable[[], Callable[[int], object]], clients: int, requests: int | None = None,
                seconds: float | None = None, serial: bool = False, warm: bool = False, think_s: float = 0.0,
                backoff: bool = False) -> dict:
    """`clients` threads send requests until `requests` were sent in all or `seconds` passed, each client its next
    one as soon as the previous one is answered; request i is call(i), call = make_call() made once per client
    thread (e.g. its own gRPC channel). A call that raises is an error, counted by its `code` attribute (a
    ClientError's) or its type, not timed. serial=True: the calls run one at a time behind one fair lock (in-process
    serving of the same stream) and a latency counts from when its client sent it, the wait included. warm=True: one
    untimed call per client first (connections). think_s: each client waits this long after an answer (a paced user,
    not a tight loop); backoff=True: after an error carrying `retry_after` (a 429's Retry-After) it waits that long,
    as a well-behaved client does (both waits end with the run and are not timed)."""
    if (requests is None) == (seconds is None):
        raise ValueError("closed_loop: give requests or seconds")
    counter, gate, start = itertools.count(), FifoLock(), threading.Barrier(clients + 1)
    latencies: list[float] = []
    errors: list[BaseException] = []
    end = [float("inf")]

    def client() -> None:
        try:
            call = make_call()
            if warm:
                call(0)  # (request 0's arguments, untimed)
        except BaseException:
            start.abort()
            raise
        start.wait()
        while time.perf_counter() < end[0] and (i := next(counter)) < (requests or float("inf")):
            t0 = time.perf_counter()
            try:
                if serial:
                    with gate:
                        call(i)
                else:
                    call(i)
            except Exception as e:  # noqa: BLE001  (RESOURCE_EXHAUSTED, UNAVAILABLE...: counted and shown)
                errors.append(e)
                pause(getattr(e, "retry_after", None) if backoff else None)
                continue
            latencies.append(time.perf_counter() - t0)
            pause(think_s)

    def pause(s: float | None) -> None:
        if s:
            time.sleep(max(0.0, min(s, end[0] - time.perf_counter())))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    end[0] = t0 + (seconds if seconds is not None else float("inf"))
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests": len(latencies) + len(errors), "ok": len(latencies),
            "errors": len(errors), "error_codes": dict(Counter(str(getattr(e, "code", type(e).__name__))
                                                               for e in errors)),
            "first_error": f"{type(errors[0]).__name__}: {errors[0]}"[:300] if errors else "", "wall_s": wall,
            "samples_per_s": len(latencies) / wall, "p50_ms": pct_ms(latencies, 50), "p99_ms": pct_ms(latencies, 99),
            "load_avg_1m": os.getloadavg()[0]}
