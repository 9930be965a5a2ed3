"""Helpers of the reliability tests: Triton SIGKILL, raw HTTP exchanges, RSS, and the figures each test measured
with the session's run record (out/reliability/*.json, the input of docs/reliability.md)."""
from __future__ import annotations

import json
import os
import platform
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from loadtest.soak import rss_mib
from serving.run import HttpReply

REPO_ROOT = Path(__file__).resolve().parents[2]
OUT_DIR = REPO_ROOT / "out" / "reliability"  # JSON figures written by the tests (counts, timings)


def kill_triton(triton) -> float:
    """SIGKILL the tritonserver the `triton` fixture started (a crash, not a graceful stop); returns the time of the kill.

    Its python-backend stubs are left to notice on their own; `restart_triton` reaps what is left.
    """
    proc = triton.server.proc
    assert proc is not None and proc.poll() is None, "Triton is not running"
    t = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    return t


def restart_triton(triton, timeout: float = 300.0) -> float:
    """Reap the killed server (stub processes of its group, the log file), start it again, block until ready.

    Returns time.monotonic() at the moment Triton reported ready. Same ports as before, so gateways reconnect.
    """
    triton.server.stop()  # the process is dead: this only kills orphaned stubs and closes the log
    triton.start(timeout)
    return time.monotonic()


def http_exchange(target: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                  chunks: list[int] | None = None, timeout: float = 10.0) -> HttpReply:
    """One HTTP/1.1 request on its own connection, written by hand (any method, headers as given, `Connection:
    close`); `chunks`: send the body with Transfer-Encoding: chunked, cut at these sizes (the rest in one last chunk).
    A server may answer before the body is all sent (a 405, a 413) and close: the answer is read all the same."""
    import http.client
    import socket

    host, port = target.rsplit(":", 1)
    head = [f"{method} {path} HTTP/1.1", f"Host: {target}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body is not None and chunks is not None:
        pieces, rest = [], body
        for n in chunks:
            pieces.append(rest[:n])
            rest = rest[n:]
        pieces.append(rest)
        payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"
        head.append("Transfer-Encoding: chunked")
    else:
        payload = body or b""
        if body is not None:
            head.append(f"Content-Length: {len(body)}")
    data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered (and closed) early: read that answer
        r = http.client.HTTPResponse(s, method=method)
        r.begin()
        return HttpReply(r.status, dict(r.getheaders()), r.read())


def raw_http(target: str, data: bytes, timeout: float = 10.0) -> tuple[int | None, bytes]:
    """Bytes straight onto a TCP connection to the gateway's HTTP port (a request http.client refuses to send:
    give it whole, with `Connection: close`); returns (status of the first response line or None, what was read
    until the server closed or `timeout` passed)."""
    import socket

    host, port = target.rsplit(":", 1)
    out = b""
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(data)
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    first = out.split(b"\r\n", 1)[0].split()
    status = int(first[1]) if len(first) >= 2 and first[0].startswith(b"HTTP/") and first[1].isdigit() else None
    return status, out


def rss_bytes(pid: int, with_children: bool = False) -> int:
    """Resident memory of a live process (and, optionally, of all its descendants): loadtest.soak.rss_mib in bytes."""
    psutil.Process(pid)  # raises NoSuchProcess for a dead pid, as a test wants
    return int(rss_mib(pid, with_children) * 2**20)


def percentile(values, q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, float), q)) if len(values) else float("nan")


WRITTEN: list[str] = []  # the figure files this session wrote (tests_run.json's "written")


def write_figures(name: str, figures: dict) -> Path:
    """out/reliability/<name>.json: what a test measured, the input of docs/reliability.md
    (`python -m loadtest.reliability_report collect` copies this session's files into reports/reliability/)."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{name}.json"
    path.write_text(json.dumps(figures, indent=2, sort_keys=True, default=float) + "\n")
    WRITTEN.append(name)
    return path


class RunRecorder:
    """A pytest plugin for one session: pytest's outcome and time per tests/reliability file, the machine's 1-minute
    load average every second, and the wall time from the first reliability test to the last."""

    def __init__(self):
        self.files: dict[str, dict] = {}
        self.loads, self.stop = [], threading.Event()
        self.started, self.t0 = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), time.monotonic()
        self.t_last = self.t0
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self.stop.is_set():
            self.loads.append(os.getloadavg()[0])
            self.stop.wait(1.0)

    def pytest_runtest_logreport(self, report) -> None:
        path = Path(report.nodeid.split("::")[0])
        if path.parent.name != "reliability":
            return
        f = self.files.setdefault(path.name, {"outcome": dict.fromkeys(("passed", "failed", "error", "skipped"), 0),
                                              "time_s": 0.0})
        f["time_s"] = round(f["time_s"] + report.duration, 1)
        self.t_last = time.monotonic()
        if report.when == "call" or report.failed or report.skipped:
            kind = ("skipped" if report.skipped else "passed" if report.passed
                    else "failed" if report.when == "call" else "error")
            f["outcome"][kind] += 1

    def write(self, config, failed: int) -> Path:
        self.stop.set()
        v = self.loads or [os.getloadavg()[0]]
        run = {"command": " ".join(["pytest", *config.invocation_params.args]), "started_utc": self.started,
               "wall_s": round(self.t_last - self.t0, 1), "exit_code": 1 if failed else 0,
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "python": platform.python_version(),
                           "gpu_devices": len(list(Path("/dev").glob("nvidia[0-9]*")))},
               "load_avg_1m": {"min": round(min(v), 2), "mean": round(sum(v) / len(v), 2), "max": round(max(v), 2)},
               "files": dict(sorted(self.files.items())), "written": sorted(set(WRITTEN))}
        return write_figures("tests_run", run)


@pytest.fixture(scope="session", autouse=True)
def reliability_run(request):
    """Record this session's run (RunRecorder) into out/reliability/tests_run.json when it ends."""
    recorder = RunRecorder()
    request.config.pluginmanager.register(recorder, "reliability-run-recorder")
    yield recorder
    request.config.pluginmanager.unregister(recorder)
    recorder.write(request.config, request.session.testsfailed)
