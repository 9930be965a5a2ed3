"""Seeded latent noise shared by training, evaluation, Triton and the gateway (numpy only, no torch import)."""
from __future__ import annotations

import numpy as np


def sample_latent(n: int, latent_dim: int, seed: int | None = None) -> np.ndarray:
    """z ~ N(0, I) as float32 (n, latent_dim); the same seed gives the same z in every process."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, latent_dim), dtype=np.float32)
