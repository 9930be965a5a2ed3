"""Subprocess helper shared by the launchers (Triton, Prometheus, test gateways): stop a child politely."""
from __future__ import annotations

import signal
import subprocess


def terminate(proc: subprocess.Popen, grace_s: float) -> int | None:
    """SIGTERM, then SIGKILL if it is still running after `grace_s`; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
