"""Measure the gateway over Triton replicas under `python -m serving.run --triton-replicas N` (what
`make run TRITON_REPLICAS=N` runs): each backend's share of mnistgen_gateway_backend_requests_total under steady
load, then SIGKILL of one tritonserver under mixed HTTP load (GAN and DDPM Generate, Denoise): the answers by code,
/readyz meanwhile, retries, and the killed replica's restart and readmission. Writes a JSON (--out)."""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mnistgen.cli import add_dataclass_args, dataclass_from_args
from mnistgen.files import REPO_ROOT
from serving.client import GatewayClient
from serving.process import http_ok, wait_until
from serving.triton_server import free_ports

from .load import closed_loop, relative_paths

SERIES = re.compile(r'mnistgen_gateway_backend_(requests|retries)_total\{(?:backend="([^"]+)",code|reason)="([^"]+)"\} '
                    r"(\S+)")


@dataclass
class ReplicasConfig:
    replicas: int = 2  # --triton-replicas
    clients: int = 8  # closed-loop HTTP clients in both phases
    steady_s: float = 20.0  # phase 1: GAN Generate only, the share per backend
    kill_window_s: float = 60.0  # phase 2: mixed load for this long; the SIGKILL comes after kill_after_s
    kill_after_s: float = 5.0
    ddpm_steps: int = 2  # DDPM Generate and Denoise steps (cheap calls: the point is routing, not sampling)
    startup_timeout_s: float = 600.0  # every exported model loading in N Tritons on shared cores
    out: Path = REPO_ROOT / "out" / "replicas.json"


def counters(url: str) -> dict:
    """{("requests", backend, code) | ("retries", "", reason): value} from the gateway's /metrics."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        return {(k, b, c): float(v) for k, b, c, v in SERIES.findall(r.read().decode())}


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}


def by_backend(d: dict, code: str = "OK") -> dict[str, float]:
    return {b: v for (k, b, c), v in d.items() if k == "requests" and c == code}


def run(cfg: ReplicasConfig) -> dict:
    grpc_port, http_port, *tports = free_ports(5)
    log_dir = Path(tempfile.mkdtemp(prefix="replicas-"))
    cmd = [sys.executable, "-m", "serving.run", "--no-export", "--host", "127.0.0.1", "--grpc-port", str(grpc_port),
           "--http-port", str(http_port), "--triton-http-port", str(tports[0]), "--triton-grpc-port", str(tports[1]),
           "--triton-metrics-port", str(tports[2]), "--triton-replicas", str(cfg.replicas), "--log-dir", str(log_dir),
           "--backoff-s", "0.5"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    url, target = f"http://127.0.0.1:{http_port}", f"127.0.0.1:{http_port}"
    try:
        wait_until(lambda: any("mnistgen-serve is up" in ln for ln in lines), cfg.startup_timeout_s, "the stack",
                   proc=proc, log=lambda: "".join(lines[-40:]))
        tritons = re.findall(r"Triton ready with .* \(pid (\d+)\) on grpc (\S+)", "".join(lines))

        def client(kinds):
            c = GatewayClient(transport="http", target=target)
            png = np.zeros((1, 1, 28, 28), np.float32)
            calls = {"gan": lambda i: c.generate("dcgan-baseline", 1, seed=i),
                     "ddpm": lambda i: c.generate("ddpm", 1, seed=i, steps=cfg.ddpm_steps),
                     "denoise": lambda i: c.denoise(png, 0.3, steps=cfg.ddpm_steps, seed=i)}
            return lambda i: calls[kinds[i % len(kinds)]](i)

        before = counters(url)
        steady = closed_loop(lambda: client(["gan"]), cfg.clients, seconds=cfg.steady_s, warm=True)
        shares = by_backend(delta(counters(url), before))
        total = sum(shares.values())

        victim_pid, victim = int(tritons[0][0]), tritons[0][1]
        not_ready, stop = [], threading.Event()

        def chaos():
            time.sleep(cfg.kill_after_s)
            os.kill(victim_pid, signal.SIGKILL)
            while not stop.wait(0.1):
                if not http_ok(f"{url}/readyz", 5):
                    not_ready.append(time.monotonic())

        before = counters(url)
        watcher = threading.Thread(target=chaos, daemon=True)
        watcher.start()
        mixed = closed_loop(lambda: client(["gan", "ddpm", "denoise"]), cfg.clients, seconds=cfg.kill_window_s)
        stop.set()
        watcher.join(10)
        d = delta(counters(url), before)
        # phase 3: once the launcher restarted the killed one, steady load again: is it readmitted?
        again = wait_until(lambda: re.search(r"Triton ready again after ([\d.]+) s", "".join(lines)),
                           cfg.startup_timeout_s, "the killed Triton restarted", proc=proc)
        wait_until(lambda: json.load(urllib.request.urlopen(f"{url}/readyz", timeout=5))["backends_ready"]
                   == cfg.replicas, 60, "every backend ready in /readyz")
        before = counters(url)
        readmitted = closed_loop(lambda: client(["gan"]), cfg.clients, seconds=cfg.steady_s)
        after = by_backend(delta(counters(url), before))
        return {
            "config": relative_paths(asdict(cfg)), "command": " ".join(["python -m loadtest.replicas", *sys.argv[1:]]),
            "stack": "python -m serving.run --no-export --triton-replicas " + str(cfg.replicas),
            "backends": [b for _, b in tritons],
            "steady": {"requests_ok": steady["ok"], "errors": steady["error_codes"],
                       "share": {b: round(v / total, 4) for b, v in shares.items()}},
            "sigkill": {"killed": victim, "requests": mixed["requests"], "ok": mixed["ok"],
                        "errors": mixed["error_codes"], "readyz_not_200": len(not_ready),
                        "retries": {r: v for (k, _, r), v in d.items() if k == "retries"},
                        "backend_calls_by_code": {f"{b} {c}": v for (k, b, c), v in d.items() if k == "requests"},
                        "restart_ready_after_s": float(again.group(1))},
            "after_restart": {"requests_ok": readmitted["ok"], "errors": readmitted["error_codes"],
                              "share": {b: round(v / sum(after.values()), 4) for b, v in after.items()}},
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    add_dataclass_args(p, ReplicasConfig)
    cfg = dataclass_from_args(ReplicasConfig, p.parse_args(argv), parser=p)
    result = run(cfg)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
