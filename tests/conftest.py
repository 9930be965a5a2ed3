"""Shared pytest fixtures: one real Triton server and one gateway in front of it per test session (serving.run's
launcher), on free ports of 127.0.0.1, and extra gateways with other options."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from serving.run import GatewayProcess, start_gateway
from serving.triton_server import TritonConfig, TritonServer, available_models, free_ports

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_REPOSITORY = REPO_ROOT / "model_repository"
# Checkpoints the fixture exports from and tests compare against (override only to develop with stand-ins).
CHECKPOINT_DIR = Path(os.environ.get("MNISTGEN_CHECKPOINT_DIR", REPO_ROOT / "checkpoints"))
TRITON_STARTUP_TIMEOUT_S = float(os.environ.get("MNISTGEN_TRITON_STARTUP_TIMEOUT", "300"))  # 2 shared cores: slow
# Strict mode (.ci/run sets it): a test that would skip, which here means a real component is missing (tritonserver,
# an export or checkpoint, Prometheus, kubectl/kustomize, openssl...), fails the run instead. `make test` alone stays
# lenient. A test that may legitimately skip everywhere carries @pytest.mark.allow_skip; xfail stays xfail. A skip for
# a property of the machine, not of the checkout (no bf16 kernels, a low open-file limit), goes through the
# `machine_skip` fixture, which strict mode accepts; any other skip still fails it.
STRICT_ENV = "MNISTGEN_STRICT"
MACHINE_SKIP = "machine-dependent: "


@pytest.fixture
def machine_skip():
    """machine_skip(reason): skip because of this machine (its CPU, its limits); declared, so strict mode accepts it."""
    def skip(reason: str):
        pytest.skip(MACHINE_SKIP + reason)
    return skip


def strict_mode() -> bool:
    return os.environ.get(STRICT_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _strict_failure(rep, what: str) -> None:
    reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) and len(rep.longrepr) == 3 else str(rep.longrepr)
    rep.outcome = "failed"
    rep.longrepr = (f"{what} skipped under {STRICT_ENV}=1, where every component must be present: {reason}\n"
                    f"(install or build what it needs; or run without {STRICT_ENV} to let it skip)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under strict mode a skip (in setup, e.g. the `triton` fixture, or in the test) becomes a failure."""
    outcome = yield
    rep = outcome.get_result()
    if (rep.skipped and not hasattr(rep, "wasxfail") and strict_mode()
            and item.get_closest_marker("allow_skip") is None and MACHINE_SKIP not in str(rep.longrepr)):
        _strict_failure(rep, "test")


_STRICT_SKIPPED_MODULES: list[str] = []


def pytest_collectreport(report):
    """Under strict mode a module skipped while collected (pytest.importorskip at import) fails the run too (at its
    end: a collection error would stop the whole session before any test ran)."""
    if report.skipped and strict_mode():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _STRICT_SKIPPED_MODULES.append(f"{report.nodeid}: {reason}")


def pytest_terminal_summary(terminalreporter):
    if _STRICT_SKIPPED_MODULES:
        terminalreporter.section(f"modules skipped under {STRICT_ENV}=1 (the run fails)", red=True)
        for line in _STRICT_SKIPPED_MODULES:
            terminalreporter.line(line)


def pytest_sessionfinish(session, exitstatus):
    if _STRICT_SKIPPED_MODULES and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


