"""`make run`: export what is stale, start Triton and the gateway, supervise both, stop both on Ctrl-C / SIGTERM / SIGHUP.

The supervisor restarts Triton when it exits or stops answering its health endpoint (and the gateway when it
exits), with exponential backoff; meanwhile the gateway answers UNAVAILABLE / HTTP 503 with Retry-After and its
/readyz says why, and it serves again as soon as Triton is ready.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mnistgen.cli import add_dataclass_args, dataclass_from_args

from .process import NotReady, http_ok, run_in_foreground, terminate, wait_until
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
    unhealthy_after_s: float = 10.0  # Triton alive but failing /v2/health/ready this long: kill and restart it
    backoff_s: float = 1.0  # first restart delay; doubles per restart in a row, up to backoff_max_s
    backoff_max_s: float = 30.0
    stable_after_s: float = 60.0  # healthy this long: the next failure starts the backoff from backoff_s again


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
        "  supervised       Triton and the gateway restart on their own (backoff), Ctrl-C / SIGTERM / SIGHUP stop",
        "try:",
        f"  .venv/bin/python -m serving.client generate --model dcgan-baseline --n 64 --out out/grid.png "
        f"--target {shown}:{c.grpc_port}",
        f"  curl -s -X POST http://{shown}:{c.http_port}/v1/generate -H 'Accept: image/png' "
        "-d '{\"num_samples\": 64}' > out/grid.png",
        "  make demo",
        "",
    ])


class Backoff:
    """Restart delays: base, 2 base, 4 base ... up to max; back to base after `stable_s` without a failure."""

    def __init__(self, base_s: float, max_s: float, stable_s: float):
        self.base_s, self.max_s, self.stable_s = base_s, max_s, stable_s
        self.failures = 0
        self.last_failure = float("-inf")

    def next_delay(self, now: float) -> float:
        if now - self.last_failure > self.stable_s:
            self.failures = 0
        self.failures += 1
        self.last_failure = now
        return min(self.max_s, self.base_s * 2 ** (self.failures - 1))


class Stack:
    """Triton, then the gateway in front of it: what run_in_foreground starts, supervises and stops."""

    def __init__(self, c: RunConfig):
        self.c = c
        self.triton = TritonServer(TritonConfig(
            model_repository=c.model_repository, http_port=c.triton_http_port, grpc_port=c.triton_grpc_port,
            metrics_port=c.triton_metrics_port, startup_timeout_s=c.startup_timeout_s,
            log_file=c.log_dir / "tritonserver.log",
        ))
        self.proc: subprocess.Popen | None = None  # the gateway
        self.triton_backoff = Backoff(c.backoff_s, c.backoff_max_s, c.stable_after_s)
        self.gateway_backoff = Backoff(c.backoff_s, c.backoff_max_s, c.stable_after_s)
        self.triton_state = "ready"  # ready | down (restart at triton_due) | starting (since triton_due)
        self.triton_due = 0.0
        self.unhealthy_since: float | None = None
        self.gateway_due: float | None = None  # gateway exited: restart at this time
        self.restarts = {"triton": 0, "gateway": 0}

    def start(self) -> "Stack":
        print(f"starting Triton (log {self.c.log_dir / 'tritonserver.log'}) ...", flush=True)
        self.triton.start()
        return self

    def wait_ready(self, timeout: float | None = None, abort=None) -> "Stack":
        self.triton.wait_ready(abort=abort)
        print(f"Triton ready with {self.triton.models} (pid {self.triton.proc.pid}); starting the gateway ...",
              flush=True)
        self._start_gateway()
        wait_until(lambda: http_ok(f"http://{shown_host(self.c)}:{self.c.http_port}/readyz"), 60, "the gateway",
                   proc=self.proc, abort=abort)
        return self

    def _start_gateway(self) -> None:
        c = self.c
        self.proc = subprocess.Popen([
            sys.executable, "-m", "serving.gateway", "--host", c.host, "--grpc-port", str(c.grpc_port),
            "--http-port", str(c.http_port), "--triton-url", f"127.0.0.1:{c.triton_grpc_port}",
        ], cwd=REPO_ROOT, start_new_session=True)  # own group: Ctrl-C reaches it through us, in order

    # -- supervision: called every poll by run_in_foreground; never blocks for long ----------------------------
    def alive(self) -> bool:
        now = time.monotonic()
        self._supervise_triton(now)
        self._supervise_gateway(now)
        return True  # a supervisor keeps trying; only a signal stops the stack

    def _triton_healthy(self) -> bool:
        try:
            return http_ok(f"http://{self.triton.http_url}/v2/health/ready", timeout_s=1.0)
        except (NotReady, OSError):
            return False

    def _schedule_triton_restart(self, now: float, why: str) -> None:
        delay = self.triton_backoff.next_delay(now)
        self.restarts["triton"] += 1
        print(f"supervisor: {why}; restarting Triton in {delay:g} s (restart #{self.restarts['triton']})",
              flush=True)
        self.triton.stop()  # SIGTERM, then SIGKILL; a dead one is only reaped
        self.triton_state, self.triton_due, self.unhealthy_since = "down", now + delay, None

    def _supervise_triton(self, now: float) -> None:
        if self.triton_state == "down":
            if now >= self.triton_due:
                self.triton.start()
                self.triton_state, self.triton_due = "starting", now
            return
        if not self.triton.running:
            self._schedule_triton_restart(now, f"Triton exited with code {self.triton.proc.returncode}")
            return
        healthy = self._triton_healthy()
        if self.triton_state == "starting":
            if healthy:
                self.triton_state = "ready"
                print(f"supervisor: Triton ready again after {now - self.triton_due:.1f} s "
                      f"(pid {self.triton.proc.pid})", flush=True)
            elif now - self.triton_due > self.c.startup_timeout_s:
                self._schedule_triton_restart(now, f"Triton not ready {self.c.startup_timeout_s:g} s after start")
            return
        if healthy:
            self.unhealthy_since = None
        elif self.unhealthy_since is None:
            self.unhealthy_since = now
        elif now - self.unhealthy_since > self.c.unhealthy_after_s:
            self._schedule_triton_restart(now, f"Triton failing /v2/health/ready for {self.c.unhealthy_after_s:g} s")

    def _supervise_gateway(self, now: float) -> None:
        if self.gateway_due is not None:
            if now >= self.gateway_due:
                self._start_gateway()
                self.gateway_due = None
            return
        if self.proc is not None and self.proc.poll() is not None:
            delay = self.gateway_backoff.next_delay(now)
            self.restarts["gateway"] += 1
            print(f"supervisor: gateway exited with code {self.proc.returncode}; restarting it in {delay:g} s "
                  f"(restart #{self.restarts['gateway']})", flush=True)
            self.gateway_due = now + delay

    def exit_message(self) -> str:
        return f"stack stopped; Triton log {self.triton.log_path}:\n{self.triton.log_tail()}"

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
    add_dataclass_args(p, RunConfig, names={"startup_timeout_s": "--startup-timeout"},
                       help={"host": "gateway bind address", "export": "run `python -m training.export` first"})
    return run(dataclass_from_args(RunConfig, p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
