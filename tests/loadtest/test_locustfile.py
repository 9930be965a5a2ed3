"""loadtest/locustfile.py run headless by the real Locust CLI against a real gateway + Triton."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from loadtest import report

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCUST_RUN_S = 5


def run_locust(gateway, tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    raw = tmp_path / "requests.csv"
    cmd = [sys.executable, "-m", "locust", "-f", str(REPO_ROOT / "loadtest" / "locustfile.py"), "--headless",
           "-u", "2", "-r", "2", "-t", f"{LOCUST_RUN_S}s", "--stop-timeout", "30", "--only-summary",
           "--grpc-host", gateway.grpc_target, "--http-host", gateway.http_url, "--raw-csv", str(raw), *args]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    return proc, raw


def test_headless_run_records_every_request(gateway, triton, tmp_path):
    triton.require("dcgan_generator", "ddpm_denoise")  # the whole mix or a skip that names the missing model
    mix = ["--mix", "generate=3,denoise=1", "--denoise-images", "1", "--denoise-steps", "2"]
    proc, raw = run_locust(gateway, tmp_path, "GrpcGatewayUser", "HttpGatewayUser", "--num-samples", "1,8", *mix)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = report.read_requests(raw)
    assert len(r) > 0, proc.stderr[-2000:]
    assert r.ok.all(), report.error_counts(r)
    assert set(r.transport) == {"grpc", "http"}
    assert set(r.samples) <= {1, 8} and (r.latency_ms > 0).all()
    s = report.summaries(r)[0]
    assert s.errors == 0 and s.samples_per_s > 0


def test_bad_option_names_allowed_values(gateway, tmp_path):
    proc, _ = run_locust(gateway, tmp_path, "GrpcGatewayUser", "--mix", "train=1")
    assert proc.returncode != 0
    assert "--mix: unknown rpc 'train'" in proc.stderr and "('generate', 'denoise')" in proc.stderr
