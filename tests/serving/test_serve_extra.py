"""A gateway-only install works: the serve lock plus the project into a fresh venv (no torch) runs the real gateway.

The venv gets requirements/serve.txt hash-checked, as the gateway image does, then the project non-editable with
--no-deps from a copy of its sources (so the build leaves nothing in the checkout); it then holds exactly the
lock's pins. The gateway runs as its console script (`mnistgen-gateway`) from a directory outside the repository
with PYTHONPATH cleared (so only the installed copy can be imported); one Generate over gRPC and one over HTTP go
through the session's real Triton, and the client CLI (`mnistgen`, and `python -m serving.client` over HTTP) draws
the same samples. tests/deploy/test_dockerfile.py checks the same extra statically (its import closure, no torch);
this is the proof that it installs and serves. About 30 s here (venv + pip from the local cache).
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from serving.generated.mnistgen.v1 import generation_pb2 as pb
from serving.run import LISTENING, GatewayProcess, GatewayProcessConfig

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
# What the project's wheel is built from (pyproject.toml's packages.find + the readme it names).
SOURCES = ("pyproject.toml", "README.md", "mnistgen", "serving", "training", "loadtest")
PIP_TIMEOUT_S = 600
SERVE_LOCK = REPO_ROOT / "requirements" / "serve.txt"
# Heavy distributions a gateway install must not bring (the reason the serve extra exists).
NOT_INSTALLED = ("torch", "torchvision", "diffusers", "onnxruntime", "locust", "matplotlib", "nvidia-pytriton")

def clean_env() -> dict[str, str]:
    """This environment without anything that would put the repository's sources on sys.path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return env | {"PYTHONUNBUFFERED": "1", "PYTHONNOUSERSITE": "1"}


def run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=clean_env(), capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    return r


@pytest.fixture(scope="module")
def serve_venv(tmp_path_factory) -> tuple[Path, Path]:
    """(python of a fresh venv holding only `.[serve]`, a working directory outside the repository)."""
    root = tmp_path_factory.mktemp("serve-extra")
    src, venv, outside = root / "src", root / "venv", root / "run"
    outside.mkdir()
    for name in SOURCES:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(path, src / name)
    t0 = time.monotonic()
    r = run([sys.executable, "-m", "venv", venv], outside, 120)
    assert r.returncode == 0, r.stderr
    t1 = time.monotonic()
    python = venv / "bin" / "python"
    pip = [python, "-m", "pip", "install", "--no-input", "--disable-pip-version-check"]
    for args in (["--require-hashes", "-r", SERVE_LOCK], ["--no-deps", "--no-build-isolation", f"{src}[serve]"]):
        r = run(pip + args, outside, PIP_TIMEOUT_S)
        assert r.returncode == 0, f"pip install {args} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    t2 = time.monotonic()
    print(f"\nserve-only venv: python -m venv {t1 - t0:.1f} s, pip install (lock + project) {t2 - t1:.1f} s")
    return python, outside


def test_serve_venv_has_the_gateway_and_no_torch(serve_venv):
    python, outside = serve_venv
    r = run([python, "-c", "import torch"], outside, 60)
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr, (r.stdout, r.stderr)
    probe = ("import importlib.metadata as md, json, serving.gateway, mnistgen.latent\n"
             f"names = {list(NOT_INSTALLED)!r}\n"
             "present = []\n"
             "for n in names:\n"
             "    try:\n        md.distribution(n)\n        present.append(n)\n"
             "    except md.PackageNotFoundError:\n        pass\n"
             "print(json.dumps({'gateway': serving.gateway.__file__, 'present': present}))\n")
    r = run([python, "-c", probe], outside, 60)
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)
    assert found["present"] == [], f"the serve extra installed {found['present']}"
    gateway_file = Path(found["gateway"]).resolve()
    assert python.parent.parent.resolve() in gateway_file.parents, f"serving.gateway came from {gateway_file}"
    r = run([python, "-m", "pip", "check", "--disable-pip-version-check"], outside, 120)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run([python, "-m", "pip", "freeze", "--all", "--disable-pip-version-check"], outside, 120)
    installed = {line.lower().replace("_", "-") for line in r.stdout.split() if "==" in line}
    locked = {m.lower().replace("_", "-") for m in re.findall(r"^([\w.-]+==\S+?)\s", SERVE_LOCK.read_text(), re.M)}
    assert locked <= installed, f"not installed at the lock's pins: {sorted(locked - installed)}"
    others = {p.split("==")[0] for p in installed - locked}
    assert others <= {"pip", "mnistgen-serve"}, f"installed beside the lock: {sorted(others)}"


