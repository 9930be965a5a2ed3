"""Prometheus metrics of the gateway (own registry): requests, latencies, batch sizes, Triton health, diversity."""
from __future__ import annotations

import threading
from collections import deque

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

PREFIX = "mnistgen_gateway"
# Seconds: fine below 1 ms (per-sample latency of a batched GAN call is tens of microseconds) up to 60 s (DDPM).
LATENCY_BUCKETS = (
    50e-6, 100e-6, 200e-6, 300e-6, 500e-6, 750e-6, 1e-3, 2e-3, 3e-3, 5e-3, 7.5e-3, 10e-3, 20e-3, 30e-3,
    50e-3, 75e-3, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
DIVERSITY_WINDOW = 256  # samples kept per model for the diversity gauge
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def mean_pairwise_distance(x: np.ndarray) -> float:
    """Mean Euclidean distance over all pairs of rows of x (M, D), divided by sqrt(D): an RMS pixel
    difference in [0, 2] for images in [-1, 1]; ~0 when a model always draws the same image."""
    m, d = x.shape
    if m < 2:
        return float("nan")
    x = x.astype(np.float64)
    sq = (x * x).sum(1)  # (M,)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)  # (M, M) squared distances
    iu = np.triu_indices(m, k=1)
    return float(np.sqrt(d2[iu]).mean() / np.sqrt(d))


class DiversityTracker:
    """Ring buffer of the last `window` generated samples per model; the gauge is computed at scrape time."""

    def __init__(self, window: int = DIVERSITY_WINDOW):
        self.window = window
        self._buf: dict[str, deque] = {}
        self._cache: dict[str, tuple[int, float]] = {}  # model -> (version, value)
        self._version: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, model: str, images: np.ndarray) -> None:
        """images (N, 1, 28, 28): only the last `window` rows are kept (cheap on the request path)."""
        flat = np.asarray(images, np.float32).reshape(len(images), -1)[-self.window:]  # (n, 784)
        with self._lock:
            buf = self._buf.setdefault(model, deque(maxlen=self.window))
            buf.extend(flat)
            self._version[model] = self._version.get(model, 0) + 1

    def value(self, model: str) -> float:
        with self._lock:
            version = self._version.get(model, 0)
            cached = self._cache.get(model)
            if cached and cached[0] == version:
                return cached[1]
            rows = list(self._buf.get(model, ()))
        v = mean_pairwise_distance(np.stack(rows)) if len(rows) >= 2 else float("nan")
        with self._lock:
            self._cache[model] = (version, v)
        return v

    def collect(self):
        """prometheus_client collector protocol."""
        g = GaugeMetricFamily(
            f"{PREFIX}_sample_diversity",
            f"Mean pairwise distance / sqrt(784) of the last {self.window} generated samples (0 = collapsed)",
            labels=["model"],
        )
        with self._lock:
            models = sorted(self._buf)
        for m in models:
            g.add_metric([m], self.value(m))
        yield g

    def describe(self):
        return []  # no fixed series: computed on scrape


class AdmissionCollector:
    """Per-class queue depth and per-pool measured throughput of an Admission, read at scrape time."""

    def __init__(self, admission):
        self.admission = admission

    def collect(self):
        depth = GaugeMetricFamily(f"{PREFIX}_queue_depth", "Requests waiting for admission, by class", labels=["class"])
        for label, n in self.admission.depths():
            depth.add_metric([label], n)
        rate = GaugeMetricFamily(f"{PREFIX}_admission_throughput", "Measured throughput of a pool in cost units per "
                                 "busy second (deadline-aware refusal estimates with it)", labels=["pool"])
        for name, pool in list(self.admission.pools.items()):
            if pool.rate is not None:
                rate.add_metric([name], pool.rate)
        yield depth
        yield rate

    def describe(self):
        return []


