"""The HTTP/JSON API: aiohttp routes transcoded onto the GenerationServicer coroutines, and their helpers."""
from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

import numpy as np
from aiohttp import web
from google.protobuf import json_format

from .. import images as imgs
from ..generated.mnistgen.v1 import generation_pb2 as pb
from ..metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ..validation import (
    DENOISE_MODEL, ApiError, ValidationError, check_format, decode_png_image, decode_raw_images,
)
from .service import GenerationServicer, images_array, model_label

if TYPE_CHECKING:
    from .app import GatewayState

# gRPC status code name -> HTTP status of the JSON API
HTTP_STATUS = {
    "OK": 200, "INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499,
    "INTERNAL": 500, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504, "FAILED_PRECONDITION": 400,
}
TIMEOUT_HEADER = "X-Request-Timeout"  # HTTP: seconds the client will wait; becomes Triton's client_timeout


def parse_error(e: json_format.ParseError, message_name: str) -> ValidationError:
    """protobuf's JSON parse errors -> ValidationError naming the field."""
    text = str(e)
    m = (re.search(r"Failed to parse (\w+) field", text) or re.search(r'no field named "?(\w+)"?', text)
         or re.search(r" at \w+\.(\w+)", text))
    return ValidationError(m.group(1) if m else "body", f"{text} (see {message_name} in docs/api.md)")


def message_json(msg) -> dict:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def error_response(e: ApiError) -> web.Response:
    status = getattr(e, "http_status", None) or HTTP_STATUS.get(e.code, 500)
    body = {"error": {"code": e.code, "http_status": status, "field": e.field, "message": e.message}}
    return web.json_response(body, status=status)


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
        raise ValidationError(TIMEOUT_HEADER, f"must be a number of seconds > 0, got {raw!r}")
    return t


def query_number(request: web.Request, name: str, kind, default=None):
    """?name=value for the image/png Denoise form; a bad value names the field."""
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        return kind(raw)
    except ValueError:
        raise ValidationError(name, f"query parameter must be {'an integer' if kind is int else 'a number'}, "
                                    f"got {raw!r}") from None


class HttpApi:
    """aiohttp routes over the same servicer coroutines as gRPC (same validation, same code path)."""

    def __init__(self, servicer: GenerationServicer, state: GatewayState):
        self.s, self.state = servicer, state

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.s.config.max_request_bytes)
        app.add_routes([
            web.post("/v1/generate", self.generate), web.post("/v1/denoise", self.denoise),
            web.get("/v1/models", self.models), web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz), web.get("/metrics", self.metrics),
        ])
        return app

    async def _read(self, request: web.Request) -> bytes:
        """The request body; over --max-request-bytes: RESOURCE_EXHAUSTED / HTTP 413 as a JSON error naming `body`."""
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            e = ApiError(f"body: request of {request.content_length or 'more than'} bytes is over the limit of "
                         f"{self.s.config.max_request_bytes} bytes (--max-request-bytes)", field="body",
                         code="RESOURCE_EXHAUSTED")
            e.http_status = 413  # not 429: retrying the same body will not help
            raise e from None

    async def _json(self, request: web.Request, message_type):
        body = await self._read(request)
        if not body.strip():
            return message_type()
        try:
            obj = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValidationError("body", f"not valid JSON ({e}); send a {message_type.DESCRIPTOR.name} "
                                          "as JSON") from None
        if not isinstance(obj, dict):
            raise ValidationError("body", f"must be a JSON object ({message_type.DESCRIPTOR.name}), got "
                                          f"{type(obj).__name__}")
        if isinstance(obj.get("format"), str):
            obj["format"] = obj["format"].upper()
        elif isinstance(obj.get("format"), bool):
            check_format(obj["format"])  # raises; protobuf's JSON parser would read false/true as enum numbers 0/1
        try:
            return json_format.ParseDict(obj, message_type())
        except json_format.ParseError as e:
            raise parse_error(e, message_type.DESCRIPTOR.name) from None

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
        return web.json_response(message_json(resp))

    async def denoise(self, request: web.Request) -> web.Response:
        try:
            try:
                if request.content_type == "image/png":
                    msg = pb.DenoiseRequest(png_images=[await self._read(request)])
                    msg.sigma = query_number(request, "sigma", float, 0.0)
                    msg.steps = query_number(request, "steps", int, 0)
                    msg.sampler = request.query.get("sampler", "")
                    seed = query_number(request, "seed", int)
                    if seed is not None:
                        if not 0 <= seed < 2**63:
                            raise ValidationError("seed", f"must be in 0..{2**63 - 1}, got {seed}")
                        msg.seed = seed
                else:
                    msg = await self._json(request, pb.DenoiseRequest)
                timeout = http_timeout(request)
                view = request.query.get("view", "denoised")
                if view not in PNG_VIEWS:
                    raise ValidationError("view", f"unknown view {view!r}: expected one of {list(PNG_VIEWS)}")
            except ApiError as e:
                self.s.metrics.observe("Denoise", DENOISE_MODEL.name, "http", e.code, 0.0, 0)
                raise
            if wants_png(request):
                msg.format = pb.RAW_FLOAT32
            resp = await self.s.run("Denoise", "http", DENOISE_MODEL.name, timeout, self.s.denoise, msg)
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
        return web.json_response(message_json(resp))

    async def models(self, request: web.Request) -> web.Response:
        try:
            resp = await self.s.run("ListModels", "http", "", http_timeout(request), self.s.list_models,
                                    pb.ListModelsRequest())
        except ApiError as e:
            return error_response(e)
        return web.json_response(message_json(resp))

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        ready, detail = await self.state.check()
        body = {"ready": ready, "draining": self.state.draining, "triton_url": self.s.config.triton_url, **detail}
        return web.json_response(body, status=200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.s.metrics.exposition(), headers={"Content-Type": METRICS_CONTENT_TYPE})


PNG_VIEWS = ("denoised", "noisy", "strip")  # Denoise with Accept: image/png: which picture comes back


def decode_any(msg: pb.DenoiseRequest, i: int) -> np.ndarray:
    """Input image i of a (validated) DenoiseRequest -> (1, 28, 28) float32."""
    if msg.png_images:
        return decode_png_image(msg.png_images[i], i)
    return decode_raw_images(msg.raw_images)[i]


def png_headers(resp) -> dict[str, str]:
    return {"X-Mnistgen-Model": resp.model, "X-Mnistgen-Model-Version": resp.model_version,
            "X-Mnistgen-Seed": str(resp.seed), "X-Mnistgen-Server-Ms": f"{resp.timing.server_ms:.3f}"}
