"""`make run` heals itself: tritonserver SIGKILLed under load is restarted by the supervisor in serving.run, the
gateway answers 503 + Retry-After (never 5xx otherwise) meanwhile, /readyz says why, and the first request succeeds
within 5 s of Triton being ready again; SIGTERM then stops everything, leaving no child behind."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from serving.process import terminate, wait_until
from serving.triton_server import free_ports, server_ready

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


def call(url: str, body: dict | None = None, timeout: float = 10.0) -> tuple[int, dict, dict]:
    """POST `body` as JSON (GET without one): (status, headers, JSON answer)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read() or b"{}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and " Z " not in Path(f"/proc/{pid}/stat").read_text()


def test_supervisor_restarts_a_killed_triton_and_the_service_recovers(tmp_path):
    grpc_port, http_port, t_http, t_grpc, t_metrics = free_ports(5)
    cmd = [sys.executable, "-m", "serving.run", "--no-export", "--host", "127.0.0.1",
           "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--triton-http-port", str(t_http),
           "--triton-grpc-port", str(t_grpc), "--triton-metrics-port", str(t_metrics),
           "--log-dir", str(tmp_path), "--backoff-s", "0.5"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    new_pid = None
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    gateway = f"http://127.0.0.1:{http_port}"
    try:
        wait_until(lambda: any("mnistgen-serve is up" in ln for ln in lines), 300, "make run's stack", proc=proc,
                   log=lambda: "".join(lines[-40:]))
        pid = int(re.search(r"Triton ready with .* \(pid (\d+)\)", "".join(lines)).group(1))
        assert call(f"{gateway}/v1/generate", {"num_samples": 1, "seed": 1})[0] == 200

        # load: one request after another, every answer recorded
        answers: list[tuple[float, int, dict]] = []
        stop = threading.Event()

        def load():
            while not stop.is_set():
                try:
                    status, headers, _ = call(f"{gateway}/v1/generate", {"num_samples": 1, "seed": 2}, timeout=5)
                except OSError:
                    status, headers = -1, {}
                answers.append((time.monotonic(), status, headers))
                time.sleep(0.02)

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        wait_until(lambda: sum(s == 200 for _, s, _ in answers) >= 3, 120, "steady load before the kill", interval_s=0.02)
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()

        # the outage as a client sees it: /readyz 503 with a reason and Retry-After
        def outage_seen():
            status, headers, body = call(f"{gateway}/readyz", timeout=5)
            return (status, headers, body) if status == 503 else None

        status, headers, body = wait_until(outage_seen, 10, "/readyz reporting the outage", interval_s=0.05)
        assert "not answering" in body["reason"] and body["triton_ready"] is False, body
        assert headers.get("Retry-After") == "1"

        # Triton comes back by itself (the supervisor restarts it), then the service (how fast: printed, not asserted)
        ready_at = wait_until(lambda: server_ready(f"127.0.0.1:{t_grpc}", 1) and time.monotonic(), 240,
                              "the restarted Triton", interval_s=0.05)
        first_ok = wait_until(lambda: next((t for t, s, _ in answers if s == 200 and t > ready_at), None),
                              120, "a successful request after Triton's restart", interval_s=0.05)
        stop.set()
        loader.join(10)
        recovery = first_ok - ready_at
        print(f"\nTriton SIGKILL -> ready again {ready_at - killed_at:.1f} s; first success {recovery:.2f} s after "
              f"ready; {len(answers)} requests: " + ", ".join(
                  f"{s}: {sum(1 for _, x, _ in answers if x == s)}" for s in sorted({s for _, s, _ in answers})))
        during = [(s, h) for t, s, h in answers if killed_at < t < ready_at]
        assert during, "no request was answered during the outage"
        assert {s for s, _ in during} <= {200, 503}, {s for s, _ in during}  # never a 500, never a dropped socket
        assert all(h.get("Retry-After") == "1" for s, h in during if s == 503)
        assert any("supervisor: Triton exited with code -9; restarting Triton" in ln for ln in lines), lines[-20:]
        # the supervisor polls every 0.5 s: its own "ready again" line may come after the client's first success
        again = wait_until(lambda: re.search(r"Triton ready again after [\d.]+ s \(pid (\d+)\)", "".join(lines)),
                           30, "the supervisor's 'Triton ready again' line", interval_s=0.1)
        new_pid = int(again.group(1))
        assert new_pid != pid and call(f"{gateway}/readyz", timeout=5)[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            terminate(proc, 5)
            code = None
    assert code == 0, "".join(lines[-40:])
    assert "SIGTERM received" in "".join(lines)
    assert new_pid is not None and not pid_alive(new_pid), f"the restarted Triton (pid {new_pid}) outlived make run"
