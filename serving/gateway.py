"""The gRPC + HTTP/JSON gateway: validates requests, samples GAN latents, calls Triton over gRPC, returns images and metrics."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, fields

import grpc
import numpy as np
from aiohttp import web
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc import aio as triton_aio
from tritonclient.utils import InferenceServerException

from mnistgen.latent import sample_latent

from . import images as imgs
from .generated.mnistgen.v1 import generation_pb2 as pb
from .generated.mnistgen.v1 import generation_pb2_grpc as pb_grpc
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import GatewayMetrics
from .validation import (
    DENOISE_MODEL, MODELS, SAMPLERS, ApiError, DenoiseParams, GenerateParams, ValidationError, decode_png_image,
    decode_raw_images, validate_denoise, validate_generate,
)

log = logging.getLogger("mnistgen.gateway")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name  # "mnistgen.v1.GenerationService"
ENV_PREFIX = "MNISTGEN_"  # every GatewayConfig field can be set as MNISTGEN_<FIELD> (e.g. MNISTGEN_TRITON_URL)
# gRPC status code name -> HTTP status of the JSON API
HTTP_STATUS = {
    "OK": 200, "INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499,
    "INTERNAL": 500, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504, "FAILED_PRECONDITION": 400,
}
# Triton tensor names (the same in config.pbtxt, export and tests)
LATENT, IMAGE, SIGMA, STEPS, SAMPLER, SEED, NUM_SAMPLES, NOISY, DENOISED = (
    "latent", "image", "sigma", "steps", "sampler", "seed", "num_samples", "noisy", "denoised")
TIMEOUT_HEADER = "X-Request-Timeout"  # HTTP: seconds the client will wait; becomes Triton's client_timeout


@dataclass
class GatewayConfig:
    host: str = "0.0.0.0"  # interface both servers bind
    grpc_port: int = 50051  # mnistgen.v1.GenerationService + grpc.health.v1 + reflection
    http_port: int = 8080  # JSON API, /healthz, /readyz, /metrics
    triton_url: str = "127.0.0.1:8001"  # Triton's gRPC endpoint (host:port)
    max_concurrency: int = 16  # requests running against Triton at once
    max_queue: int = 64  # requests waiting for a slot; beyond that RESOURCE_EXHAUSTED / HTTP 429
    request_timeout_s: float = 60.0  # deadline when the client sends none (gRPC deadline / X-Request-Timeout)
    max_request_bytes: int = 8 << 20  # gRPC receive limit and HTTP body limit (RESOURCE_EXHAUSTED / HTTP 413)
    max_response_bytes: int = 64 << 20  # gRPC send limit (1024 raw samples are 3.2 MB)
    readiness_timeout_s: float = 1.0  # per Triton health call in /readyz and the background probe
    probe_interval_s: float = 2.0  # background Triton probe (triton_up gauge, gRPC health status)
    stop_grace_s: float = 10.0  # SIGTERM: finish in-flight requests for up to this long, then stop
    log_level: str = "INFO"  # one of LOG_LEVELS

    def __post_init__(self) -> None:
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")
        for name in ("grpc_port", "http_port"):
            if not 0 <= int(getattr(self, name)) < 65536:
                raise ValueError(f"{name} must be in 0..65535 (0 = any free port), got {getattr(self, name)!r}")
        for name in ("max_concurrency", "max_request_bytes", "max_response_bytes"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue!r}")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


# ---- pure helpers ---------------------------------------------------------------------------------------
def images_message(x: np.ndarray, fmt: str) -> pb.Images:
    """(N, 1, 28, 28) float32 in [-1, 1] -> pb.Images in the requested format."""
    x = np.ascontiguousarray(x, dtype="<f4").reshape(-1, 1, imgs.SIDE, imgs.SIDE)  # (N, 1, 28, 28)
    msg = pb.Images(format=pb.ImageFormat.Value(fmt), count=len(x), shape=list(x.shape))
    if fmt == "RAW_FLOAT32":
        msg.raw = x.tobytes()
    elif fmt == "PNG":
        msg.png.extend(imgs.encode_pngs(x))
    else:
        msg.grid_png = imgs.grid_png(x)
    return msg


def images_array(msg: pb.Images) -> np.ndarray:
    """pb.Images (any format but PNG_GRID) -> (N, 1, 28, 28) float32; the inverse of images_message."""
    if msg.format == pb.PNG:
        u8 = np.stack([np.asarray(imgs.decode_png(b).convert("L")) for b in msg.png])  # (N, 28, 28)
        return imgs.from_uint8(u8)
    if msg.format == pb.PNG_GRID:
        raise ValueError("a PNG_GRID response holds one tiled image, not separable samples")
    return np.frombuffer(msg.raw, dtype="<f4").reshape(-1, 1, imgs.SIDE, imgs.SIDE).copy()


def timing_message(start: float, triton_s: float, n: int) -> pb.Timing:
    ms = (time.perf_counter() - start) * 1e3
    return pb.Timing(server_ms=ms, per_sample_ms=ms / max(n, 1), triton_ms=triton_s * 1e3)


def triton_error(e: InferenceServerException, model: str) -> ApiError:
    """Map a tritonclient error (its status is "StatusCode.X") to the gateway's ApiError."""
    status = (e.status() or "").replace("StatusCode.", "")
    msg = e.message() or str(e)
    if status == "DEADLINE_EXCEEDED":
        return ApiError(f"deadline exceeded waiting for Triton model {model!r}", code="DEADLINE_EXCEEDED")
    if status == "UNAVAILABLE" or "not found" in msg or "is not ready" in msg:
        return ApiError(f"Triton unavailable for model {model!r}: {msg}", code="UNAVAILABLE")
    if status == "RESOURCE_EXHAUSTED":
        return ApiError(f"Triton busy for model {model!r}: {msg}", code="RESOURCE_EXHAUSTED")
    if status == "CANCELLED":
        return ApiError(f"cancelled while waiting for Triton model {model!r}", code="CANCELLED")
    return ApiError(f"Triton model {model!r} failed: {status} {msg}", code="INTERNAL")


