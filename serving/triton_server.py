"""Start, health-check and stop the real Triton Inference Server shipped in the nvidia-pytriton wheel."""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mnistgen.cli import add_dataclass_args, dataclass_from_args
from mnistgen.files import REPO_ROOT
from serving.process import ManagedProcess, NotReady, run_in_foreground
from serving.triton_access import ADMIN_APIS, APIS, KEY_ENV, KEY_HEADER, KeyHeader, is_loopback

DEFAULT_MODEL_REPOSITORY = REPO_ROOT / "model_repository"
LOG_LEVELS = (0, 1, 2, 3)  # --log-verbose values accepted by tritonserver (0 = info only)


@dataclass
class TritonConfig:
    model_repository: Path = DEFAULT_MODEL_REPOSITORY  # Triton layout: <name>/config.pbtxt, <name>/1/
    host: str = "127.0.0.1"  # address clients use to reach the server (the *_url properties)
    bind_address: str = "127.0.0.1"  # where all Triton ports listen; beyond loopback only with bind_reason
    bind_reason: str = ""  # why Triton listens beyond loopback (a container: a NetworkPolicy admits only the gateway)
    http: bool = False  # Triton's HTTP endpoint (--allow-http): the gateway, the tools and health checks use gRPC
    restricted: tuple[str, ...] = ADMIN_APIS  # APIs answering only requests carrying `key` (values: APIS)
    key: str = field(default="", repr=False)  # the key of the restricted APIs; "" = a fresh random one (per launch)
    http_port: int = 8000  # KServe v2 HTTP/REST
    grpc_port: int = 8001  # KServe v2 gRPC
    metrics_port: int = 8002  # Prometheus text format at /metrics
    models: tuple[str, ...] | None = None  # models to load; None = every model whose 1/model.onnx exists
    startup_timeout_s: float = 120.0  # wait_ready() default: loading python-backend models takes ~10 s each
    stop_grace_s: float = 15.0  # SIGTERM, then SIGKILL after this many seconds
    log_verbose: int = 0  # one of LOG_LEVELS
    log_file: Path | None = None  # server stdout+stderr; None = a file in the server's temporary dir
    log_to_stdout: bool = False  # foreground use (make run, containers): leave the log on our stdout

    def __post_init__(self) -> None:
        self.model_repository = Path(self.model_repository).resolve()
        if self.log_verbose not in LOG_LEVELS:
            raise ValueError(f"log_verbose must be one of {LOG_LEVELS}, got {self.log_verbose!r}")
        ports = (self.http_port, self.grpc_port, self.metrics_port)
        for name, port in zip(("http_port", "grpc_port", "metrics_port"), ports):
            if not 0 < int(port) < 65536:
                raise ValueError(f"{name} must be in 1..65535, got {port!r}")
        if len(set(ports)) != 3:
            raise ValueError(f"http_port, grpc_port and metrics_port must differ, got {ports}")
        self.models = None if self.models is None else tuple(self.models)
        self.restricted = tuple(self.restricted)
        bad = sorted(set(self.restricted) - set(APIS))
        if bad:
            raise ValueError(f"restricted: {bad} are not Triton APIs; allowed: {APIS}")
        if not (is_loopback(self.bind_address) or self.bind_reason.strip()):
            raise ValueError(f"bind_address {self.bind_address!r} exposes Triton beyond this machine: give bind_reason "
                             "(--bind-reason) saying why, e.g. a container that only the gateway can reach "
                             "(docs/security.md)")
        self.key = self.key or secrets.token_urlsafe(24)


@dataclass
class TritonInstall:
    """Where the pieces of the wheel's Triton live."""
    binary: Path  # tritonserver executable
    lib_dir: Path  # shared libraries it links against (LD_LIBRARY_PATH)
    backends_dir: Path  # backends/python/libtriton_python.so ...
    stub: Path  # triton_python_backend_stub built for this interpreter's Python version


