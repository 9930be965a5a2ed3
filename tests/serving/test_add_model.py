"""README "Add a model": a new GAN generator needs a checkpoint and one catalog entry, nothing else.

A tiny untrained generator is written by the test, named in one MNISTGEN_CATALOG entry, exported (export makes its
model directory from the GAN template), served by the real Triton and gateway (serving.run.Stack, the launcher
`make run` uses) and asked for images over both transports."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mnistgen.checkpoint import save_checkpoint
from mnistgen.models import GANArch, build_generator
from serving.client import ClientError, GatewayClient
from serving.generated.mnistgen.v1 import generation_pb2 as pb
from serving.run import RunConfig, Stack

REPO = Path(__file__).resolve().parents[2]


def test_a_new_generator_needs_a_checkpoint_and_one_entry(tmp_path, monkeypatch):
    arch = GANArch(arch="dcgan", latent_dim=16, depth=3, base_channels=8)
    torch.manual_seed(0)
    gen = build_generator(arch)
    gen.train()(torch.randn(8, arch.latent_dim))  # BatchNorm running statistics that are not the identity
    checkpoint = save_checkpoint(tmp_path / "tiny.safetensors", {"generator": gen.state_dict()},
                                 {"kind": "gan", "arch": arch.to_dict()})
    entry = {"name": "tiny-gan", "triton": "tiny_generator", "kind": "gan", "checkpoint": str(checkpoint),
             "max_samples": 8, "about": "a test's untrained generator"}
    (tmp_path / "catalog.json").write_text(json.dumps([entry]))
    monkeypatch.setenv("MNISTGEN_CATALOG", str(tmp_path / "catalog.json"))  # Triton, export and gateway inherit it

    repo = tmp_path / "model_repository"  # the committed templates, none of this checkout's exports
    shutil.copytree(REPO / "model_repository", repo,
                    ignore=shutil.ignore_patterns("*.onnx", "*.pt", "engines.json", "__pycache__"))
    r = subprocess.run([sys.executable, "-m", "training.export", "--model-repository", str(repo),
                        "--only", "tiny_generator", "--engine-budget-s", "0.01"],
                       cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (repo / "tiny_generator" / "1" / "model.onnx").is_file()

    cfg = RunConfig(grpc_port=0, http_port=0, triton_http_port=0, model_repository=repo,
                    models=("tiny_generator",), export=False, log_dir=tmp_path, gateway_log=tmp_path / "gw.log")
    with Stack(cfg) as stack:
        gw = stack.gateway
        for transport, target in (("grpc", gw.grpc_target), ("http", gw.http_target)):
            with GatewayClient(transport=transport, target=target) as client:
                listed = {m.name: m for m in client.list_models().models}
                assert listed["tiny-gan"].ready and listed["tiny-gan"].latent_dim == arch.latent_dim
                assert listed["tiny-gan"].max_num_samples == 8 and listed["tiny-gan"].kind == "gan"
                resp = client.generate("tiny-gan", num_samples=4, seed=3, format=pb.RAW_FLOAT32)
                x = np.frombuffer(resp.images.raw, "<f4").reshape(-1, 1, 28, 28)
                assert resp.model == "tiny-gan" and x.shape == (4, 1, 28, 28) and resp.seed == 3
                assert np.isfinite(x).all() and np.abs(x).max() <= 1.0 and x.std() > 0
                with pytest.raises(ClientError) as refused:  # its own limit, from its one entry
                    client.generate("tiny-gan", num_samples=9)
                assert refused.value.code == "INVALID_ARGUMENT" and "1..8" in refused.value.message
