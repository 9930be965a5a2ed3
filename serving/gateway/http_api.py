"""The HTTP/JSON API: aiohttp routes transcoded onto the GenerationServicer coroutines, and their helpers."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from mnistgen import catalog

from .. import images as imgs
from .. import pb_json
from ..generated.mnistgen.v1 import generation_pb2 as pb
from ..metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ..pb_json import message_json  # noqa: F401 (serving.gateway re-exports it)
from ..validation import MAX_SEED, ApiError, ValidationError, clip, decode_png_image, decode_raw_images, echo
from . import request_id
from .json_body import JSON_THREAD_BYTES, parse_json_body
from .auth import HTTP_HEADER, OPEN_HTTP_PATHS, UNAUTHENTICATED_MESSAGE, WWW_AUTHENTICATE, TokenAuth
from .service import GenerationServicer, images_array, model_label

if TYPE_CHECKING:
    from .app import GatewayState

# gRPC status code name -> HTTP status of the JSON API
HTTP_STATUS = {
    "OK": 200, "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "UNAUTHENTICATED": 401, "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499, "INTERNAL": 500, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
}
TIMEOUT_HEADER = "X-Request-Timeout"  # HTTP: seconds the client will wait; becomes Triton's client_timeout
RETRY_AFTER_S = 1  # Retry-After on 429 / 503: Triton restarts take seconds, a busy slot frees in milliseconds
INT32 = (-(2**31), 2**31 - 1)
PNG_VIEWS = ("denoised", "noisy", "strip")  # Denoise with Accept: image/png: which picture comes back
WEB_DIR = Path(__file__).resolve().parents[1] / "web"  # the page at / (index.html) and its /static/ files


def json_message_response(msg) -> web.Response:
    """200 with protobuf's JSON mapping of msg (serving.pb_json: raw image bytes base64-encoded in one block)."""
    return web.Response(body=pb_json.dumps(msg), content_type="application/json", charset="utf-8")



def error_response(e: ApiError) -> web.Response:
    status = getattr(e, "http_status", None) or HTTP_STATUS.get(e.code, 500)
    body = {"error": {"code": e.code, "http_status": status, "field": e.field, "message": e.message}}
    # 503 (Triton down or restarting) and 429 (busy): when to try again; clients and proxies honour it
    headers = {"Retry-After": str(e.retry_after or RETRY_AFTER_S)} if status in (429, 503) else None
    return web.json_response(body, status=status, headers=headers)


def wants_png(request: web.Request) -> bool:
    return "image/png" in request.headers.get("Accept", "")


def http_timeout(request: web.Request) -> float | None:
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        t = float(raw)
    except ValueError:
        t = float("nan")
    if not 0 < t < float("inf"):
        raise ValidationError(TIMEOUT_HEADER, f"must be a number of seconds > 0, got {echo(raw)}")
    return t



def query_number(request: web.Request, name: str, kind, default=None, bounds: tuple[int, int] = INT32):
    """?name=value for the image/png Denoise form; a bad value names the field. Integers outside `bounds` (the
    proto field's range: int32 unless given) are refused here, where protobuf's setter would raise."""
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = kind(raw)
    except ValueError:  # (int() of over 4300 digits included)
        raise ValidationError(name, f"query parameter must be {'an integer' if kind is int else 'a number'}, "
                                    f"got {echo(raw)}") from None
    if kind is int and not bounds[0] <= value <= bounds[1]:
        raise ValidationError(name, f"query parameter must be an integer in {bounds[0]}..{bounds[1]}, got {echo(raw)}")
    return value


def query_text(request: web.Request, name: str) -> str:
    """?name=text; text protobuf cannot hold (a lone surrogate from percent-decoding) is refused, naming the field."""
    raw = request.query.get(name, "")
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(name, f"query parameter is not valid UTF-8 text, got {echo(raw)}") from None
    return raw


@web.middleware
async def request_id_middleware(request: web.Request, handler):
    """Every HTTP answer carries X-Request-Id: the client's when usable, else a new one (request_id.py)."""
    rid = request_id.choose(request.headers.get(request_id.HTTP_HEADER))
    request_id.current.set(rid)
    try:
        resp = await handler(request)
    except web.HTTPException as e:  # aiohttp's own answers (unknown path, wrong method)
        e.headers[request_id.HTTP_HEADER] = rid
        raise
    resp.headers[request_id.HTTP_HEADER] = rid
    return resp


def auth_middleware(auth: TokenAuth):
    """Every path but OPEN_HTTP_PATHS needs `Authorization: Bearer <token>` (when auth is on); else a 401 JSON
    error with `WWW-Authenticate: Bearer`, the same whatever was wrong. Unknown paths get 401 too."""

    @web.middleware
    async def check_token(request: web.Request, handler):
        if request.path in OPEN_HTTP_PATHS or auth.allows(request.headers.getall(HTTP_HEADER, []), "http"):
            return await handler(request)
        resp = error_response(ApiError(UNAUTHENTICATED_MESSAGE, code="UNAUTHENTICATED"))
        resp.headers["WWW-Authenticate"] = WWW_AUTHENTICATE
        return resp

    return check_token


