"""Load a GAN generator from a catalog name (mnistgen.catalog) or a checkpoint path."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import catalog, latent
from .checkpoint import CHECKPOINT_DIR, load_module
from .models import GANArch, build_generator

CLASSIFIER_CHECKPOINT = "classifier.safetensors"  # the evaluation classifier (not served: no catalog entry)


def resolve(name_or_path: str | Path, table: dict[str, catalog.Model] = catalog.GANS) -> Path:
    """A catalog model's name (a GAN generator by default), or a path to a checkpoint file."""
    if str(name_or_path) in table:
        return CHECKPOINT_DIR / table[str(name_or_path)].checkpoint
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
