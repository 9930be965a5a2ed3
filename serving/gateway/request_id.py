"""Request IDs: one per call, the client's `x-request-id` when it sent a usable one, else a new one; echoed back (HTTP
header, gRPC trailing metadata), sent on to Triton as the inference request's `id`, and named in the gateway's error
log lines, so a failure a client reports can be found in the server's logs."""
from __future__ import annotations

import contextvars
import re
import secrets

GRPC_KEY = "x-request-id"  # gRPC metadata key (lower case, as gRPC requires)
HTTP_HEADER = "X-Request-Id"
MAX_CHARS = 128
# what is taken from a client as is: enough for UUIDs, ULIDs and trace ids, nothing a log or header could misread
_USABLE = re.compile(r"[A-Za-z0-9._:/+=-]{1,%d}" % MAX_CHARS)

current: contextvars.ContextVar[str] = contextvars.ContextVar("mnistgen_request_id", default="")


def new_id() -> str:
    """A fresh random id: 16 hex digits."""
    return secrets.token_hex(8)


def choose(given: str | None) -> str:
    """The client's id when it is 1..MAX_CHARS of [A-Za-z0-9._:/+=-], else a new one (an unusable id is replaced,
    never refused: a request id must not be why a call fails)."""
    if given and _USABLE.fullmatch(given):
        return given
    return new_id()


def from_grpc_metadata(metadata) -> str:
    """choose() over the `x-request-id` entry of a call's invocation metadata ((key, value) pairs; None: none)."""
    for key, value in metadata or ():
        if key == GRPC_KEY:
            return choose(value if isinstance(value, str) else None)
    return new_id()
