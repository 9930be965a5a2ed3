"""Triton python-backend model: unconditional DDPM sampling, the whole loop in-process (no per-step round trips).

Requests are rows of (num_samples, steps, sampler, seed); Triton's dynamic batcher hands over every queued request
at once. Their rows are validated (a bad request gets its own INVALID_ARG error naming the field, the others still
run), grouped by (steps, sampler), and each group runs as one batched sampling loop (mnistgen.diffusion.generate with
per-item seeds, the UNet on the engine chosen for the group's batch size). Sample i of a row is seeded with seed + i,
exactly as diffusion.generate(n, seed=seed) seeds it, so a row's images do not depend on what they were batched with.

Cancellation: the loop asks before every UNet evaluation whether the group's requests are still wanted
(request.is_cancelled(): the gRPC client cancelled or its deadline passed); when none is, it stops there and they get
CANCELLED. A group also serving live requests runs on; its cancelled requests get CANCELLED at the end.
Output `image`: (rows, num_samples, 1, 28, 28) per request (every row of one request asks for the same num_samples).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.append(str(Path(__file__).resolve().parents[3]))  # the source tree, used when mnistgen is not installed
# serving.triton_backend first: it sets torch's OpenMP environment (OMP_WAIT_POLICY) before torch is imported
from serving.triton_backend import (  # noqa: E402
    SEED_MAX, DiffusionLoopModel, StopWhenAllCancelled, cancelled_response, error_response, is_cancelled, log, param,
    text,
)
import torch  # noqa: E402

from mnistgen import diffusion, limits  # noqa: E402


class TritonPythonModel(DiffusionLoopModel):
    def initialize(self, args: dict) -> None:
        super().initialize(args)
        self.max_num_samples = int(param(self.model_config, "max_num_samples", str(limits.MAX_DDPM_SAMPLES)))
        self.loop_batch = int(param(self.model_config, "max_loop_batch", "256"))  # images per batched loop
        self.batched = int(self.model_config.get("max_batch_size", 0)) > 0  # image gets the leading row axis

    def _parse(self, request) -> tuple[list[tuple[int, int, str, int]], str | None]:
        """[(num_samples, steps, sampler, seed)] per row, or an error naming the field and the allowed range."""
        get = lambda name: pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)  # noqa: E731
        cols = [get("num_samples"), get("steps"), get("sampler"), get("seed")]
        if len({len(c) for c in cols}) != 1 or len(cols[0]) == 0:
            return [], "num_samples, steps, sampler and seed must hold one value per row"
        rows = [(int(n), int(steps), text(sampler), int(seed)) for n, steps, sampler, seed in zip(*cols)]
        for n, steps, sampler, seed in rows:
            if not 1 <= n <= self.max_num_samples:
                return rows, f"num_samples must be an integer in [1, {self.max_num_samples}], got {n}"
            if not 1 <= steps <= diffusion.MAX_STEPS:
                return rows, f"steps must be an integer in [1, {diffusion.MAX_STEPS}], got {steps}"
            if sampler not in diffusion.SAMPLERS:
                return rows, f"sampler must be one of {list(diffusion.SAMPLERS)}, got {sampler!r}"
            if not 0 <= seed <= SEED_MAX:
                return rows, f"seed must be an integer in [0, {SEED_MAX}], got {seed}"
        if len({n for n, *_ in rows}) != 1:
            return rows, f"every row of one request must ask for the same num_samples, got {[r[0] for r in rows]}"
        return rows, None

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        images: dict[int, list] = {}  # request -> per-row (n, 1, 28, 28), filled group by group
        groups: dict[tuple[int, str], list[tuple[int, int, int, int]]] = {}  # (steps, sampler) -> [(r, row, n, seed)]
        for r, request in enumerate(requests):
            try:
                rows, error = self._parse(request)
            except Exception as e:  # malformed tensors: answer this request, keep the model up
                rows, error = [], f"bad request: {e}"
            if error is not None:
                responses[r] = error_response(error, "INVALID_ARG")
                continue
            images[r] = [None] * len(rows)
            for j, (n, steps, sampler, seed) in enumerate(rows):
                groups.setdefault((steps, sampler), []).append((r, j, n, seed))

        for (steps, sampler), members in groups.items():
            rs = sorted({r for r, *_ in members})
            if all(responses[r] is not None for r in rs):
                continue
            seeds = [seed + i for _, _, n, seed in members for i in range(n)]  # sample i of a row: seed + i
            try:
                with torch.inference_mode():
                    x = diffusion.generate(self.eps, len(seeds), sampler, steps, seeds=seeds,
                                           batch_size=self.loop_batch, scheduler_config=self.eps.scheduler_config,
                                           should_stop=StopWhenAllCancelled([requests[r] for r in rs]))
            except diffusion.SamplingStopped as e:
                log("info", f"ddpm_generate: {len(rs)} request(s) cancelled ({len(seeds)} samples, {sampler}-{steps}): "
                            f"stopped at UNet evaluation {e.step + 1} of {e.steps}")
                for r in rs:
                    responses[r] = cancelled_response(f"; stopped at UNet evaluation {e.step + 1} of {e.steps}")
                continue
            except Exception as e:  # e.g. an engine failure: fail only the requests in this group
                for r in rs:
                    responses[r] = error_response(f"generate failed: {e}")
                continue
            start = 0
            for r, j, n, _ in members:
                images[r][j] = x[start:start + n].numpy()  # (n, 1, 28, 28)
                start += n

        for r, rows in images.items():
            if responses[r] is not None:
                continue
            if is_cancelled(requests[r]):  # its group ran on for other requests
                responses[r] = cancelled_response()
                continue
            out = np.stack(rows) if self.batched else rows[0]  # (rows, n, 1, 28, 28) or (n, 1, 28, 28)
            responses[r] = pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("image", np.ascontiguousarray(out, dtype=np.float32))])
        return responses
