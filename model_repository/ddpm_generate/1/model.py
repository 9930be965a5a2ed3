"""Triton python-backend model: unconditional DDPM sampling, the whole loop in-process (no per-step round trips).

training.diffusion.generate drives an ONNX Runtime UNet as eps_fn; sample i is seeded with seed + i, so the
same (num_samples, steps, sampler, seed) gives the same images as the eager PyTorch loop.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import triton_python_backend_utils as pb_utils

try:
    from training import diffusion
except ImportError:  # repository checkout without `pip install -e .`: model_repository/<model>/1/model.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    from training import diffusion

SEED_MAX = 2**63 - 1


def _param(model_config: dict, key: str, default: str) -> str:
    return model_config.get("parameters", {}).get(key, {}).get("string_value", default)


class OrtEps:
    """eps_fn(x (B, 1, 28, 28), t (B,) int64) -> noise_pred (B, 1, 28, 28), running the exported UNet."""

    def __init__(self, onnx_path: str, model_config: dict, instance_kind: str, device_id: int):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = int(_param(model_config, "intra_op_threads", "0"))  # 0 = ORT picks (all cores)
        opts.inter_op_num_threads = 1
        # spinning worker threads burn the CPU they wait on: on a shared machine they slow everything down
        opts.add_session_config_entry("session.intra_op.allow_spinning", _param(model_config, "allow_spinning", "1"))
        providers: list = ["CPUExecutionProvider"]
        if instance_kind == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
        self.session = ort.InferenceSession(onnx_path, sess_options=opts, providers=providers)
        meta = self.session.get_modelmeta().custom_metadata_map
        # the training noise schedule, recorded in the ONNX file by training.export
        self.scheduler_config = json.loads(meta["scheduler"]) if "scheduler" in meta else dict(diffusion.DEFAULT_SCHEDULER)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        feeds = {"sample": np.ascontiguousarray(x.detach().numpy(), dtype=np.float32),  # (B, 1, 28, 28)
                 "timestep": np.ascontiguousarray(t.numpy(), dtype=np.int64)}  # (B,)
        return torch.from_numpy(self.session.run(["noise_pred"], feeds)[0])  # (B, 1, 28, 28)


def _invalid(message: str) -> "pb_utils.InferenceResponse":
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    err = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=err)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        torch.set_num_threads(1)  # the UNet runs in ONNX Runtime; torch only does the scheduler arithmetic
        self.model_config = json.loads(args["model_config"])
        self.max_num_samples = int(_param(self.model_config, "max_num_samples", "256"))
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.eps = OrtEps(
            str(version_dir / "model.onnx"), self.model_config,
            args.get("model_instance_kind", "CPU"), int(args.get("model_instance_device_id", 0) or 0),
        )

    def _parse(self, request) -> tuple[tuple, str | None]:
        one = lambda name: pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)[0]  # noqa: E731
        n, steps, seed = int(one("num_samples")), int(one("steps")), int(one("seed"))
        sampler = one("sampler")
        sampler = sampler.decode("utf-8", "replace") if isinstance(sampler, bytes) else str(sampler)
        args = (n, steps, sampler, seed)
        if not 1 <= n <= self.max_num_samples:
            return args, f"num_samples must be an integer in [1, {self.max_num_samples}], got {n}"
        if not 1 <= steps <= diffusion.MAX_STEPS:
            return args, f"steps must be an integer in [1, {diffusion.MAX_STEPS}], got {steps}"
        if sampler not in diffusion.SAMPLERS:
            return args, f"sampler must be one of {list(diffusion.SAMPLERS)}, got {sampler!r}"
        if not 0 <= seed <= SEED_MAX:
            return args, f"seed must be an integer in [0, {SEED_MAX}], got {seed}"
        return args, None

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:  # max_batch_size 0: each request is one call of its own size
            try:
                (n, steps, sampler, seed), error = self._parse(request)
            except Exception as e:
                error = f"bad request: {e}"
            if error is not None:
                responses.append(_invalid(error))
                continue
            try:
                with torch.inference_mode():
                    images = diffusion.generate(self.eps, n, sampler, steps, seed,
                                                scheduler_config=self.eps.scheduler_config)  # (n, 1, 28, 28)
            except Exception as e:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"generate failed: {e}")))
                continue
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("image", np.ascontiguousarray(images.numpy(), dtype=np.float32))]))
        return responses

    def finalize(self) -> None:
        self.eps = None
