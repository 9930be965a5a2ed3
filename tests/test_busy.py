""".ci/busy (what `make test-busy` runs): CPU-bound loops beside a command, stopped when it ends or is stopped."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

BUSY = Path(__file__).resolve().parent.parent / ".ci" / "busy"


def loop_pids(line: str) -> list[int]:
    return [int(p) for p in re.search(r"\(pids ([\d ]+)\)", line).group(1).split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_command_s_exit_status_comes_back_and_the_loops_stop():
    r = subprocess.run([str(BUSY), "2", sys.executable, "-c", "import sys; sys.exit(3)"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 3, r.stderr
    pids = loop_pids(r.stderr)
    assert len(pids) == 2 and not any(alive(p) for p in pids), r.stderr


def test_a_stopped_run_stops_its_loops():
    proc = subprocess.Popen([str(BUSY), "1", "sleep", "60"], stderr=subprocess.PIPE, text=True)
    pids = loop_pids(proc.stderr.readline())  # printed once the loops run
    assert len(pids) == 1 and alive(pids[0])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM
    assert not alive(pids[0])


def test_usage_without_a_command():
    r = subprocess.run([str(BUSY)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "usage" in r.stderr
