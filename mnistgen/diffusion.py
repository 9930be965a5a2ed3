"""DDPM library: the UNet, diffusers schedulers, and one sampling loop for generation and denoising at sigma.

Samplers, the denoise definition and per-item seeds: docs/training.md "Training the DDPM denoiser". The loop is
written once over `eps_fn(x (B, 1, 28, 28) float32, t (B,) int64) -> eps (B, 1, 28, 28)`, so the same code drives an
eager PyTorch UNet and (inside Triton) an ONNX Runtime session; every update rule is a diffusers scheduler's own.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel
from torch import nn

from .catalog import GENERATORS, MAX_STEPS, SAMPLERS  # noqa: F401  (re-exported; MAX_STEPS = num_train_timesteps)
from .checkpoint import CHECKPOINT_DIR, load_module
from .schedule import DEFAULT_SCHEDULER, noise_to_signal, sigma_to_timestep  # noqa: F401  (re-exported)

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StopFn = Callable[[], bool]


class SamplingStopped(Exception):
    """should_stop() returned True: the loop stopped before UNet evaluation `step` (0-based) of `steps`."""

    def __init__(self, step: int, steps: int):
        super().__init__(f"sampling stopped before UNet evaluation {step + 1} of {steps}")
        self.step, self.steps = step, steps


@dataclass
class UNetConfig:
    sample_size: int = 28  # 28 -> 14 -> 7: two downsamples divide 28, no padding needed
    in_channels: int = 1
    out_channels: int = 1
    block_out_channels: tuple[int, ...] = (32, 64, 64)  # one entry per resolution level
    layers_per_block: int = 1  # ResNet blocks per level (the up path has one more)
    attention: tuple[bool, ...] = (False, False, True)  # self-attention per level (7x7 only by default)
    norm_num_groups: int = 8  # GroupNorm groups; must divide every channel count
    attention_head_dim: int = 32  # channels per attention head
    num_class_embeds: int = 0  # 0: unconditional; 11: class-conditional (digits 0-9 plus the null class 10)

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        self.attention = tuple(bool(a) for a in self.attention)
        if len(self.attention) != len(self.block_out_channels):
            raise ValueError(
                f"attention has {len(self.attention)} entries but block_out_channels has "
                f"{len(self.block_out_channels)}: give one bool per level"
            )
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every block_out_channels, not {bad}")

    def to_dict(self) -> dict:
        return asdict(self)


def build_unet(cfg: UNetConfig | None = None) -> UNet2DModel:
    """A diffusers UNet2DModel for (B, 1, 28, 28) epsilon prediction."""
    cfg = cfg or UNetConfig()
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention))
    return UNet2DModel(
        sample_size=cfg.sample_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=cfg.norm_num_groups,
        attention_head_dim=cfg.attention_head_dim,
        num_class_embeds=cfg.num_class_embeds or None,  # nn.Embedding added to the timestep embedding
    )


def null_class(unet_or_config) -> int | None:
    """The label that means "no digit" (classifier-free guidance's unconditional pass), None if unconditional."""
    n = (unet_or_config.num_class_embeds if isinstance(unet_or_config, UNetConfig)
         else getattr(getattr(unet_or_config, "config", None), "num_class_embeds", None))
    return int(n) - 1 if n else None


def guided_eps_fn(model_or_fn, labels: torch.Tensor, guidance: float | torch.Tensor, null: int) -> EpsFn:
    """Classifier-free guidance as an eps_fn(x, t): eps_null + w * (eps_label - eps_null) (Ho & Salimans 2022).

    `model_or_fn`: a class-conditional UNet2DModel, or a callable eps(x, t, labels) (an ONNX/TorchScript engine).
    `labels` (B,) int64, `null` where no digit was asked for (that item gets eps_null: unconditional sampling);
    `guidance` w, a float or one per item (B,). The labelled and null passes run as one batch of 2B, not two calls;
    items that need no second pass (w == 1, or the null label) are not doubled.
    """
    call = as_eps_fn(model_or_fn)
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)  # (B,)
    w = torch.as_tensor(guidance, dtype=torch.float32).reshape(-1).expand(labels.shape[0]).clone()  # (B,)
    w[labels == null] = 1.0  # eps_label == eps_null there: one pass gives the answer
    guided = torch.nonzero(w != 1.0).reshape(-1)  # (G,) items that also need the null pass
    w4 = w[guided].reshape(-1, 1, 1, 1)  # (G, 1, 1, 1)
    nulls = torch.full((guided.numel(),), null, dtype=torch.int64)

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if guided.numel() == 0:
            return call(x, t, labels)
        out = call(torch.cat([x, x[guided]]), torch.cat([t, t[guided]]), torch.cat([labels, nulls]))  # (B + G, ...)
        eps, eps_null = out[:x.shape[0]].clone(), out[x.shape[0]:]
        eps[guided] = eps_null + w4 * (eps[guided] - eps_null)
        return eps

    return eps_fn


