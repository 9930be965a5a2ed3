"""Triton over gRPC: TritonClient (one reused tritonclient aio channel), tensor names, error mapping."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
import numpy as np
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc import aio as triton_aio
from tritonclient.utils import InferenceServerException

from ..validation import ApiError

# Triton tensor names (the same in config.pbtxt, export and tests)
LATENT, IMAGE, SIGMA, STEPS, SAMPLER, SEED, NUM_SAMPLES, NOISY, DENOISED = (
    "latent", "image", "sigma", "steps", "sampler", "seed", "num_samples", "noisy", "denoised")


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


@dataclass
class TritonModelInfo:
    name: str
    max_batch_size: int  # 0 = the model is not batched
    latent_dim: int  # GANs: dims of the `latent` input; 0 otherwise
    version: str  # the newest version Triton serves


class TritonClient:
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
