"""DCGAN generator and discriminator for 1x28x28 images (Radford et al., 2016), depth-parameterised."""
from __future__ import annotations

import torch
from torch import nn


def weights_init(m: nn.Module) -> None:
    """DCGAN init: conv weights ~ N(0, 0.02), BatchNorm gamma ~ N(1, 0.02), beta = 0."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class DCGANGenerator(nn.Module):
    """z (B, latent) -> image (B, 1, 28, 28) in [-1, 1].

    Layer 0 projects z to 7x7; layers beyond 3 are stride-1 3x3 at 7x7; the last two upsample 7->14->28.
    Widths: base * 2**(depth-2-i) for hidden layer i, so depth 3 gives 128, 64 and depth 4 gives 256, 128, 64.
    """

    def __init__(self, latent_dim: int = 256, depth: int = 3, base_channels: int = 64):
        super().__init__()
        if depth < 3:
            raise ValueError(f"depth must be >= 3 for 28x28 output, got {depth}")
        self.latent_dim = latent_dim
        widths = [base_channels * 2 ** (depth - 2 - i) for i in range(depth - 1)] + [1]
        layers: list[nn.Module] = []
        c_in = latent_dim
        for i, c_out in enumerate(widths):
            if i == 0:
                conv = nn.ConvTranspose2d(c_in, c_out, 7, 1, 0, bias=False)  # 1x1 -> 7x7
            elif i < depth - 2:
                conv = nn.ConvTranspose2d(c_in, c_out, 3, 1, 1, bias=False)  # 7x7 -> 7x7
            else:
                conv = nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=(i == depth - 1))  # x2
            layers.append(conv)
            if i < depth - 1:
                layers += [nn.BatchNorm2d(c_out), nn.ReLU(True)]
            c_in = c_out
        layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(z.shape[0], self.latent_dim, 1, 1))  # (B, 1, 28, 28)


class DCGANDiscriminator(nn.Module):
    """image (B, 1, 28, 28) -> logit (B,). Strided convs 28->14->7->3, stride-1 3x3 beyond, adaptive pooling to 1x1."""

    def __init__(self, depth: int = 3, base_channels: int = 64, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for i in range(depth):
            c_out = base_channels * 2 ** i
            if i < 3:
                layers.append(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=(i == 0)))  # 28 -> 14 -> 7 -> 3
            else:
                # Deeper layers keep 3x3. Striding on to 1x1 would leave BatchNorm normalising each
                # all-real / all-fake batch over a single position per channel, which erases the
                # batch-level difference D must detect (its loss then sits at log 4 and nothing learns).
                layers.append(nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False))
            if i > 0:
                layers.append(nn.BatchNorm2d(c_out))  # no BN on the input layer (DCGAN)
            layers.append(nn.LeakyReLU(0.2, True))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            c_in = c_out
        layers += [nn.Conv2d(c_in, 1, 3, 1, 1), nn.AdaptiveAvgPool2d(1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()  # (B,) logits; BCE-with-logits is applied by the trainer
