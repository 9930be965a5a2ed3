"""Request limits shared by the gateway (serving.validation) and the Triton models (model_repository/): one source.

Pure constants (no numpy, no torch): the serve-only gateway and Triton's python-backend stubs both import this.
model_repository/ddpm_generate/config.pbtxt repeats MAX_DDPM_SAMPLES as its `max_num_samples` parameter (what
model.py reads); tests/serving/test_limits.py keeps the two equal.
"""
from __future__ import annotations

MAX_GAN_SAMPLES = 1024  # num_samples upper bound for the GAN generators
MAX_DDPM_SAMPLES = 64  # num_samples upper bound for ddpm: a whole sampling loop per request (seconds per sample on CPU)
MAX_DENOISE_IMAGES = 64  # images per Denoise request
DIGITS = 10  # class-conditional models draw digit 0..DIGITS-1; the UNet's null class (any digit) is DIGITS
MAX_GUIDANCE = 10.0  # classifier-free guidance scale upper bound (0 = unconditional, 1 = conditional, no guidance)
# guidance used when a ddpm-cond request gives none: chosen by the guidance sweep (python -m training.report_cond,
# reports/ddpm-cond/guidance_sweep.json `recommended_guidance`; tests/training keep the two equal)
DEFAULT_GUIDANCE = 2.0
# DDPM samplers, all one UNet evaluation per step: ancestral DDPM, deterministic DDIM (eta 0), DPM-Solver++ (2M, ODE)
# and its stochastic variant SDE-DPM-Solver++ (2M SDE; per-item noise like ddpm: at 20 steps it sits nearest DDPM-100
# in FID, reports/ddpm/sampler_study.md)
SAMPLERS = ("ddpm", "ddim", "dpm-solver++", "sde-dpm-solver++")
DEFAULT_SAMPLER = "dpm-solver++"  # what Denoise and ddpm-cond run when a request names none (serving.validation)
DEFAULT_SAMPLER_STEPS = 20  # ... and its steps when a ddpm request gives steps=0 (DEFAULT_GENERATE_STEPS)
# what unconditional `ddpm` Generate runs when a request names none: at the same 20 UNet calls its FID is about half
# dpm-solver++'s (reports/quality/goals.md); Denoise keeps the deterministic dpm-solver++ (higher PSNR: the SDE adds
# fresh noise every step, reports/ddpm/report.md) and ddpm-cond the sampler its guidance sweep was measured with
DEFAULT_GENERATE_SAMPLER = "sde-dpm-solver++"
MAX_STEPS = 1000  # the DDPM's training timesteps: more sampling steps than this make no sense
