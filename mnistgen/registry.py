"""Names of the committed models and how to load a generator from a name or a checkpoint path."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import latent
from .checkpoint import CHECKPOINT_DIR, load_module
from .models import GANArch, build_generator

# Committed GAN generators: service name -> checkpoint file under checkpoints/.
GAN_MODELS = {
    "dcgan-baseline": "dcgan-baseline.safetensors",
    "dcgan-modified": "dcgan-modified.safetensors",
    "mlp": "mlp.safetensors",
}
DDPM_CHECKPOINT = "ddpm.safetensors"
DDPM_COND_CHECKPOINT = "ddpm-cond.safetensors"  # class-conditional DDPM (digits 0-9 + null class)
CLASSIFIER_CHECKPOINT = "classifier.safetensors"


def resolve(name_or_path: str | Path, table: dict[str, str] = GAN_MODELS) -> Path:
    """A committed model's name, or a path to a checkpoint file."""
    if str(name_or_path) in table:
        return CHECKPOINT_DIR / table[str(name_or_path)]
    path = Path(name_or_path)
    if path.suffix == ".safetensors" or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        return path
    raise ValueError(f"unknown model {str(name_or_path)!r}: expected one of {sorted(table)} or a .safetensors path")


def load_generator(name_or_path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild a GAN generator (eval mode, CPU) and return it with its checkpoint config."""
    path = resolve(name_or_path)
    tensors, config = load_module(path, "generator", "gan")
    gen = build_generator(GANArch(**config["arch"]))
    gen.load_state_dict(tensors)
    return gen.eval(), config


def latent_tensor(n: int, latent_dim: int, seed: int | None = None) -> torch.Tensor:
    """mnistgen.latent.sample_latent as a torch tensor: (n, latent_dim) float32, the same values."""
    return torch.from_numpy(latent.sample_latent(n, latent_dim, seed))