def model_label(name: str) -> str:
    """Metrics label for a requested model: only known names (unbounded user input never becomes a label)."""
    name = name or "dcgan-baseline"
    return name if name in MODELS else "unknown"


def parse_error(e: json_format.ParseError, message_name: str) -> ValidationError:
    """protobuf's JSON parse errors -> ValidationError naming the field."""
    text = str(e)
    m = (re.search(r"Failed to parse (\w+) field", text) or re.search(r'no field named "?(\w+)"?', text)
         or re.search(r" at \w+\.(\w+)", text))
    return ValidationError(m.group(1) if m else "body", f"{text} (see {message_name} in docs/api.md)")


def deadline_remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise ApiError("deadline exceeded before the request reached Triton", code="DEADLINE_EXCEEDED")
    return left


# ---- Triton ---------------------------------------------------------------------------------------------
@dataclass
class TritonModelInfo:
    name: str
    max_batch_size: int  # 0 = the model is not batched
    latent_dim: int  # GANs: dims of the `latent` input; 0 otherwise
    version: str  # the newest version Triton serves


class TritonBackend:
    """One reused tritonclient aio channel, Triton's model configs cached, errors mapped to ApiError."""

    def __init__(self, url: str, max_message_bytes: int):
        self.url = url
        self.client = triton_aio.InferenceServerClient(url, channel_args=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # reconnect fast after a Triton restart (the default backoff grows to 2 minutes)
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1000),
            ("grpc.keepalive_time_ms", 2**31 - 1),
        ])
        self._info: dict[str, TritonModelInfo] = {}

    async def close(self) -> None:
        await self.client.close()

    def forget(self) -> None:
        """Drop cached model configs (Triton went away; a new one may serve other shapes)."""
        self._info.clear()

    async def model_info(self, model: str, timeout: float) -> TritonModelInfo:
        if model not in self._info:
            try:
                cfg = (await self.client.get_model_config(model, as_json=True, client_timeout=timeout))["config"]
                meta = await self.client.get_model_metadata(model, as_json=True, client_timeout=timeout)
            except InferenceServerException as e:
                raise triton_error(e, model) from None
            latent = [i for i in cfg.get("input", []) if i["name"] == LATENT]
            versions = sorted(meta.get("versions", []), key=lambda v: int(v) if v.isdigit() else -1)
            self._info[model] = TritonModelInfo(
                model, int(cfg.get("max_batch_size", 0)), int(latent[0]["dims"][-1]) if latent else 0,
                versions[-1] if versions else "")
        return self._info[model]

    async def infer(self, model: str, inputs: list[InferInput], outputs: list[str], timeout: float):
        try:
            return await self.client.infer(
                model, inputs, outputs=[InferRequestedOutput(o) for o in outputs], client_timeout=timeout)
        except InferenceServerException as e:
            raise triton_error(e, model) from None

    async def readiness(self, models: list[str], timeout: float) -> tuple[bool, dict[str, bool]]:
        """(server ready, {model: ready}); never raises."""
        try:
            server = bool(await self.client.is_server_ready(client_timeout=timeout))
        except (InferenceServerException, asyncio.TimeoutError, grpc.RpcError):
            return False, {m: False for m in models}

        async def one(m: str) -> bool:
            try:
                return bool(await self.client.is_model_ready(m, client_timeout=timeout))
            except (InferenceServerException, asyncio.TimeoutError, grpc.RpcError):
                return False

        ready = await asyncio.gather(*(one(m) for m in models))
        return server, dict(zip(models, ready))


