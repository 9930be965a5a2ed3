"""Image conversions for the API: [-1, 1] float32 <-> 8-bit grayscale PNG, sample grids and side-by-side strips."""
from __future__ import annotations

import io
import math
import struct
import zlib

import numpy as np
from PIL import Image

SIDE = 28  # MNIST images are SIDE x SIDE, one channel
PIXELS = SIDE * SIDE  # 784 values per image
GRID_PAD = 2  # pixels of background between tiles in a grid
BACKGROUND = 0  # uint8 value of the gaps (black, like MNIST's background)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """(N, 1, 28, 28) or (N, 28, 28) float in [-1, 1] -> (N, 28, 28) uint8 (value v -> round((v + 1) * 127.5))."""
    x = np.asarray(x, dtype=np.float32).reshape(-1, SIDE, SIDE)  # (N, 28, 28)
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def from_uint8(u: np.ndarray) -> np.ndarray:
    """(N, 28, 28) uint8 -> (N, 1, 28, 28) float32 in [-1, 1] (inverse of to_uint8 up to rounding)."""
    u = np.asarray(u, dtype=np.uint8).reshape(-1, 1, SIDE, SIDE)  # (N, 1, 28, 28)
    return (u.astype(np.float32) / 127.5 - 1.0).astype(np.float32)


def encode_png(u8: np.ndarray) -> bytes:
    """(H, W) uint8 -> PNG bytes (8-bit grayscale, mode L)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(u8, dtype=np.uint8), mode="L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_pngs(x: np.ndarray) -> list[bytes]:
    """(N, 1, 28, 28) float in [-1, 1] -> N PNGs, one per sample."""
    return [encode_png(img) for img in to_uint8(x)]


def grid(x: np.ndarray, cols: int | None = None, pad: int = GRID_PAD) -> np.ndarray:
    """(N, 1, 28, 28) float in [-1, 1] -> one (H, W) uint8 image with the N tiles row-major, cols = ceil(sqrt(N))."""
    tiles = to_uint8(x)  # (N, 28, 28)
    n = len(tiles)
    if n == 0:
        raise ValueError("grid needs at least one image")
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.full((rows * SIDE + (rows - 1) * pad, cols * SIDE + (cols - 1) * pad), BACKGROUND, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        out[r * (SIDE + pad): r * (SIDE + pad) + SIDE, c * (SIDE + pad): c * (SIDE + pad) + SIDE] = t
    return out


def grid_png(x: np.ndarray, cols: int | None = None) -> bytes:
    """(N, 1, 28, 28) float in [-1, 1] -> one PNG of their grid."""
    return encode_png(grid(x, cols))


def strip(columns: list[np.ndarray], pad: int = GRID_PAD) -> np.ndarray:
    """Side by side: each (N, 1, 28, 28) array becomes a column, row i shows image i of every column -> (H, W) uint8."""
    n = len(columns[0])
    if any(len(c) != n for c in columns):
        raise ValueError(f"all columns need the same number of images, got {[len(c) for c in columns]}")
    stacked = np.stack([np.asarray(c, np.float32).reshape(n, 1, SIDE, SIDE) for c in columns], axis=1)  # (N, C, 1, 28, 28)
    return grid(stacked.reshape(-1, 1, SIDE, SIDE), cols=len(columns), pad=pad)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png_chunks(data: bytes) -> None:
    """Raise ValueError unless data is a complete PNG: the signature, then whole chunks with matching CRCs, ending
    in IEND. PIL alone decodes a stream cut inside its last IDAT or missing IEND; a client that sent half a file
    should hear so, not get a denoised half-image back."""
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG (the 8-byte PNG signature is missing)")
    pos = len(PNG_SIGNATURE)
    while True:
        if pos + 8 > len(data):
            raise ValueError(f"truncated PNG: it ends at byte {len(data)} inside a chunk header, before IEND")
        length, kind = struct.unpack(">I4s", data[pos: pos + 8])
        end = pos + 8 + length + 4
        if end > len(data):
            raise ValueError(f"truncated PNG: chunk {kind!r} declares {length} bytes but the file ends at byte "
                             f"{len(data)}, before IEND")
        (crc,) = struct.unpack(">I", data[end - 4: end])
        if zlib.crc32(data[pos + 4: end - 4]) != crc:
            raise ValueError(f"corrupt PNG: CRC mismatch in chunk {kind!r} at byte {pos}")
        pos = end
        if kind == b"IEND":
            return


def decode_png(data: bytes) -> Image.Image:
    """PNG bytes -> a loaded PIL image; raises ValueError when the bytes are not a complete PNG PIL can decode."""
    try:
        check_png_chunks(data)
    except ValueError as e:
        raise ValueError(f"not a decodable PNG: {e}") from None
    try:
        img = Image.open(io.BytesIO(data), formats=["PNG"])
        img.load()
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError... on bad bytes
        raise ValueError(f"not a decodable PNG ({type(e).__name__}: {e})") from None
    return img
