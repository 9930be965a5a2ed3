"""Command-line and Python client of the gateway over gRPC or HTTP: generate grids, denoise digits, list models.

    python -m serving.client generate --model dcgan-baseline --n 64 --out grid.png
    python -m serving.client denoise --input digit.png --sigma 0.5 --out result.png   # clean | noisy | denoised
    python -m serving.client models --transport http --target 127.0.0.1:8080
    MNISTGEN_TOKEN=... python -m serving.client models --ca ca.crt   # a gateway with auth and TLS
"""
from __future__ import annotations

import argparse
import http.client
import json
import re
import select
import ssl
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import json_format

from mnistgen import catalog
from mnistgen.cli import add_dataclass_args, dataclass_from_args

from . import images as imgs
from . import pb_json
from .generated.mnistgen.v1 import generation_pb2 as pb
from .generated.mnistgen.v1 import generation_pb2_grpc as pb_grpc

TRANSPORTS = ("grpc", "http")
DEFAULT_TARGETS = {"grpc": "127.0.0.1:50051", "http": "127.0.0.1:8080"}
MAX_MESSAGE_BYTES = 64 << 20  # responses of 1024 raw samples are 3.2 MB
REQUEST_ID_HEADER, REQUEST_ID_KEY = "X-Request-Id", "x-request-id"  # what the gateway answers with (HTTP, gRPC)
TOKEN_ENV = "MNISTGEN_TOKEN"  # the CLI's --token when not given (as MNISTGEN_<OPTION> any option)


