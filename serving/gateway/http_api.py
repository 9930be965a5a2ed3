"""The HTTP/JSON API: aiohttp routes transcoded onto the GenerationServicer coroutines, and their helpers."""
from __future__ import annotations

import asyncio
import codecs
import json
import logging
import re
from typing import TYPE_CHECKING

import numpy as np
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor as FD

from .. import images as imgs
from ..generated.mnistgen.v1 import generation_pb2 as pb
from ..metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ..validation import (
    DENOISE_MODEL, ECHO_CHARS, MAX_SEED, ApiError, ValidationError, check_format, clip, decode_png_image,
    decode_raw_images, echo,
)
from .auth import HTTP_HEADER, OPEN_HTTP_PATHS, UNAUTHENTICATED_MESSAGE, WWW_AUTHENTICATE, TokenAuth
from .service import GenerationServicer, images_array, model_label

if TYPE_CHECKING:
    from .app import GatewayState

# gRPC status code name -> HTTP status of the JSON API
HTTP_STATUS = {
    "OK": 200, "INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499,
    "INTERNAL": 500, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504, "FAILED_PRECONDITION": 400,
}
TIMEOUT_HEADER = "X-Request-Timeout"  # HTTP: seconds the client will wait; becomes Triton's client_timeout


log = logging.getLogger("mnistgen.gateway")

# ---- JSON bodies: bounded before parsing, typed before protobuf sees them -------------------------------------
MAX_JSON_DEPTH = 8  # nesting of arrays/objects in a body (a valid request has 2: {"png_images": [...]})
MAX_JSON_ITEMS = 4096  # values in a body, counted as commas + arrays + objects (a valid Denoise has < 80)
JSON_THREAD_BYTES = 256 << 10  # bodies over this are parsed off the event loop (64 raw images are ~270 KB)
# a JSON string, possessive (no backtracking); an unterminated one runs to the end (no retry from each later quote,
# which made a body of '"\\"\\"\\"...' quadratic): linear in the body whatever it holds
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.?)*+(?:"|\Z)', re.DOTALL)
_NOT_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))
_OPEN = np.frombuffer(b"[{", np.uint8)


def json_shape(body: bytes) -> tuple[int, int]:
    """(deepest nesting, commas + arrays + objects) of a JSON text, from a scan of its bytes before any parsing.

    json.loads and protobuf's ParseDict recurse once per level (100k `[` exhaust the interpreter's stack: a
    RecursionError, once an HTTP 500), and a body of 4 million `1,` is 0.2 s and 40 MB of Python objects; both
    are refused from this linear scan (a regex and numpy). String contents are skipped ("[" inside one counts
    for nothing); the body must already be valid UTF-8, so no multi-byte sequence contains an ASCII byte.
    """
    skeleton = _JSON_STRING.sub(b"0", body)
    brackets = np.frombuffer(skeleton.translate(None, _NOT_BRACKET), np.uint8)
    opens = np.isin(brackets, _OPEN)
    depth = int(np.cumsum(np.where(opens, np.int8(1), np.int8(-1)), dtype=np.int32).max(initial=0))
    return depth, skeleton.count(b",") + int(opens.sum())


class DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json.loads object_pairs_hook: a key given twice is refused (which one wins differs between parsers)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return obj


def json_kind(value) -> str:
    """The JSON type of a parsed value, for messages: "an array", "a string", ..."""
    if value is None:
        return "null"
    for types, name in ((bool, "a boolean"), ((int, float), "a number"), (str, "a string"), (list, "an array"),
                        (dict, "an object")):
        if isinstance(value, types):
            return name
    return type(value).__name__


FLOAT_MAX = np.finfo(np.float64).max
_NUMERIC = (FD.CPPTYPE_INT32, FD.CPPTYPE_INT64, FD.CPPTYPE_UINT32, FD.CPPTYPE_UINT64, FD.CPPTYPE_FLOAT,
            FD.CPPTYPE_DOUBLE, FD.CPPTYPE_ENUM)


def json_expects(f) -> str:
    """What protobuf's JSON mapping takes for a (non-repeated) field, in words."""
    if f.type == FD.TYPE_BYTES:
        return "base64 bytes in a JSON string"
    if f.cpp_type == FD.CPPTYPE_STRING:
        return "a JSON string"
    if f.cpp_type == FD.CPPTYPE_ENUM:
        return f"one of {[v.name for v in f.enum_type.values]} or its number"
    if f.cpp_type in (FD.CPPTYPE_FLOAT, FD.CPPTYPE_DOUBLE):
        return 'a JSON number (or "NaN", "Infinity" as strings)'
    if f.cpp_type == FD.CPPTYPE_BOOL:
        return "true or false"
    return "an integer (a JSON number or a string of digits)"


def json_accepts(f, value) -> bool:
    """Whether a value has a JSON type protobuf's mapping can read into this (non-repeated) field."""
    if f.cpp_type == FD.CPPTYPE_STRING:
        return isinstance(value, str)
    if f.cpp_type == FD.CPPTYPE_BOOL:
        return isinstance(value, bool)
    if f.cpp_type in _NUMERIC:
        return isinstance(value, (int, float, str)) and not isinstance(value, bool)
    return isinstance(value, dict)  # a message


