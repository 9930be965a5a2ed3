"""A small CNN digit classifier: the judge behind coverage, KL, class preservation and the Fréchet feature space."""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mnistgen.checkpoint import CHECKPOINT_DIR, load_module, save_checkpoint
from mnistgen.cli import add_dataclass_args, dataclass_from_args
from .data import DataConfig, load_mnist
from mnistgen.registry import CLASSIFIER_CHECKPOINT

FEATURE_DIM = 128  # width of the penultimate layer used as the Fréchet feature space


@dataclass
class ClassifierConfig:
    epochs: int = 4  # passes over the training split (60,000 images: 938 steps each at batch 64)
    batch_size: int = 64  # images per optimiser step
    lr: float = 2e-3  # AdamW peak learning rate (one-cycle cosine schedule)
    weight_decay: float = 1e-4  # AdamW weight decay
    max_shift: float = 2.0  # random translation, pixels (uniform in [-max_shift, max_shift])
    max_rotate: float = 10.0  # random rotation, degrees
    max_scale: float = 0.1  # random zoom in [1 - max_scale, 1 + max_scale]
    data_source: str = "full"  # training images: one of training.data.SOURCES (tests use "embedded", 5k)
    seed: int = 0  # torch seed for init, shuffling and augmentation
    threads: int = 1  # torch CPU threads (the machine is shared)
    out: str = str(CHECKPOINT_DIR / CLASSIFIER_CHECKPOINT)  # where the weights go


class DigitClassifier(nn.Module):
    """image (B, 1, 28, 28) in [-1, 1] -> logits (B, 10); `features` gives the (B, 128) penultimate activations."""

    num_features = FEATURE_DIM

    def __init__(self, width: int = 32, feature_dim: int = FEATURE_DIM, dropout: float = 0.3):
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)]

        self.body = nn.Sequential(
            *block(1, width), nn.MaxPool2d(2),  # (B, 32, 14, 14)
            *block(width, 2 * width), nn.MaxPool2d(2),  # (B, 64, 7, 7)
            *block(2 * width, 2 * width), nn.MaxPool2d(2),  # (B, 64, 3, 3)
            nn.Flatten(),  # (B, 576)
            nn.Linear(2 * width * 9, feature_dim), nn.ReLU(True),  # (B, 128)
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # (B, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))  # (B, 10)


class FeatureExtractor(nn.Module):
    """For torchmetrics' FrechetInceptionDistance(feature=..., normalize=True): it hands a custom module [0, 1]
    images unchanged and reads `num_features` (no probe with a dummy 299x299 image); we map them to [-1, 1]."""

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x01.float() * 2 - 1)  # (B, 128)


def augment(x: torch.Tensor, cfg: ClassifierConfig, gen: torch.Generator) -> torch.Tensor:
    """Random affine (shift, rotation, zoom) of [-1, 1] images (B, 1, 28, 28); the border stays background."""
    b = x.shape[0]
    angle = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(cfg.max_rotate)
    scale = 1 + (torch.rand(b, generator=gen) * 2 - 1) * cfg.max_scale
    shift = (torch.rand(b, 2, generator=gen) * 2 - 1) * cfg.max_shift * 2 / 28  # pixels -> [-1, 1] grid units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, 28, 28, 2)
    x01 = (x + 1) / 2  # zero padding == black background in [0, 1]
    return F.grid_sample(x01, grid, align_corners=False, padding_mode="zeros") * 2 - 1  # (B, 1, 28, 28)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Softmax probabilities (N, 10) for [-1, 1] images (N, 1, 28, 28), in batches."""
    out = [F.softmax(model(x[i:i + batch_size].float()), dim=1) for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out) if out else torch.zeros(0, 10)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict(model, x).argmax(1) == y).float().mean())


def train(cfg: ClassifierConfig) -> tuple[DigitClassifier, dict]:
    """Train on the training split (DataConfig's default source), score the 10k test split, save to cfg.out."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    data_cfg = DataConfig(source=cfg.data_source)
    x_train, y_train = load_mnist("train", data_cfg)  # (60000, 1, 28, 28), (60000,) for source "full"
    x_test, y_test = load_mnist("test", DataConfig())  # (10000, 1, 28, 28), (10000,)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    start = time.perf_counter()
    bar = tqdm(range(cfg.epochs), desc="classifier", unit="epoch")
    for _epoch in bar:
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            xb, yb = augment(x_train[idx], cfg, gen), y_train[idx]  # (B, 1, 28, 28), (B,)
            logits = model(xb)  # (B, 10)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            total += len(idx)
        bar.set_postfix(loss=f"{loss_sum / total:.4f}", train_acc=f"{correct / total:.4f}")
    train_time = time.perf_counter() - start
    model.eval()
    config = {
        "kind": "classifier", "test_accuracy": accuracy(model, x_test, y_test),
        "train_accuracy_clean": accuracy(model, x_train, y_train),
        "feature_dim": FEATURE_DIM, "parameters": sum(p.numel() for p in model.parameters()),
        "train_time_s": train_time, "iterations": cfg.epochs * steps_per_epoch,
        "train_split": f"{data_cfg.source}: {len(x_train)} training images", "test_split": "official t10k",
        "train_config": {k: v for k, v in asdict(cfg).items() if k != "out"},
    }
    save_checkpoint(cfg.out, {"classifier": model.state_dict()}, config)
    return model, config


_CACHE: dict[str, DigitClassifier] = {}


def load_classifier(path: str | Path | None = None) -> DigitClassifier:
    """The committed classifier (eval mode, CPU); cached per path, so callers must not train it."""
    path = Path(path) if path is not None else CHECKPOINT_DIR / CLASSIFIER_CHECKPOINT
    key = str(path.resolve())
    if key not in _CACHE:
        tensors, config = load_module(path, "classifier", "classifier")
        model = DigitClassifier(feature_dim=int(config.get("feature_dim", FEATURE_DIM)))
        model.load_state_dict(tensors)
        _CACHE[key] = model.eval().requires_grad_(False)
    return _CACHE[key]


def parse_args(argv: list[str] | None = None) -> ClassifierConfig:
    p = argparse.ArgumentParser(description=__doc__)
    add_dataclass_args(p, ClassifierConfig)
    return dataclass_from_args(ClassifierConfig, p.parse_args(argv))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    if cfg.epochs < 1:
        raise SystemExit(f"--epochs must be >= 1, got {cfg.epochs}")
    _, config = train(cfg)
    print(f"test accuracy {config['test_accuracy']:.4f} on 10,000 test images; "
          f"{config['parameters']:,} parameters; {config['train_time_s']:.0f} s; saved {cfg.out}")


if __name__ == "__main__":
    main()