class TritonHandle:
    """What the `triton` fixture yields: addresses, the loaded models, and blocking stop()/start().

    `grpc_url` / `http_url` are `127.0.0.1:PORT` (what tritonclient takes), `metrics_url` is
    `http://127.0.0.1:PORT/metrics`. The ports stay the same across stop()/start().
    A test that calls stop() must call start() again (try/finally): the server is shared by the session.
    """

    def __init__(self, server: TritonServer):
        self.server = server
        self.served_sha: dict[str, str] = {}  # model -> sha256 of the checkpoint its ONNX came from, at start

    def record_exports(self) -> None:
        from training.export import META_SHA, onnx_metadata

        repo = self.server.config.model_repository
        self.served_sha = {m: onnx_metadata(repo / m / "1" / "model.onnx").get(META_SHA, "")
                           for m in self.server.models}

    grpc_url = property(lambda self: self.server.grpc_url)
    http_url = property(lambda self: self.server.http_url)
    metrics_url = property(lambda self: self.server.metrics_url)
    models = property(lambda self: list(self.server.models))  # loaded model names
    running = property(lambda self: self.server.running)

    def stop(self) -> None:
        self.server.stop()

    def start(self, timeout: float = TRITON_STARTUP_TIMEOUT_S) -> "TritonHandle":
        """(Re)start if stopped and block until ready; a no-op when already running."""
        if not self.server.running:
            self.server.start()
            self.record_exports()  # what this (re)start loads
        self.server.wait_ready(timeout)
        return self

    def require(self, *models: str) -> None:
        """Skip the calling test unless these models are loaded (their checkpoints may not exist yet)."""
        missing = [m for m in models if m not in self.server.models]
        if missing:
            pytest.skip(f"models {missing} not exported (checkpoint missing); loaded: {self.server.models}")

    def require_checkpoint(self, model: str, checkpoint: Path) -> None:
        """Skip unless `model` is loaded and was exported from this checkpoint's current bytes.

        (A checkpoint still being trained changes under a running session; comparing Triton's outputs with
        a newer checkpoint would fail for no fault of the serving path.)
        """
        from mnistgen.files import sha256

        self.require(model)
        if not checkpoint.exists():
            pytest.skip(f"{checkpoint} not found")
        if sha256(checkpoint) != self.served_sha.get(model):
            pytest.skip(f"{checkpoint} changed since Triton loaded {model} (still training?)")

    def log_tail(self, n_lines: int = 40) -> str:
        return self.server.log_tail(n_lines)


@pytest.fixture(scope="session")
def triton(tmp_path_factory) -> TritonHandle:
    """The real tritonserver on model_repository/, exporting first whatever committed checkpoint is new."""
    from training.export import ExportConfig, run

    # skips fresh exports; models without a checkpoint are left out
    run(ExportConfig(checkpoint_dir=CHECKPOINT_DIR, model_repository=MODEL_REPOSITORY))
    if not available_models(MODEL_REPOSITORY):
        pytest.skip("no exported model in model_repository/: no committed checkpoint yet")
    http_port, grpc_port, metrics_port = free_ports(3)
    cfg = TritonConfig(
        model_repository=MODEL_REPOSITORY, http=True,  # (tests call Triton over HTTP too; loopback, admin APIs keyed)
        http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
        startup_timeout_s=TRITON_STARTUP_TIMEOUT_S,
        log_file=tmp_path_factory.mktemp("triton") / "tritonserver.log",
    )
    handle = TritonHandle(TritonServer(cfg))
    handle.start()
    yield handle
    handle.server.close()


@pytest.fixture(scope="session")
def checkpoint_dir() -> Path:
    """Where the committed checkpoints are (what the `triton` fixture exported from)."""
    return CHECKPOINT_DIR


@pytest.fixture(scope="session")
def gateway(triton, tmp_path_factory) -> GatewayProcess:
    """One gateway for the session in front of the session's Triton, ready."""
    gw = start_gateway(triton.grpc_url, tmp_path_factory.mktemp("gateway") / "gateway.log")
    try:
        yield gw.wait_ready(60)
    finally:
        code = gw.stop(20)
        assert code == 0, f"gateway exited with {code} after SIGTERM:\n{gw.log_tail()}"


@pytest.fixture
def ready_gateway(gateway, triton) -> GatewayProcess:
    """The session gateway, with Triton running and ready again (after a test that stopped it)."""
    triton.start()
    return gateway.wait_ready(120)


@pytest.fixture
def make_gateway(triton, tmp_path):
    """Start extra gateways with other options (`make_gateway("--max-queue", "0")`, env=/ca= as start_gateway),
    ready; stopped after the test."""
    started: list[GatewayProcess] = []

    def make(*extra: str, env: dict | None = None, ca: Path | None = None) -> GatewayProcess:
        started.append(start_gateway(triton.grpc_url, tmp_path / f"gateway{len(started)}.log", *extra, env=env, ca=ca))
        return started[-1].wait_ready(60)

    yield make
    for gw in started:
        gw.stop(20)
