"""Train a GAN configuration (the research's baseline/modified DCGAN, the MLP GAN, controlled failures)."""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from mnistgen.checkpoint import save_checkpoint
from mnistgen.cli import add_dataclass_args, dataclass_from_args
from . import distributed
from .data import DataConfig, mnist_dataset
from .ema import EMA
from mnistgen.models import GANArch, build_discriminator, build_generator, weights_init
from .plots import plot_losses, save_grid

REPO_ROOT = Path(__file__).resolve().parent.parent
G_LOSSES = ("non-saturating", "saturating")
DEVICES = ("auto", "cpu", "cuda")
MITIGATIONS = ("label-smoothing", "non-saturating", "k-steps", "instance-noise", "d-dropout")


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
    device: str = "auto"  # one of DEVICES: auto = cuda when available, else cpu
    max_iters: int | None = None  # iteration budget: stop after this many (CPU runs, tests, smoke runs)
    stop_at: int | None = None  # stop once this many iterations are done, the learning-rate plan still running to
    # max_iters (a training.recipe stage that ended before its plan did)
    log_every: int = 1  # write every n-th iteration's losses to CSV
    run_dir: str | None = None  # default runs/gan/<name>[+mitigations]
    checkpoint: str | None = None  # also write the generator checkpoint here (e.g. checkpoints/dcgan-baseline.safetensors)
    g_ema: float = 0.0  # > 0: keep an exponential moving average of G's weights (decay per G step, e.g. 0.999) and
    # write it as the checkpoint's generator (the raw G keeps training; samples and grids use the average)
    lr_decay_from: int | None = None  # from this iteration on, lr_g and lr_d fall linearly to lr_min_ratio x their
    # value at the last planned iteration (max_iters, else epochs x batches); None = constant, as in DCGAN
    lr_min_ratio: float = 0.0


def _cfg(name: str, **kw) -> TrainConfig:
    return TrainConfig(name=name, **kw)


CONFIGS: dict[str, TrainConfig] = {
    "baseline": _cfg("baseline", arch=GANArch("dcgan", 256, 3, 0.0)),
    "modified": _cfg("modified", arch=GANArch("dcgan", 64, 4, 0.3)),
    "mlp": _cfg("mlp", arch=GANArch("mlp", 100, 3, 0.0)),
    # Controlled failures (from the GAN-training-challenges study): each breaks one balance on purpose.
    "vanishing-gradient": _cfg("vanishing-gradient", arch=GANArch("dcgan", 256, 3, 0.0), lr_d=2e-3, g_loss="saturating"),
    "mode-collapse": _cfg("mode-collapse", arch=GANArch("dcgan", 256, 3, 0.0), lr_g=2e-3),
    "d-overfit": _cfg("d-overfit", arch=GANArch("dcgan", 256, 3, 0.0), data_limit=1000),
}


def apply_mitigations(cfg: TrainConfig, names: list[str]) -> TrainConfig:
    """Switch on mitigations by name: label smoothing 0.9, non-saturating G loss, k=2 D steps,
    instance noise 0.1, D dropout 0.4."""
    for n in names:
        if n not in MITIGATIONS:
            raise ValueError(f"unknown mitigation {n!r}: allowed {MITIGATIONS} or 'all'")
    changes = {
        "label-smoothing": {"real_label": 0.9},
        "non-saturating": {"g_loss": "non-saturating"},
        "k-steps": {"d_steps": 2},
        "instance-noise": {"instance_noise": 0.1},
        "d-dropout": {"d_dropout": 0.4},
    }
    for n in names:
        cfg = dataclasses.replace(cfg, **changes[n])
    return cfg


def resolve_device(name: str) -> torch.device:
    if name not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def seed_everything(seed: int) -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS on GPU
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


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


