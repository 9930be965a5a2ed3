"""Repository paths, SHA-256 checksums and the vendored official MNIST test split (numpy only, no torch)."""
from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT_DIR = REPO_ROOT / "checkpoints"
VENDORED_DIR = REPO_ROOT / "data" / "mnist"

# SHA-256 of the files the project relies on by default (data/mnist/SHA256SUMS may add more).
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"
CHECKSUMS = {
    TEST_IMAGES: "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    TEST_LABELS: "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}


def repo_path(p: str | Path) -> Path:
    """A path as given when absolute, else relative to the repository root (not the working directory)."""
    path = Path(p)
    return path if path.is_absolute() else REPO_ROOT / path


def repo_relative(path: str | Path) -> str:
    """repo_path's inverse, as results files record a path: relative to the repository when it lies inside it (a
    committed run names no checkout's location), else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path)


class DataError(RuntimeError):
    """A data file is missing, corrupt or malformed; the message names the file."""


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file (read in chunks: Triton's Python 3.10 has no hashlib.file_digest)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_sums() -> dict[str, str]:
    """CHECKSUMS plus the entries of data/mnist/SHA256SUMS (`sha256sum` format)."""
    sums = dict(CHECKSUMS)
    path = VENDORED_DIR / "SHA256SUMS"
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                digest, name = line.split()
                sums[name.lstrip("*")] = digest
    return sums


def verify(path: Path, expected: str) -> None:
    """Raise DataError naming the file and the expected checksum unless it matches."""
    if not path.exists():
        raise DataError(f"missing data file {path} (expected SHA-256 {expected})")
    got = sha256(path)
    if got != expected:
        raise DataError(f"corrupt data file {path}: SHA-256 {got}, expected {expected}")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not) into a numpy array; raise DataError if malformed."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} but holds {len(raw) - offset} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def official_test_split() -> tuple[np.ndarray, np.ndarray]:
    """The vendored official t10k split, checksum-verified: uint8 images (10000, 28, 28), labels (10000,)."""
    sums = read_sums()
    img, lab = VENDORED_DIR / TEST_IMAGES, VENDORED_DIR / TEST_LABELS
    verify(img, sums[TEST_IMAGES])
    verify(lab, sums[TEST_LABELS])
    return read_idx(img), read_idx(lab)