def check_json_fields(obj: dict, descriptor) -> None:
    """Every key a field of the message (by proto or JSON name, once), every value of a JSON type that field takes.

    Refuses what protobuf's ParseDict would choke on or misread, with messages that echo at most ECHO_CHARS of
    the input: unknown keys (any length, any characters), a field given under both of its names, arrays/objects/
    booleans where scalars go, non-strings inside repeated fields. null means "unset", as in protobuf's mapping.
    """
    fields = {}
    for f in descriptor.fields:
        fields[f.name] = fields[f.json_name] = f
    given: dict[str, str] = {}
    for key, value in obj.items():
        f = fields.get(key)
        if f is None:
            raise ValidationError(clip(key, ECHO_CHARS), f"{descriptor.full_name} has no field named {echo(key)}; "
                                                         f"its fields: {[f.name for f in descriptor.fields]} "
                                                         f"(see {descriptor.name} in docs/api.md)")
        if f.name in given:
            raise ValidationError(f.name, f"given twice, as {echo(given[f.name])} and {echo(key)}")
        given[f.name] = key
        if value is None:
            continue
        if f.is_repeated:
            if not isinstance(value, list):
                raise ValidationError(f.name, f"must be a JSON array of {json_expects(f)}, got {json_kind(value)} "
                                              f"{echo(value)}")
            for i, v in enumerate(value):
                if not json_accepts(f, v):
                    raise ValidationError(f"{f.name}[{i}]", f"must be {json_expects(f)}, got {json_kind(v)} {echo(v)}")
        elif not json_accepts(f, value):
            raise ValidationError(f.name, f"must be {json_expects(f)}, got {json_kind(value)} {echo(value)}")
        elif f.cpp_type in (FD.CPPTYPE_FLOAT, FD.CPPTYPE_DOUBLE) and isinstance(value, int) and abs(value) > FLOAT_MAX:
            raise ValidationError(f.name, f"must be a finite number, got {echo(value)}")  # (float() would overflow)


def parse_error(e: json_format.ParseError, message_name: str, obj: dict | None = None,
                descriptor=None) -> ValidationError:
    """protobuf's JSON parse errors -> ValidationError naming the field. protobuf repeats the offending value in
    full (or Python's 200 characters of it); the message says what the field takes and echoes the value short."""
    text = str(e)
    m = (re.search(r"Failed to parse (\w+) field", text) or re.search(r'no field named "?(\w+)"?', text)
         or re.search(r" at \w+\.(\w+)", text))
    key = m.group(1) if m else None
    f = next((f for f in descriptor.fields if key in (f.name, f.json_name)), None) if descriptor and key else None
    if f is None or key not in (obj or {}):
        return ValidationError(f.name if f is not None else key or "body",
                               f"{clip(text)} (see {message_name} in docs/api.md)")
    reason = text.split(" field: ", 1)[-1].split(": ", 1)[0]  # "Couldn't parse integer", "Value out of range"...
    reason = re.sub(r" at \w+(\.\w+)*\.?$", "", reason).rstrip(".")
    value = obj[key]
    return ValidationError(f.name, f"must be {json_expects(f)}, got {json_kind(value)} {echo(value)} "
                                   f"({clip(reason, 80)}; see {message_name} in docs/api.md)")


def parse_json_body(body: bytes, message_type):
    """An HTTP body -> a request message; every way it can be wrong is a ValidationError (HTTP 400) naming `body`
    or the field, never an exception that would become a 500. Bounded before anything recurses: UTF-8 only
    (RFC 8259), nesting <= MAX_JSON_DEPTH, <= MAX_JSON_ITEMS values; then duplicate keys, unknown fields and wrong
    JSON types are refused before protobuf's ParseDict reads the rest."""
    name = message_type.DESCRIPTOR.name
    if body.startswith(codecs.BOM_UTF8):
        body = body[len(codecs.BOM_UTF8):]
    if not body.strip():
        return message_type()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValidationError("body", f"not UTF-8 (byte {e.start} is {echo(body[e.start:e.start + 1])}); send a "
                                      f"{name} as JSON in UTF-8") from None
    depth, items = json_shape(body)
    if depth > MAX_JSON_DEPTH:
        raise ValidationError("body", f"JSON nested {depth} levels deep, over the limit of {MAX_JSON_DEPTH} "
                                      f"(a {name} needs 2)")
    if items > MAX_JSON_ITEMS:
        raise ValidationError("body", f"JSON with {items} values, over the limit of {MAX_JSON_ITEMS} "
                                      f"(a {name} needs fewer than 100)")
    try:
        obj = json.loads(text, object_pairs_hook=unique_keys)
    except DuplicateKey as e:
        raise ValidationError("body", f"key {echo(e.key)} given twice in one JSON object") from None
    except (ValueError, RecursionError) as e:
        raise ValidationError("body", f"not valid JSON ({clip(e)}); send a {name} as JSON") from None
    if not isinstance(obj, dict):
        raise ValidationError("body", f"must be a JSON object ({name}), got {json_kind(obj)} {echo(obj)}")
    check_json_fields(obj, message_type.DESCRIPTOR)
    fmt = obj.get("format")
    if isinstance(fmt, float) and fmt.is_integer():
        obj["format"] = fmt = int(fmt)
    if isinstance(fmt, str):
        obj["format"] = fmt = fmt.upper() if fmt.isascii() else fmt
        if fmt not in pb.ImageFormat.keys():  # upb would read "PNG\u0000junk" as PNG (a C string)
            check_format(fmt)  # raises
    elif isinstance(fmt, (int, float)):
        check_format(fmt)  # raises unless 0..3: protobuf reads 1.5 as 1 and drops numbers beyond int32 silently
    try:
        return json_format.ParseDict(obj, message_type())
    except json_format.ParseError as e:
        raise parse_error(e, name, obj, message_type.DESCRIPTOR) from None
    except Exception as e:  # protobuf choking on something check_json_fields let through: still the body's fault
        log.warning("ParseDict(%s) raised %s: %s", name, type(e).__name__, clip(e))
        raise ValidationError("body", f"cannot be read as a {name} ({type(e).__name__}: {clip(e)})") from None