def load_unet(path: str | Path | None = None) -> tuple[UNet2DModel, dict]:
    """Rebuild the EMA UNet (eval mode, CPU) from a checkpoint (default checkpoints/ddpm.safetensors)."""
    path = Path(path) if path is not None else CHECKPOINT_DIR / GENERATORS["ddpm"].checkpoint
    tensors, config = load_module(path, "ema", "ddpm")
    unet = build_unet(UNetConfig(**config["unet"]))
    unet.load_state_dict(tensors)
    return unet.eval(), config


def make_scheduler(name: str, train_config: dict | None = None):
    """A fresh diffusers scheduler for sampler `name` over the training noise schedule `train_config`."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {name!r}")
    cfg = dict(train_config or DEFAULT_SCHEDULER)
    common = {k: cfg[k] for k in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")}
    if name == "ddpm":
        return DDPMScheduler(**common, clip_sample=cfg.get("clip_sample", True))
    if name == "ddim":
        # eta = 0 (deterministic); set_alpha_to_one: the last update lands on abar = 1, i.e. on x0
        return DDIMScheduler(**common, clip_sample=cfg.get("clip_sample", True), set_alpha_to_one=True)
    algorithm = "sde-dpmsolver++" if name == "sde-dpm-solver++" else "dpmsolver++"
    return DPMSolverMultistepScheduler(**common, algorithm_type=algorithm, solver_order=2, final_sigmas_type="zero")


def _ddim_gaps(num_train_timesteps: int) -> dict[int, int]:
    """DDIMScheduler.step moves from t to t - T // num_inference_steps: gap -> a num_inference_steps giving it."""
    return {num_train_timesteps // n: n for n in range(num_train_timesteps, 0, -1)}


def inference_timesteps(t_start: int, steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """`min(steps, t_start + 1)` descending timesteps spread evenly over [0, t_start], starting at t_start.

    Evaluations sit at ~t_start * (steps - i) / steps ("trailing" spacing); after the last one the sampler makes a
    final update to x0. Every gap is one that DDIMScheduler can take (T // n for some n), so all three samplers run
    the same grid.
    """
    if not 0 <= t_start < num_train_timesteps:
        raise ValueError(f"t_start must be in [0, {num_train_timesteps - 1}], got {t_start}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    steps = min(int(steps), t_start + 1)
    allowed = sorted(_ddim_gaps(num_train_timesteps))
    ts, t = [t_start], t_start
    for remaining in range(steps, 1, -1):  # evaluations left, the current one included
        max_gap = t - (remaining - 2)  # leave room for remaining - 1 distinct timesteps >= 0
        target = t / remaining
        gap = min((k for k in allowed if k <= max_gap), key=lambda k: (abs(k - target), k))
        t -= gap
        ts.append(t)
    return ts


def _set_timesteps(scheduler, timesteps: Sequence[int]) -> None:
    if isinstance(scheduler, DDIMScheduler):
        scheduler.set_timesteps(len(timesteps))  # then replaced by our grid; gaps are set per step in sample_loop
        scheduler.timesteps = torch.tensor(list(timesteps), dtype=torch.int64)
    else:  # DDPMScheduler and DPMSolverMultistepScheduler accept custom descending timesteps
        scheduler.set_timesteps(timesteps=list(timesteps))


def sample_loop(
    eps_fn: EpsFn,
    x_t: torch.Tensor,
    scheduler,
    timesteps: Sequence[int],
    generator: torch.Generator | list[torch.Generator] | None = None,
    should_stop: StopFn | None = None,
) -> torch.Tensor:
    """Run the reverse process from x_t at timesteps[0] down to x0: `eps_fn(x, t)` then `scheduler.step(...)`.

    `scheduler` must be fresh (DPM-Solver++ keeps multistep state). `generator`: one per batch item for
    batch-independent DDPM noise. `should_stop()`: asked before every UNet evaluation; True raises SamplingStopped.
    Returns x0 (B, 1, 28, 28), not clamped.
    """
    timesteps = [int(t) for t in timesteps]
    _set_timesteps(scheduler, timesteps)
    ddim_gaps = _ddim_gaps(scheduler.config.num_train_timesteps) if isinstance(scheduler, DDIMScheduler) else None
    x = x_t  # (B, 1, 28, 28)
    for i, t in enumerate(timesteps):
        if should_stop is not None and should_stop():
            raise SamplingStopped(i, len(timesteps))
        t_batch = torch.full((x.shape[0],), t, dtype=torch.int64)  # (B,)
        eps = eps_fn(x, t_batch)  # (B, 1, 28, 28)
        if ddim_gaps is not None:  # DDIM derives the previous timestep from num_inference_steps
            nxt = timesteps[i + 1] if i + 1 < len(timesteps) else t - scheduler.config.num_train_timesteps
            scheduler.num_inference_steps = ddim_gaps[t - nxt] if nxt >= 0 else 1
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
    return x


def as_eps_fn(model_or_eps_fn: nn.Module | EpsFn) -> EpsFn:
    """Wrap a UNet2DModel (or any module returning `.sample`) as eps_fn(x, t[, labels]); pass callables through."""
    if isinstance(model_or_eps_fn, nn.Module):
        model = model_or_eps_fn.eval()

        @torch.inference_mode()
        def eps_fn(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
            out = model(x, t) if labels is None else model(x, t, class_labels=labels)
            return out.sample if hasattr(out, "sample") else out

        return eps_fn
    if not callable(model_or_eps_fn):
        raise TypeError(f"expected a torch module or an eps_fn(x, t) callable, got {type(model_or_eps_fn).__name__}")
    return model_or_eps_fn


def item_generators(seed: int, n: int, seeds: Sequence[int] | None = None) -> list[torch.Generator]:
    """One CPU generator per item, seeded with seeds[i] (several requests batched together) or seed + i, so an
    item's result does not depend on the batch it is computed in."""
    seeds = [int(seed) + i for i in range(n)] if seeds is None else [int(s) for s in seeds]
    if len(seeds) != n:
        raise ValueError(f"seeds must hold one seed per item ({n}), got {len(seeds)}")
    return [torch.Generator().manual_seed(s) for s in seeds]


def _check(sampler: str, steps: int) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if not (isinstance(steps, (int, np.integer)) and 1 <= steps <= MAX_STEPS):
        raise ValueError(f"steps must be an integer in [1, {MAX_STEPS}], got {steps!r}")


def generate(
    model_or_eps_fn: nn.Module | EpsFn,
    n: int,
    sampler: str = "ddpm",
    steps: int = 100,
    seed: int = 0,
    batch_size: int = 256,
    scheduler_config: dict | None = None,
    seeds: Sequence[int] | None = None,
    should_stop: StopFn | None = None,
    labels: Sequence[int] | None = None,
    guidance: float | Sequence[float] = 1.0,
    null: int | None = None,
) -> torch.Tensor:
    """n samples (n, 1, 28, 28) in [-1, 1]; item i is seeded with seed + i (or seeds[i] when given).

    Class-conditional models: `labels` (one per item; `null` = any digit) and classifier-free `guidance` (a float or
    one per item); `model_or_eps_fn` is then the UNet or an eps(x, t, labels) callable, and `null` defaults to the
    module's null class.
    """
    _check(sampler, steps)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if labels is not None:
        null = null_class(model_or_eps_fn) if null is None else null
        if null is None:
            raise ValueError("labels given but the model is not class-conditional (num_class_embeds = 0)")
        labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        w = torch.as_tensor(guidance, dtype=torch.float32).reshape(-1).expand(n)
        if labels.shape[0] != n or bool(((labels < 0) | (labels > null)).any()):
            raise ValueError(f"labels must hold {n} values in [0, {null}], got {labels.tolist()[:16]}")
    else:
        eps_fn = as_eps_fn(model_or_eps_fn)
    cfg = dict(scheduler_config or DEFAULT_SCHEDULER)
    all_gens = item_generators(seed, n, seeds)
    t_max = cfg["num_train_timesteps"] - 1
    timesteps = inference_timesteps(t_max, steps, cfg["num_train_timesteps"])
    out = []
    for start in range(0, n, batch_size):
        gens = all_gens[start:start + batch_size]
        x_t = torch.cat([torch.randn((1, 1, 28, 28), generator=g) for g in gens])  # (B, 1, 28, 28) ~ N(0, I)
        if labels is not None:
            part = slice(start, start + len(gens))
            eps_fn = guided_eps_fn(model_or_eps_fn, labels[part], w[part], null)
        x0 = sample_loop(eps_fn, x_t, make_scheduler(sampler, cfg), timesteps, gens, should_stop)
        out.append(x0.clamp(-1, 1))
    return torch.cat(out)  # (n, 1, 28, 28)


def denoise(
    model_or_eps_fn: nn.Module | EpsFn,
    x0: torch.Tensor,
    sigma: float,
    sampler: str = "ddpm",
    steps: int = 100,
    seed: int = 0,
    scheduler_config: dict | None = None,
    seeds: Sequence[int] | None = None,
    should_stop: StopFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy y = x0 + sigma * n, denoised) for clean images x0 (B, 1, 28, 28) in [-1, 1]; see the module doc.

    Item i is seeded with seed + i (or seeds[i] when given); one sigma, sampler and steps for the whole batch.
    `steps` evaluations run over [0, t*] (capped at t* + 1), not over the full training range; sigma = 0 returns x0.
    """
    _check(sampler, steps)
    if x0.ndim != 4 or tuple(x0.shape[1:]) != (1, 28, 28):
        raise ValueError(f"x0 must have shape (B, 1, 28, 28), got {tuple(x0.shape)}")
    cfg = dict(scheduler_config or DEFAULT_SCHEDULER)
    gens = item_generators(seed, x0.shape[0], seeds)
    sched = make_scheduler(sampler, cfg)
    alphas_cumprod = sched.alphas_cumprod
    sigma_max = float(noise_to_signal(alphas_cumprod)[-1])
    if not (isinstance(sigma, (int, float, np.floating)) and 0 <= float(sigma) <= sigma_max):
        raise ValueError(f"sigma must be a number in [0, {sigma_max:.1f}], got {sigma!r}")
    x0 = x0.float()
    if float(sigma) == 0.0:
        return x0.clone(), x0.clone()
    n = torch.cat([torch.randn((1, 1, 28, 28), generator=g) for g in gens])  # (B, 1, 28, 28)
    noisy = x0 + float(sigma) * n  # y, the research's forward process
    # x_t / sqrt(abar_t) = x0 + sqrt((1 - abar_t) / abar_t) * eps: t* = argmin_t |sqrt((1 - abar_t) / abar_t) - sigma|
    t_star = sigma_to_timestep(float(sigma), alphas_cumprod)
    x_t = math.sqrt(float(alphas_cumprod[t_star])) * noisy  # x_t* = sqrt(abar_t*) * y
    timesteps = inference_timesteps(t_star, steps, cfg["num_train_timesteps"])
    denoised = sample_loop(as_eps_fn(model_or_eps_fn), x_t, sched, timesteps, gens, should_stop)
    return noisy, denoised.clamp(-1, 1)