def tensor(name: str, array: np.ndarray, dtype: str) -> InferInput:
    t = InferInput(name, list(array.shape), dtype)
    t.set_data_from_numpy(array)
    return t


# ---- admission control ----------------------------------------------------------------------------------
class Limiter:
    """At most `concurrency` requests at once and `queue` waiting; the next one is refused at once."""

    def __init__(self, concurrency: int, queue: int):
        self.concurrency, self.queue = concurrency, queue
        self._sem = asyncio.Semaphore(concurrency)
        self.waiting = 0

    @contextlib.asynccontextmanager
    async def slot(self):
        if self._sem.locked() and self.waiting >= self.queue:
            raise ApiError(f"server busy: {self.concurrency} requests running and {self.waiting} queued "
                           f"(max_queue {self.queue}); retry with backoff", code="RESOURCE_EXHAUSTED")
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._sem.release()


# ---- the service ----------------------------------------------------------------------------------------
class GenerationServicer(pb_grpc.GenerationServiceServicer):
    """mnistgen.v1.GenerationService; the HTTP routes call the same coroutines (`run`)."""

    def __init__(self, triton: TritonBackend, metrics: GatewayMetrics, limiter: Limiter, config: GatewayConfig):
        self.triton, self.metrics, self.limiter, self.config = triton, metrics, limiter, config
        self.in_flight = 0  # requests inside run() now (drain waits for 0)

    # -- transport-independent core --
    async def run(self, rpc: str, transport: str, label: str, timeout_s: float | None, fn, request):
        """Admission, deadline, metrics around one call of fn(request, deadline) -> (response, samples, triton_s)."""
        start = time.perf_counter()
        timeout_s = self.config.request_timeout_s if timeout_s is None else min(timeout_s,
                                                                                self.config.request_timeout_s)
        deadline = time.monotonic() + timeout_s
        code, samples, triton_s = "OK", 0, 0.0
        self.metrics.in_flight.inc()
        self.in_flight += 1
        try:
            # the deadline covers the wait for a slot too (an HTTP client's X-Request-Timeout included)
            async with asyncio.timeout(max(timeout_s, 0.0)):
                async with self.limiter.slot():
                    response, samples, triton_s = await fn(request, deadline, start)
            return response
        except ApiError as e:
            code = e.code
            raise
        except TimeoutError:
            code = "DEADLINE_EXCEEDED"
            raise ApiError(f"deadline of {timeout_s:.3g} s exceeded", code=code) from None
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as e:  # a bug or an unexpected Triton answer: log it, keep serving
            code = "INTERNAL"
            log.exception("%s failed", rpc)
            raise ApiError(f"internal error: {type(e).__name__}: {e}", code=code) from None
        finally:
            self.metrics.in_flight.dec()
            self.in_flight -= 1
            self.metrics.observe(rpc, label, transport, code, time.perf_counter() - start, samples, triton_s)

    async def generate(self, req: pb.GenerateRequest, deadline: float, start: float):
        p = validate_generate(req.model, req.num_samples, req.seed if req.HasField("seed") else None,
                              req.steps, req.sampler, req.format)
        t0 = time.perf_counter()
        if p.model.kind == "gan":
            x, version = await self._generate_gan(p, deadline)  # (N, 1, 28, 28)
        else:
            x, version = await self._generate_ddpm(p, deadline)
        triton_s = time.perf_counter() - t0
        self.metrics.diversity.add(p.model.name, x)
        out = await encode(x, p.format)
        resp = pb.GenerateResponse(model=p.model.name, model_version=version, seed=p.seed, images=out,
                                   steps=p.steps, sampler=p.sampler)
        resp.timing.CopyFrom(timing_message(start, triton_s, p.num_samples))
        return resp, p.num_samples, triton_s

    async def _generate_gan(self, p: GenerateParams, deadline: float) -> tuple[np.ndarray, str]:
        model = p.model.triton_model
        info = await self.triton.model_info(model, deadline_remaining(deadline))
        z = sample_latent(p.num_samples, info.latent_dim, p.seed)  # (N, latent_dim)
        step = info.max_batch_size or p.num_samples
        results = await asyncio.gather(*(
            self.triton.infer(model, [tensor(LATENT, z[i:i + step], "FP32")], [IMAGE], deadline_remaining(deadline))
            for i in range(0, p.num_samples, step)))
        x = np.concatenate([r.as_numpy(IMAGE) for r in results]).reshape(-1, 1, imgs.SIDE, imgs.SIDE)
        return x, results[0].get_response().model_version

    async def _generate_ddpm(self, p: GenerateParams, deadline: float) -> tuple[np.ndarray, str]:
        model = p.model.triton_model
        inputs = [
            tensor(NUM_SAMPLES, np.array([p.num_samples], np.int32), "INT32"),
            tensor(STEPS, np.array([p.steps], np.int32), "INT32"),
            tensor(SAMPLER, np.array([p.sampler.encode()], np.object_), "BYTES"),
            tensor(SEED, np.array([p.seed], np.int64), "INT64"),
        ]
        r = await self.triton.infer(model, inputs, [IMAGE], deadline_remaining(deadline))
        x = r.as_numpy(IMAGE).reshape(-1, 1, imgs.SIDE, imgs.SIDE)  # (N, 1, 28, 28)
        return x, r.get_response().model_version

    async def denoise(self, req: pb.DenoiseRequest, deadline: float, start: float):
        args = (list(req.png_images), req.raw_images, req.sigma, req.steps, req.sampler,
                req.seed if req.HasField("seed") else None, req.format)
        # decoding many PNGs is CPU work: keep it off the event loop
        p = await asyncio.to_thread(validate_denoise, *args) if len(req.png_images) > 8 else validate_denoise(*args)
        t0 = time.perf_counter()
        noisy, denoised, version = await self._denoise(p, deadline)
        triton_s = time.perf_counter() - t0
        k = len(p.images)
        resp = pb.DenoiseResponse(model=DENOISE_MODEL.name, model_version=version, seed=p.seed,
                                  noisy=await encode(noisy, p.format), denoised=await encode(denoised, p.format),
                                  sigma=p.sigma, steps=p.steps, sampler=p.sampler)
        resp.timing.CopyFrom(timing_message(start, triton_s, k))
        return resp, k, triton_s

    async def _denoise(self, p: DenoiseParams, deadline: float) -> tuple[np.ndarray, np.ndarray, str]:
        """Each image i gets its own noise seed (seed + i), so results do not depend on how Triton batches."""
        model = DENOISE_MODEL.triton_model
        info = await self.triton.model_info(model, deadline_remaining(deadline))
        k = len(p.images)
        seeds = (np.uint64(p.seed) + np.arange(k, dtype=np.uint64)) % np.uint64(2**63)
        col = lambda v, dt: np.full((k, 1), v, dtype=dt)  # noqa: E731  (K, 1) per-image scalars
        step = info.max_batch_size or k
        calls = []
        for i in range(0, k, step):
            j = min(i + step, k)
            inputs = [
                tensor(IMAGE, np.ascontiguousarray(p.images[i:j], np.float32), "FP32"),  # (b, 1, 28, 28)
                tensor(SIGMA, col(p.sigma, np.float32)[i:j], "FP32"),
                tensor(STEPS, col(p.steps, np.int32)[i:j], "INT32"),
                tensor(SAMPLER, col(p.sampler.encode(), np.object_)[i:j], "BYTES"),
                tensor(SEED, seeds[i:j].astype(np.int64).reshape(-1, 1), "INT64"),
            ]
            calls.append(self.triton.infer(model, inputs, [NOISY, DENOISED], deadline_remaining(deadline)))
        results = await asyncio.gather(*calls)
        shape = (-1, 1, imgs.SIDE, imgs.SIDE)
        noisy = np.concatenate([r.as_numpy(NOISY) for r in results]).reshape(shape)  # (K, 1, 28, 28)
        denoised = np.concatenate([r.as_numpy(DENOISED) for r in results]).reshape(shape)  # (K, 1, 28, 28)
        return noisy, denoised, results[0].get_response().model_version

    async def list_models(self, req: pb.ListModelsRequest, deadline: float, start: float):
        timeout = min(self.config.readiness_timeout_s, deadline_remaining(deadline))
        specs = list(MODELS.values()) + [DENOISE_MODEL]
        _, ready = await self.triton.readiness([s.triton_model for s in specs], timeout)
        resp = pb.ListModelsResponse()
        for spec in MODELS.values():
            info = pb.ModelInfo(name=spec.name, triton_model=spec.triton_model, kind=spec.kind,
                                ready=ready[spec.triton_model], max_num_samples=spec.max_num_samples)
            if info.ready:
                with contextlib.suppress(ApiError):
                    t = await self.triton.model_info(spec.triton_model, timeout)
                    info.version, info.latent_dim = t.version, t.latent_dim
            if spec.kind == "ddpm":
                info.samplers.extend(SAMPLERS)
                info.supports_denoise = ready[DENOISE_MODEL.triton_model]
            resp.models.append(info)
        return resp, 0, 0.0

    # -- gRPC --
    async def _grpc(self, rpc, label, fn, request, context: grpc.aio.ServicerContext):
        remaining = context.time_remaining()
        try:
            return await self.run(rpc, "grpc", label, remaining, fn, request)
        except ApiError as e:
            await context.abort(getattr(grpc.StatusCode, e.code), e.message)

    async def Generate(self, request, context):
        return await self._grpc("Generate", model_label(request.model), self.generate, request, context)

    async def Denoise(self, request, context):
        return await self._grpc("Denoise", DENOISE_MODEL.name, self.denoise, request, context)

    async def ListModels(self, request, context):
        return await self._grpc("ListModels", "", self.list_models, request, context)