def find_tritonserver() -> TritonInstall:
    """Locate tritonserver inside the installed nvidia-pytriton wheel, or fail with what to install."""
    try:
        import pytriton  # noqa: F401  (only its location is needed)
    except ImportError as e:
        raise RuntimeError("tritonserver not found: the nvidia-pytriton wheel is not installed in this environment "
                           f"({sys.executable}); install it with `pip install nvidia-pytriton==0.7.0 'numpy<2'`") from e
    pkg = Path(pytriton.__file__).resolve().parent
    root, ver = pkg / "tritonserver", f"{sys.version_info.major}.{sys.version_info.minor}"
    install = TritonInstall(binary=root / "bin" / "tritonserver", lib_dir=pkg.parent / "nvidia_pytriton.libs",
                            backends_dir=root / "backends",
                            stub=root / "python_backend_stubs" / ver / "triton_python_backend_stub")
    for what, path in vars(install).items():
        if not path.exists():
            hint = f" (no python backend stub for Python {ver})" if what == "stub" else ""
            raise RuntimeError(f"nvidia-pytriton is installed but its {what} is missing: {path}{hint}")
    return install


def available_models(model_repository: Path) -> list[str]:
    """Models that can load: a config.pbtxt and an exported 1/model.onnx (all models here run ONNX)."""
    repo = Path(model_repository)
    dirs = repo.iterdir() if repo.is_dir() else ()
    return sorted(d.name for d in dirs if (d / "config.pbtxt").is_file() and (d / "1" / "model.onnx").is_file())


