"""The gateway's Triton backend set: addresses from a list, DNS names or a file (re-resolved on a timer and on a
failure), one TritonClient each, a least-loaded pick (power of two choices by outstanding cost), outlier ejection with
readmission by Triton's health API, and one retry on another backend for calls that failed before any answer."""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import time
from pathlib import Path
from typing import Callable

from ..validation import ApiError
from .triton_client import NOT_SERVED_TEXT, TritonClient

log = logging.getLogger("mnistgen.gateway")
READY, EJECTED, UNKNOWN = "ready", "ejected", "unknown"  # a backend's state (/readyz); unknown = not probed yet
# a failure before any answer (the request never ran, so sending it again is safe): gRPC reports connection refused,
# reset and closed sockets as UNAVAILABLE, which triton_error keeps; any other code (INVALID_ARGUMENT,
# RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, CANCELLED, INTERNAL) is the answer and is never retried
RETRYABLE = "UNAVAILABLE"
CONNECT_WORDS = ("connect", "refused", "reset", "socket closed", "broken pipe", "dns")  # reason "connect"
# UNAVAILABLE for one model on a Triton that is up (not loaded there, or loading): retried elsewhere, not ejected
MODEL_MISSING = (NOT_SERVED_TEXT,)  # triton_error's words for it


def split_hostport(entry: str) -> tuple[str, str]:
    """"host:port" or "[v6]:port" -> (host, port); ValueError naming the entry otherwise."""
    host, sep, port = entry.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"triton_url entry {entry!r} is not host:port (port 1..65535)")
    return host.strip("[]"), port


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def address(host: str, port: str) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def dns_lookup(host: str, port: str) -> list[str]:
    """Every address `host` resolves to (a headless Service lists one per ready pod); IPv4 when there is any."""
    infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    v4 = sorted({i[4][0] for i in infos if i[0] == socket.AF_INET})
    return [address(h, port) for h in (v4 or sorted({i[4][0] for i in infos}))]


def resolve(spec: str, lookup: Callable[[str, str], list[str]] = dns_lookup) -> list[str]:
    """The backend addresses of a triton_url: comma-separated entries, each an IP:port (itself), a name:port (every
    address it resolves to) or @FILE (its entries, commas or lines, re-read at each re-resolution); deduplicated,
    in order. OSError when a name does not resolve or a file cannot be read."""
    out: list[str] = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        if entry.startswith("@"):
            out += resolve(Path(entry[1:]).read_text().replace("\n", ","), lookup)
            continue
        host, port = split_hostport(entry)
        out += [address(host, port)] if is_ip(host) else lookup(host, port)
    return list(dict.fromkeys(out))


def check_spec(spec: str) -> None:
    """ValueError for a triton_url that cannot name any backend (at config time: names are resolved later)."""
    entries = [e.strip() for e in spec.split(",") if e.strip()]
    if not entries:
        raise ValueError("triton_url must name at least one Triton backend (host:port, comma-separated, or @FILE)")
    for e in entries:
        if not e.startswith("@"):
            split_hostport(e)


class Backend:
    """One Triton replica: its own channel, state, outstanding cost (requests running on it now)."""

    def __init__(self, url: str, client: TritonClient):
        self.url, self.client = url, client
        self.state, self.reason, self.outstanding, self.removed = UNKNOWN, "not probed yet", 0, False
        self.server, self.models = False, {}  # the last probe's answers: Triton ready, {model: ready}

    def detail(self) -> dict:
        return {"backend": self.url, "state": self.state, "reason": self.reason, "triton_ready": self.server,
                "models": self.models, "outstanding_cost": self.outstanding}