async def encode(x: np.ndarray, fmt: str) -> pb.Images:
    """images_message, off the event loop when there are many PNGs to compress."""
    if fmt != "RAW_FLOAT32" and len(x) > 16:
        return await asyncio.to_thread(images_message, x, fmt)
    return images_message(x, fmt)


# ---- HTTP -----------------------------------------------------------------------------------------------
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

    def __init__(self, servicer: GenerationServicer, state: "GatewayState"):
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


# ---- readiness, health, lifecycle -----------------------------------------------------------------------
class GatewayState:
    """Triton readiness as seen by /readyz, gRPC health and the triton_up gauge; draining on shutdown."""

    def __init__(self, triton: TritonBackend, metrics: GatewayMetrics, health_servicer, config: GatewayConfig):
        self.triton, self.metrics, self.health, self.config = triton, metrics, health_servicer, config
        self.draining = False
        self.ready = False
        self.models = [s.triton_model for s in MODELS.values()] + [DENOISE_MODEL.triton_model]

    async def check(self) -> tuple[bool, dict]:
        server, models = await self.triton.readiness(self.models, self.config.readiness_timeout_s)
        # Triton reports ready only when every model it loaded is READY; we also need one of ours among them
        # (a model that was never exported is listed as not ready and its calls answer UNAVAILABLE)
        up = server and any(models.values())
        ready = up and not self.draining
        if not server:
            self.triton.forget()
        self.metrics.triton_up.set(1 if up else 0)
        if ready != self.ready:
            log.info("readiness %s -> %s (triton server ready %s, models %s)", self.ready, ready, server, models)
        self.ready = ready
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)
        return ready, {"triton_ready": server, "models": models}

    async def probe_forever(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.check()
            await asyncio.sleep(self.config.probe_interval_s)


@dataclass
class RunningGateway:
    grpc_server: grpc.aio.Server
    http_runner: web.AppRunner
    state: GatewayState
    triton: TritonBackend
    metrics: GatewayMetrics
    servicer: GenerationServicer
    grpc_port: int
    http_port: int
    probe: asyncio.Task

    async def stop(self, grace: float) -> None:
        """Drain: report not-ready, stop accepting, let in-flight requests finish for up to `grace` s."""
        self.state.draining = True
        for service in ("", SERVICE_NAME):
            await self.state.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.probe.cancel()
        deadline = time.monotonic() + grace
        http_stop = asyncio.ensure_future(self._stop_http(deadline))
        await self.grpc_server.stop(grace)
        await http_stop
        await self.triton.close()

    async def _stop_http(self, deadline: float) -> None:
        for site in list(self.http_runner.sites):
            await site.stop()  # no new connections
        while self.servicer.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # aiohttp's shutdown then waits for running handlers up to its shutdown_timeout, twice (finish, then
        # cancel); its default of 60 s would let one slow HTTP request outlive the grace period by minutes
        self.http_runner._shutdown_timeout = max(deadline - time.monotonic(), 0.25)
        await self.http_runner.cleanup()


async def start(config: GatewayConfig) -> RunningGateway:
    """Start both servers on the running loop (ports 0 = pick free ones) and return handles to them."""
    metrics = GatewayMetrics()
    triton = TritonBackend(config.triton_url, config.max_response_bytes)
    servicer = GenerationServicer(triton, metrics, Limiter(config.max_concurrency, config.max_queue), config)
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", config.max_request_bytes),
        ("grpc.max_send_message_length", config.max_response_bytes),
        ("grpc.so_reuseport", 0),
    ])
    pb_grpc.add_GenerationServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    grpc_port = server.add_insecure_port(f"{config.host}:{config.grpc_port}")
    if grpc_port == 0:
        raise OSError(f"cannot bind gRPC port {config.host}:{config.grpc_port}")
    await server.start()
    state = GatewayState(triton, metrics, health_servicer, config)
    runner = web.AppRunner(HttpApi(servicer, state).app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.http_port, reuse_port=False)
    await site.start()
    http_port = runner.addresses[0][1]
    await state.check()
    probe = asyncio.create_task(state.probe_forever())
    return RunningGateway(server, runner, state, triton, metrics, servicer, grpc_port, http_port, probe)