class HttpApi:
    """aiohttp routes over the same servicer coroutines as gRPC (same validation, same code path)."""

    def __init__(self, servicer: GenerationServicer, state: GatewayState, auth: TokenAuth | None = None):
        self.s, self.state, self.auth = servicer, state, auth

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.s.config.max_request_bytes,
                              middlewares=[request_id_middleware]
                              + ([auth_middleware(self.auth)] if self.auth is not None else []))
        app.add_routes([
            web.post("/v1/generate", self.generate), web.post("/v1/denoise", self.denoise),
            web.get("/v1/models", self.models), web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz), web.get("/metrics", self.metrics),
            web.get("/openapi.json", self.openapi), web.get("/", self.page), web.static("/static", WEB_DIR),
        ])
        return app

    async def _read(self, request: web.Request) -> bytes:
        """The request body; over --max-request-bytes: RESOURCE_EXHAUSTED / HTTP 413 as a JSON error naming `body`."""
        limit = self.s.config.max_request_bytes
        try:
            if (request.content_length or 0) > limit:  # declared too large: refused before a byte of it is read
                raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            size = (f"of {request.content_length} bytes" if (request.content_length or 0) > limit
                    else "body (chunked or decompressed)")
            e = ApiError(f"body: request {size} is over the limit of {limit} bytes (--max-request-bytes)",
                         field="body", code="RESOURCE_EXHAUSTED")
            e.http_status = 413  # not 429: retrying the same body will not help
            self.s.metrics.refusals.labels("unknown", "too_large").inc()
            raise e from None
        except (web.RequestPayloadError, HttpProcessingError) as e:  # bad chunked framing, undecodable gzip/deflate/br
            raise ValidationError("body", f"cannot be read ({clip(' '.join(str(e).split()), 160)})") from None
        except ConnectionResetError:  # the client went away mid-body: nobody to answer (and no traceback in the log)
            raise ApiError("client closed the connection before sending the whole body", code="CANCELLED") from None

    async def _json(self, request: web.Request, message_type):
        body = await self._read(request)
        if len(body) > JSON_THREAD_BYTES:  # a hostile 8 MB body takes up to ~0.7 s to scan and refuse
            return await asyncio.to_thread(parse_json_body, body, message_type)
        return parse_json_body(body, message_type)

    async def generate(self, request: web.Request) -> web.Response:
        try:
            try:
                msg = await self._json(request, pb.GenerateRequest)
                label = model_label(msg.model)
                timeout = http_timeout(request)
            except ApiError as e:
                self.s.metrics.observe("Generate", "unknown", "http", e.code, 0.0, 0)
                raise
            if wants_png(request):
                msg.format = pb.PNG_GRID
            resp = await self.s.run("Generate", "http", label, timeout, self.s.generate, msg)
        except ApiError as e:
            return error_response(e)
        if wants_png(request):
            return web.Response(body=resp.images.grid_png, content_type="image/png", headers=png_headers(resp))
        return json_message_response(resp)

    async def denoise(self, request: web.Request) -> web.Response:
        try:
            try:
                if request.content_type == "image/png":
                    msg = pb.DenoiseRequest(png_images=[await self._read(request)],
                                            sigma=query_number(request, "sigma", float, 0.0),
                                            steps=query_number(request, "steps", int, 0),
                                            sampler=query_text(request, "sampler"),
                                            seed=query_number(request, "seed", int, bounds=(0, MAX_SEED)))  # None: unset
                else:
                    msg = await self._json(request, pb.DenoiseRequest)
                timeout = http_timeout(request)
                view = request.query.get("view", "denoised")
                if view not in PNG_VIEWS:
                    raise ValidationError("view", f"unknown view {echo(view)}: expected one of {list(PNG_VIEWS)}")
            except ApiError as e:
                self.s.metrics.observe("Denoise", catalog.DENOISER.name, "http", e.code, 0.0, 0)
                raise
            if wants_png(request):
                msg.format = pb.RAW_FLOAT32
            resp = await self.s.run("Denoise", "http", catalog.DENOISER.name, timeout, self.s.denoise, msg)
        except ApiError as e:
            return error_response(e)
        if wants_png(request):
            noisy, den = images_array(resp.noisy), images_array(resp.denoised)
            if view == "strip":
                clean = np.stack([decode_any(msg, i) for i in range(len(den))])  # (K, 1, 28, 28)
                png = imgs.encode_png(imgs.strip([clean, noisy, den]))
            else:
                png = imgs.grid_png(den if view == "denoised" else noisy)
            return web.Response(body=png, content_type="image/png", headers=png_headers(resp))
        return json_message_response(resp)

    async def models(self, request: web.Request) -> web.Response:
        try:
            resp = await self.s.run("ListModels", "http", "", http_timeout(request), self.s.list_models,
                                    pb.ListModelsRequest())
        except ApiError as e:
            return error_response(e)
        return json_message_response(resp)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        ready, detail = await self.state.check()
        body = {"ready": ready, "draining": self.state.draining, "triton_url": self.s.config.triton_url, **detail}
        headers = None if ready else {"Retry-After": str(RETRY_AFTER_S)}
        return web.json_response(body, status=200 if ready else 503, headers=headers)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.s.metrics.exposition(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def openapi(self, request: web.Request) -> web.Response:
        from .openapi import dumps  # (it imports this module)
        return web.Response(text=dumps(), content_type="application/json")

    async def page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(WEB_DIR / "index.html")



def decode_any(msg: pb.DenoiseRequest, i: int) -> np.ndarray:
    """Input image i of a (validated) DenoiseRequest -> (1, 28, 28) float32."""
    if msg.png_images:
        return decode_png_image(msg.png_images[i], i)
    return decode_raw_images(msg.raw_images)[i]


def png_headers(resp) -> dict[str, str]:
    return {"X-Mnistgen-Model": resp.model, "X-Mnistgen-Model-Version": resp.model_version,
            "X-Mnistgen-Seed": str(resp.seed), "X-Mnistgen-Server-Ms": f"{resp.timing.server_ms:.3f}"}