class ClientError(Exception):
    """A failed call: `code` is the gRPC status name (HTTP errors carry it in their JSON body); `request_id` the id the
    gateway answered with (None when none answered): the gateway's and Triton's logs name it; `retry_after` the
    seconds the gateway asked to wait before trying again (HTTP Retry-After, gRPC trailer retry-after), else None."""

    def __init__(self, code: str, message: str, http_status: int | None = None, request_id: str | None = None,
                 retry_after: str | None = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.http_status, self.request_id = code, message, http_status, request_id
        self.retry_after = float(retry_after) if retry_after and retry_after.isdigit() else None


@dataclass
class ClientConfig:
    transport: str = "grpc"  # one of TRANSPORTS
    target: str | None = None  # host:port; None = DEFAULT_TARGETS[transport]
    timeout_s: float = 60.0  # gRPC deadline / HTTP timeout (sent as X-Request-Timeout)
    token: str | None = field(default=None, repr=False)  # bearer token, sent as `authorization: Bearer <token>`
    ca: Path | None = None  # PEM CA certificate(s) to verify the gateway's TLS certificate; implies tls
    tls: bool = False  # TLS (https / a secure gRPC channel); without `ca`, the system's CAs verify

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        self.target = self.target or DEFAULT_TARGETS[self.transport]
        if self.token is not None and not re.fullmatch(r"[\x21-\x7e]+", self.token):
            raise ValueError("token must be printable ASCII without spaces")
        self.ca = Path(self.ca) if self.ca is not None else None
        self.tls = bool(self.tls or self.ca is not None)


class GatewayClient:
    """The same three calls over either transport; every call returns the response protobuf message."""

    def __init__(self, config: ClientConfig | None = None, **kw):
        c = self.config = config or ClientConfig(**kw)
        self._channel = self._stub = self._ssl = None  # gRPC; HTTP: the client SSL context
        self._metadata = (("authorization", f"Bearer {c.token}"),) if c.token else None
        self._local = threading.local()  # HTTP: each thread's kept-alive connection
        if c.transport == "grpc":
            self._channel = grpc_channel(c.target, c.tls, c.ca)
            self._stub = pb_grpc.GenerationServiceStub(self._channel)
        elif c.tls:
            self._ssl = ssl.create_default_context(cafile=str(c.ca) if c.ca else None)

    def close(self) -> None:
        """Closes the gRPC channel, or this thread's HTTP connection (a later call opens a new one)."""
        if self._channel is not None:
            self._channel.close()
        self._drop_http_connection()

    def __enter__(self) -> "GatewayClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transports --
    def _grpc(self, method: str, request):
        try:
            return getattr(self._stub, method)(request, timeout=self.config.timeout_s, metadata=self._metadata)
        except grpc.RpcError as e:
            trailer = dict(e.trailing_metadata() or ()) if hasattr(e, "trailing_metadata") else {}
            raise ClientError(e.code().name, e.details() or "", request_id=trailer.get(REQUEST_ID_KEY),
                              retry_after=trailer.get("retry-after")) from None

    def _http(self, method: str, path: str, request, response_type):
        """One HTTP/JSON call on this thread's kept-alive connection. One the gateway closed while idle is replaced
        before sending; one that closes without an answer as the call goes out is replaced and the call sent once
        more, as browsers do. The response is read with serving.pb_json (image bytes decoded in one block)."""
        url, data = f"{'https' if self.config.tls else 'http'}://{self.config.target}{path}", None
        headers = {"X-Request-Timeout": str(self.config.timeout_s), "Accept": "application/json"}
        if self.config.token:
            headers["Authorization"] = f"Bearer {self.config.token}"
        if request is not None:
            data = json.dumps(json_format.MessageToDict(request, preserving_proto_field_name=True)).encode()
            headers["Content-Type"] = "application/json"
        for attempt in (1, 2):
            conn, reused = self._http_connection()
            try:
                conn.request(method, path, body=data, headers=headers)
                r = conn.getresponse()
                status, body, rid = r.status, r.read(), r.getheader(REQUEST_ID_HEADER)
                retry_after = r.getheader("Retry-After")
                if r.will_close:
                    self._drop_http_connection()
                break
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, TLS failed, no status line
                self._drop_http_connection()
                closed = isinstance(e, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError))
                if closed and reused and attempt == 1:
                    continue  # closed without an answer as the call went out: once more on a new connection
                detail = repr(e) if closed or isinstance(e, http.client.HTTPException) else str(e)
                raise ClientError("UNAVAILABLE", f"{url}: {detail}") from None
        if status >= 400:
            try:
                err = json.loads(body)["error"]
                raise ClientError(err["code"], err["message"], status, rid, retry_after) from None
            except (ValueError, KeyError, TypeError):
                raise ClientError("UNKNOWN", f"HTTP {status}: {body[:200]!r}", status, rid) from None
        return pb_json.loads(body, response_type)

    def _http_connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """(this thread's connection to the gateway, whether it served a call before)."""
        conn = getattr(self._local, "http", None)
        if conn is not None and conn.sock is not None and not readable(conn.sock):
            return conn, True
        self._drop_http_connection()  # (idle and readable: the gateway closed it, or sent what nobody asked for)
        timeout = self.config.timeout_s + 5
        conn = (http.client.HTTPSConnection(self.config.target, timeout=timeout, context=self._ssl) if self.config.tls
                else http.client.HTTPConnection(self.config.target, timeout=timeout))
        self._local.http = conn
        return conn, False

    def _drop_http_connection(self) -> None:
        conn = getattr(self._local, "http", None)
        self._local.http = None
        if conn is not None:
            conn.close()

    # -- calls --
    def generate(self, model: str = "", num_samples: int = 1, seed: int | None = None, steps: int = 0,
                 sampler: str = "", format: int = pb.RAW_FLOAT32, digit: int | None = None,
                 guidance: float | None = None) -> pb.GenerateResponse:
        """digit (0..9) and guidance: class-conditional models only; None = absent (protobuf leaves it unset)."""
        req = pb.GenerateRequest(model=model, num_samples=num_samples, seed=seed, steps=steps, sampler=sampler,
                                 format=format, digit=digit, guidance=guidance)
        return self._call("Generate", "/v1/generate", req, pb.GenerateResponse)

    def denoise(self, images: np.ndarray | list[bytes], sigma: float, steps: int = 0, sampler: str = "",
                seed: int | None = None, format: int = pb.RAW_FLOAT32) -> pb.DenoiseResponse:
        """images: (K, 1, 28, 28) float32 in [-1, 1], or a list of PNG bytes."""
        req = pb.DenoiseRequest(sigma=sigma, steps=steps, sampler=sampler, seed=seed, format=format)
        if isinstance(images, np.ndarray):
            req.raw_images = np.ascontiguousarray(images, dtype="<f4").tobytes()
        else:
            req.png_images.extend(images)
        return self._call("Denoise", "/v1/denoise", req, pb.DenoiseResponse)

    def list_models(self) -> pb.ListModelsResponse:
        return self._call("ListModels", "/v1/models", pb.ListModelsRequest(), pb.ListModelsResponse, "GET")

    def _call(self, rpc: str, path: str, request, response_type, method: str = "POST"):
        if self._stub is not None:
            return self._grpc(rpc, request)
        return self._http(method, path, request if method == "POST" else None, response_type)