async def serve(config: GatewayConfig) -> None:
    """Run until SIGTERM/SIGINT, then drain with config.stop_grace_s."""
    gw = await start(config)
    print(f"gateway listening: grpc {config.host}:{gw.grpc_port}, http http://{config.host}:{gw.http_port} "
          f"(triton {config.triton_url}, ready {gw.state.ready})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received: draining for up to %.1f s", config.stop_grace_s)
    await gw.stop(config.stop_grace_s)
    log.info("gateway stopped")


# ---- CLI ------------------------------------------------------------------------------------------------
def env_defaults(environ=os.environ) -> GatewayConfig:
    """GatewayConfig defaults overridden by MNISTGEN_<FIELD> environment variables."""
    cfg = GatewayConfig()
    for f in fields(GatewayConfig):
        raw = environ.get(ENV_PREFIX + f.name.upper())
        if raw is not None:
            kind = type(getattr(cfg, f.name))
            try:
                setattr(cfg, f.name, kind(raw))
            except ValueError:
                raise SystemExit(f"{ENV_PREFIX}{f.name.upper()} must be a {kind.__name__}, got {raw!r}") from None
    return cfg


def parse_args(argv: list[str] | None = None, environ=os.environ) -> GatewayConfig:
    d = env_defaults(environ)
    p = argparse.ArgumentParser(description=__doc__,
                                epilog=f"Every option can also be set as {ENV_PREFIX}<OPTION> (e.g. MNISTGEN_TRITON_URL).")
    for f in fields(GatewayConfig):
        default = getattr(d, f.name)
        kw = {"choices": LOG_LEVELS, "type": str.upper} if f.name == "log_level" else {"type": type(default)}
        p.add_argument("--" + f.name.replace("_", "-"), default=default, **kw, help=f"default {default!r}")
    a = p.parse_args(argv)
    try:
        return GatewayConfig(**{f.name: getattr(a, f.name) for f in fields(GatewayConfig)})
    except ValueError as e:
        p.error(str(e))


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
