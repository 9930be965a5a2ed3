"""Exponential moving average of a module's weights, shared by the DDPM and GAN trainers."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """ema = d * ema + (1 - d) * param after every update; buffers (BatchNorm statistics) are copied from the model.

    warmup: d = min(decay, (1 + n) / (10 + n)) for the n-th update, so early averages do not hold on to the random
    initialisation (the DDPM trainer); without it d = decay from the first update (the GAN trainer's --g-ema, which
    also starts averages from trained weights when resuming).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)
