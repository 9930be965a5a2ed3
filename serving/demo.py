"""`make demo` (with `make run` up in another terminal): out/generate.png, out/denoise.png and out/digits.png (one
row per digit from the catalog's class-conditional model) through the gateway client."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnistgen import catalog
from mnistgen.cli import add_dataclass_args, dataclass_from_args
from mnistgen.files import REPO_ROOT, official_test_split

from . import images as imgs
from .client import TRANSPORTS, ClientConfig, ClientError, GatewayClient, as_array
from .generated.mnistgen.v1 import generation_pb2 as pb


@dataclass
class DemoConfig:
    transport: str = "grpc"  # one of client.TRANSPORTS
    target: str | None = None  # default: the gateway of `make run` (127.0.0.1:50051 / :8080)
    out_dir: Path = REPO_ROOT / "out"
    model: str = catalog.DEFAULT_MODEL  # generator for generate.png
    num_samples: int = 64  # generate.png is an 8 x 8 grid
    num_digits: int = 8  # real test digits in denoise.png (one row each)
    sigma: float = 0.5  # noise std added before denoising
    steps: int = 0  # 0 = the gateway's default
    seed: int = 0  # same picture every run
    digits_per_row: int = 8  # digits.png: a row per digit of this many class-conditional samples


def run(c: DemoConfig) -> int:
    c.out_dir.mkdir(parents=True, exist_ok=True)
    with GatewayClient(ClientConfig(c.transport, c.target, 300.0)) as client:
        try:
            generate_and_denoise(client, c)
            digits_grid(client, c)
        except ClientError as e:
            print(f"demo failed: {e} (is `make run` up at {client.config.target}?)", file=sys.stderr)
            return 1
    return 0


def generate_and_denoise(client: GatewayClient, c: DemoConfig) -> None:
    """out/generate.png (a grid from `c.model`) and out/denoise.png (clean | noisy | denoised real test digits)."""
    g = client.generate(c.model, c.num_samples, c.seed, format=pb.PNG_GRID)
    (c.out_dir / "generate.png").write_bytes(g.images.grid_png)
    print(f"{c.out_dir / 'generate.png'}: {g.images.count} samples from {g.model} v{g.model_version} "
          f"(seed {g.seed}), server {g.timing.server_ms:.1f} ms")
    clean = imgs.from_uint8(official_test_split()[0][:c.num_digits])  # (K, 1, 28, 28) real test digits
    d = client.denoise(clean, c.sigma, c.steps, seed=c.seed)
    strip = imgs.strip([clean, as_array(d.noisy), as_array(d.denoised)])
    (c.out_dir / "denoise.png").write_bytes(imgs.encode_png(strip))
    print(f"{c.out_dir / 'denoise.png'}: clean | noisy (sigma {d.sigma:g}) | denoised ({d.sampler}, {d.steps} "
          f"steps) for {len(clean)} test digits, server {d.timing.server_ms:.0f} ms")


def digits_grid(client: GatewayClient, c: DemoConfig) -> None:
    """out/digits.png: row d holds `digits_per_row` class-conditional samples of digit d (one Generate per digit)."""
    rows, ms, model = [], 0.0, catalog.by_kind(catalog.DDPM_COND)[0].name
    for d in range(catalog.DIGITS):
        r = client.generate(model, c.digits_per_row, c.seed, digit=d)
        rows.append(as_array(r.images))  # (digits_per_row, 1, 28, 28)
        ms += r.timing.server_ms
    (c.out_dir / "digits.png").write_bytes(imgs.grid_png(np.concatenate(rows), cols=c.digits_per_row))
    print(f"{c.out_dir / 'digits.png'}: digits 0-{catalog.DIGITS - 1}, {c.digits_per_row} each from {model} "
          f"v{r.model_version} ({r.sampler} {r.steps} steps, guidance {r.guidance:g}), server "
          f"{ms / catalog.DIGITS:.0f} ms per digit")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    add_dataclass_args(p, DemoConfig, exclude=("num_samples", "num_digits", "seed", "digits_per_row"),
                       choices={"transport": TRANSPORTS},
                       help={"target": "gateway host:port (default: make run's, 127.0.0.1:50051 / :8080)"})
    return run(dataclass_from_args(DemoConfig, p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