class GatewayMetrics:
    """Everything the gateway exports, on a registry of its own (no default process collectors mixed in)."""

    def __init__(self, registry: CollectorRegistry | None = None, diversity_window: int = DIVERSITY_WINDOW):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "Requests by rpc, model, transport and gRPC status code",
                                ["rpc", "model", "transport", "code"], registry=r)
        self.latency = Histogram(f"{PREFIX}_request_latency_seconds", "Server-side request latency",
                                 ["rpc", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.sample_latency = Histogram(f"{PREFIX}_sample_latency_seconds", "Request latency / samples in it",
                                        ["rpc", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.triton_latency = Histogram(f"{PREFIX}_triton_latency_seconds", "Time waiting on Triton per request",
                                        ["rpc", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(f"{PREFIX}_batch_size", "Samples per request", ["rpc", "model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.in_flight = Gauge(f"{PREFIX}_in_flight_requests", "Requests being served now (queued included)",
                               registry=r)
        # admission by cost (serving/gateway/admission.py): read from the Limiter at scrape time (watch_admission)
        self.cost_in_flight = Gauge(f"{PREFIX}_cost_in_flight", "Cost (model evaluations x samples) of the "
                                    "requests running now", registry=r)
        self.cost_queued = Gauge(f"{PREFIX}_cost_queued", "Cost of the requests waiting for admission", registry=r)
        self.max_cost_in_flight = Gauge(f"{PREFIX}_max_cost_in_flight", "The admission budget of each pool "
                                        "(--max-cost-in-flight x backends)", registry=r)
        # fair admission per class (a pool = Triton model, "/tenant" when auth is on): label values are bounded
        self.queue_wait = Histogram(f"{PREFIX}_queue_wait_seconds", "Time a request waited for admission, by class",
                                    ["class"], buckets=LATENCY_BUCKETS, registry=r)
        self.refusals = Counter(f"{PREFIX}_admission_refusals", "Requests refused by admission (429) or size (413), "
                                "by class and reason (over_budget, queue_full, deadline, too_large)",
                                ["class", "reason"], registry=r)
        self.triton_up = Gauge(f"{PREFIX}_triton_up", "1 when Triton and the served models are ready, else 0",
                               registry=r)
        # the Triton backend set (serving/gateway/backends.py): one series per backend address and status code
        self.backend_requests = Counter(f"{PREFIX}_backend_requests", "Triton calls by backend (host:port) and gRPC "
                                        "status code (a retried call counts on each backend it tried)",
                                        ["backend", "code"], registry=r)
        self.backend_retries = Counter(f"{PREFIX}_backend_retries", "Triton calls sent again to another backend, by "
                                       "why the first failed before answering (connect, unavailable)", ["reason"],
                                       registry=r)
        self.backends_healthy = Gauge(f"{PREFIX}_backends_healthy", "Triton backends ready to take requests",
                                      registry=r)
        self.backends_known = Gauge(f"{PREFIX}_backends_known", "Triton backends the address set names (--triton-url "
                                    "resolved)", registry=r)
        self.auth_failures = Counter(f"{PREFIX}_auth_failures", "Requests refused UNAUTHENTICATED / HTTP 401, by "
                                     "transport and reason (missing, malformed, invalid)", ["transport", "reason"],
                                     registry=r)
        self.auth_enabled = Gauge(f"{PREFIX}_auth_enabled", "1 when bearer tokens are required, else 0", registry=r)
        self.digits = Counter(f"{PREFIX}_generate_digits", "Successful Generate requests to class-conditional models, "
                              "by model and requested digit (\"any\" when none was asked for)", ["model", "digit"],
                              registry=r)
        self.diversity = DiversityTracker(diversity_window)
        r.register(self.diversity)
        self._children: dict[tuple, object] = {}  # observe()'s labelled series, looked up once per label set

    def count_digit(self, model: str, digit: int) -> None:
        """One Generate request to a class-conditional model (digit -1 = any); label values: known models, 0-9, any."""
        self.digits.labels(model, str(digit) if 0 <= digit <= 9 else "any").inc()

    def watch_admission(self, admission) -> None:
        """The cost gauges and the per-class queue depths follow `admission` (serving.gateway.admission.Admission),
        read when scraped; its waits and refusals feed the histogram and counter."""
        self.cost_in_flight.set_function(lambda: admission.cost_in_flight)
        self.cost_queued.set_function(lambda: admission.cost_queued)
        self.max_cost_in_flight.set_function(lambda: admission.max_cost)
        admission.on_wait = lambda label, seconds: self.queue_wait.labels(label).observe(seconds)
        admission.on_refuse = lambda label, reason: self.refusals.labels(label, reason).inc()
        self.registry.register(AdmissionCollector(admission))

    def observe(self, rpc: str, model: str, transport: str, code: str, seconds: float, samples: int,
                triton_seconds: float = 0.0) -> None:
        """Record one finished request (latency and sizes only for successful ones). Label values are bounded
        (callers pass known model names or "unknown"), so the series are cached per label set."""
        key = (rpc, model, transport, code)
        counter = self._children.get(key)
        if counter is None:
            counter = self._children[key] = self.requests.labels(rpc, model, transport, code)
        counter.inc()
        if code == "OK":
            series = self._children.get((rpc, model))  # histograms only for what succeeded at least once
            if series is None:
                series = self._children[(rpc, model)] = (
                    self.latency.labels(rpc, model), self.sample_latency.labels(rpc, model),
                    self.batch_size.labels(rpc, model), self.triton_latency.labels(rpc, model))
            latency, sample_latency, batch_size, triton_latency = series
            latency.observe(seconds)
            if samples > 0:
                sample_latency.observe(seconds / samples)
                batch_size.observe(samples)
            triton_latency.observe(triton_seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