def start_installed_gateway(python: Path, cwd: Path, triton_url: str, log_path: Path):
    """The venv's `mnistgen-gateway` console script, from `cwd`, on ports the OS picks (read back from its log)."""
    cmd = [str(python.parent / "mnistgen-gateway"), "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0",
           "--triton-url", triton_url, "--probe-interval-s", "0.5", "--stop-grace-s", "5"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=clean_env())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        m = LISTENING.search(log_path.read_text(errors="replace"))
        if m:  # serving.run's handle on a process it did not start itself
            gw = GatewayProcess(GatewayProcessConfig(triton_url, grpc_port=int(m.group(1)), http_port=int(m.group(2))))
            gw.proc, gw.log_path = proc, log_path
            return gw
        time.sleep(0.1)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    raise RuntimeError(f"gateway did not start ({cmd}):\n{log_path.read_text(errors='replace')[-3000:]}")


def test_serve_only_gateway_generates(serve_venv, triton, tmp_path):
    triton.require("dcgan_generator")
    python, outside = serve_venv
    gw = start_installed_gateway(python, outside, triton.grpc_url, tmp_path / "gateway.log")
    try:
        gw.wait_ready(60)
        g = gw.stub.Generate(pb.GenerateRequest(model="dcgan-baseline", num_samples=2, seed=1), timeout=60)
        assert g.images.count == 2 and list(g.images.shape) == [2, 1, 28, 28]
        a = np.frombuffer(g.images.raw, "<f4").reshape(2, 1, 28, 28)
        assert np.isfinite(a).all() and np.abs(a).max() <= 1.0 + 1e-5 and a.std() > 0.05  # tanh, float32
        h = gw.http("POST", "/v1/generate", {"model": "dcgan-baseline", "num_samples": 2, "seed": 1})
        assert h.status == 200, h.body[:500]
        j = h.json()
        assert j["images"]["count"] == 2 and j["seed"] == "1"
        np.testing.assert_array_equal(np.frombuffer(base64.b64decode(j["images"]["raw"]), "<f4").reshape(2, 1, 28, 28), a)
        # The client CLI of the same install: its console script over gRPC, the module over HTTP.
        for cli, transport, target in (([python.parent / "mnistgen"], "grpc", gw.grpc_target),
                                     ([python, "-m", "serving.client"], "http", gw.http_target)):
            out = tmp_path / transport
            r = run(cli + ["generate", "--transport", transport, "--target", target, "--model",
                           "dcgan-baseline", "--n", "2", "--seed", "1", "--out", out / "grid.png", "--npy",
                           out / "x.npy"], outside, 120)
            assert r.returncode == 0, f"{cli} generate over {transport}: {r.stdout}\n{r.stderr}"
            np.testing.assert_array_equal(np.load(out / "x.npy"), a)
            assert (out / "grid.png").read_bytes().startswith(b"\x89PNG"), r.stdout
        r = run([python.parent / "mnistgen", "models", "--target", gw.grpc_target], outside, 60)
        assert r.returncode == 0 and "dcgan-baseline" in r.stdout, r.stdout + r.stderr
        # package data: the page, its static files and the proto /openapi.json reads comments from
        assert [gw.http("GET", p).status for p in ("/", "/static/app.js", "/static/style.css")] == [200] * 3
        assert "/v1/generate" in gw.http("GET", "/openapi.json").json()["paths"]
    finally:
        code = gw.stop()
    assert code == 0, f"gateway exited with {code} after SIGTERM:\n{gw.log_tail()}"
