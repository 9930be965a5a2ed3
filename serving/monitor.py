"""`make monitor`: a real Prometheus server scraping the gateway and Triton with prometheus/ (scrape config + rules).

    python -m serving.monitor --gateway 127.0.0.1:8080 --triton 127.0.0.1:8002 --port 9090   # make run's ports

Needs the `prometheus` binary (Debian: `apt-get install -y prometheus`, which starts nothing by itself)."""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from mnistgen.cli import add_dataclass_args, dataclass_from_args
from mnistgen.files import REPO_ROOT
from serving.process import ManagedProcess, http_ok, run_in_foreground

PROMETHEUS_DIR = REPO_ROOT / "prometheus"
CONFIG_FILE = PROMETHEUS_DIR / "prometheus.yml"  # the committed config (make run's default targets)
RULES_FILE = PROMETHEUS_DIR / "rules.yml"
INSTALL_HINT = "apt-get update && apt-get install -y prometheus"
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


def render_config(cfg: MonitorConfig, rules_file: Path = RULES_FILE) -> dict:
    """The committed prometheus.yml with this run's targets, intervals and an absolute rules path."""
    doc = yaml.safe_load(CONFIG_FILE.read_text())
    doc["global"]["scrape_interval"] = cfg.scrape_interval
    doc["global"]["evaluation_interval"] = cfg.evaluation_interval
    doc["global"]["scrape_timeout"] = cfg.scrape_interval  # may not exceed the interval
    doc["rule_files"] = [str(Path(rules_file).resolve())]
    targets = {"mnistgen-gateway": cfg.gateway, "triton": cfg.triton}  # by the job names in prometheus.yml
    for job in doc["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    return doc


class PrometheusServer(ManagedProcess):
    """One `prometheus` process: start(), wait_ready(), query(), stop(); also a context manager."""

    stop_grace_s = 15.0

    def __init__(self, config: MonitorConfig | None = None):
        self.config = config or MonitorConfig()
        self.binary = shutil.which("prometheus")
        if self.binary is None:
            raise FileNotFoundError(f"'prometheus' not found on PATH: install it with `{INSTALL_HINT}`")
        self.config_path: Path | None = None

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
        cmd = [self.binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={storage / 'data'}",
               f"--storage.tsdb.retention.time={c.retention}", f"--web.listen-address={c.host}:{c.port}",
               "--log.level=warn"]
        self._spawn(cmd, storage / "prometheus.log")  # beside the rendered config
        return self

    def describe(self) -> str:
        return f"prometheus ({self.url})"

    def _check_ready(self) -> bool:
        return http_ok(f"{self.url}/-/ready")

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = MonitorConfig(storage=Path("out/prometheus"))
    add_dataclass_args(p, MonitorConfig, defaults, exclude=("startup_timeout_s",), help={
        "gateway": "gateway HTTP host:port", "triton": "Triton metrics host:port", "host": "Prometheus listen address",
        "port": "Prometheus web UI / API port", "storage": "TSDB directory"})
    a = p.parse_args(argv)
    try:
        cfg = dataclass_from_args(MonitorConfig, a, base=defaults)
        server = PrometheusServer(cfg)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    return run_in_foreground(server, "prometheus", lambda: (
        f"Prometheus ready: {server.url} (scraping gateway {cfg.gateway}, triton {cfg.triton} every "
        f"{cfg.scrape_interval}; config {server.config_path}, log {server.log_path})"))


if __name__ == "__main__":
    sys.exit(main())
