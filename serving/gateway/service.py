"""mnistgen.v1.GenerationService: the gRPC servicer, its transport-independent core `run`, and pure helpers."""
from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import time
import traceback

import grpc
import numpy as np

from mnistgen import catalog
from mnistgen.latent import sample_latent

from .. import images as imgs
from ..generated.mnistgen.v1 import generation_pb2 as pb
from ..generated.mnistgen.v1 import generation_pb2_grpc as pb_grpc
from ..metrics import GatewayMetrics
from ..validation import (
    SAMPLERS, ApiError, DenoiseParams, GenerateParams, ValidationError, clip,
    validate_denoise, validate_generate,
)
from . import request_id
from .admission import FREE, LIST_POOL, Admission, denoise_cost, generate_cost
from .auth import TENANT
from .config import GatewayConfig
from .backends import BackendSet
from .triton_client import (
    DENOISED, DIGIT, GUIDANCE, IMAGE, LATENT, NOISY, NUM_SAMPLES, SAMPLER, SEED, SIGMA, STEPS, tensor,
)

log = logging.getLogger("mnistgen.gateway")
MAX_STATUS_BYTES = 2048  # a gRPC error message (UTF-8): it travels percent-encoded in a trailer, and a client drops
#                          a stream whose metadata passes its limit (8 KB by default) as RESOURCE_EXHAUSTED


class Undecodable:
    """What the gRPC deserializer hands over for bytes that are no valid request message (bad wire format, strings
    that are not UTF-8): the servicer answers INVALID_ARGUMENT instead of grpc's UNKNOWN for a deserializer raise."""

    model = "\0"  # (Generate's metrics label: "unknown")

    def __init__(self, message_type, data: bytes, error: Exception):
        self.message_type, self.size, self.error = message_type, len(data), error

    async def refuse(self, request, deadline: float, start: float):
        raise ValidationError("body", f"not a valid {self.message_type.DESCRIPTOR.full_name} protobuf message "
                                      f"({self.size} bytes: {clip(self.error, 120)})")


def lenient(message_type):
    """request_deserializer: message_type.FromString, or an Undecodable when the bytes do not parse."""
    def deserialize(data: bytes):
        try:
            return message_type.FromString(data)
        except Exception as e:  # google.protobuf.message.DecodeError, RecursionError on deep nesting...
            return Undecodable(message_type, data, e)
    return deserialize


def add_to_server(servicer: "GenerationServicer", server) -> None:
    """pb_grpc.add_GenerationServiceServicer_to_server with lenient request deserializers."""
    methods = {"Generate": (pb.GenerateRequest, pb.GenerateResponse),
               "Denoise": (pb.DenoiseRequest, pb.DenoiseResponse),
               "ListModels": (pb.ListModelsRequest, pb.ListModelsResponse)}
    handlers = {name: grpc.unary_unary_rpc_method_handler(getattr(servicer, name), request_deserializer=lenient(req),
                                                          response_serializer=resp.SerializeToString)
                for name, (req, resp) in methods.items()}
    service = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


