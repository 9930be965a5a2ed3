"""Generator and discriminator architectures, and a registry that rebuilds them from a saved config."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from .dcgan import DCGANDiscriminator, DCGANGenerator, weights_init
from .mlp import MLPDiscriminator, MLPGenerator

ARCHITECTURES = ("dcgan", "mlp")


@dataclass
class GANArch:
    arch: str = "dcgan"  # one of ARCHITECTURES
    latent_dim: int = 256  # size of z ~ N(0, I)
    depth: int = 3  # transposed-conv layers in G / strided-conv layers in D (dcgan only, >= 3)
    dropout: float = 0.0  # dropout after each D block (the research's "modified" uses 0.3)
    base_channels: int = 64  # width of the widest-but-one layer; widths double per layer towards z

    def to_dict(self) -> dict:
        return asdict(self)


def build_generator(a: GANArch) -> nn.Module:
    if a.arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {a.arch!r}")
    if a.arch == "mlp":
        return MLPGenerator(a.latent_dim)
    return DCGANGenerator(a.latent_dim, a.depth, a.base_channels)


def build_discriminator(a: GANArch, dropout: float | None = None) -> nn.Module:
    p = a.dropout if dropout is None else dropout
    if a.arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {a.arch!r}")
    if a.arch == "mlp":
        return MLPDiscriminator(p)
    return DCGANDiscriminator(a.depth, a.base_channels, p)


__all__ = [
    "ARCHITECTURES", "GANArch", "build_generator", "build_discriminator", "weights_init",
    "DCGANGenerator", "DCGANDiscriminator", "MLPGenerator", "MLPDiscriminator",
]
