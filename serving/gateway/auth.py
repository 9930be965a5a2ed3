"""Optional bearer-token auth and TLS of the gateway: TokenAuth, the gRPC interceptor, TLS material.

The rules (open paths, rotation, token file reloads, constant-time comparison, one answer for every failure) are
docs/api.md's "Auth and TLS"; the HTTP side is http_api.auth_middleware."""
from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import re
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import grpc

from .request_id import GRPC_KEY, from_grpc_metadata

log = logging.getLogger("mnistgen.gateway.auth")

SCHEME = "Bearer"
HTTP_HEADER = "Authorization"
GRPC_METADATA_KEY = "authorization"
# Same text whatever went wrong (no token, not "Bearer ...", unknown token): never say which.
UNAUTHENTICATED_MESSAGE = "authentication required: send a valid token as 'authorization: Bearer <token>'"
WWW_AUTHENTICATE = 'Bearer realm="mnistgen"'
# the page and the contract are open too (the page's API calls still send the token the user types in)
OPEN_HTTP_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json", "/", "/static/app.js",
                             "/static/style.css"})
OPEN_GRPC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                      "/grpc.reflection.v1.ServerReflection/")
TOKEN_FILE_CHECK_S = 1.0  # the token file's stat is looked at no more often than this
# RFC 6750 b64token: what a token may contain (no spaces, commas or '#', which the config formats use)
TOKEN_RE = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# the caller's tenant id when auth is on (set by TokenAuth.allows for the request's task), "" otherwise: admission
# classes and their metrics labels use it, never the token
TENANT: contextvars.ContextVar[str] = contextvars.ContextVar("mnistgen_tenant", default="")


class ConfigError(ValueError):
    """Auth/TLS configuration that cannot work (bad token, unreadable or mismatched cert/key)."""


def parse_tokens(text: str, source: str, comments: bool = False) -> list[str]:
    """Tokens from a comma-separated list (MNISTGEN_API_TOKENS) or, with comments, a token file (one per line,
    `#` starts a comment, blank lines skipped). A bad token is named by position only, never echoed."""
    if comments:
        items = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    else:
        items = [t.strip() for t in text.split(",")]
    tokens = [t for t in items if t]
    for i, t in enumerate(tokens, 1):
        if not TOKEN_RE.fullmatch(t):
            raise ConfigError(f"{source}: token #{i} has characters outside A-Z a-z 0-9 - . _ ~ + / "
                              "(trailing =): not usable in an 'authorization: Bearer' header")
    return list(dict.fromkeys(tokens))  # dedupe, order kept


def _digest(token: str | bytes) -> bytes:
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


def tenant_id(digest: bytes) -> str:
    """A short stable id of a token (from its digest, one-way): "t" + 8 hex digits; the same across restarts."""
    return "t" + hashlib.sha256(b"mnistgen-tenant:" + digest).hexdigest()[:8]


