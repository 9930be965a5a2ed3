"""Run a real Prometheus server scraping the gateway and Triton with prometheus/ (scrape config + rules).

    python -m serving.monitor                      # make run's ports: gateway :8080, Triton metrics :8002, UI :9090
    python -m serving.monitor --gateway 127.0.0.1:8080 --triton 127.0.0.1:8002 --port 9090 --storage out/prometheus

Needs the `prometheus` binary (Debian: `apt-get install -y prometheus`; it installs prometheus and promtool
and starts nothing by itself).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from serving.process import terminate

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = REPO_ROOT / "prometheus"
CONFIG_FILE = PROMETHEUS_DIR / "prometheus.yml"  # the committed config (make run's default targets)
RULES_FILE = PROMETHEUS_DIR / "rules.yml"
INSTALL_HINT = "apt-get update && apt-get install -y prometheus"
GATEWAY_JOB, TRITON_JOB = "mnistgen-gateway", "triton"  # job names in prometheus.yml
DURATION = re.compile(r"^\d+(ms|s|m|h)$")  # Prometheus durations accepted here


@dataclass
class MonitorConfig:
    gateway: str = "127.0.0.1:8080"  # host:port of the gateway's HTTP server (/metrics)
    triton: str = "127.0.0.1:8002"  # host:port of Triton's metrics server (/metrics)
    host: str = "127.0.0.1"  # Prometheus web UI / API address
    port: int = 9090  # Prometheus web UI / API port
    storage: Path | None = None  # TSDB directory; None = a temporary one (deleted on stop)
    scrape_interval: str = "5s"  # how often both targets are scraped
    evaluation_interval: str = "5s"  # how often recording and alert rules run
    retention: str = "1d"  # TSDB retention
    startup_timeout_s: float = 60.0  # until /-/ready answers 200
    log_file: Path | None = None  # server log; None = a file beside the rendered config
    binary: str = "prometheus"  # executable name or path

    def __post_init__(self) -> None:
        for name in ("scrape_interval", "evaluation_interval", "retention"):
            v = getattr(self, name)
            if not (DURATION.match(v) or (name == "retention" and re.match(r"^\d+[dwy]$", v))):
                raise ValueError(f"{name} must be a Prometheus duration like 1s, 500ms, 5m, got {v!r}")
        if not 0 <= int(self.port) < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port!r}")
        for name in ("gateway", "triton"):
            if not re.match(r"^[\w.\-\[\]:]+:\d+$", getattr(self, name)):
                raise ValueError(f"{name} must be host:port, got {getattr(self, name)!r}")


def find_prometheus(binary: str = "prometheus") -> str:
    path = shutil.which(binary)
    if path is None:
        raise FileNotFoundError(f"{binary!r} not found on PATH: install it with `{INSTALL_HINT}`")
    return path


def render_config(cfg: MonitorConfig, rules_file: Path = RULES_FILE) -> dict:
    """The committed prometheus.yml with this run's targets, intervals and an absolute rules path."""
    doc = yaml.safe_load(CONFIG_FILE.read_text())
    doc["global"]["scrape_interval"] = cfg.scrape_interval
    doc["global"]["evaluation_interval"] = cfg.evaluation_interval
    doc["global"]["scrape_timeout"] = cfg.scrape_interval  # may not exceed the interval
    doc["rule_files"] = [str(Path(rules_file).resolve())]
    targets = {GATEWAY_JOB: cfg.gateway, TRITON_JOB: cfg.triton}
    for job in doc["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    return doc


class PrometheusServer:
    """One `prometheus` process: start(), wait_ready(), query(), stop(); also a context manager."""

    def __init__(self, config: MonitorConfig | None = None):
        self.config = config or MonitorConfig()
        self.binary = find_prometheus(self.config.binary)
        self.proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._log = None
        self.config_path: Path | None = None
        self.log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    def start(self) -> "PrometheusServer":
        c = self.config
        if c.storage is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="mnistgen-prometheus-")
            storage = Path(self._tmp.name)
        else:
            storage = Path(c.storage)
            storage.mkdir(parents=True, exist_ok=True)
        self.config_path = storage / "prometheus.rendered.yml"
        self.config_path.write_text(yaml.safe_dump(render_config(c), sort_keys=False))
        self.log_path = Path(c.log_file) if c.log_file else storage / "prometheus.log"
        self._log = open(self.log_path, "ab")
        cmd = [self.binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={storage / 'data'}",
               f"--storage.tsdb.retention.time={c.retention}", f"--web.listen-address={c.host}:{c.port}",
               "--log.level=warn"]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self

    def log_tail(self, n: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def wait_ready(self, timeout: float | None = None) -> "PrometheusServer":
        timeout = self.config.startup_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited before becoming ready; log {self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready after {timeout:.0f} s; log {self.log_path}:\n{self.log_tail()}")

    def api(self, path: str, **params) -> dict | list:
        """GET /api/v1/<path>?params -> the `data` field; RuntimeError on an API error."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = json.loads(e.read() or b"{}")
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus API {path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """Instant query: [{"metric": {labels}, "value": [ts, "value"]}, ...]."""
        return self.api("query", query=expr)["result"]

    def targets(self) -> dict[str, str]:
        """{job: health} of the active scrape targets ("up", "down" or "unknown")."""
        return {t["labels"]["job"]: t["health"] for t in self.api("targets")["activeTargets"]}

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        terminate(self.proc, 15)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "PrometheusServer":
        return self.start().wait_ready()

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    d = MonitorConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gateway", default=d.gateway, help="gateway HTTP host:port")
    p.add_argument("--triton", default=d.triton, help="Triton metrics host:port")
    p.add_argument("--host", default=d.host, help="Prometheus listen address")
    p.add_argument("--port", type=int, default=d.port, help="Prometheus web UI / API port")
    p.add_argument("--storage", type=Path, default=Path("out/prometheus"), help="TSDB directory")
    p.add_argument("--scrape-interval", default=d.scrape_interval)
    p.add_argument("--evaluation-interval", default=d.evaluation_interval)
    p.add_argument("--retention", default=d.retention)
    a = p.parse_args(argv)
    try:
        cfg = MonitorConfig(gateway=a.gateway, triton=a.triton, host=a.host, port=a.port, storage=a.storage,
                            scrape_interval=a.scrape_interval, evaluation_interval=a.evaluation_interval,
                            retention=a.retention)
        server = PrometheusServer(cfg)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    stop = {"sig": None}
    signal.signal(signal.SIGTERM, lambda s, _f: stop.update(sig=s))
    signal.signal(signal.SIGINT, lambda s, _f: stop.update(sig=s))
    try:
        server.start().wait_ready()
    except (RuntimeError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        server.close()
        return 1
    print(f"Prometheus ready: {server.url} (scraping gateway {cfg.gateway}, triton {cfg.triton} every "
          f"{cfg.scrape_interval}; config {server.config_path}, log {server.log_path})", flush=True)
    while stop["sig"] is None and server.proc.poll() is None:
        time.sleep(0.5)
    code = server.proc.poll()
    server.close()
    return 0 if code in (None, 0) else 1


if __name__ == "__main__":
    sys.exit(main())
