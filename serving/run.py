"""`make run`: export what is stale, start Triton and the gateway, wait until ready, stop both on Ctrl-C / SIGTERM."""
from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mnistgen.cli import add_dataclass_args, dataclass_from_args

from .process import http_ok, run_in_foreground, terminate, wait_until
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


def banner(c: RunConfig, models: list[str]) -> str:
    shown = shown_host(c)
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


class Stack:
    """Triton, then the gateway in front of it: what run_in_foreground starts, watches and stops."""

    def __init__(self, c: RunConfig):
        self.c = c
        self.triton = TritonServer(TritonConfig(
            model_repository=c.model_repository, http_port=c.triton_http_port, grpc_port=c.triton_grpc_port,
            metrics_port=c.triton_metrics_port, startup_timeout_s=c.startup_timeout_s,
            log_file=c.log_dir / "tritonserver.log",
        ))
        self.proc: subprocess.Popen | None = None  # the gateway

    def start(self) -> "Stack":
        print(f"starting Triton (log {self.c.log_dir / 'tritonserver.log'}) ...", flush=True)
        self.triton.start()
        return self

    def wait_ready(self) -> "Stack":
        c = self.c
        self.triton.wait_ready()
        print(f"Triton ready with {self.triton.models}; starting the gateway ...", flush=True)
        self.proc = subprocess.Popen([
            sys.executable, "-m", "serving.gateway", "--host", c.host, "--grpc-port", str(c.grpc_port),
            "--http-port", str(c.http_port), "--triton-url", f"127.0.0.1:{c.triton_grpc_port}",
        ], cwd=REPO_ROOT, start_new_session=True)  # own group: Ctrl-C reaches it through us, in order
        wait_until(lambda: http_ok(f"http://{shown_host(c)}:{c.http_port}/readyz"), 60, "the gateway", proc=self.proc)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self.triton.running

    def exit_message(self) -> str:
        if self.proc is not None and self.proc.poll() is not None:
            return f"gateway exited with code {self.proc.returncode}"
        return f"Triton exited; log {self.triton.log_path}:\n{self.triton.log_tail()}"

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            print("stopping the gateway (draining in-flight requests) ...", flush=True)
            terminate(self.proc, 30)
        print("stopping Triton ...", flush=True)
        self.triton.close()
        print("stopped.", flush=True)


def shown_host(c: RunConfig) -> str:
    return "127.0.0.1" if c.host in ("0.0.0.0", "") else c.host


def run(c: RunConfig) -> int:
    if c.export:
        export_models()
    c.log_dir.mkdir(parents=True, exist_ok=True)
    stack = Stack(c)
    return run_in_foreground(stack, "mnistgen-serve", lambda: banner(c, stack.triton.models), alive=stack.alive,
                             exit_message=stack.exit_message)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    add_dataclass_args(p, RunConfig, exclude=("log_dir",), names={"startup_timeout_s": "--startup-timeout"},
                       help={"host": "gateway bind address", "export": "run `python -m training.export` first"})
    return run(dataclass_from_args(RunConfig, p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