def message_json(msg) -> dict:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


RETRY_AFTER_S = 1  # Retry-After on 429 / 503: Triton restarts take seconds, a busy slot frees in milliseconds


def error_response(e: ApiError) -> web.Response:
    status = getattr(e, "http_status", None) or HTTP_STATUS.get(e.code, 500)
    body = {"error": {"code": e.code, "http_status": status, "field": e.field, "message": e.message}}
    # 503 (Triton down or restarting) and 429 (busy): when to try again; clients and proxies honour it
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
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


INT32 = (-(2**31), 2**31 - 1)


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


def auth_middleware(auth: TokenAuth):
    """Every path but OPEN_HTTP_PATHS needs `Authorization: Bearer <token>` (when auth is on); else a 401 JSON
    error with `WWW-Authenticate: Bearer`, the same whatever was wrong. Unknown paths get 401 too."""

    @web.middleware
    async def check_token(request: web.Request, handler):
        if request.path in OPEN_HTTP_PATHS or auth.allows(request.headers.getall(HTTP_HEADER, []), "http"):
            return await handler(request)
        e = ApiError(UNAUTHENTICATED_MESSAGE, code="UNAUTHENTICATED")
        e.http_status = 401
        resp = error_response(e)
        resp.headers["WWW-Authenticate"] = WWW_AUTHENTICATE
        return resp

    return check_token


class HttpApi:
    """aiohttp routes over the same servicer coroutines as gRPC (same validation, same code path)."""

    def __init__(self, servicer: GenerationServicer, state: GatewayState, auth: TokenAuth | None = None):
        self.s, self.state, self.auth = servicer, state, auth

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.s.config.max_request_bytes,
                              middlewares=[auth_middleware(self.auth)] if self.auth is not None else [])
        app.add_routes([
            web.post("/v1/generate", self.generate), web.post("/v1/denoise", self.denoise),
            web.get("/v1/models", self.models), web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz), web.get("/metrics", self.metrics),
        ])
        return app

    async def _read(self, request: web.Request) -> bytes:
        """The request body; over --max-request-bytes: RESOURCE_EXHAUSTED / HTTP 413 as a JSON error naming `body`."""
        limit = self.s.config.max_request_bytes
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            size = (f"of {request.content_length} bytes" if (request.content_length or 0) > limit
                    else "body (chunked or decompressed)")
            e = ApiError(f"body: request {size} is over the limit of {limit} bytes (--max-request-bytes)",
                         field="body", code="RESOURCE_EXHAUSTED")
            e.http_status = 413  # not 429: retrying the same body will not help
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
        return web.json_response(message_json(resp))

    async def denoise(self, request: web.Request) -> web.Response:
        try:
            try:
                if request.content_type == "image/png":
                    msg = pb.DenoiseRequest(png_images=[await self._read(request)])
                    msg.sigma = query_number(request, "sigma", float, 0.0)
                    msg.steps = query_number(request, "steps", int, 0)
                    msg.sampler = query_text(request, "sampler")
                    seed = query_number(request, "seed", int, bounds=(0, MAX_SEED))
                    if seed is not None:
                        msg.seed = seed
                else:
                    msg = await self._json(request, pb.DenoiseRequest)
                timeout = http_timeout(request)
                view = request.query.get("view", "denoised")
                if view not in PNG_VIEWS:
                    raise ValidationError("view", f"unknown view {echo(view)}: expected one of {list(PNG_VIEWS)}")
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
        headers = None if ready else {"Retry-After": str(RETRY_AFTER_S)}
        return web.json_response(body, status=200 if ready else 503, headers=headers)

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
