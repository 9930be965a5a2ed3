"""Train the DDPM denoiser (diffusers UNet2DModel, epsilon prediction, EMA) on MNIST -> checkpoints/ddpm.safetensors."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from torch import nn
from torch.utils.data import TensorDataset

from mnistgen.checkpoint import save_checkpoint
from mnistgen.files import repo_path
from mnistgen.cli import add_dataclass_args, dataclass_from_args
from . import distributed
from .data import DataConfig, load_mnist
from .ema import EMA
from .plots import plot_losses, save_grid
from mnistgen.diffusion import DEFAULT_SCHEDULER, SAMPLERS, UNetConfig, build_unet, generate, null_class


@dataclass
class TrainConfig:
    epochs: int = 40  # passes over the training split; time_budget_min usually stops it first
    batch_size: int = 32  # small batches: more updates per CPU-second on 2 shared cores
    lr: float = 1e-3  # AdamW peak learning rate
    warmup_steps: int = 100  # linear warm-up, then cosine decay to lr_min_ratio * lr at the last planned step
    lr_min_ratio: float = 1.0  # 1.0 = constant after warm-up (Ho et al.), so a time-budget stop loses nothing
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm
    ema_decay: float = 0.995  # EMA of the weights (with warm-up min(decay, (1 + n) / (10 + n)))
    seed: int = 0
    threads: int = 1  # torch.set_num_threads: the CPU is shared, and 2 threads on a contended core ran 3-50x slower
    limit: int = 0  # >0: train on the first N images only (tests, quick runs)
    data_source: str = "full"  # one of training.data.SOURCES: full = the 60,000 training images
    max_steps: int = 0  # >0: iteration budget, stop after this many optimiser steps (CPU runs)
    stop_at: int = 0  # >0: stop here, the lr plan still running to max_steps (a recipe stage cut short)
    device: str = "cpu"  # one of training.distributed.DEVICES (torchrun: cuda:<local rank>, nccl; cpu: gloo)
    run_dir: str = "runs/ddpm"  # loss.csv, loss.png, samples/epoch_XXX.png, state.pt
    checkpoint: str = "checkpoints/ddpm.safetensors"  # EMA UNet + config, rewritten after every epoch
    sample_sampler: str = "ddim"  # fast sampler for the per-epoch 8x8 grid, one of SAMPLERS
    sample_steps: int = 20
    sample_every: int = 1  # epochs between sample grids (0: never)
    label_dropout: float = 0.1  # class-conditional UNets (unet.num_class_embeds > 0): P(label -> null class), CFG
    sample_guidance: float = 3.0  # class-conditional UNets: guidance scale of the per-epoch grid (row = digit)
    time_budget_min: float = 50.0  # >0: stop after the epoch that crosses this many minutes (resumes included)
    unet: UNetConfig = field(default_factory=lambda: UNetConfig(block_out_channels=(16, 32, 64)))

    def __post_init__(self) -> None:
        if self.sample_sampler not in SAMPLERS:
            raise ValueError(f"sample_sampler must be one of {SAMPLERS}, got {self.sample_sampler!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if self.unet.num_class_embeds not in (0, 11):
            raise ValueError(f"unet.num_class_embeds must be 0 (unconditional) or 11 (10 digits + null), "
                             f"got {self.unet.num_class_embeds}")


def train_step(unet: nn.Module, x0: torch.Tensor, noise_sched: DDPMScheduler, opt: torch.optim.Optimizer,
               grad_clip: float = 1.0, labels: torch.Tensor | None = None) -> float:
    """One epsilon-prediction step: x_t = add_noise(x0, eps, t), loss = MSE(unet(x_t, t), eps) (Ho et al. eq. 14);
    `labels` (B,): a class-conditional UNet's digits (already dropped to the null class where CFG wants it)."""
    unet.train()
    b = x0.shape[0]
    t = torch.randint(0, noise_sched.config.num_train_timesteps, (b,), dtype=torch.int64).to(x0.device)  # (B,)
    eps = torch.randn_like(x0)  # (B, 1, 28, 28)
    x_t = noise_sched.add_noise(x0, eps, t)  # (B, 1, 28, 28)
    pred = unet(x_t, t).sample if labels is None else unet(x_t, t, class_labels=labels).sample
    loss = nn.functional.mse_loss(pred, eps)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(unet.parameters(), grad_clip)
    opt.step()
    return float(loss.detach())


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


