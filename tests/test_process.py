"""serving.process: the readiness wait, the stop and the foreground run every launcher shares (small subprocesses)."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from serving.process import NotReady, log_tail, run_in_foreground, terminate, wait_until


def child(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code])


def test_wait_until_returns_the_first_truthy_result():
    calls = []

    def check():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionRefusedError("not listening")
        return "ready"

    assert wait_until(check, 5, "thing", interval_s=0.01) == "ready"
    assert len(calls) == 3


def test_wait_until_timeout_names_what_the_last_error_and_the_log(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))

    def check():
        raise NotReady("/readyz 503 {'triton': 'down'}")

    t0 = time.monotonic()
    with pytest.raises(TimeoutError) as e:
        wait_until(check, 0.3, "the gateway (http 1234)", log=log, interval_s=0.05)
    assert time.monotonic() - t0 >= 0.3  # it waited its whole timeout (a busy machine may make it longer, not shorter)
    msg = str(e.value)
    assert "the gateway (http 1234) not ready after 0.3 s" in msg and "/readyz 503" in msg
    assert str(log) in msg and "line 99" in msg and "line 50" not in msg  # the tail only


def test_wait_until_falsy_results_are_quoted_and_checked_at_least_once():
    with pytest.raises(TimeoutError, match=r"last: 0\)"):
        wait_until(lambda: 0, 0, "zero")


def test_wait_until_fails_fast_when_the_process_exits():
    proc = child("import sys; sys.exit(3)")
    # a RuntimeError naming the exit, not the TimeoutError the 30 s wait would end in
    with pytest.raises(RuntimeError, match="server exited with code 3 before becoming ready.*log:\ntail text"):
        wait_until(lambda: False, 30, "server", proc=proc, log=lambda: "tail text", interval_s=0.05)


def test_wait_until_does_not_swallow_bugs():
    with pytest.raises(ZeroDivisionError):
        wait_until(lambda: 1 / 0, 5, "buggy check")


def test_terminate_sigterm_then_sigkill():
    polite = child("import time; time.sleep(60)")
    assert terminate(polite, 10) == -signal.SIGTERM
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                 "signal.SIG_IGN); print('x', flush=True); time.sleep(60)"], stdout=subprocess.PIPE)
    assert stubborn.stdout.readline() == b"x\n"  # its marker: the handler is installed
    assert terminate(stubborn, 0.5) == -signal.SIGKILL
    assert terminate(stubborn, 0.5) == -signal.SIGKILL  # already gone: just the code


def test_log_tail(tmp_path):
    assert log_tail(None) == "(no log)" and log_tail(tmp_path / "missing") == "(no log)"
    (tmp_path / "l").write_text("a\nb\nc\n")
    assert log_tail(tmp_path / "l", 2) == "b\nc"


class SleepServer:
    """The shape run_in_foreground drives: start(), wait_ready(), proc, close()."""

    def __init__(self, code: str = "import time; time.sleep(60)"):
        self.code, self.proc, self.closed = code, None, 0

    def start(self):
        self.proc = child(self.code)
        return self

    def wait_ready(self, timeout=None, abort=None):
        return self

    def close(self):
        self.closed += 1
        terminate(self.proc, 5)


def raise_then(message: str, sig: int) -> str:
    """A ready message that sends `sig` to this process: the signal comes once the server is ready, never earlier."""
    signal.raise_signal(sig)
    return message


@pytest.fixture
def restore_signals():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def test_run_in_foreground_stops_cleanly_on_sigterm(restore_signals, capsys):
    server = SleepServer()
    assert run_in_foreground(server, "sleeper", lambda: raise_then("sleeper ready", signal.SIGTERM), poll_s=0.05) == 0
    assert server.closed and server.proc.poll() is not None
    assert "sleeper ready" in capsys.readouterr().out


def test_run_in_foreground_reports_a_server_that_dies(restore_signals, capsys):
    server = SleepServer("import time, sys; time.sleep(0.3); sys.exit(4)")
    assert run_in_foreground(server, "sleeper", lambda: "up", poll_s=0.05) == 1
    assert server.closed and "sleeper exited with code 4" in capsys.readouterr().err


def test_run_in_foreground_reports_a_failed_start(restore_signals, capsys):
    class Failing(SleepServer):
        def wait_ready(self, timeout=None, abort=None):
            raise TimeoutError("sleeper not ready after 1 s")

    server = Failing()
    assert run_in_foreground(server, "sleeper", lambda: "up") == 1
    assert server.closed and "error: sleeper not ready after 1 s" in capsys.readouterr().err


def test_sighup_stops_like_sigterm_and_a_second_signal_cannot_skip_the_cleanup(restore_signals, capsys):
    class SlowClose(SleepServer):
        def close(self):
            signal.raise_signal(signal.SIGTERM)  # a second signal while cleaning up: only sets the flag
            super().close()

    server = SlowClose()
    assert run_in_foreground(server, "sleeper", lambda: raise_then("up", signal.SIGHUP), poll_s=0.05) == 0
    assert server.closed == 1 and server.proc.poll() is not None  # cleaned up exactly once
    assert "SIGHUP received" in capsys.readouterr().out


def test_a_signal_during_startup_interrupts_the_readiness_wait(restore_signals, capsys):
    class NeverReady(SleepServer):
        def wait_ready(self, timeout=None, abort=None):
            signal.raise_signal(signal.SIGTERM)  # during startup (the server is started, not ready)
            wait_until(lambda: False, 30, "the sleeper", abort=abort, interval_s=0.02)

    server = NeverReady()
    # 128 + SIGTERM only comes from the interrupted wait (never becoming ready ends in 1 after 30 s)
    assert run_in_foreground(server, "sleeper", lambda: "up") == 128 + signal.SIGTERM
    assert server.closed == 1 and server.proc.poll() is not None
    assert "SIGTERM during startup" in capsys.readouterr().err
