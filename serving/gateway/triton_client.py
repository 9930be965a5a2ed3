"""Triton over gRPC: TritonClient (reused aio channels, model configs cached), tensor names, error mapping."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import NamedTuple

import grpc
import numpy as np
from tritonclient.grpc import InferInput, InferResult, service_pb2, service_pb2_grpc
from tritonclient.grpc import aio as triton_aio
from tritonclient.utils import InferenceServerException, serialize_byte_tensor, triton_to_np_dtype

from ..triton_access import GRPC_KEY_HEADER, KeyHeader
from ..validation import ApiError
from . import request_id

# Triton tensor names (the same in config.pbtxt, export and tests)
LATENT, IMAGE, SIGMA, STEPS, SAMPLER, SEED, NUM_SAMPLES, NOISY, DENOISED, DIGIT, GUIDANCE = (
    "latent", "image", "sigma", "steps", "sampler", "seed", "num_samples", "noisy", "denoised", "digit", "guidance")


# Triton's words for a model it does not serve (an unload, a failed load, not ready yet): UNAVAILABLE, not INTERNAL
NOT_SERVED_TEXT = "does not serve model"  # the message of a model Triton does not serve (backends.py)
NOT_SERVED = ("unknown model", "not found", "is not ready", "no available versions")


def triton_error(e: InferenceServerException, model: str) -> ApiError:
    """Map a tritonclient error (its status is "StatusCode.X") to the gateway's ApiError."""
    status = (e.status() or "").replace("StatusCode.", "")
    msg = e.message() or str(e)
    if status == "DEADLINE_EXCEEDED":
        return ApiError(f"deadline exceeded waiting for Triton model {model!r}", code="DEADLINE_EXCEEDED")
    if status == "NOT_FOUND" or any(s in msg for s in NOT_SERVED):
        return ApiError(f"Triton {NOT_SERVED_TEXT} {model!r} now (unloaded, failed to load or not ready): {msg}",
                        code="UNAVAILABLE")
    if status == "UNAVAILABLE":
        return ApiError(f"Triton unavailable for model {model!r}: {msg}", code="UNAVAILABLE")
    if status == "RESOURCE_EXHAUSTED":
        return ApiError(f"Triton busy for model {model!r}: {msg}", code="RESOURCE_EXHAUSTED")
    if status == "CANCELLED":
        return ApiError(f"cancelled while waiting for Triton model {model!r}", code="CANCELLED")
    return ApiError(f"Triton model {model!r} failed: {status} {msg}", code="INTERNAL")


@dataclass
class TritonModelInfo:
    name: str
    max_batch_size: int  # 0 = the model is not batched
    latent_dim: int  # GANs: dims of the `latent` input; 0 otherwise
    version: str  # the newest version Triton serves