class DDPMTrainer(distributed.Trainer):
    """The UNet, its EMA, the optimizer and one step; writes loss.csv, loss.png, grids and the checkpoint per epoch."""

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg, repo_path(cfg.run_dir))
        data = TensorDataset(*load_mnist("train", DataConfig(source=cfg.data_source, limit=cfg.limit or None)))
        self.loader = self.make_loader(data, drop_last=False)  # (one process: the last, smaller batch is trained too)
        self.null = null_class(cfg.unet)  # None: unconditional
        self.unet = build_unet(cfg.unet).to(self.device)
        self.unet_train = self.dist.wrap(self.unet)  # DistributedDataParallel under torchrun
        self.ema = EMA(self.unet, cfg.ema_decay)
        self.noise_sched = DDPMScheduler(**DEFAULT_SCHEDULER)
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.losses: list[float] = []  # this epoch's
        self.seed_ranks()

    def train_batch(self, batch: list[torch.Tensor]) -> dict[str, float]:
        planned = self.cfg.epochs * len(self.loader)  # where the lr schedule ends: these steps, or max_steps if fewer
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, min(planned, self.cfg.max_steps or planned), self.cfg)
        x0, labels = batch  # (B / world_size, 1, 28, 28) in [-1, 1], (B / world_size,) digits 0-9
        if self.null is not None:  # classifier-free guidance: some labels become "no digit"
            labels[torch.rand(labels.shape[0]) < self.cfg.label_dropout] = self.null
        labels = labels.to(self.device) if self.null is not None else None
        self.losses.append(train_step(self.unet_train, x0.to(self.device), self.noise_sched, self.opt,
                                      self.cfg.grad_clip, labels))
        self.ema.update(self.unet)
        return {"loss": sum(self.losses[-50:]) / len(self.losses[-50:])}

    def end_epoch(self) -> str:
        loss = self.dist.all_mean({"loss": sum(self.losses) / len(self.losses)})["loss"]  # over every rank's shard
        self.losses = []
        row = self.log(epoch=self.epoch, step=self.step, loss=loss, lr=self.opt.param_groups[0]["lr"],
                       elapsed_s=round(self.elapsed, 1))
        if self.is_main:
            if self.cfg.sample_every and self.epoch % self.cfg.sample_every == 0:
                self._sample_grid()
            plot_losses({"DDPM training loss": (self.history["epoch"], {"train MSE (eps)": self.history["loss"]})},
                        self.run_dir / "loss.png", xlabel="epoch", smooth=5)
            self.save_checkpoint()
        return json.dumps(row)

    def over_time_budget(self) -> bool:  # (resumes included; time_budget_min 0: no budget)
        return bool(self.cfg.time_budget_min) and self.elapsed > self.cfg.time_budget_min * 60

    def stop_early(self) -> bool:
        if not self.over_time_budget() or self.epoch >= self.cfg.epochs:
            return False
        if self.is_main:
            print(f"time budget {self.cfg.time_budget_min} min reached after epoch {self.epoch}; stopping", flush=True)
        return True

    def summary(self) -> dict:
        return {**super().summary(), "final_loss": self.history["loss"][-1] if self.history else float("nan"),
                "params": sum(p.numel() for p in self.unet.parameters())}

    def finish(self) -> dict:
        return {**super().finish(), "checkpoint": str(repo_path(self.cfg.checkpoint))}

    def replicas(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "ema": self.ema.model}

    def state_objects(self) -> dict:
        return {"unet": self.unet, "ema": self.ema, "opt": self.opt}

    def save_checkpoint(self) -> Path:
        config = {
            "kind": "ddpm", "unet": self.cfg.unet.to_dict(), "scheduler": dict(DEFAULT_SCHEDULER), "conditional":
                None if self.null is None else {"null_class": self.null, "label_dropout": self.cfg.label_dropout},
            "train": {k: v for k, v in dataclasses.asdict(self.cfg).items() if k != "unet"}, "summary": self.summary(),
        }
        return save_checkpoint(repo_path(self.cfg.checkpoint), {"ema": self.ema.model.state_dict()}, config)

    def _sample_grid(self) -> None:
        model = self.ema.model if self.device.type == "cpu" else copy.deepcopy(self.ema.model).cpu()
        cond = {} if self.null is None else {"labels": [i // 8 % 10 for i in range(64)],  # row r: digit r
                                              "guidance": self.cfg.sample_guidance}
        imgs = generate(model, 64, self.cfg.sample_sampler, self.cfg.sample_steps, seed=0, **cond)  # (64, 1, 28, 28)
        save_grid(imgs, self.run_dir / "samples" / f"epoch_{self.epoch:03d}.png")

    def train(self) -> dict:
        cfg = self.cfg
        if self.is_main:
            print(f"DDPM: {sum(p.numel() for p in self.unet.parameters()) / 1e6:.2f} M params, "
                  f"{len(self.loader.dataset)} images, {len(self.loader)} steps/epoch ({self.dist.world_size} "
                  f"process(es), global batch {cfg.batch_size}), epochs {self.epoch + 1}..{cfg.epochs}"
                  + (f", at most {cfg.max_steps} steps" if cfg.max_steps else ""), flush=True)
        return super().train()


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, bool]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--resume", action="store_true", help="continue from run_dir/state.pt")
    base = TrainConfig()
    add_dataclass_args(p, TrainConfig, base)  # every field but the nested unet
    add_dataclass_args(p.add_argument_group("UNet (unet.<field>; tuples as comma lists)"), UNetConfig, base.unet,
                       prefix="unet_")
    a = p.parse_args(argv)
    unet = dataclass_from_args(UNetConfig, a, prefix="unet_", base=base.unet)
    return dataclass_from_args(TrainConfig, a, base=base, unet=unet), a.resume


def main(argv: list[str] | None = None) -> None:
    cfg, resume = parse_args(argv)
    trainer = DDPMTrainer(cfg)
    if resume and trainer.load_state() and trainer.is_main:
        print(f"resumed at epoch {trainer.epoch} (step {trainer.step})", flush=True)
        if trainer.over_time_budget():
            print(f"note: this run has trained {trainer.elapsed / 60:.0f} min already, past --time-budget-min "
                  f"{cfg.time_budget_min:g} (the run's total, resumes included): it stops after one more epoch; "
                  f"raise --time-budget-min to train longer", flush=True)
    summary = trainer.train()
    if trainer.is_main:
        print(json.dumps(summary, indent=2), flush=True)


if __name__ == "__main__":
    main()
