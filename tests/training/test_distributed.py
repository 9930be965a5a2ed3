"""torchrun: 2 CPU processes (gloo) train a few iterations; both ranks hold identical weights; the checkpoint loads."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mnistgen.checkpoint import load_checkpoint
from mnistgen.diffusion import load_unet
from mnistgen.registry import load_generator
from training.distributed import DistContext, setup, weights_digest

REPO_ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]  # free port


def torchrun(module: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*TORCHRUN, "-m", module, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"torchrun {module} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def last_json(stdout: str) -> dict:
    """The JSON object a trainer prints last (pretty-printed over several lines)."""
    start = stdout.rindex("\n{") + 1 if "\n{" in stdout else stdout.index("{")
    return json.loads(stdout[start:])


def test_single_process_context_changes_nothing():
    ctx = setup("cpu")
    assert ctx == DistContext() and not ctx.enabled and ctx.is_main
    m = torch.nn.Linear(2, 2)
    assert ctx.wrap(m) is m and ctx.local_batch(96) == 96
    assert ctx.all_mean({"loss": 1.5}) == {"loss": 1.5}


def test_global_batch_must_split_evenly():
    with pytest.raises(ValueError, match="batch_size 15 must be divisible by the number of processes \\(2\\)"):
        DistContext(rank=0, world_size=2).local_batch(15)


@pytest.mark.slow
def test_torchrun_gan_two_ranks_identical_weights(tmp_path):
    run = tmp_path / "gan"
    r = torchrun("training.train_gan", "--config", "baseline", "--data-source", "embedded", "--data-limit", "256",
                 "--max-iters", "3", "--epochs", "1", "--batch-size", "16", "--threads", "1", "--base-channels", "8",
                 "--run-dir", str(run))
    summary = last_json(r.stdout)
    assert summary["world_size"] == 2 and summary["iterations"] == 3 and summary["images_seen"] == 48
    digests = summary["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # rank 0 and rank 1 hold the same G and D
    gen, config = load_generator(run / "generator.safetensors")  # rank 0's checkpoint
    assert weights_digest(gen) == digests[0]["generator"]
    assert config["summary"]["world_size"] == 2
    # rank 0 alone writes: one CSV with one row per iteration (not one per rank)
    assert len((run / "losses.csv").read_text().strip().splitlines()) == 1 + 3


@pytest.mark.slow
def test_torchrun_ddpm_two_ranks_identical_weights(tmp_path):
    ckpt = tmp_path / "ddpm.safetensors"
    r = torchrun("training.train_ddpm", "--data-source", "embedded", "--limit", "64", "--epochs", "1",
                 "--batch-size", "16", "--threads", "1", "--sample-every", "0", "--unet-block-out-channels", "8,8,8",
                 "--unet-norm-num-groups", "4", "--unet-attention-head-dim", "8", "--run-dir", str(tmp_path / "run"),
                 "--checkpoint", str(ckpt))
    summary = last_json(r.stdout)
    assert summary["world_size"] == 2 and summary["steps"] == 4  # 64 images / global batch 16
    digests = summary["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    unet, _ = load_unet(ckpt)
    assert weights_digest(unet) == digests[0]["ema"]
    _, config = load_checkpoint(ckpt)
    assert config["summary"]["world_size"] == 2