def server_ready(grpc_url: str, timeout_s: float = 2.0) -> bool:
    """Triton's gRPC ServerReady at host:port (health needs no key): up, and every loaded model ready."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    try:
        with grpcclient.InferenceServerClient(grpc_url) as c:
            return bool(c.is_server_ready(client_timeout=timeout_s))
    except InferenceServerException:
        return False


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ephemeral ports free right now (all bound at once, read, released)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class TritonServer(ManagedProcess):
    """One tritonserver process: `start()`, `wait_ready()`, `stop()`; also a context manager. `grpc_url` and
    `http_url` are `host:port` (what tritonclient takes), `metrics_url` the full scrape address."""

    def __init__(self, config: TritonConfig | None = None):
        self.config = config or TritonConfig()
        self.install = find_tritonserver()
        self.models: list[str] = []

    grpc_url = property(lambda self: f"{self.config.host}:{self.config.grpc_port}")
    http_url = property(lambda self: f"{self.config.host}:{self.config.http_port}")
    metrics_url = property(lambda self: f"http://{self.config.host}:{self.config.metrics_port}/metrics")

    def _backends(self) -> Path:
        """A private copy of the wheel's backends with the python stub in place (site-packages untouched)."""
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="mnistgen-triton-")
        dst = Path(self._tmp.name) / "backends"
        if not dst.exists():
            shutil.copytree(self.install.backends_dir, dst, ignore=shutil.ignore_patterns("__pycache__"))
            shutil.copy2(self.install.stub, dst / "python" / "triton_python_backend_stub")
        return dst

    def command(self) -> list[str]:
        """tritonserver's argv (it holds the key: log describe(), never this)."""
        c = self.config
        kinds = ("http", "grpc", "metrics") if c.http else ("grpc", "metrics")
        restricted = ",".join(c.restricted) + f":{KEY_HEADER}={c.key}"
        return [str(self.install.binary), f"--model-repository={c.model_repository}",
                f"--backend-directory={self._backends()}", *(f"--{k}-port={getattr(c, k + '_port')}" for k in kinds),
                *(f"--{k}-address={c.bind_address}" for k in kinds), "--allow-metrics=true",
                f"--allow-http={str(c.http).lower()}",
                *([f"--grpc-restricted-protocol={restricted}"] + [f"--http-restricted-api={restricted}"] * c.http
                  if c.restricted else []),
                f"--log-verbose={c.log_verbose}",
                # explicit mode: load exactly the exported models, so a missing export is a clear "not loaded"
                # rather than a failed start; a model that fails to load still stops the server
                "--model-control-mode=explicit",
                "--disable-auto-complete-config",  # configs are complete; skips one extra stub process per model
                *(f"--load-model={m}" for m in self.models)]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        # the stub links libpython3.X.so.1.0: it must be this interpreter's (a shared build's LIBDIR), or extension
        # modules built for it (e.g. _ssl, imported by diffusers -> huggingface_hub) fail on missing symbols
        libpython = sysconfig.get_config_var("LIBDIR") if sysconfig.get_config_var("Py_ENABLE_SHARED") else None
        libdirs = [str(self.install.lib_dir), libpython, env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libdirs if p)
        # the python backend stub runs model.py in the first `python` on PATH: make it this venv's
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        # model.py files import serving.triton_backend: the repository root on the stub's path
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        return env

    def _select_models(self) -> list[str]:
        c = self.config
        if not c.model_repository.is_dir():
            raise FileNotFoundError(f"model repository not found: {c.model_repository}")
        present = available_models(c.model_repository)
        missing = sorted(set(c.models or ()) - set(present))
        if missing:
            raise FileNotFoundError(f"models {missing} have no config.pbtxt + 1/model.onnx in {c.model_repository}; "
                                    f"exported: {present}; run `python -m training.export`")
        if not (c.models or present):
            raise FileNotFoundError(f"no exported model in {c.model_repository} (need <name>/1/model.onnx): "
                                    "run `python -m training.export` first")
        return list(c.models or present)

    def start(self) -> "TritonServer":
        """Spawn tritonserver (returns at once; call wait_ready())."""
        if self.running:
            raise RuntimeError(f"Triton already running (pid {self.proc.pid})")
        self.models = self._select_models()
        backends = self._backends()
        log = None
        if not self.config.log_to_stdout:
            log = Path(self.config.log_file) if self.config.log_file else backends.parent / "tritonserver.log"
        self._spawn(self.command(), log, env=self.env(),
                    start_new_session=True)  # own process group: stubs die with it
        return self

    def describe(self) -> str:
        c = self.config
        http = f"http {c.http_port}" if c.http else "http off"
        return f"tritonserver ({http}, grpc {c.grpc_port}, metrics {c.metrics_port}, models {self.models})"

    def client(self, key: bool = True):
        """A tritonclient gRPC client of this server, sending the launch key (key=False: as a stranger would)."""
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.grpc_url)
        if key:
            client.register_plugin(KeyHeader(self.config.key))
        return client

    def healthy(self, timeout_s: float = 2.0) -> bool:
        return server_ready(self.grpc_url, timeout_s)

    def _check_ready(self) -> bool:
        if not self.healthy():
            raise NotReady(f"gRPC ServerReady at {self.grpc_url} is not true yet")
        return True

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after the grace period, and the stubs of its process group; the exit code."""
        code = super().stop()
        if self.proc is not None:
            try:  # python-backend stubs orphaned by a SIGKILL live in the group this object created
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        return code


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    add_dataclass_args(
        p, TritonConfig, exclude=("host", "stop_grace_s", "log_to_stdout", "key"),
        names={"startup_timeout_s": "--startup-timeout"}, choices={"log_verbose": LOG_LEVELS},
        help={"models": "models to load (none: every exported one)",
              "log_file": "server log (none: stream it to stdout)"})
    a = p.parse_args(argv)
    cfg = dataclass_from_args(TritonConfig, a, log_to_stdout=a.log_file is None, key=os.environ.get(KEY_ENV, ""))
    server = TritonServer(cfg)
    return run_in_foreground(server, "tritonserver", lambda: (
        f"Triton ready: models {server.models}; grpc {server.grpc_url}, "
        f"{'http ' + server.http_url if cfg.http else 'http off'}, metrics {server.metrics_url}; restricted APIs "
        f"{list(cfg.restricted)} need the key of {KEY_ENV}"))


if __name__ == "__main__":
    sys.exit(main())
