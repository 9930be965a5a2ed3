"""`make run`: export what is stale, start Triton and the gateway, wait until ready, stop both on Ctrl-C / SIGTERM."""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .triton_server import DEFAULT_MODEL_REPOSITORY, REPO_ROOT, TritonConfig, TritonServer


@dataclass
class RunConfig:
    host: str = "127.0.0.1"  # interface the gateway binds (0.0.0.0 to reach it from other machines)
    grpc_port: int = 50051  # gateway gRPC
    http_port: int = 8080  # gateway HTTP/JSON, /metrics, /readyz
    triton_http_port: int = 8000
    triton_grpc_port: int = 8001
    triton_metrics_port: int = 8002
    model_repository: Path = DEFAULT_MODEL_REPOSITORY
    export: bool = True  # run `python -m training.export` first (it skips up-to-date exports)
    startup_timeout_s: float = 300.0  # Triton loading every model on a small CPU machine
    log_dir: Path = REPO_ROOT / "out" / "run"  # tritonserver.log goes here


def export_models() -> None:
    print("exporting checkpoints that changed (python -m training.export) ...", flush=True)
    r = subprocess.run([sys.executable, "-m", "training.export"], cwd=REPO_ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"python -m training.export failed with exit code {r.returncode}")


def wait_http_ok(url: str, timeout: float, alive) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"process exited while waiting for {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s")


def banner(c: RunConfig, models: list[str]) -> str:
    shown = "127.0.0.1" if c.host in ("0.0.0.0", "") else c.host
    return "\n".join([
        "",
        "mnistgen-serve is up (Ctrl-C stops both servers)",
        f"  gateway gRPC     {shown}:{c.grpc_port}   (mnistgen.v1.GenerationService, health, reflection)",
        f"  gateway HTTP     http://{shown}:{c.http_port}   (/v1/generate, /v1/denoise, /v1/models, /readyz, /metrics)",
        f"  Triton           http :{c.triton_http_port}, grpc :{c.triton_grpc_port}, "
        f"metrics http://127.0.0.1:{c.triton_metrics_port}/metrics",
        f"  Triton models    {', '.join(models)}",
        f"  Triton log       {c.log_dir / 'tritonserver.log'}",
        "try:",
        f"  .venv/bin/python -m serving.client generate --model dcgan-baseline --n 64 --out out/grid.png "
        f"--target {shown}:{c.grpc_port}",
        f"  curl -s -X POST http://{shown}:{c.http_port}/v1/generate -H 'Accept: image/png' "
        "-d '{\"num_samples\": 64}' > out/grid.png",
        "  make demo",
        "",
    ])


def run(c: RunConfig) -> int:
    if c.export:
        export_models()
    c.log_dir.mkdir(parents=True, exist_ok=True)
    triton = TritonServer(TritonConfig(
        model_repository=c.model_repository, http_port=c.triton_http_port, grpc_port=c.triton_grpc_port,
        metrics_port=c.triton_metrics_port, startup_timeout_s=c.startup_timeout_s,
        log_file=c.log_dir / "tritonserver.log",
    ))
    gateway: subprocess.Popen | None = None
    stop = {"sig": None, "starting": True}

    def on_signal(signum, _frame):
        stop["sig"] = signum
        if stop["starting"]:  # interrupt the waits for readiness
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = 0
    try:
        print(f"starting Triton (log {c.log_dir / 'tritonserver.log'}) ...", flush=True)
        triton.start()
        triton.wait_ready()
        print(f"Triton ready with {triton.models}; starting the gateway ...", flush=True)
        gateway = subprocess.Popen([
            sys.executable, "-m", "serving.gateway", "--host", c.host, "--grpc-port", str(c.grpc_port),
            "--http-port", str(c.http_port), "--triton-url", f"127.0.0.1:{c.triton_grpc_port}",
        ], cwd=REPO_ROOT, start_new_session=True)  # own group: Ctrl-C reaches it through us, in order
        shown = "127.0.0.1" if c.host in ("0.0.0.0", "") else c.host
        wait_http_ok(f"http://{shown}:{c.http_port}/readyz", 60, lambda: gateway.poll() is None)
        stop["starting"] = False
        print(banner(c, triton.models), flush=True)
        while stop["sig"] is None:
            if gateway.poll() is not None:
                print(f"gateway exited with code {gateway.returncode}", file=sys.stderr)
                code = 1
                break
            if not triton.running:
                print(f"Triton exited; log {triton.log_path}:\n{triton.log_tail()}", file=sys.stderr)
                code = 1
                break
            time.sleep(0.5)
    except (RuntimeError, TimeoutError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("interrupted during startup", file=sys.stderr)
        code = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean stop short
        if gateway is not None and gateway.poll() is None:
            print("stopping the gateway (draining in-flight requests) ...", flush=True)
            gateway.send_signal(signal.SIGTERM)
            try:
                gateway.wait(30)
            except subprocess.TimeoutExpired:
                gateway.kill()
                gateway.wait()
        print("stopping Triton ...", flush=True)
        triton.close()
        print("stopped.", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    d = RunConfig()
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default=d.host, help="gateway bind address")
    p.add_argument("--grpc-port", type=int, default=d.grpc_port)
    p.add_argument("--http-port", type=int, default=d.http_port)
    p.add_argument("--triton-http-port", type=int, default=d.triton_http_port)
    p.add_argument("--triton-grpc-port", type=int, default=d.triton_grpc_port)
    p.add_argument("--triton-metrics-port", type=int, default=d.triton_metrics_port)
    p.add_argument("--model-repository", type=Path, default=d.model_repository)
    p.add_argument("--no-export", dest="export", action="store_false", help="skip `python -m training.export`")
    p.add_argument("--startup-timeout", type=float, default=d.startup_timeout_s)
    a = p.parse_args(argv)
    return run(RunConfig(
        host=a.host, grpc_port=a.grpc_port, http_port=a.http_port, triton_http_port=a.triton_http_port,
        triton_grpc_port=a.triton_grpc_port, triton_metrics_port=a.triton_metrics_port,
        model_repository=a.model_repository, export=a.export, startup_timeout_s=a.startup_timeout,
    ))


if __name__ == "__main__":
    sys.exit(main())