def grpc_channel(target: str, tls: bool = False, ca: Path | None = None) -> grpc.Channel:
    """A channel to the gateway taking MAX_MESSAGE_BYTES each way; TLS verified by `ca` (None: the system's CAs)."""
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    if not (tls or ca):
        return grpc.insecure_channel(target, options=options)
    creds = grpc.ssl_channel_credentials(root_certificates=Path(ca).read_bytes() if ca else None)
    return grpc.secure_channel(target, creds, options=options)


def readable(sock) -> bool:
    """Whether an idle kept-alive socket has something to read (the peer's close, or bytes nobody asked for): then
    it cannot carry the next call. poll(), not select(), which refuses descriptors over 1,023 (a load generator)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def as_array(msg: pb.Images) -> np.ndarray:
    """RAW_FLOAT32 or PNG pb.Images -> (N, 1, 28, 28) float32 in [-1, 1]."""
    if msg.format == pb.PNG:
        return imgs.from_uint8(np.stack([np.asarray(imgs.decode_png(b).convert("L")) for b in msg.png]))
    if msg.format == pb.PNG_GRID:
        raise ValueError("a PNG_GRID holds one tiled picture; ask for RAW_FLOAT32 or PNG to get samples")
    return np.frombuffer(msg.raw, dtype="<f4").reshape(-1, 1, imgs.SIDE, imgs.SIDE).copy()


# ---- CLI ------------------------------------------------------------------------------------------------
def _cmd_generate(c: GatewayClient, a) -> str:
    r = c.generate(a.model, a.n, a.seed, a.steps, a.sampler, pb.RAW_FLOAT32 if a.npy else pb.PNG_GRID, a.digit,
                   a.guidance)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    if a.npy:
        x = as_array(r.images)  # (N, 1, 28, 28)
        np.save(a.npy, x)
        a.out.write_bytes(imgs.grid_png(x))
    else:
        a.out.write_bytes(r.images.grid_png)
    extra = f", {r.sampler} {r.steps} steps" if r.sampler else ""
    if r.HasField("digit") or r.guidance:
        extra += f", digit {r.digit if r.HasField('digit') else 'any'}, guidance {r.guidance:g}"
    return (f"{r.images.count} samples from {r.model} v{r.model_version} (seed {r.seed}{extra}) -> {a.out}; "
            f"server {r.timing.server_ms:.2f} ms ({r.timing.per_sample_ms:.3f} ms/sample, "
            f"triton {r.timing.triton_ms:.2f} ms)")


def _cmd_denoise(c: GatewayClient, a) -> str:
    pngs = [Path(p).read_bytes() for p in a.input]
    r = c.denoise(pngs, a.sigma, a.steps, a.sampler, a.seed, pb.RAW_FLOAT32)
    from .validation import decode_png_image  # the server's own decoding, for the "clean" column

    clean = np.stack([decode_png_image(b, i) for i, b in enumerate(pngs)])  # (K, 1, 28, 28)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_bytes(imgs.encode_png(imgs.strip([clean, as_array(r.noisy), as_array(r.denoised)])))
    return (f"{len(pngs)} image(s) denoised by {r.model} v{r.model_version} (sigma {r.sigma:g}, {r.sampler} "
            f"{r.steps} steps, seed {r.seed}) -> {a.out} (clean | noisy | denoised); "
            f"server {r.timing.server_ms:.1f} ms")


def _cmd_models(c: GatewayClient, a) -> str:
    rows = [f"{'name':16} {'triton model':18} {'kind':9} {'ready':6} {'version':8} {'latent':7} max_n"]
    for m in c.list_models().models:
        rows.append(f"{m.name:16} {m.triton_model:18} {m.kind:9} {str(m.ready):6} {m.version or '-':8} "
                    f"{m.latent_dim or '-':<7} {m.max_num_samples}"
                    + (f"  samplers {list(m.samplers)} (default {m.default_sampler}), denoise {m.supports_denoise}"
                       if m.samplers else "")
                    + (f", digit 0-{catalog.DIGITS - 1} (guidance {m.default_guidance:g})" if m.accepts_digit else ""))
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    add_dataclass_args(common, ClientConfig, choices={"transport": TRANSPORTS}, names={"timeout_s": "--timeout"},
                       help={"target": f"host:port (default {DEFAULT_TARGETS})", "timeout_s": "seconds",
                             "token": f"bearer token for a gateway with auth (default: ${TOKEN_ENV}, which is "
                                      "safer: a command line is visible to other users)",
                             "ca": "PEM CA certificate that signed the gateway's TLS certificate (implies --tls)",
                             "tls": "connect with TLS; without --ca the system's CAs verify the gateway"})
    sampling = argparse.ArgumentParser(add_help=False)  # generate's and denoise's
    sampling.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    sampling.add_argument("--steps", type=int, default=0, help="diffusion models; 0 = the sampler's default")
    sampling.add_argument("--sampler", default="", help=f"diffusion models: {', '.join(catalog.SAMPLERS)}")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", parents=[common, sampling], help="sample a grid of digits")
    models = "; ".join(f"{m.name} (1..{m.max_samples}): {m.about}" for m in catalog.GENERATORS.values())
    g.add_argument("--model", default=catalog.DEFAULT_MODEL, help=f"one of: {models}")
    g.add_argument("--n", type=int, default=64, help="samples (the model's range above)")
    g.add_argument("--digit", type=int, default=None, help="class-conditional models only: the digit to draw, "
                                                           f"0..{catalog.DIGITS - 1} (default: any)")
    g.add_argument("--guidance", type=float, default=None, help="class-conditional models only: classifier-free "
                   f"guidance scale 0..{catalog.MAX_GUIDANCE:g} (default: the service's)")
    g.add_argument("--out", type=Path, default=Path("out/generate.png"))
    g.add_argument("--npy", type=Path, default=None, help="also save the raw (N, 1, 28, 28) float32 samples")
    d = sub.add_parser("denoise", parents=[common, sampling], help="noise 28x28 digits to level sigma and denoise them")
    d.add_argument("--input", type=Path, nargs="+", required=True, help="28x28 PNG(s)")
    d.add_argument("--sigma", type=float, default=0.5, help="0 < sigma <= 1")
    d.add_argument("--out", type=Path, default=Path("out/denoise.png"))
    sub.add_parser("models", parents=[common], help="list the served models and their readiness")
    return p


COMMANDS = {"generate": _cmd_generate, "denoise": _cmd_denoise, "models": _cmd_models}


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    config = dataclass_from_args(ClientConfig, a, parser=p, env_prefix="MNISTGEN_")  # MNISTGEN_TOKEN; bad: exit 2
    try:
        with GatewayClient(config) as c:
            print(COMMANDS[a.command](c, a))
    except (ClientError, OSError) as e:
        rid = getattr(e, "request_id", None)
        print(f"error: {e}" + (f" (request id {rid})" if rid else ""), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
