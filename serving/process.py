"""Subprocess helpers of every launcher (Triton, the gateway, Prometheus): readiness waits, polite stops, log tails,
a foreground run, and ManagedProcess, the start/wait_ready/stop/close life cycle of the server classes."""
from __future__ import annotations

import http.client
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")
LogSource = Callable[[], str] | Path | str | None


class NotReady(Exception):
    """Raised by a readiness check to say why it is not ready yet (the last one is quoted on timeout)."""


class Interrupted(Exception):
    """A wait was abandoned because a stop was requested (a signal set the flag that `abort` reads)."""


# what a readiness check may raise while the thing it polls is still coming up
RETRY_ON: tuple[type[BaseException], ...] = (NotReady, OSError, ValueError, http.client.HTTPException)


def log_tail(path: Path | str | None, n_lines: int = 40) -> str:
    """The last n_lines of a text log ("(no log)" when there is none yet)."""
    if path is None or not Path(path).exists():
        return "(no log)"
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n_lines:])


def _describe_log(log: LogSource) -> str:
    return "" if log is None else f"; log:\n{log()}" if callable(log) else f"; log {log}:\n{log_tail(log)}"


def wait_until(check: Callable[[], T], timeout_s: float, what: str, *, proc: subprocess.Popen | None = None,
               log: LogSource = None, interval_s: float = 0.25, abort: Callable[[], bool] | None = None) -> T:
    """Call `check` (at least once) every `interval_s` until it returns something truthy, and return that; raising
    one of RETRY_ON means "not yet". RuntimeError when `proc` exits first, TimeoutError after `timeout_s`: both name
    `what`, the last answer and the log tail (`log`: a path, or a callable returning the tail). Interrupted once
    `abort()` is true (a signal handler set a flag)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        if abort is not None and abort():
            raise Interrupted(f"stopped while waiting for {what}")
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before becoming ready "
                               f"(last: {last}){_describe_log(log)}")
        try:
            result = check()
        except RETRY_ON as e:
            last = f"{type(e).__name__}: {e}" if not isinstance(e, NotReady) else str(e)
        else:
            if result:
                return result
            last = repr(result)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{what} not ready after {timeout_s:g} s (last: {last}){_describe_log(log)}")
        time.sleep(min(interval_s, remaining))


def http_ok(url: str, timeout_s: float = 2.0, context: ssl.SSLContext | None = None) -> bool:
    """GET `url` answers 200; NotReady with the status otherwise (connection errors propagate as OSError)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s, context=context) as r:
            if r.status == 200:
                return True
            raise NotReady(f"GET {url}: {r.status}")
    except urllib.error.HTTPError as e:
        raise NotReady(f"GET {url}: {e.code} {e.read()[:300]!r}") from None


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


class ManagedProcess:
    """One child server process: start(), wait_ready(), stop(), close(); also a context manager. A subclass launches
    its command with `_spawn` in start(), says what "ready" means in `_check_ready` (True, or raise NotReady /
    OSError) and names itself in `describe()`; timeouts come from its config; close() deletes `_tmp`, if any."""

    proc: subprocess.Popen | None = None
    log_path: Path | None = None  # the child's stdout + stderr (None: inherited from us)
    _log_fh = None
    _tmp = None  # tempfile.TemporaryDirectory | None

    startup_timeout_s = property(lambda self: self.config.startup_timeout_s)
    stop_grace_s = property(lambda self: self.config.stop_grace_s)
    running = property(lambda self: self.proc is not None and self.proc.poll() is None)

    def describe(self) -> str:
        return type(self).__name__

    def _check_ready(self) -> bool:
        raise NotImplementedError

    def _spawn(self, cmd: list[str], log_path: Path | None, **popen_kw) -> None:
        """Popen `cmd` with stdout + stderr appended to `log_path` (None: ours) and no stdin."""
        self.log_path = out = None if log_path is None else Path(log_path)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_fh = out = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None,
                                     stdin=subprocess.DEVNULL, **popen_kw)

    def log_tail(self, n_lines: int = 40) -> str:
        return log_tail(self.log_path, n_lines)

    def wait_ready(self, timeout: float | None = None, abort: Callable[[], bool] | None = None):
        """Block until ready (see wait_until)."""
        if self.proc is None:
            raise RuntimeError(f"{self.describe()} was not started: call start() first")
        wait_until(self._check_ready, self.startup_timeout_s if timeout is None else timeout, self.describe(),
                   proc=self.proc, log=self.log_path, abort=abort)
        return self

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after the grace period; returns the exit code (None if never started)."""
        if self.proc is None:
            return None
        terminate(self.proc, self.stop_grace_s)
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        return self.proc.returncode

    def close(self) -> None:
        """stop() and delete the temporary directory, if any."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self):
        try:
            return self.start().wait_ready()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # each one means: stop cleanly


def run_in_foreground(server, name: str, ready_message: Callable[[], str], alive: Callable[[], bool] | None = None,
                      exit_message: Callable[[], str] | None = None, poll_s: float = 0.5) -> int:
    """A launcher's main(): start `server` (start(), wait_ready(abort=), close(), proc), print `ready_message()`, run
    until SIGTERM/SIGINT/SIGHUP or until `alive()` (default: proc running; a supervisor repairs things there) is
    false; close() it exactly once. The handlers only record the signal, which waits read, so nothing is raised
    between a Popen and its bookkeeping and a second signal cannot cut the cleanup short. Exit status: 0 after a
    signal; 1 when it failed to start or stopped on its own; 128 + signal when stopped during startup."""
    alive = alive or (lambda: server.proc is not None and server.proc.poll() is None)
    caught: list[int] = []  # the signals received; the first one counts

    def on_signal(signum, _frame):
        caught.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    try:
        server.start()
        server.wait_ready(abort=lambda: bool(caught))
        print(ready_message(), flush=True)
        while not caught and alive():
            time.sleep(poll_s)
        if not caught:
            print("error: " + (exit_message() if exit_message else f"{name} exited with code {server.proc.returncode}"),
                  file=sys.stderr)
            return 1
        print(f"{name}: {signal.Signals(caught[0]).name} received, stopping", flush=True)
    except Interrupted:
        print(f"{name}: {signal.Signals(caught[0]).name} during startup, stopping", file=sys.stderr)
        return 128 + int(caught[0])
    except (RuntimeError, TimeoutError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        server.close()  # once: the handlers only record the signal, so nothing interrupts this
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
