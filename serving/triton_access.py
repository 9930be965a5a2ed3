"""Who may call Triton (docs/security.md): its API groups, the launch key's headers and env var, loopback checks.
Standard library only: the gateway image and the launcher both import it."""
from __future__ import annotations

import ipaddress

# Triton's API groups (--grpc-restricted-protocol / --http-restricted-api of tritonserver 2.51)
APIS = ("health", "metadata", "inference", "shared-memory", "model-config", "model-repository", "statistics", "trace",
        "logging")
ADMIN_APIS = ("model-repository", "shared-memory", "logging", "trace", "statistics")  # nothing the gateway calls
ALL_BUT_HEALTH = tuple(a for a in APIS if a != "health")  # the launcher's Triton: only the gateway (with the key)
KEY_HEADER = "mnistgen-triton-key"  # HTTP header of the launch key; gRPC metadata is GRPC_KEY_HEADER
GRPC_KEY_HEADER = "triton-grpc-protocol-" + KEY_HEADER  # (tritonserver prefixes the key name on gRPC)
KEY_ENV = "MNISTGEN_TRITON_KEY"  # the key reaches processes by environment only, never by their argv or logs


def is_loopback(address: str) -> bool:
    """127.0.0.0/8, ::1 (also as ::ffff:127.x or Triton's ipv6:[::1]) or localhost."""
    address = address.removeprefix("ipv6:").strip("[]")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address == "localhost"
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


class KeyHeader:
    """A tritonclient plugin (client.register_plugin) adding the launch key to every call."""

    def __init__(self, key: str):
        self.headers = {GRPC_KEY_HEADER: key}

    def __call__(self, request) -> None:
        request.headers = (request.headers or {}) | self.headers
