"""Triton python-backend model: unconditional DDPM sampling, the whole loop in-process (no per-step round trips).

mnistgen.diffusion.generate drives an ONNX Runtime UNet as eps_fn; sample i is seeded with seed + i, so the
same (num_samples, steps, sampler, seed) gives the same images as the eager PyTorch loop.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

sys.path.append(str(Path(__file__).resolve().parents[3]))  # the source tree, used when mnistgen is not installed
from mnistgen import diffusion  # noqa: E402
from serving.triton_backend import SEED_MAX, DiffusionLoopModel, error_response, param, text  # noqa: E402


class TritonPythonModel(DiffusionLoopModel):
    def initialize(self, args: dict) -> None:
        super().initialize(args)
        self.max_num_samples = int(param(self.model_config, "max_num_samples", "256"))

    def _parse(self, request) -> tuple[tuple, str | None]:
        one = lambda name: pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)[0]  # noqa: E731
        n, steps, seed = int(one("num_samples")), int(one("steps")), int(one("seed"))
        sampler = text(one("sampler"))
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
                responses.append(error_response(error, "INVALID_ARG"))
                continue
            try:
                with torch.inference_mode():
                    images = diffusion.generate(self.eps, n, sampler, steps, seed,
                                                scheduler_config=self.eps.scheduler_config)  # (n, 1, 28, 28)
            except Exception as e:
                responses.append(error_response(f"generate failed: {e}"))
                continue
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("image", np.ascontiguousarray(images.numpy(), dtype=np.float32))]))
        return responses