def status_message(message: str) -> str:
    """A gRPC status message within MAX_STATUS_BYTES (the messages echo user input short already: a last guard)."""
    if len(message.encode("utf-8", "backslashreplace")) <= MAX_STATUS_BYTES:
        return message
    return clip(message, MAX_STATUS_BYTES // 4)


FORMAT_VALUES = {name: pb.ImageFormat.Value(name) for name in pb.ImageFormat.keys()}


def fill_images(msg: pb.Images, x: np.ndarray, fmt: str) -> pb.Images:
    """Write (N, 1, 28, 28) float32 in [-1, 1] into msg (a response's images field, in place: no copy of the
    pixels into a separate message first) in the requested format; returns msg."""
    x = np.ascontiguousarray(x, dtype="<f4").reshape(-1, 1, imgs.SIDE, imgs.SIDE)  # (N, 1, 28, 28)
    msg.format, msg.count = FORMAT_VALUES[fmt], len(x)
    msg.shape.extend(x.shape)
    if fmt == "RAW_FLOAT32":
        msg.raw = x.tobytes()
    elif fmt == "PNG":
        msg.png.extend(imgs.encode_pngs(x))
    else:
        msg.grid_png = imgs.grid_png(x)
    return msg


def images_array(msg: pb.Images) -> np.ndarray:
    """pb.Images (any format but PNG_GRID) -> (N, 1, 28, 28) float32; the inverse of fill_images."""
    if msg.format == pb.PNG:
        u8 = np.stack([np.asarray(imgs.decode_png(b).convert("L")) for b in msg.png])  # (N, 28, 28)
        return imgs.from_uint8(u8)
    if msg.format == pb.PNG_GRID:
        raise ValueError("a PNG_GRID response holds one tiled image, not separable samples")
    return np.frombuffer(msg.raw, dtype="<f4").reshape(-1, 1, imgs.SIDE, imgs.SIDE).copy()


def set_timing(msg: pb.Timing, start: float, triton_s: float, n: int) -> pb.Timing:
    """Fill a response's timing field in place (server time since `start`)."""
    ms = (time.perf_counter() - start) * 1e3
    msg.server_ms, msg.per_sample_ms, msg.triton_ms = ms, ms / max(n, 1), triton_s * 1e3
    return msg


def model_label(name: str) -> str:
    """Metrics label for a requested model: only known names (unbounded user input never becomes a label)."""
    name = name or catalog.DEFAULT_MODEL
    return name if name in catalog.GENERATORS else "unknown"


def access_line(rpc: str, transport: str, model: str, code: str, seconds: float, samples: int,
                triton_s: float) -> str:
    """One access-log record as a JSON line (the request id from request_id.current)."""
    return json.dumps({"ts": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
                       "request_id": request_id.current.get(), "rpc": rpc, "transport": transport, "model": model,
                       "code": code, "ms": round(seconds * 1e3, 3), "samples": samples,
                       "triton_ms": round(triton_s * 1e3, 3)})


def deadline_remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise ApiError("deadline exceeded before the request reached Triton", code="DEADLINE_EXCEEDED")
    return left


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    """mnistgen.v1.GenerationService; the HTTP routes call the same coroutines (`run`)."""

    def __init__(self, triton: BackendSet, metrics: GatewayMetrics, limiter: Admission, config: GatewayConfig,
                 access: logging.Logger | None = None):
        self.triton, self.metrics, self.limiter, self.config = triton, metrics, limiter, config
        self.access = access  # the access log (app.access_logger), None when off
        self.in_flight = 0  # requests inside run() now (drain waits for 0)

    # -- transport-independent core --
    async def run(self, rpc: str, transport: str, label: str, timeout_s: float | None, fn, request):
        """Deadline, errors and metrics around one call of fn(request, deadline, start) -> (response, samples,
        triton_s). Admission is the handler's: it validates the request first (a bad one never waits in the queue),
        then holds `async with self.limiter.slot(pool, cost, tenant, deadline)` around its Triton work (admission.py:
        a pool per Triton model, fair by cost across tenants, refused at once when it cannot meet its deadline)."""
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
            # the traceback's frames, and the exception's text cut and escaped (it may quote the request)
            rid = request_id.current.get()
            log.error("%s failed (request id %s): %s: %s\n%s", rpc, rid, type(e).__name__, clip(e),
                      "".join(traceback.format_tb(e.__traceback__)).rstrip())
            raise ApiError(f"internal error: {type(e).__name__}: {clip(e)} (request id {rid})", code=code) from None
        finally:
            self.metrics.in_flight.dec()
            self.in_flight -= 1
            seconds = time.perf_counter() - start
            self.metrics.observe(rpc, label, transport, code, seconds, samples, triton_s)
            if self.access is not None:
                self.access.info(access_line(rpc, transport, label, code, seconds, samples, triton_s))

    async def generate(self, req: pb.GenerateRequest, deadline: float, start: float):
        p = validate_generate(req.model, req.num_samples, req.seed if req.HasField("seed") else None,
                              req.steps, req.sampler, req.format, req.digit if req.HasField("digit") else None,
                              req.guidance if req.HasField("guidance") else None)
        async with self.limiter.slot(p.model.triton, generate_cost(p), TENANT.get(), deadline):
            t0 = time.perf_counter()
            if p.model.kind == catalog.GAN:
                x, version = await self._generate_gan(p, deadline)  # (N, 1, 28, 28)
            else:
                x, version = await self._generate_ddpm(p, deadline)
            triton_s = time.perf_counter() - t0
            self.metrics.diversity.add(p.model.name, x)
            resp = pb.GenerateResponse(model=p.model.name, model_version=version, seed=p.seed, steps=p.steps,
                                       sampler=p.sampler, guidance=p.guidance)
            if p.model.conditional:
                self.metrics.count_digit(p.model.name, p.digit)
                if p.digit >= 0:
                    resp.digit = p.digit
            await encode_into(resp.images, x, p.format)
        set_timing(resp.timing, start, triton_s, p.num_samples)
        return resp, p.num_samples, triton_s

    async def _generate_gan(self, p: GenerateParams, deadline: float) -> tuple[np.ndarray, str]:
        model = p.model.triton
        info = await self.triton.model_info(model, deadline_remaining(deadline))
        z = sample_latent(p.num_samples, info.latent_dim, p.seed)  # (N, latent_dim)
        step = info.max_batch_size or p.num_samples
        if p.num_samples <= step:  # one call (every batch-1 request): no task, no gather, no concatenate
            r = await self.triton.infer(model, [tensor(LATENT, z, "FP32")], [IMAGE], deadline_remaining(deadline),
                                        p.num_samples)
            return r.as_numpy(IMAGE).reshape(-1, 1, imgs.SIDE, imgs.SIDE), r.get_response().model_version
        results = await asyncio.gather(*(
            self.triton.infer(model, [tensor(LATENT, z[i:i + step], "FP32")], [IMAGE], deadline_remaining(deadline),
                              len(z[i:i + step]))
            for i in range(0, p.num_samples, step)))
        x = np.concatenate([r.as_numpy(IMAGE) for r in results]).reshape(-1, 1, imgs.SIDE, imgs.SIDE)
        return x, results[0].get_response().model_version

    async def _generate_ddpm(self, p: GenerateParams, deadline: float) -> tuple[np.ndarray, str]:
        model = p.model.triton
        info = await self.triton.model_info(model, deadline_remaining(deadline))
        row = (1, 1) if info.max_batch_size else (1,)  # batched ddpm_generate: one row (1, 1) per request
        inputs = [
            tensor(NUM_SAMPLES, np.full(row, p.num_samples, np.int32), "INT32"),
            tensor(STEPS, np.full(row, p.steps, np.int32), "INT32"),
            tensor(SAMPLER, np.full(row, p.sampler.encode(), np.object_), "BYTES"),
            tensor(SEED, np.full(row, p.seed, np.int64), "INT64"),
        ]
        if p.model.conditional:  # ddpm_cond_generate: digit -1 = any
            inputs += [tensor(DIGIT, np.full(row, p.digit, np.int32), "INT32"),
                       tensor(GUIDANCE, np.full(row, p.guidance, np.float32), "FP32")]
        r = await self.triton.infer(model, inputs, [IMAGE], deadline_remaining(deadline),
                                    p.model.cost(p.num_samples, p.steps, p.guided))
        x = r.as_numpy(IMAGE).reshape(-1, 1, imgs.SIDE, imgs.SIDE)  # (N, 1, 28, 28) from (1, N, 1, 28, 28) or (N, ...)
        return x, r.get_response().model_version

    async def denoise(self, req: pb.DenoiseRequest, deadline: float, start: float):
        args = (list(req.png_images), req.raw_images, req.sigma, req.steps, req.sampler,
                req.seed if req.HasField("seed") else None, req.format)
        # decoding many PNGs is CPU work: keep it off the event loop
        p = await asyncio.to_thread(validate_denoise, *args) if len(req.png_images) > 8 else validate_denoise(*args)
        async with self.limiter.slot(catalog.DENOISER.triton, denoise_cost(p), TENANT.get(), deadline):
            t0 = time.perf_counter()
            noisy, denoised, version = await self._denoise(p, deadline)
            triton_s = time.perf_counter() - t0
            resp = pb.DenoiseResponse(model=catalog.DENOISER.name, model_version=version, seed=p.seed, sigma=p.sigma,
                                      steps=p.steps, sampler=p.sampler)
            await encode_into(resp.noisy, noisy, p.format)
            await encode_into(resp.denoised, denoised, p.format)
        k = len(p.images)
        set_timing(resp.timing, start, triton_s, k)
        return resp, k, triton_s

    async def _denoise(self, p: DenoiseParams, deadline: float) -> tuple[np.ndarray, np.ndarray, str]:
        """Each image i gets its own noise seed (seed + i), so results do not depend on how Triton batches."""
        model = catalog.DENOISER.triton
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
            calls.append(self.triton.infer(model, inputs, [NOISY, DENOISED], deadline_remaining(deadline),
                                           catalog.DENOISER.cost(j - i, p.steps)))
        results = await asyncio.gather(*calls)
        shape = (-1, 1, imgs.SIDE, imgs.SIDE)
        noisy = np.concatenate([r.as_numpy(NOISY) for r in results]).reshape(shape)  # (K, 1, 28, 28)
        denoised = np.concatenate([r.as_numpy(DENOISED) for r in results]).reshape(shape)  # (K, 1, 28, 28)
        return noisy, denoised, results[0].get_response().model_version

    async def list_models(self, req: pb.ListModelsRequest, deadline: float, start: float):
        async with self.limiter.slot(LIST_POOL, FREE, TENANT.get()):  # no model evaluation: max_concurrency only
            return await self._list_models(deadline)

    async def _list_models(self, deadline: float):
        timeout = min(self.config.readiness_timeout_s, deadline_remaining(deadline))
        _, ready = await self.triton.readiness(list(catalog.SERVED), timeout)
        resp = pb.ListModelsResponse()
        for spec in catalog.GENERATORS.values():
            info = pb.ModelInfo(name=spec.name, triton_model=spec.triton, kind=spec.kind, ready=ready[spec.triton],
                                max_num_samples=spec.max_samples, accepts_digit=spec.conditional,
                                default_guidance=spec.guidance)
            if info.ready:
                with contextlib.suppress(ApiError):
                    t = await self.triton.model_info(spec.triton, timeout)
                    info.version, info.latent_dim = t.version, t.latent_dim
            if spec.kind != catalog.GAN:
                info.samplers.extend(SAMPLERS)
                info.default_sampler = spec.sampler
                info.supports_denoise = spec.name == catalog.DENOISER.name and ready[catalog.DENOISER.triton]
            resp.models.append(info)
        return resp, 0, 0.0

    # -- gRPC --
    async def _grpc(self, rpc, label, fn, request, context: grpc.aio.ServicerContext):
        remaining = context.time_remaining()
        rid = request_id.from_grpc_metadata(context.invocation_metadata())
        request_id.current.set(rid)  # (this call's own task: the Triton client and the error log read it)
        trailer = ((request_id.GRPC_KEY, rid),)
        context.set_trailing_metadata(trailer)
        if isinstance(request, Undecodable):
            fn = request.refuse
        try:
            return await self.run(rpc, "grpc", label, remaining, fn, request)
        except ApiError as e:
            if e.retry_after is not None:  # the admission's estimate of when a retry could fit (seconds)
                trailer += (("retry-after", str(e.retry_after)),)
            await context.abort(getattr(grpc.StatusCode, e.code), status_message(e.message), trailer)

    async def Generate(self, request, context):
        return await self._grpc("Generate", model_label(request.model), self.generate, request, context)

    async def Denoise(self, request, context):
        return await self._grpc("Denoise", catalog.DENOISER.name, self.denoise, request, context)

    async def ListModels(self, request, context):
        return await self._grpc("ListModels", "", self.list_models, request, context)


async def encode_into(msg: pb.Images, x: np.ndarray, fmt: str) -> pb.Images:
    """fill_images, off the event loop when there are many PNGs to compress."""
    if fmt != "RAW_FLOAT32" and len(x) > 16:
        return await asyncio.to_thread(fill_images, msg, x, fmt)
    return fill_images(msg, x, fmt)