class TritonClient:
    """One reused tritonclient aio channel, Triton's model configs cached, errors mapped to ApiError."""

    def __init__(self, url: str, max_message_bytes: int, key: str = ""):
        self.url = url
        channel_args = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # reconnect fast after a Triton restart (the default backoff grows to 2 minutes)
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1000),
            ("grpc.keepalive_time_ms", 2**31 - 1),
        ]
        self.client = triton_aio.InferenceServerClient(url, channel_args=channel_args)  # configs, health
        # Triton's launch key (serving/triton_server.py): on every call, so Triton may restrict any API but health
        self._key = ((GRPC_KEY_HEADER, key),) if key else None
        if key:
            self.client.register_plugin(KeyHeader(key))
        # inference: the generated stub on a channel of our own, the request built straight from numpy (tritonclient's
        # aio infer() spends ~0.1 ms per call on InferInput/InferRequestedOutput objects and request assembly)
        self._channel = grpc.aio.insecure_channel(url, options=channel_args)
        self._model_infer = service_pb2_grpc.GRPCInferenceServiceStub(self._channel).ModelInfer
        self._info: dict[str, TritonModelInfo] = {}

    async def close(self) -> None:
        await self.client.close()
        await self._channel.close()

    def forget(self) -> None:
        """Drop cached model configs (Triton went away; a new one may serve other shapes)."""
        self._info.clear()

    async def model_info(self, model: str, timeout: float) -> TritonModelInfo:
        if model not in self._info:
            try:
                cfg = (await self.client.get_model_config(model, as_json=True, client_timeout=timeout))["config"]
                meta = await self.client.get_model_metadata(model, as_json=True, client_timeout=timeout)
            except InferenceServerException as e:
                raise self.error(e, model) from None
            latent = [i for i in cfg.get("input", []) if i["name"] == LATENT]
            versions = sorted(meta.get("versions", []), key=lambda v: int(v) if v.isdigit() else -1)
            self._info[model] = TritonModelInfo(
                model, int(cfg.get("max_batch_size", 0)), int(latent[0]["dims"][-1]) if latent else 0,
                versions[-1] if versions else "")
        return self._info[model]

    async def infer(self, model: str, inputs: list[Tensor], outputs: list[str], timeout: float) -> InferResult:
        """One ModelInfer call; the result is tritonclient's InferResult (as_numpy(name), get_response())."""
        try:
            req = infer_request(model, inputs, outputs, request_id.current.get())
            return InferResult(await self._model_infer(req, timeout=timeout, metadata=self._key))
        except grpc.RpcError as e:  # grpc.aio.AioRpcError: as tritonclient raises it, then mapped
            raise self.error(InferenceServerException(msg=e.details(), status=str(e.code()),
                                                      debug_details=e.debug_error_string()), model) from None

    def error(self, e: InferenceServerException, model: str) -> ApiError:
        """triton_error(); a model Triton does not serve loses its cached config (a reload may change it)."""
        err = triton_error(e, model)
        if err.code == "UNAVAILABLE":
            self._info.pop(model, None)
        return err

    async def readiness(self, models: list[str], timeout: float) -> tuple[bool, dict[str, bool]]:
        """(server live, {model: ready}); never raises. Live, not ServerReady: that turns false while any loaded model
        is unloaded or failing, and the other models still serve."""
        try:
            server = bool(await self.client.is_server_live(client_timeout=timeout))
        except (InferenceServerException, asyncio.TimeoutError, grpc.RpcError):
            return False, {m: False for m in models}

        async def one(m: str) -> bool:
            try:
                return bool(await self.client.is_model_ready(m, client_timeout=timeout))
            except (InferenceServerException, asyncio.TimeoutError, grpc.RpcError):
                return False

        ready = await asyncio.gather(*(one(m) for m in models))
        return server, dict(zip(models, ready))


class Tensor(NamedTuple):
    """One input of a ModelInfer request: name, numpy array, Triton datatype ("FP32", "INT32", "BYTES", ...)."""

    name: str
    array: np.ndarray
    datatype: str


def tensor(name: str, array: np.ndarray, dtype: str) -> Tensor:
    return Tensor(name, array, dtype)


def raw_contents(t: Tensor) -> bytes:
    """The tensor's raw_input_contents: little-endian values, or length-prefixed elements for BYTES (tritonclient's
    own serialization)."""
    if t.datatype == "BYTES":
        s = serialize_byte_tensor(np.asarray(t.array, dtype=np.object_))
        return s.item() if s.size > 0 else b""
    if t.array.dtype != triton_to_np_dtype(t.datatype):  # (tritonclient's InferInput checks this too)
        raise TypeError(f"input {t.name!r}: {t.datatype} needs {np.dtype(triton_to_np_dtype(t.datatype))}, "
                        f"got {t.array.dtype}")
    return np.ascontiguousarray(t.array).tobytes()


def infer_request(model: str, inputs: list, outputs: list[str], rid: str = "") -> service_pb2.ModelInferRequest:
    """A ModelInferRequest from Tensor inputs (a tritonclient InferInput is taken too); `rid`: its `id` (the gateway's
    request id: Triton echoes it in the response and names it in its logs)."""
    req = service_pb2.ModelInferRequest(model_name=model, id=rid)
    for t in inputs:
        if isinstance(t, InferInput):
            req.inputs.append(t._get_tensor())
            req.raw_input_contents.append(t._get_content() or b"")
            continue
        spec = req.inputs.add()
        spec.name, spec.datatype = t.name, t.datatype
        spec.shape.extend(t.array.shape)
        req.raw_input_contents.append(raw_contents(t))
    for name in outputs:
        req.outputs.add().name = name
    return req
