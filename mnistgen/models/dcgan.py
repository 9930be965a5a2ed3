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


# -- serving graph -----------------------------------------------------------------------------------------------------

# ConvTranspose2d(kernel 4, stride 2, padding 1) as a 3x3 convolution + pixel shuffle: output pixel (2m + a, 2n + b)
# takes input rows m - 1 + dh for the kernel rows _SUBPIXEL_TAPS[a][dh] (dh = 0, 1, 2; two of three used per phase)
_SUBPIXEL_TAPS = {0: {0: 3, 1: 1}, 1: {1: 2, 2: 0}}


def _fold_batchnorm(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d | None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """ConvTranspose2d weight (C_in, C_out, k, k) and bias with an eval-mode BatchNorm2d after it folded in."""
    w = weight.detach().clone()
    b = torch.zeros(w.shape[1]) if bias is None else bias.detach().clone()
    if bn is not None:
        scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)  # (C_out,)
        w = w * scale.view(1, -1, 1, 1)
        b = (b - bn.running_mean) * scale + bn.bias.detach()
    return w, b


def subpixel_conv(weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    """ConvTranspose2d(C_in, C_out, 4, stride 2, padding 1) weights -> Conv2d(C_in, 4 C_out, 3, padding 1) whose
    output, through pixel_shuffle(2), equals the transposed convolution's (each output channel c holds phases
    c*4 + 2a + b, pixel_shuffle's order)."""
    c_in, c_out = weight.shape[:2]
    kernel = torch.zeros(c_out, 2, 2, c_in, 3, 3)
    for a, rows in _SUBPIXEL_TAPS.items():
        for b, cols in _SUBPIXEL_TAPS.items():
            for dh, kh in rows.items():
                for dw, kw in cols.items():
                    kernel[:, a, b, :, dh, dw] = weight[:, :, kh, kw].t()
    conv = nn.Conv2d(c_in, 4 * c_out, 3, 1, 1)
    conv.weight.data = kernel.reshape(4 * c_out, c_in, 3, 3)
    conv.bias.data = bias.repeat_interleave(4)
    return conv.requires_grad_(False)


class DCGANServing(nn.Module):
    """What Triton runs for a DCGANGenerator (training.export): the same function rewritten for inference speed
    (docs/training.md): z's projection as one matrix product, BatchNorm folded in everywhere, the hidden transposed
    convolutions kept (oneDNN's is the fastest measured) and the 1-channel output layer as a 3x3 convolution into 4
    phase channels + pixel_shuffle(2). Outputs equal the generator's to float rounding (training.export checks 1e-4).
    """

    def __init__(self, gen: DCGANGenerator):
        super().__init__()
        gen = gen.eval()
        layers = list(gen.net)
        convs = [i for i, m in enumerate(layers) if isinstance(m, nn.ConvTranspose2d)]

        def bn_after(i: int) -> nn.BatchNorm2d | None:
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            return nxt if isinstance(nxt, nn.BatchNorm2d) else None

        first, last = layers[convs[0]], layers[convs[-1]]
        if (first.stride, first.padding) != ((1, 1), (0, 0)):  # on a 1x1 input: out[c, i, j] = sum_z z * w[z, c, i, j]
            raise ValueError(f"projection layer {first} is not the stride-1, padding-0 one this rewrite handles")
        w, b = _fold_batchnorm(first.weight, first.bias, bn_after(convs[0]))
        self.proj_channels, self.proj_size = w.shape[1], w.shape[2]
        self.proj_weight = nn.Parameter(w.reshape(w.shape[0], -1), requires_grad=False)  # (latent, C*k*k)
        self.proj_bias = nn.Parameter(b.repeat_interleave(w.shape[2] * w.shape[3]), requires_grad=False)
        hidden = []
        for i in convs[1:-1]:
            conv = layers[i]
            w, b = _fold_batchnorm(conv.weight, conv.bias, bn_after(i))
            folded = nn.ConvTranspose2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                        conv.padding)
            folded.weight.data, folded.bias.data = w, b
            hidden += [folded.requires_grad_(False), nn.ReLU()]
        self.hidden = nn.Sequential(*hidden)
        if (last.kernel_size, last.stride, last.padding) != ((4, 4), (2, 2), (1, 1)):
            raise ValueError(f"output layer {last} is not the kernel-4 stride-2 upsampling this rewrite handles")
        self.out = subpixel_conv(*_fold_batchnorm(last.weight, last.bias, bn_after(convs[-1])))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = torch.relu(torch.addmm(self.proj_bias, z, self.proj_weight))  # (B, C*k*k)
        x = self.hidden(x.view(z.shape[0], self.proj_channels, self.proj_size, self.proj_size))
        return torch.tanh(nn.functional.pixel_shuffle(self.out(x), 2))  # (B, 1, 28, 28)


def serving_module(gen: nn.Module) -> nn.Module:
    """The module to export for serving: DCGANServing for a DCGANGenerator, any other generator as it is."""
    return DCGANServing(gen).eval() if isinstance(gen, DCGANGenerator) else gen