class TokenAuth:
    """The set of valid tokens (static ones + a token file re-read on change) and the check of one header."""

    def __init__(self, tokens: Iterable[str] = (), token_file: str | Path | None = None, metrics=None,
                 clock: Callable[[], float] = time.monotonic):
        self.static = list(dict.fromkeys(tokens))
        self.token_file = Path(token_file) if token_file else None
        self.metrics, self.clock = metrics, clock
        self._file_tokens: list[str] = []
        self._file_sig = None
        self._digests: tuple[bytes, ...] = ()
        if self.token_file is not None:
            self._load_file(initial=True)
        self._next_check = clock() + TOKEN_FILE_CHECK_S
        self._rebuild()

    @classmethod
    def from_config(cls, config, metrics=None) -> "TokenAuth | None":
        """None when the config names no tokens and no token file (auth off: nothing is installed)."""
        tokens = parse_tokens(config.api_tokens, "MNISTGEN_API_TOKENS / --api-tokens")
        if not tokens and not config.api_token_file:
            return None
        return cls(tokens, config.api_token_file or None, metrics)

    # -- the token set --
    @property
    def enabled(self) -> bool:
        """Whether tokens are required (the token file re-read first when TOKEN_FILE_CHECK_S has passed)."""
        now = self.clock()
        if self.token_file is not None and now >= self._next_check:
            self._next_check = now + TOKEN_FILE_CHECK_S
            self._load_file(initial=False)
        return bool(self._digests)

    def describe(self) -> str:
        """For the startup line: counts and the file, never a token."""
        f = f" + {len(self._file_tokens)} from {self.token_file}" if self.token_file else ""
        state = "on" if self._digests else "OFF (no tokens yet)"
        return f"auth {state}: {len(self.static)} token(s) from config{f}"

    def _rebuild(self) -> None:
        self._digests = tuple(_digest(t) for t in dict.fromkeys(self.static + self._file_tokens))
        if self.metrics is not None:
            self.metrics.auth_enabled.set(1 if self._digests else 0)

    def _load_file(self, initial: bool) -> None:
        path = self.token_file
        try:
            st = path.stat()
            sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            sig = None
        if sig == self._file_sig and not initial:
            return
        self._file_sig = sig
        if sig is None:
            if initial:
                log.warning("token file %s does not exist: auth stays off until it appears%s", path,
                            " (config tokens still apply)" if self.static else "")
            elif self._file_tokens:
                log.warning("token file %s disappeared: keeping the %d token(s) read before", path,
                            len(self._file_tokens))
            return
        try:
            tokens = parse_tokens(path.read_text(), str(path), comments=True)
        except (OSError, UnicodeDecodeError, ConfigError) as e:
            if initial:
                raise ConfigError(f"token file {path}: {e}") from None
            log.warning("token file %s not reloaded (%s): keeping the %d token(s) read before", path, e,
                        len(self._file_tokens))
            return
        if not tokens and self._file_tokens:
            log.warning("token file %s holds no tokens now: keeping the %d token(s) read before", path,
                        len(self._file_tokens))
            return
        if not tokens and initial and not self.static:
            log.warning("token file %s holds no tokens: auth stays off until it does", path)
        if not initial and tokens != self._file_tokens:
            log.info("token file %s reloaded: %d token(s)", path, len(tokens))
        self._file_tokens = tokens
        self._rebuild()

    # -- the check --
    def failure(self, values: list[str]) -> str | None:
        """None when the authorization header/metadata values hold a valid bearer token, else why not
        ("missing", "malformed" or "invalid": for the metric and logs only, never for the caller)."""
        return self._check(values)[0]

    def _check(self, values: list[str]) -> tuple[str | None, bytes]:
        """(failure reason or None, the matching token's digest)."""
        if not values:
            return "missing", b""
        if len(values) > 1:
            return "malformed", b""
        scheme, _, token = values[0].strip().partition(" ")
        token = token.strip()
        if scheme.lower() != SCHEME.lower() or not token:
            return "malformed", b""
        candidate = _digest(token.encode("utf-8", "surrogateescape"))
        ok = False
        for d in self._digests:  # every token, no early exit
            ok |= hmac.compare_digest(candidate, d)
        return (None, candidate) if ok else ("invalid", b"")

    def allows(self, values: list[str], transport: str) -> bool:
        """True when auth is off or the values carry a valid token (TENANT set to its id); counts failures per
        transport and reason."""
        if not self.enabled:
            return True
        reason, digest = self._check(values)
        if reason is None:
            TENANT.set(tenant_id(digest))
            return True
        if self.metrics is not None:
            self.metrics.auth_failures.labels(transport, reason).inc()
        log.debug("unauthenticated %s request (%s)", transport, reason)
        return False


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """grpc.aio server interceptor: RPCs outside OPEN_GRPC_PREFIXES need a valid bearer token."""

    def __init__(self, auth: TokenAuth):
        self.auth = auth

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_GRPC_PREFIXES):
            return handler
        values = [v for k, v in (handler_call_details.invocation_metadata or ()) if k == GRPC_METADATA_KEY]
        values = [v.decode("latin-1") if isinstance(v, bytes) else v for v in values]
        if self.auth.allows(values, "grpc"):
            return handler
        return _deny(handler)


async def _abort(request_or_iterator, context: grpc.aio.ServicerContext):
    rid = from_grpc_metadata(context.invocation_metadata())  # a refused call gets its request id too
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE, ((GRPC_KEY, rid),))


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind (grpc.<unary|stream>_<unary|stream>_rpc_method_handler) that aborts
    UNAUTHENTICATED; no deserializer: the request is never parsed."""
    kind = f"{'stream' if handler.request_streaming else 'unary'}_{'stream' if handler.response_streaming else 'unary'}"
    return getattr(grpc, f"{kind}_rpc_method_handler")(_abort)


@dataclass(frozen=True)
class TlsMaterial:
    """A server certificate chain and its key (PEM), checked to belong together."""

    cert_path: Path
    key_path: Path
    cert_pem: bytes
    key_pem: bytes

    @classmethod
    def from_config(cls, config) -> "TlsMaterial | None":
        """From config.tls_cert/tls_key; None when neither is set (GatewayConfig checks both-or-neither)."""
        if not config.tls_cert and not config.tls_key:
            return None
        cert_path, key_path = Path(config.tls_cert), Path(config.tls_key)
        pems = []
        for what, p in (("tls_cert", cert_path), ("tls_key", key_path)):
            try:
                pems.append(p.read_bytes())
            except OSError as e:
                raise ConfigError(f"{what} {p}: cannot read ({e.strerror or e})") from None
        material = cls(cert_path, key_path, *pems)
        material.ssl_context()  # fails here (clearly) on a bad PEM or a key that is not the cert's
        return material

    def ssl_context(self) -> ssl.SSLContext:
        """Server context for the HTTP site: TLS 1.2+, the cert chain and key."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert_path, self.key_path)
        except ssl.SSLError as e:
            raise ConfigError(f"tls_cert {self.cert_path} / tls_key {self.key_path}: not a PEM certificate "
                              f"chain and its matching private key ({e.reason or e})") from None
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)])

