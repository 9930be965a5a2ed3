"""The fully connected "vanilla" GAN: three linear layers on each side, z of 100."""
from __future__ import annotations

import torch
from torch import nn


class MLPGenerator(nn.Module):
    """z (B, latent) -> image (B, 1, 28, 28) in [-1, 1]."""

    def __init__(self, latent_dim: int = 100):
        super().__init__()
        self.latent_dim = latent_dim
        self.net = nn.Sequential(
            nn.Linear(latent_dim, 256), nn.LeakyReLU(0.2, True),
            nn.Linear(256, 512), nn.LeakyReLU(0.2, True),
            nn.Linear(512, 784), nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(z.shape[0], -1)).view(-1, 1, 28, 28)  # (B, 1, 28, 28)


class MLPDiscriminator(nn.Module):
    """image (B, 1, 28, 28) -> logit (B,)."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 512), nn.LeakyReLU(0.2, True), nn.Dropout(dropout),
            nn.Linear(512, 256), nn.LeakyReLU(0.2, True), nn.Dropout(dropout),
            nn.Linear(256, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()  # (B,)