class BackendSet:
    """The Triton replicas a gateway spreads requests over. Duck-compatible with TritonClient for the servicer
    (model_info, infer, readiness, forget, close), with `cost` on infer for the least-loaded pick."""

    def __init__(self, spec: str, max_message_bytes: int, metrics=None, resolve_interval_s: float = 30.0,
                 lookup: Callable[[str, str], list[str]] = dns_lookup,
                 on_change: Callable[[int], None] | None = None, key: str = ""):
        self.spec, self.max_message_bytes, self.metrics, self.key = spec, max_message_bytes, metrics, key
        self.resolve_interval_s, self.lookup, self.on_change = resolve_interval_s, lookup, on_change
        self.backends: dict[str, Backend] = {}
        self.healthy = -1  # last count given to on_change
        self._resolved_at = float("-inf")
        self._resolve_soon = False
        self._tasks: set[asyncio.Task] = set()
        try:
            self._apply(resolve(spec, lookup))
        except OSError as e:  # a name that does not resolve yet (pods starting): retried on the timer
            log.warning("triton_url %r does not resolve yet: %s", spec, e)

    # -- the address set --------------------------------------------------------------------------------------
    def _apply(self, urls: list[str]) -> None:
        self._resolved_at = time.monotonic()
        for url in urls:
            if url not in self.backends:
                log.info("Triton backend added: %s", url)
                self.backends[url] = Backend(url, TritonClient(url, self.max_message_bytes, self.key))
        for url in [u for u in self.backends if u not in urls]:
            log.info("Triton backend removed: %s", url)
            b = self.backends.pop(url)
            b.removed = True
            if b.outstanding == 0:
                self._spawn(b.client.close())
        self._count()

    async def reresolve(self, force: bool = False) -> None:
        """Resolve triton_url again when the interval passed, a call failed (or force); keep the old set on error."""
        if not (force or self._resolve_soon or time.monotonic() - self._resolved_at >= self.resolve_interval_s):
            return
        self._resolve_soon = False
        try:
            urls = await asyncio.to_thread(resolve, self.spec, self.lookup)
        except (OSError, ValueError) as e:  # (a name that stopped resolving, an @FILE being rewritten)
            self._resolved_at = time.monotonic()
            log.warning("re-resolving triton_url %r failed (keeping %s): %s", self.spec, list(self.backends), e)
            return
        if urls:
            self._apply(urls)

    def _spawn(self, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # -- health -----------------------------------------------------------------------------------------------
    def _count(self) -> None:
        n = sum(b.state == READY for b in self.backends.values())
        if self.metrics is not None:
            self.metrics.backends_healthy.set(n)
            self.metrics.backends_known.set(len(self.backends))
        if n != self.healthy:
            self.healthy = n
            if self.on_change is not None:
                self.on_change(n)

    def eject(self, b: Backend, why: str) -> None:
        if b.state != EJECTED:
            log.warning("Triton backend %s ejected: %s", b.url, why)
        b.state, b.reason = EJECTED, why
        b.client.forget()
        self._resolve_soon = True
        self._count()

    async def probe(self, models: list[str], timeout: float) -> list[dict]:
        """Re-resolve when due, then ask every backend's health API: READY (server ready and one of `models` ready)
        readmits it, anything else ejects it. Returns each backend's detail for /readyz."""
        await self.reresolve()
        backends = list(self.backends.values())
        answers = await asyncio.gather(*(b.client.readiness(models, timeout) for b in backends))
        for b, (server, ready) in zip(backends, answers):
            b.server, b.models = server, ready
            if server and any(ready.values()):
                if b.state != READY:
                    log.info("Triton backend %s ready", b.url)
                b.state, b.reason = READY, "ready"
            else:
                self.eject(b, "not answering (down or restarting)" if not server
                           else f"up but none of the models {sorted(ready)} is ready")
        self._count()
        return [b.detail() for b in backends]

    # -- requests ---------------------------------------------------------------------------------------------
    def pick(self, exclude: Backend | None = None) -> Backend | None:
        """Least outstanding cost of two ready backends drawn at random (power of two choices). With none ready,
        any known backend but `exclude` (the probe may lag behind a restart: its answer tells)."""
        ready = [b for b in self.backends.values() if b.state == READY and b is not exclude]
        if not ready:
            if exclude is not None:
                return None  # a retry goes to a healthy backend only
            ready = [b for b in self.backends.values()]
            if not ready:
                return None
        if len(ready) == 1:
            return ready[0]
        a, b = random.sample(ready, 2)
        return a if a.outstanding <= b.outstanding else b

    async def _call(self, op: Callable[[TritonClient, float], object], timeout: float, cost: int, model: str,
                    counted: bool = True):
        """op(client, timeout) on a picked backend; once more on another ready one when it failed before answering,
        within the same deadline. counted: in mnistgen_gateway_backend_requests_total (inference calls)."""
        deadline = time.monotonic() + timeout
        tried: Backend | None = None
        error: ApiError | None = None
        for _ in range(2):
            b = self.pick(exclude=tried)
            if b is None and error is not None:
                raise error  # no other ready backend to retry on
            if b is None:
                self._resolve_soon = True
                raise ApiError(f"no Triton backend for model {model!r}: {self.spec!r} names none that resolves",
                               code="UNAVAILABLE")
            left = deadline - time.monotonic()
            if left <= 0:
                raise ApiError(f"deadline exceeded waiting for Triton model {model!r}", code="DEADLINE_EXCEEDED")
            if error is not None and self.metrics is not None:
                why = "connect" if any(w in error.message.lower() for w in CONNECT_WORDS) else "unavailable"
                self.metrics.backend_retries.labels(why).inc()
            b.outstanding += cost
            code = "OK"
            try:
                return await op(b.client, left)
            except ApiError as e:
                code, error, tried = e.code, e, b
                if e.code != RETRYABLE:
                    raise
                if not any(w in e.message for w in MODEL_MISSING):
                    self.eject(b, e.message)
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            finally:
                b.outstanding -= cost
                if counted and self.metrics is not None:
                    self.metrics.backend_requests.labels(b.url, code).inc()
                if b.removed and b.outstanding == 0:
                    self._spawn(b.client.close())
        raise error

    async def infer(self, model: str, inputs: list, outputs: list[str], timeout: float, cost: int = 1):
        return await self._call(lambda c, t: c.infer(model, inputs, outputs, t), timeout, cost, model)

    async def model_info(self, model: str, timeout: float):
        return await self._call(lambda c, t: c.model_info(model, t), timeout, 0, model, counted=False)

    async def readiness(self, models: list[str], timeout: float) -> tuple[bool, dict[str, bool]]:
        """(any backend ready, {model: ready on any backend}); never raises."""
        answers = await asyncio.gather(*(b.client.readiness(models, timeout) for b in self.backends.values()))
        return (any(s for s, _ in answers),
                {m: any(r[m] for _, r in answers) for m in models})

    def forget(self) -> None:
        for b in self.backends.values():
            b.client.forget()

    async def close(self) -> None:
        for b in list(self.backends.values()):
            await b.client.close()
        self.backends.clear()