class GANTrainer:
    """Holds models, optimisers and the loop; writes CSV, grids, plots and checkpoints into run_dir."""

    def __init__(self, cfg: TrainConfig):
        if cfg.g_loss not in G_LOSSES:
            raise ValueError(f"g_loss must be one of {G_LOSSES}, got {cfg.g_loss!r}")
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        # torchrun: a process group, one rank each; a plain run: rank 0 of 1 and nothing changes
        self.dist = distributed.setup(resolve_device(cfg.device).type)
        self.is_main = self.dist.is_main
        seed_everything(cfg.seed)  # the same on every rank: identical initial weights
        self.run_dir = Path(cfg.run_dir or REPO_ROOT / "runs" / "gan" / cfg.name)
        if self.is_main:
            (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
        self.device = self.dist.device(resolve_device(cfg.device).type)
        self.G = build_generator(cfg.arch).to(self.device)
        self.D = build_discriminator(cfg.arch, cfg.d_dropout).to(self.device)
        self.G.apply(weights_init)
        self.D.apply(weights_init)
        if not 0.0 <= cfg.g_ema < 1.0:
            raise ValueError(f"g_ema must be in [0, 1) (0 = off), got {cfg.g_ema}")
        if not 0.0 <= cfg.lr_min_ratio <= 1.0:
            raise ValueError(f"lr_min_ratio must be in [0, 1], got {cfg.lr_min_ratio}")
        if cfg.lr_decay_from is not None and cfg.lr_decay_from < 0:
            raise ValueError(f"lr_decay_from must be an iteration >= 0 (or absent: constant lr), got {cfg.lr_decay_from}")
        self.ema = EMA(self.G, cfg.g_ema, warmup=False) if cfg.g_ema else None
        # what the training step calls: DistributedDataParallel wrappers under torchrun, the models themselves otherwise
        self.g_train, self.d_train = self.dist.wrap(self.G), self.dist.wrap(self.D)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=cfg.lr_g, betas=cfg.betas)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=cfg.lr_d, betas=cfg.betas)
        data = mnist_dataset("train", DataConfig(cfg.data_source, cfg.data_dir, cfg.data_limit))
        batch = self.dist.local_batch(cfg.batch_size)  # batch_size is global: each rank takes its share
        if self.dist.enabled:
            self.sampler = self.dist.sampler(data, cfg.seed)
            self.loader = DataLoader(data, batch_size=batch, sampler=self.sampler, drop_last=True)
        else:
            self.sampler = None
            self.loader = DataLoader(data, batch_size=batch, shuffle=True, drop_last=True,
                                     generator=torch.Generator().manual_seed(cfg.seed))
        self.fixed_z = torch.randn(64, cfg.arch.latent_dim, generator=torch.Generator().manual_seed(cfg.seed + 1)).to(self.device)
        if self.dist.enabled:
            torch.manual_seed(cfg.seed + self.dist.rank)  # after init: each rank draws its own z and noise
        self.epoch = 0
        self.iteration = 0
        self.history: dict[str, list] = {"iter": [], "epoch": [], "loss_d": [], "loss_g": [], "d_real": [], "d_fake": []}
        self.epoch_times: list[float] = []

    # --- one iteration -------------------------------------------------------------------------
    def _noisy(self, x: torch.Tensor) -> torch.Tensor:
        total = self.cfg.epochs * len(self.loader)
        std = self.cfg.instance_noise * max(0.0, 1.0 - self.iteration / max(1, total))
        return x + std * torch.randn_like(x) if std > 0 else x

    def planned_iterations(self) -> int:
        return self.cfg.max_iters if self.cfg.max_iters is not None else self.cfg.epochs * len(self.loader)

    def reached_stop(self) -> bool:
        return any(n is not None and self.iteration >= n for n in (self.cfg.max_iters, self.cfg.stop_at))

    def lr_scale(self) -> float:
        return lr_scale(self.iteration, self.cfg.lr_decay_from, self.planned_iterations(), self.cfg.lr_min_ratio)

    def step(self, real: torch.Tensor) -> dict[str, float]:
        cfg, b = self.cfg, real.shape[0]
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
        return {"loss_d": loss_d.item(), "loss_g": loss_g.item(),
                "d_real": torch.sigmoid(logits_real).mean().item(), "d_fake": torch.sigmoid(logits_fake).mean().item()}

    # --- generator EMA ---------------------------------------------------------------------------
    @property
    def G_ema(self) -> torch.nn.Module | None:
        return self.ema.model if self.ema is not None else None

    @property
    def G_out(self) -> torch.nn.Module:
        """The generator that is sampled and saved: the EMA when g_ema > 0, else G itself."""
        return self.G_ema if self.G_ema is not None else self.G

    # --- the loop ------------------------------------------------------------------------------
    def train(self) -> dict:
        cfg = self.cfg
        csv_path = self.run_dir / "losses.csv"
        new_file = not csv_path.exists() or self.iteration == 0
        log_file = open(csv_path, "w" if new_file else "a", newline="") if self.is_main else contextlib.nullcontext()
        with log_file as f:
            writer = csv.writer(f) if self.is_main else None  # rank 0 writes every file
            if writer and new_file:
                writer.writerow(["iter", "epoch", "loss_d", "loss_g", "d_real", "d_fake"])
            while self.epoch < cfg.epochs and not self.reached_stop():  # (a resumed run may be done)
                t0 = time.perf_counter()
                if self.sampler is not None:
                    self.sampler.set_epoch(self.epoch)  # a new shuffle per epoch, the same on every rank
                self.G.train()
                self.D.train()
                bar = tqdm(self.loader, desc=f"{cfg.name} epoch {self.epoch + 1}/{cfg.epochs}", leave=False,
                           disable=not self.is_main)
                for real, _ in bar:
                    m = self.step(real)
                    if self.iteration % cfg.log_every == 0:
                        m = self.dist.all_mean(m)  # under torchrun: the mean over the ranks' shards
                        row = [self.iteration, self.epoch, m["loss_d"], m["loss_g"], m["d_real"], m["d_fake"]]
                        if writer:
                            writer.writerow(row)
                        for k, v in zip(self.history, row):
                            self.history[k].append(v)
                    self.iteration += 1
                    bar.set_postfix(loss_d=f"{m['loss_d']:.3f}", loss_g=f"{m['loss_g']:.3f}")
                    if self.reached_stop():
                        break
                self.epoch_times.append(time.perf_counter() - t0)
                self.epoch += 1
                if self.is_main:
                    self._save_grid()
                    self.save_state()
                    f.flush()
                    tqdm.write(f"[{cfg.name}] epoch {self.epoch}/{cfg.epochs} loss_d={m['loss_d']:.4f} "
                               f"loss_g={m['loss_g']:.4f} D(x)={m['d_real']:.3f} D(G(z))={m['d_fake']:.3f} "
                               f"({self.epoch_times[-1]:.1f}s)")
                if self.reached_stop():
                    break
        return self.finish()

    def _save_grid(self) -> None:
        self.G.eval()
        with torch.no_grad():
            save_grid(self.G_out(self.fixed_z), self.run_dir / "samples" / f"epoch_{self.epoch:03d}.png")

    def summary(self) -> dict:
        h = self.history
        return {
            "final_loss_g": h["loss_g"][-1], "final_loss_d": h["loss_d"][-1],
            "min_loss_g": min(h["loss_g"]), "min_loss_d": min(h["loss_d"]),
            "train_time_s": sum(self.epoch_times),
            "time_per_epoch_s": sum(self.epoch_times) / max(1, len(self.epoch_times)),
            "epochs": self.epoch, "iterations": self.iteration, "threads": torch.get_num_threads(),
            "world_size": self.dist.world_size, "images_seen": self.iteration * self.cfg.batch_size,
            **({"g_ema": self.cfg.g_ema} if self.G_ema is not None else {}),
            **({"lr_decay_from": self.cfg.lr_decay_from, "lr_final_scale": self.lr_scale()}
               if self.cfg.lr_decay_from is not None else {}),
        }

    def finish(self) -> dict:
        # every rank: the replicas must agree (raises otherwise); the digest names the weights the checkpoint holds
        ema = {"generator_ema": self.G_ema} if self.G_ema is not None else {}
        digests = distributed.assert_replicas_identical(self.dist, generator=self.G, discriminator=self.D, **ema)
        summary = {**self.summary(), "replica_digests": digests}
        if self.is_main:
            self._write_outputs(summary)
        self.dist.barrier()
        self.dist.close()
        return summary

    def _write_outputs(self, summary: dict) -> None:
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_losses({f"{self.cfg.name}: losses": (self.history["iter"], {"G": self.history["loss_g"],
                                                                          "D": self.history["loss_d"]})},
                    self.run_dir / "loss_curve.png")
        stride = max(1, len(self.history["iter"]) // 2000)
        config = {
            "kind": "gan", "name": self.cfg.name, "arch": self.cfg.arch.to_dict(),
            "train": _jsonable(dataclasses.asdict(self.cfg)), "summary": summary,
            "loss_history": {k: self.history[k][::stride] for k in ("iter", "loss_g", "loss_d")},
        }
        paths = [self.run_dir / "generator.safetensors"] + ([Path(self.cfg.checkpoint)] if self.cfg.checkpoint else [])
        for p in paths:
            save_checkpoint(p, {"generator": self.G_out.state_dict()}, config)

    # --- resume --------------------------------------------------------------------------------
    def save_state(self) -> None:
        torch.save({
            "G": self.G.state_dict(), "D": self.D.state_dict(),
            "G_ema": self.G_ema.state_dict() if self.G_ema is not None else None,
            "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
            "epoch": self.epoch, "iteration": self.iteration, "history": self.history,
            "epoch_times": self.epoch_times, "rng": torch.get_rng_state(),
            "loader_rng": self.loader.generator.get_state() if self.sampler is None else None,
            "world_size": self.dist.world_size,
        }, self.run_dir / "state.pt")

    def load_state(self) -> bool:
        path = self.run_dir / "state.pt"
        if not path.exists():
            return False
        s = torch.load(path, weights_only=False, map_location=self.device)
        self.G.load_state_dict(s["G"])
        self.D.load_state_dict(s["D"])
        if self.G_ema is not None:  # a run saved without an EMA (or before g_ema was set) starts its average at G
            self.G_ema.load_state_dict(s["G_ema"] if s.get("G_ema") is not None else s["G"])
        self.opt_g.load_state_dict(s["opt_g"])
        self.opt_d.load_state_dict(s["opt_d"])
        self.epoch, self.iteration, self.history = s["epoch"], s["iteration"], s["history"]
        self.epoch_times = s["epoch_times"]
        torch.set_rng_state(s["rng"].cpu())
        if self.sampler is None and s.get("loader_rng") is not None:
            self.loader.generator.set_state(s["loader_rng"])
        if self.dist.enabled:  # rank 0 saved its own RNG; every rank continues from a seed of its own
            torch.manual_seed(self.cfg.seed + self.dist.rank + 1_000_003 * self.iteration)
        return True


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__, epilog="Defaults shown are the baseline configuration's; "
                                "each option overrides the value of the --config chosen.")
    p.add_argument("--config", default="baseline", choices=sorted(CONFIGS), help="named configuration")
    p.add_argument("--mitigations", default="", help=f"comma list of {MITIGATIONS} or 'all'")
    p.add_argument("--resume", action="store_true", help="continue from run_dir/state.pt")
    base = CONFIGS["baseline"]
    add_dataclass_args(p, TrainConfig, base, exclude=("name", "betas"))  # (arch: its fields below)
    add_dataclass_args(p.add_argument_group("architecture (arch.<field>)"), GANArch, base.arch, prefix="arch_",
                       names={f.name: "--" + f.name.replace("_", "-") for f in dataclasses.fields(GANArch)})
    a = p.parse_args(argv)
    cfg = CONFIGS[a.config]
    mitig = list(MITIGATIONS) if a.mitigations == "all" else [m for m in a.mitigations.split(",") if m]
    cfg = apply_mitigations(cfg, mitig)
    if mitig:
        cfg = dataclasses.replace(cfg, name=f"{cfg.name}+mitigated" if a.mitigations == "all" else f"{cfg.name}+{'+'.join(mitig)}")
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
