"""Train a GAN configuration (the research's baseline/modified DCGAN, the MLP GAN, controlled failures)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from mnistgen.checkpoint import REPO_ROOT, save_checkpoint
from mnistgen.cli import add_dataclass_args, dataclass_from_args
from . import distributed
from .data import DataConfig, load_mnist
from .ema import EMA
from mnistgen.models import GANArch, build_discriminator, build_generator, weights_init
from .plots import plot_losses, save_grid

G_LOSSES = ("non-saturating", "saturating")
MITIGATIONS = {  # name -> the fields it sets
    "label-smoothing": {"real_label": 0.9},  # one-sided
    "non-saturating": {"g_loss": "non-saturating"},
    "k-steps": {"d_steps": 2},
    "instance-noise": {"instance_noise": 0.1},
    "d-dropout": {"d_dropout": 0.4},
}


@dataclass
class TrainConfig:
    name: str = "baseline"  # one of CONFIGS (a starting point; every field below can be overridden)
    arch: GANArch = field(default_factory=GANArch)
    epochs: int = 50  # the research trained 50 epochs
    batch_size: int = 96
    lr_g: float = 2e-4  # Adam, as in DCGAN
    lr_d: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    seed: int = 77
    g_loss: str = "non-saturating"  # one of G_LOSSES: -log D(G(z)) (Goodfellow's trick) or log(1 - D(G(z)))
    real_label: float = 1.0  # 0.9 = one-sided label smoothing
    d_steps: int = 1  # discriminator updates per generator update
    instance_noise: float = 0.0  # std of Gaussian noise added to D's inputs, annealed linearly to 0
    d_dropout: float | None = None  # overrides arch.dropout in D only (mitigation: 0.4)
    data_limit: int | None = None  # keep only the first N training images (d-overfit: 1,000)
    data_source: str = "full"  # one of training.data.SOURCES: full = the 60,000 training images
    data_dir: str | None = None
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    device: str = "auto"  # one of training.distributed.DEVICES: auto = cuda when available, else cpu
    max_iters: int | None = None  # iteration budget: stop after this many (CPU runs, tests, smoke runs)
    stop_at: int | None = None  # stop here, the lr plan still running to max_iters (a recipe stage cut short)
    log_every: int = 1  # write every n-th iteration's losses to CSV
    run_dir: str | None = None  # default runs/gan/<name>[+mitigations]
    checkpoint: str | None = None  # also write the generator here (e.g. checkpoints/dcgan-baseline.safetensors)
    g_ema: float = 0.0  # > 0: grids and the checkpoint use an EMA of G's weights (decay per G step, e.g. 0.999)
    lr_decay_from: int | None = None  # from here lr_g, lr_d fall linearly to lr_min_ratio x at the plan end; None: off
    lr_min_ratio: float = 0.0


CONFIGS: dict[str, TrainConfig] = {  # arch: GANArch's default, the research's baseline DCGAN, unless named
    "baseline": TrainConfig("baseline"),
    "modified": TrainConfig("modified", arch=GANArch("dcgan", 64, 4, 0.3)),
    "mlp": TrainConfig("mlp", arch=GANArch("mlp", 100, 3, 0.0)),
    # Controlled failures (from the GAN-training-challenges study): each breaks one balance on purpose.
    "vanishing-gradient": TrainConfig("vanishing-gradient", lr_d=2e-3, g_loss="saturating"),
    "mode-collapse": TrainConfig("mode-collapse", lr_g=2e-3),
    "d-overfit": TrainConfig("d-overfit", data_limit=1000),
}


def apply_mitigations(cfg: TrainConfig, names: list[str]) -> TrainConfig:
    """Switch on MITIGATIONS by name."""
    for n in names:
        if n not in MITIGATIONS:
            raise ValueError(f"unknown mitigation {n!r}: allowed {tuple(MITIGATIONS)} or 'all'")
    for n in names:
        cfg = dataclasses.replace(cfg, **MITIGATIONS[n])
    return cfg


def lr_scale(iteration: int, decay_from: int | None, total: int, min_ratio: float) -> float:
    """The learning-rate factor at `iteration`: 1 up to decay_from, then linear to min_ratio at `total`."""
    if decay_from is None or iteration <= decay_from:
        return 1.0
    frac = min(1.0, (iteration - decay_from) / max(1, total - decay_from))
    return 1.0 - (1.0 - min_ratio) * frac


def generator_loss(logits_fake: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "non-saturating":  # maximise log D(G(z))
        return F.binary_cross_entropy_with_logits(logits_fake, torch.ones_like(logits_fake))
    # saturating: minimise log(1 - D(G(z))) = -BCE(D(G(z)), 0)
    return -F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))


class GANTrainer(distributed.Trainer):
    """Models, optimisers and one training iteration; writes losses.csv, grids, the loss plot and checkpoints."""

    counter, budget, csv_name = "iteration", "max_iters", "losses.csv"

    def __init__(self, cfg: TrainConfig):
        if cfg.g_loss not in G_LOSSES:
            raise ValueError(f"g_loss must be one of {G_LOSSES}, got {cfg.g_loss!r}")
        if not 0.0 <= cfg.g_ema < 1.0:
            raise ValueError(f"g_ema must be in [0, 1) (0 = off), got {cfg.g_ema}")
        if not 0.0 <= cfg.lr_min_ratio <= 1.0:
            raise ValueError(f"lr_min_ratio must be in [0, 1], got {cfg.lr_min_ratio}")
        if cfg.lr_decay_from is not None and cfg.lr_decay_from < 0:
            raise ValueError(f"lr_decay_from must be an iteration >= 0 (absent: constant lr), got {cfg.lr_decay_from}")
        super().__init__(cfg, cfg.run_dir or REPO_ROOT / "runs" / "gan" / cfg.name)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS on GPU
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        self.G = build_generator(cfg.arch).to(self.device)
        self.D = build_discriminator(cfg.arch, cfg.d_dropout).to(self.device)
        self.G.apply(weights_init)
        self.D.apply(weights_init)
        self.ema = EMA(self.G, cfg.g_ema, warmup=False) if cfg.g_ema else None
        self.G_out = self.ema.model if self.ema is not None else self.G  # what is sampled and saved
        # what the training step calls: DistributedDataParallel wrappers under torchrun, the models themselves otherwise
        self.g_train, self.d_train = self.dist.wrap(self.G), self.dist.wrap(self.D)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=cfg.lr_g, betas=cfg.betas)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=cfg.lr_d, betas=cfg.betas)
        data = TensorDataset(*load_mnist("train", DataConfig(cfg.data_source, cfg.data_dir, cfg.data_limit)))
        self.loader = self.make_loader(data)
        z_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.fixed_z = torch.randn(64, cfg.arch.latent_dim, generator=z_gen).to(self.device)  # (64, latent) for grids
        self.seed_ranks()

    def _noisy(self, x: torch.Tensor) -> torch.Tensor:
        total = self.cfg.epochs * len(self.loader)
        std = self.cfg.instance_noise * max(0.0, 1.0 - self.iteration / max(1, total))
        return x + std * torch.randn_like(x) if std > 0 else x

    def lr_scale(self) -> float:
        planned = self.cfg.max_iters if self.cfg.max_iters is not None else self.cfg.epochs * len(self.loader)
        return lr_scale(self.iteration, self.cfg.lr_decay_from, planned, self.cfg.lr_min_ratio)

    def train_batch(self, batch: list[torch.Tensor]) -> dict[str, float]:
        cfg, real = self.cfg, batch[0]
        b = real.shape[0]
        if cfg.lr_decay_from is not None:  # (constant otherwise: the optimizers keep the lr they were built with)
            scale = self.lr_scale()
            for opt, lr in ((self.opt_g, cfg.lr_g), (self.opt_d, cfg.lr_d)):
                for group in opt.param_groups:
                    group["lr"] = lr * scale
        real = real.to(self.device, non_blocking=True)
        for _ in range(cfg.d_steps):
            z = torch.randn(b, cfg.arch.latent_dim, device=self.device)
            with torch.no_grad():
                fake = self.g_train(z)  # (B, 1, 28, 28), no graph back into G
            self.opt_d.zero_grad(set_to_none=True)
            # two forwards through D, so two backwards: under torchrun the first accumulates locally (no_sync) and
            # the second all-reduces the sum, which is the gradient of loss_real + loss_fake
            with self.dist.no_sync(self.d_train):
                logits_real = self.d_train(self._noisy(real))
                loss_real = F.binary_cross_entropy_with_logits(logits_real, torch.full_like(logits_real, cfg.real_label))
                loss_real.backward()
            logits_fake = self.d_train(self._noisy(fake))
            loss_fake = F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))
            loss_fake.backward()
            loss_d = loss_real.detach() + loss_fake.detach()
            self.opt_d.step()
        z = torch.randn(b, cfg.arch.latent_dim, device=self.device)
        logits = self.d_train(self._noisy(self.g_train(z)))
        loss_g = generator_loss(logits, cfg.g_loss)
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        if self.ema is not None:
            self.ema.update(self.G)
        m = {"loss_d": loss_d.item(), "loss_g": loss_g.item(),
             "d_real": torch.sigmoid(logits_real).mean().item(), "d_fake": torch.sigmoid(logits_fake).mean().item()}
        if self.iteration % cfg.log_every == 0:
            m = self.dist.all_mean(m)  # under torchrun: the mean over the ranks' shards
            self.log(iter=self.iteration, epoch=self.epoch, **m)
        self.last = m
        return m

    def end_epoch(self) -> str:
        if self.is_main:
            self.G.eval()
            with torch.no_grad():
                save_grid(self.G_out(self.fixed_z), self.run_dir / "samples" / f"epoch_{self.epoch:03d}.png")
            self.G.train()
        m = self.last
        return (f"[{self.cfg.name}] epoch {self.epoch}/{self.cfg.epochs} loss_d={m['loss_d']:.4f} loss_g="
                f"{m['loss_g']:.4f} D(x)={m['d_real']:.3f} D(G(z))={m['d_fake']:.3f} ({self.elapsed:.0f}s in all)")

    def summary(self) -> dict:
        h = self.history
        return {
            **super().summary(), "final_loss_g": h["loss_g"][-1], "final_loss_d": h["loss_d"][-1],
            "min_loss_g": min(h["loss_g"]), "min_loss_d": min(h["loss_d"]),
            "time_per_epoch_s": self.elapsed / max(1, self.epoch), "threads": torch.get_num_threads(),
            **({"g_ema": self.cfg.g_ema} if self.ema is not None else {}),
            **({"lr_decay_from": self.cfg.lr_decay_from, "lr_final_scale": self.lr_scale()}
               if self.cfg.lr_decay_from is not None else {}),
        }

    def replicas(self) -> dict[str, torch.nn.Module]:
        ema = {"generator_ema": self.G_out} if self.ema is not None else {}
        return {"generator": self.G, "discriminator": self.D, **ema}

    def write_final(self, summary: dict) -> None:
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_losses({f"{self.cfg.name}: losses": (self.history["iter"], {"G": self.history["loss_g"],
                                                                          "D": self.history["loss_d"]})},
                    self.run_dir / "loss_curve.png")
        stride = max(1, len(self.history["iter"]) // 2000)
        config = {
            "kind": "gan", "name": self.cfg.name, "arch": self.cfg.arch.to_dict(),
            "train": json.loads(json.dumps(dataclasses.asdict(self.cfg), default=str)), "summary": summary,
            "loss_history": {k: self.history[k][::stride] for k in ("iter", "loss_g", "loss_d")},
        }
        for p in [self.run_dir / "generator.safetensors", *([self.cfg.checkpoint] if self.cfg.checkpoint else [])]:
            save_checkpoint(p, {"generator": self.G_out.state_dict()}, config)

    def state_objects(self) -> dict:
        return {"G": self.G, "D": self.D, "opt_g": self.opt_g, "opt_d": self.opt_d,
                **({"G_ema": self.ema} if self.ema is not None else {})}

    def load_state(self) -> dict | None:
        s = super().load_state()
        if s and self.ema is not None and s.get("G_ema") is None:  # a state saved without an average: it starts at G
            self.G_out.load_state_dict(s["G"])
        return s


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__, epilog="Defaults shown are the baseline configuration's; "
                                "each option overrides the value of the --config chosen.")
    p.add_argument("--config", default="baseline", choices=sorted(CONFIGS), help="named configuration")
    p.add_argument("--mitigations", default="", help=f"comma list of {tuple(MITIGATIONS)} or 'all'")
    p.add_argument("--resume", action="store_true", help="continue from run_dir/state.pt")
    base = CONFIGS["baseline"]
    add_dataclass_args(p, TrainConfig, base, exclude=("name", "betas"))  # (arch: its fields below)
    add_dataclass_args(p.add_argument_group("architecture (arch.<field>)"), GANArch, base.arch, prefix="arch_",
                       names={f.name: "--" + f.name.replace("_", "-") for f in dataclasses.fields(GANArch)})
    a = p.parse_args(argv)
    mitig = list(MITIGATIONS) if a.mitigations == "all" else [m for m in a.mitigations.split(",") if m]
    cfg = apply_mitigations(CONFIGS[a.config], mitig)
    if mitig:  # the run's name says what changed
        suffix = "+mitigated" if a.mitigations == "all" else "+" + "+".join(mitig)
        cfg = dataclasses.replace(cfg, name=cfg.name + suffix)
    cfg = dataclass_from_args(TrainConfig, a, base=cfg, arch=dataclass_from_args(GANArch, a, "arch_", base=cfg.arch))
    cfg._resume = a.resume  # type: ignore[attr-defined]
    return cfg


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    trainer = GANTrainer(cfg)
    if getattr(cfg, "_resume", False) and trainer.load_state() and trainer.is_main:
        print(f"resumed {cfg.name} at epoch {trainer.epoch}")
    summary = trainer.train()
    if trainer.is_main:
        print(json.dumps({"name": cfg.name, "run_dir": str(trainer.run_dir), **summary}, indent=2))


if __name__ == "__main__":
    main()
