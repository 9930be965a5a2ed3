"""Triton python-backend model: class-conditional DDPM sampling with classifier-free guidance, the whole loop
in-process (no per-step round trips).

serving.triton_backend.GenerateLoopModel does the work: rows of (num_samples, steps, sampler, seed, digit, guidance)
from every queued request, grouped by (steps, sampler) into batched sampling loops (digits and guidance scales mixed
freely in a group; each step's labelled and null passes are one UNet call), per-item seeds, stopped within one UNet
step when every request of a group is cancelled.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[3]))  # the source tree, used when mnistgen is not installed
# serving.triton_backend first: it sets torch's OpenMP environment (OMP_WAIT_POLICY) before torch is imported
from serving.triton_backend import GenerateLoopModel  # noqa: E402


class TritonPythonModel(GenerateLoopModel):
    pass
