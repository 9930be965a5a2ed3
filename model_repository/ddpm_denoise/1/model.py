"""Triton python-backend model: DDPM denoising at noise level sigma, the whole sampling loop in-process.

Each execute() gets every queued request; their rows are validated (a bad request gets its own TritonError
naming the field and the allowed range, the others still run), grouped by (sigma, steps, sampler), and each
group runs as one batch through mnistgen.diffusion's loop with an ONNX Runtime UNet as eps_fn.
Row i draws all its noise from torch.Generator().manual_seed(seed[i]), exactly as mnistgen.diffusion.denoise
does for item i with seed + i, so a row's result does not depend on what it was batched with.
Cancellation: before every UNet evaluation the loop asks whether the group's requests are still wanted
(request.is_cancelled(): the gRPC client cancelled or its deadline passed); when none is, it stops and they get
CANCELLED. A group also serving live requests runs on; its cancelled requests get CANCELLED at the end.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.append(str(Path(__file__).resolve().parents[3]))  # the source tree, used when mnistgen is not installed
# serving.triton_backend first: it sets torch's OpenMP environment (OMP_WAIT_POLICY) before torch is imported
from serving.triton_backend import (  # noqa: E402
    SEED_MAX, DiffusionLoopModel, StopWhenAllCancelled, cancelled_response, error_response, is_cancelled, log,
    request_ids, text,
)
import torch  # noqa: E402

from mnistgen import diffusion  # noqa: E402


class TritonPythonModel(DiffusionLoopModel):
    def initialize(self, args: dict) -> None:
        super().initialize(args)
        sched = diffusion.make_scheduler("ddpm", self.eps.scheduler_config)
        self.sigma_max = float(diffusion.noise_to_signal(sched.alphas_cumprod)[-1])

    def _parse(self, request) -> tuple[dict, str | None]:
        """The request's rows as numpy arrays, or an error naming the field and the allowed range."""
        get = lambda name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()  # noqa: E731
        image = get("image").astype(np.float32)  # (B, 1, 28, 28)
        sigma = get("sigma").reshape(-1).astype(np.float32)  # (B,)
        steps = get("steps").reshape(-1).astype(np.int64)  # (B,)
        seed = get("seed").reshape(-1).astype(np.int64)  # (B,)
        sampler = [text(s) for s in get("sampler").reshape(-1)]  # (B,)
        rows = {"image": image, "sigma": sigma, "steps": steps, "seed": seed, "sampler": sampler}
        for s in sampler:
            if s not in diffusion.SAMPLERS:
                return rows, f"sampler must be one of {list(diffusion.SAMPLERS)}, got {s!r}"
        bad = steps[(steps < 1) | (steps > diffusion.MAX_STEPS)]
        if bad.size:
            return rows, f"steps must be an integer in [1, {diffusion.MAX_STEPS}], got {int(bad[0])}"
        bad = sigma[~(np.isfinite(sigma) & (sigma >= 0) & (sigma <= self.sigma_max))]
        if bad.size:
            return rows, f"sigma must be a number in [0, {self.sigma_max:.1f}], got {float(bad[0])}"
        bad = seed[seed < 0]
        if bad.size:
            return rows, f"seed must be an integer in [0, {SEED_MAX}], got {int(bad[0])}"
        if not np.isfinite(image).all() or image.min() < -1.0 or image.max() > 1.0:
            return rows, ("image values must be finite and in [-1, 1] (clean x0), got range "
                          f"[{np.nanmin(image):.3g}, {np.nanmax(image):.3g}]")
        return rows, None

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        parsed: dict[int, dict] = {}
        groups: dict[tuple, list[tuple[int, int]]] = {}  # (sigma, steps, sampler) -> [(request, row)]
        for r, request in enumerate(requests):
            try:
                rows, error = self._parse(request)
            except Exception as e:  # malformed tensors: answer this request, keep the model up
                rows, error = None, f"bad request: {e}"
            if error is not None:
                responses[r] = error_response(error, "INVALID_ARG")
                continue
            parsed[r] = {"rows": rows, "noisy": np.empty_like(rows["image"]), "denoised": np.empty_like(rows["image"])}
            for i in range(len(rows["sigma"])):
                key = (float(rows["sigma"][i]), int(rows["steps"][i]), rows["sampler"][i])
                groups.setdefault(key, []).append((r, i))

        failed: dict[int, str] = {}
        cancelled: dict[int, str] = {}
        for (sigma, steps, sampler), members in groups.items():
            rs = sorted({r for r, _ in members})
            x0 = torch.from_numpy(np.stack([parsed[r]["rows"]["image"][i] for r, i in members]))  # (G, 1, 28, 28)
            seeds = [int(parsed[r]["rows"]["seed"][i]) for r, i in members]
            try:
                with torch.inference_mode():
                    noisy, denoised = diffusion.denoise(self.eps, x0, sigma, sampler, steps, seeds=seeds,
                                                         scheduler_config=self.eps.scheduler_config,
                                                         should_stop=StopWhenAllCancelled([requests[r] for r in rs]))
            except diffusion.SamplingStopped as e:
                log("info", f"ddpm_denoise: {len(rs)} request(s) cancelled ({len(members)} images, {sampler}-{steps}): "
                            f"stopped at UNet evaluation {e.step + 1} of {e.steps}"
                            f"{request_ids([requests[r] for r in rs])}")
                for r in rs:
                    cancelled[r] = f"; stopped at UNet evaluation {e.step + 1} of {e.steps}"
                continue
            except Exception as e:  # e.g. ONNX Runtime failure: fail only the requests in this group
                log("error", f"ddpm_denoise: denoise failed{request_ids([requests[r] for r in rs])}: {e}")
                for r, _ in members:
                    failed[r] = f"denoise failed: {e}"
                continue
            for k, (r, i) in enumerate(members):
                parsed[r]["noisy"][i] = noisy[k].numpy()
                parsed[r]["denoised"][i] = denoised[k].numpy()

        for r, p in parsed.items():
            if r in failed:
                responses[r] = error_response(failed[r])
                continue
            if r in cancelled or is_cancelled(requests[r]):
                responses[r] = cancelled_response(cancelled.get(r, ""))
                continue
            responses[r] = pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("noisy", p["noisy"]),  # (B, 1, 28, 28)
                pb_utils.Tensor("denoised", p["denoised"]),  # (B, 1, 28, 28)
            ])
        return responses
