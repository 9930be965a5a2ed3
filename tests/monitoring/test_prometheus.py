"""prometheus/ checked by promtool, and a real Prometheus scraping a real gateway + Triton, read back by its query API."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import time

import pytest
import yaml

from serving.client import ClientError, GatewayClient
from serving.monitor import (
    CONFIG_FILE, INSTALL_HINT, PROMETHEUS_DIR, RULES_FILE, MonitorConfig, PrometheusServer, render_config,
)
from serving.process import NotReady, wait_until
from serving.triton_server import free_ports

PROMTOOL = shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None or PROMTOOL is None,
    reason=f"prometheus/promtool not installed (Debian package `prometheus`): run `{INSTALL_HINT}`")
TRAFFIC_S = 4.0  # seconds of requests while Prometheus scrapes every second
RECORDED_TIMEOUT_S = 30.0  # until the recording rules have values; well inside their 1m rate window


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


@needs_prometheus
def test_promtool_accepts_config_and_rules():
    for args in (("check", "config", str(CONFIG_FILE)), ("check", "rules", str(RULES_FILE))):
        r = promtool(*args)
        assert r.returncode == 0, r.stdout + r.stderr


@needs_prometheus
def test_rule_unit_tests_pass():
    """prometheus/rules_test.yml: error ratio, per-sample p50, throughput and the collapse alert on synthetic series."""
    r = promtool("test", "rules", str(PROMETHEUS_DIR / "rules_test.yml"))
    assert r.returncode == 0, r.stdout + r.stderr


@needs_prometheus
def test_rendered_config_is_valid(tmp_path):
    cfg = MonitorConfig(gateway="127.0.0.1:18080", triton="127.0.0.1:18002", scrape_interval="1s",
                        evaluation_interval="1s")
    doc = render_config(cfg)
    targets = {j["job_name"]: j["static_configs"][0]["targets"] for j in doc["scrape_configs"]}
    assert targets == {"mnistgen-gateway": ["127.0.0.1:18080"], "triton": ["127.0.0.1:18002"]}
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(doc))
    r = promtool("check", "config", str(path))
    assert r.returncode == 0, r.stdout + r.stderr


def test_bad_monitor_settings_name_the_field():
    with pytest.raises(ValueError, match="scrape_interval must be a Prometheus duration"):
        MonitorConfig(scrape_interval="fast")
    with pytest.raises(ValueError, match="gateway must be host:port"):
        MonitorConfig(gateway="localhost")


def test_dashboard_queries_use_recorded_or_exported_series():
    dash = json.loads((PROMETHEUS_DIR / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert exprs and all("mnistgen" in e or "nv_inference" in e or "up{" in e for e in exprs)
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for word in ("p50", "p99", "throughput", "error", "in-flight", "triton up", "diversity", "queue"):
        assert word in titles, word


def values(prom: PrometheusServer, expr: str) -> dict[tuple, float]:
    """{sorted labels without __name__: value} of an instant query."""
    return {tuple(sorted((k, v) for k, v in r["metric"].items() if k != "__name__")): float(r["value"][1])
            for r in prom.query(expr)}


def invalid_request(client: GatewayClient) -> None:
    with pytest.raises(ClientError) as e:
        client.generate(model="dcgan-baseline", num_samples=5000)  # over 1..1024
    assert e.value.code == "INVALID_ARGUMENT"


@needs_prometheus
def test_prometheus_records_gateway_traffic(gateway, triton, tmp_path):
    triton.require("dcgan_generator")
    cfg = MonitorConfig(gateway=f"127.0.0.1:{gateway.config.http_port}", triton=triton.metrics_url.split("/")[2],
                        port=free_ports(1)[0], storage=tmp_path / "prometheus", scrape_interval="1s",
                        evaluation_interval="1s")
    with PrometheusServer(cfg) as prom:
        grpc_client = GatewayClient(transport="grpc", target=gateway.grpc_target)
        http_client = GatewayClient(transport="http", target=gateway.http_url.removeprefix("http://"))
        try:
            # a first request creates the series; rates need a scrape of it before the traffic starts
            grpc_client.generate(model="dcgan-baseline", num_samples=8, seed=0)
            invalid_request(grpc_client)
            wait_until(lambda: len(values(prom, 'mnistgen_gateway_requests_total{rpc="Generate"}')) >= 2,
                       RECORDED_TIMEOUT_S, "a scrape of the gateway",
                       log=lambda: f"{prom.targets()}\n{prom.log_tail()}")
            ok, end = 1, time.monotonic() + TRAFFIC_S
            while time.monotonic() < end:
                for c in (grpc_client, http_client):
                    c.generate(model="dcgan-baseline", num_samples=8, seed=ok)
                    ok += 1
            invalid_request(grpc_client)  # (the rules below are polled until a scrape has seen it)
        finally:
            grpc_client.close()
            http_client.close()

        key = (("model", "dcgan-baseline"), ("rpc", "Generate"))

        def recorded() -> tuple[dict, ...]:  # the last (invalid) request counts once a scrape and a rule saw it
            rules = ("sample_latency_seconds:p50_1m", "sample_latency_seconds:p99_1m", "error_ratio:rate1m",
                     "samples:rate1m")
            p50, p99, err, rate = (values(prom, f"mnistgen:{rule}") for rule in rules)
            if not (math.isfinite(p50.get(key, math.nan)) and math.isfinite(p99.get(key, math.nan))
                    and err.get((("rpc", "Generate"),), 0) > 0 and rate.get(key, 0) > 0):
                raise NotReady(f"p50 {p50}, p99 {p99}, error ratio {err}, samples/s {rate}; targets {prom.targets()}")
            return p50, p99, err, rate

        p50, p99, err, rate = wait_until(recorded, RECORDED_TIMEOUT_S, "recording rules with values",
                                         log=prom.log_tail, interval_s=1.0)
        assert ok >= 2
        # per-sample latency of 8-sample requests on this machine: between 10 us and 10 s, p50 <= p99
        assert 1e-5 < p50[key] <= p99[key] < 10.0, (p50, p99)
        # one INVALID_ARGUMENT among the traffic's ok + 1 requests: the ratio is positive and below one half
        assert 0 < err[(("rpc", "Generate"),)] < 0.5, err
        assert rate[key] > 0
        assert prom.targets() == {"mnistgen-gateway": "up", "triton": "up"}
        diversity = values(prom, 'mnistgen_gateway_sample_diversity{model="dcgan-baseline"}')
        assert diversity and all(0 <= v <= 2 for v in diversity.values()), diversity
        assert values(prom, "mnistgen_gateway_triton_up") and all(
            v == 1 for v in values(prom, "mnistgen_gateway_triton_up").values())
