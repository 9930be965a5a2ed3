"""`make demo` (with `make run` up in another terminal): out/generate.png, out/denoise.png and out/digits.png (one
row per digit from the class-conditional ddpm-cond) through the gateway client."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnistgen.cli import add_dataclass_args, dataclass_from_args
from mnistgen.files import official_test_split

from . import images as imgs
from .client import TRANSPORTS, ClientConfig, ClientError, GatewayClient, as_array
from .generated.mnistgen.v1 import generation_pb2 as pb

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class DemoConfig:
    transport: str = "grpc"  # one of client.TRANSPORTS
    target: str | None = None  # default: the gateway of `make run` (127.0.0.1:50051 / :8080)
    out_dir: Path = REPO_ROOT / "out"
    model: str = "dcgan-baseline"  # generator for generate.png
    num_samples: int = 64  # generate.png is an 8 x 8 grid
    num_digits: int = 8  # real test digits in denoise.png (one row each)
    sigma: float = 0.5  # noise std added before denoising
    steps: int = 0  # 0 = the gateway's default
    seed: int = 0  # same picture every run
    digits_per_row: int = 8  # digits.png: 10 rows (0-9) of this many ddpm-cond samples


def test_digits(n: int) -> np.ndarray:
    """The first n images of the official MNIST test split, (n, 1, 28, 28) float32 in [-1, 1]."""
    images, _ = official_test_split()  # (10000, 28, 28) uint8
    return imgs.from_uint8(images[:n])


def run(c: DemoConfig) -> int:
    c.out_dir.mkdir(parents=True, exist_ok=True)
    with GatewayClient(ClientConfig(c.transport, c.target, 300.0)) as client:
        try:
            g = client.generate(c.model, c.num_samples, c.seed, format=pb.PNG_GRID)
        except ClientError as e:
            print(f"generate failed: {e} (is `make run` up at {client.config.target}?)", file=sys.stderr)
            return 1
        (c.out_dir / "generate.png").write_bytes(g.images.grid_png)
        print(f"{c.out_dir / 'generate.png'}: {g.images.count} samples from {g.model} v{g.model_version} "
              f"(seed {g.seed}), server {g.timing.server_ms:.1f} ms")
        clean = test_digits(c.num_digits)  # (K, 1, 28, 28)
        try:
            d = client.denoise(clean, c.sigma, c.steps, seed=c.seed)
        except ClientError as e:
            print(f"denoise failed: {e}", file=sys.stderr)
            return 1
        strip = imgs.strip([clean, as_array(d.noisy), as_array(d.denoised)])
        (c.out_dir / "denoise.png").write_bytes(imgs.encode_png(strip))
        print(f"{c.out_dir / 'denoise.png'}: clean | noisy (sigma {d.sigma:g}) | denoised ({d.sampler}, {d.steps} "
              f"steps) for {len(clean)} test digits, server {d.timing.server_ms:.0f} ms")
        return digits_grid(client, c)


def digits_grid(client: GatewayClient, c: DemoConfig) -> int:
    """out/digits.png: row d holds `digits_per_row` ddpm-cond samples of digit d (one Generate per digit)."""
    rows, ms = [], 0.0
    for d in range(10):
        try:
            r = client.generate("ddpm-cond", c.digits_per_row, c.seed, digit=d)
        except ClientError as e:
            print(f"generate digit {d} failed: {e}", file=sys.stderr)
            return 1
        rows.append(as_array(r.images))  # (digits_per_row, 1, 28, 28)
        ms += r.timing.server_ms
    (c.out_dir / "digits.png").write_bytes(imgs.grid_png(np.concatenate(rows), cols=c.digits_per_row))
    print(f"{c.out_dir / 'digits.png'}: digits 0-9, {c.digits_per_row} each from ddpm-cond v{r.model_version} "
          f"({r.sampler} {r.steps} steps, guidance {r.guidance:g}), server {ms / 10:.0f} ms per digit")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    add_dataclass_args(p, DemoConfig, exclude=("num_samples", "num_digits", "seed", "digits_per_row"), choices={"transport": TRANSPORTS},
                       help={"target": "gateway host:port (default: make run's, 127.0.0.1:50051 / :8080)"})
    return run(dataclass_from_args(DemoConfig, p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
