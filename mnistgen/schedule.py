"""The DDPM noise schedule and the sigma -> timestep map (numpy only: the gateway prices denoise requests with it)."""
from __future__ import annotations

import math

import numpy as np

# The training noise schedule (DDPMScheduler config); saved in the checkpoint under "scheduler".
DEFAULT_SCHEDULER: dict = {
    "num_train_timesteps": 1000,  # T
    "beta_schedule": "linear",  # Ho et al. 2020
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "prediction_type": "epsilon",  # the UNet predicts the added noise
    "clip_sample": True,  # clip predicted x0 to [-1, 1] (DDPM / DDIM)
}


def default_alphas_cumprod() -> np.ndarray:
    """abar_t of DEFAULT_SCHEDULER (linear betas), float32 (T,), computed as diffusers' DDPMScheduler does."""
    c = DEFAULT_SCHEDULER
    betas = np.linspace(c["beta_start"], c["beta_end"], c["num_train_timesteps"], dtype=np.float32)
    return np.cumprod(1.0 - betas, dtype=np.float32)


def noise_to_signal(alphas_cumprod) -> np.ndarray:
    """sqrt((1 - abar_t) / abar_t) for every t: the sigma of y = x0 + sigma * n that x_t corresponds to."""
    a = np.asarray(alphas_cumprod, dtype=np.float64)
    return np.sqrt((1.0 - a) / a)


def sigma_to_timestep(sigma: float, alphas_cumprod) -> int:
    """t* = argmin_t |sqrt((1 - abar_t) / abar_t) - sigma| (monotone in t; exact on the grid)."""
    if not (sigma >= 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
    ratio = noise_to_signal(alphas_cumprod)
    return int(np.argmin(np.abs(ratio - float(sigma))))
