"""Gateway configuration: the GatewayConfig dataclass, MNISTGEN_* environment defaults and the CLI."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from mnistgen.cli import add_dataclass_args, dataclass_from_args

from ..triton_access import is_loopback
from .backends import check_spec

# the --help description (what the gateway is)
DESCRIPTION = ("The gRPC + HTTP/JSON gateway: validates requests, samples GAN latents, calls Triton over gRPC, "
               "returns images and metrics.")
ENV_PREFIX = "MNISTGEN_"  # every GatewayConfig field can be set as MNISTGEN_<FIELD> (e.g. MNISTGEN_TRITON_URL)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass
class GatewayConfig:
    host: str = "0.0.0.0"  # interface both servers bind
    grpc_port: int = 50051  # mnistgen.v1.GenerationService + grpc.health.v1 + reflection
    http_port: int = 8080  # JSON API, /healthz, /readyz, /metrics
    # Triton's gRPC endpoints: comma-separated host:port entries; a name resolving to many addresses (a headless
    # Service) is one backend per address; @FILE reads entries from a file (serving/gateway/backends.py)
    triton_url: str = "127.0.0.1:8001"
    resolve_interval_s: float = 30.0  # re-resolve triton_url's names (and @FILE) this often, and after a failure
    triton_key: str = field(default="", repr=False)  # Triton's restricted-API key (docs/security.md); env only
    max_concurrency: int = 16  # requests running against Triton at once, per pool (Triton model; admission.py)
    # cost running at once per pool, in evaluations x samples (admission.py, docs/api.md#admission): a DDPM Generate
    # costs num_samples x steps, Denoise images x min(steps, t*+1), a GAN num_samples; 64 x 100 = 64 samples of
    # DDPM-100; a request costing more on its own is refused at once (RESOURCE_EXHAUSTED / HTTP 429)
    max_cost_in_flight: int = 64 * 100
    max_queue: int = 64  # requests waiting for a slot per class (pool, tenant; FIFO); beyond: RESOURCE_EXHAUSTED / 429
    request_timeout_s: float = 60.0  # deadline when the client sends none (gRPC deadline / X-Request-Timeout)
    max_request_bytes: int = 8 << 20  # gRPC receive limit and HTTP body limit (RESOURCE_EXHAUSTED / HTTP 413)
    max_response_bytes: int = 64 << 20  # gRPC send limit (1024 raw samples are 3.2 MB)
    readiness_timeout_s: float = 1.0  # per Triton health call in /readyz and the background probe
    probe_interval_s: float = 2.0  # background Triton probe (triton_up gauge, gRPC health status)
    stop_grace_s: float = 10.0  # SIGTERM: finish in-flight requests for up to this long, then stop
    log_level: str = "INFO"  # one of LOG_LEVELS
    # auth (serving/gateway/auth.py): off unless tokens are configured; both sources add up (rotation)
    api_tokens: str = field(default="", repr=False)  # comma-separated bearer tokens (prefer the env var; never shown)
    api_token_file: str = ""  # file of bearer tokens, one per line, # comments; re-read when it changes
    # without tokens the gateway serves only on loopback; beyond it, this opt-out (a private test cluster: k8s
    # overlays/auth-disabled) or it refuses to start: fail closed (docs/security.md)
    allow_unauthenticated: bool = False
    tls_cert: str = ""  # PEM certificate chain: TLS on both ports (with tls_key)
    tls_key: str = ""  # PEM private key of tls_cert
    # one JSON line per Generate/Denoise/ListModels call (request id, rpc, transport, model, status, ms, samples):
    # "" = none, "-" = standard error (beside the gateway's log), else a file path (appended to)
    access_log: str = ""

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            given, missing = ("tls_cert", "tls_key") if self.tls_cert else ("tls_key", "tls_cert")
            raise ValueError(f"{given} is set but {missing} is not: TLS needs both the certificate and its key "
                             f"(--tls-cert/--tls-key or MNISTGEN_TLS_CERT/MNISTGEN_TLS_KEY), or neither")
        self.log_level = self.log_level.upper()
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")
        for name in ("grpc_port", "http_port"):
            if not 0 <= int(getattr(self, name)) < 65536:
                raise ValueError(f"{name} must be in 0..65535 (0 = any free port), got {getattr(self, name)!r}")
        for name in ("max_concurrency", "max_cost_in_flight", "max_request_bytes", "max_response_bytes"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        check_spec(self.triton_url)
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue!r}")


def unauthenticated_refusal(config: GatewayConfig, has_tokens: bool) -> str | None:
    """Why the gateway must not start (no tokens, listening beyond loopback, no opt-out), or None."""
    if has_tokens or config.allow_unauthenticated or is_loopback(config.host):
        return None
    return (f"no API tokens, and the gateway would listen on {config.host!r} (beyond loopback): give tokens "
            "(MNISTGEN_API_TOKEN_FILE / MNISTGEN_API_TOKENS), bind 127.0.0.1, or opt out with --allow-unauthenticated "
            "(MNISTGEN_ALLOW_UNAUTHENTICATED=true) on a private network")


def env_defaults(environ=os.environ) -> GatewayConfig:
    """GatewayConfig defaults overridden by MNISTGEN_<FIELD> environment variables."""
    return dataclass_from_args(GatewayConfig, argparse.Namespace(), env_prefix=ENV_PREFIX, environ=environ)


def parse_args(argv: list[str] | None = None, environ=os.environ) -> GatewayConfig:
    """The options given, over MNISTGEN_<FIELD> environment variables, over the defaults; usage error otherwise."""
    p = argparse.ArgumentParser(description=DESCRIPTION, epilog=f"Every option can also be set as {ENV_PREFIX}<OPTION> "
                                                                "(e.g. MNISTGEN_TRITON_URL); an option given wins.")
    add_dataclass_args(p, GatewayConfig, help={"log_level": f"one of {LOG_LEVELS}"})
    return dataclass_from_args(GatewayConfig, p.parse_args(argv), parser=p, env_prefix=ENV_PREFIX, environ=environ)
