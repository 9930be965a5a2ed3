"""training.export: ONNX/TorchScript parity with PyTorch, freshness skipping, latent_dim sync, a new catalog GAN's
model directory, loud failures."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from mnistgen import catalog
from training import export
from mnistgen.checkpoint import save_checkpoint
from training.export import ExportConfig, ExportError, onnx_metadata, read_model_config, run
from mnistgen.models import GANArch, build_generator
from mnistgen.registry import load_generator

REPO_ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-4  # fp32 max |export - PyTorch|


def stand_in(ckpt_dir: Path, name: str, arch: GANArch) -> Path:
    torch.manual_seed(0)
    gen = build_generator(arch)
    gen.train()(torch.randn(8, arch.latent_dim))  # non-trivial BatchNorm running stats
    return save_checkpoint(ckpt_dir / catalog.GANS[name].checkpoint, {"generator": gen.state_dict()},
                           {"kind": "gan", "arch": arch.to_dict()})


@pytest.fixture
def repo(tmp_path):
    """A private copy of model_repository/ (configs and model.py only) and an empty checkpoint dir."""
    dst = tmp_path / "model_repository"
    shutil.copytree(REPO_ROOT / "model_repository", dst,
                    ignore=shutil.ignore_patterns("*.onnx", "*.pt", "engines.json", "__pycache__", "tmp*"))
    (tmp_path / "ckpt").mkdir()
    return dst


def cfg_for(repo: Path, **kw) -> ExportConfig:
    return ExportConfig(checkpoint_dir=repo.parent / "ckpt", model_repository=repo,
                        gpu_repository=repo.parent / "gpu", **kw)


def ort_run(path: Path, feeds: dict) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.load is deprecated; TorchScript is still a deliverable
def test_generator_export_parity_names_and_dynamic_batch(repo):
    ckpt = stand_in(repo.parent / "ckpt", "dcgan-modified", GANArch(latent_dim=64, depth=4))
    (result,) = run(cfg_for(repo, only=("dcgan_modified",)))
    assert result["onnx_max_abs_diff"] <= TOL and result["torchscript_max_abs_diff"] <= TOL
    onnx_path = repo / "dcgan_modified" / "1" / "model.onnx"
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape[1:]) for i in sess.get_inputs()] == [("latent", [64])]
    assert [(o.name, o.shape[1:]) for o in sess.get_outputs()] == [("image", [1, 28, 28])]
    gen, _ = load_generator(ckpt)
    ts = torch.jit.load(str(repo / "dcgan_modified" / "1" / "model.pt"))
    for batch in (1, 37):  # the batch axis is dynamic
        z = np.random.default_rng(batch).standard_normal((batch, 64), dtype=np.float32)
        with torch.inference_mode():
            ref = gen(torch.from_numpy(z)).numpy()  # (B, 1, 28, 28)
            assert np.abs(ts(torch.from_numpy(z)).numpy() - ref).max() <= TOL
        assert np.abs(ort_run(onnx_path, {"latent": z}) - ref).max() <= TOL
    meta = onnx_metadata(onnx_path)
    assert meta[export.META_SHA] == export.sha256(ckpt) and meta[export.META_FORMAT] == export.EXPORT_FORMAT
    assert meta["graph"] == "DCGANServing"  # the inference rewrite is what is served


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_generator_gets_a_bf16_torchscript_with_an_fp32_interface_within_its_tolerance(repo):
    """model_bf16.pt: fp32 latents in, fp32 images out, bf16 inside (a model that differs from fp32 by more than
    bf16 rounding would be a broken export), and a missing one makes the export stale."""
    from mnistgen.engine import BF16_FILE, BF16_MEAN_TOL, load_torchscript

    ckpt = stand_in(repo.parent / "ckpt", "dcgan-modified", GANArch(latent_dim=64, depth=4))
    (result,) = run(cfg_for(repo, only=("dcgan_modified",), measure_engines=False))
    assert 0 < result["bf16"]["mean_abs_diff"] <= BF16_MEAN_TOL  # > 0: really bf16, not the fp32 graph again
    path = repo / "dcgan_modified" / "1" / BF16_FILE
    assert {p.dtype for p in torch.jit.load(str(path)).parameters()} == {torch.bfloat16}
    gen, _ = load_generator(ckpt)
    z = torch.from_numpy(np.random.default_rng(5).standard_normal((37, 64), dtype=np.float32))
    with torch.inference_mode():
        out, ref = load_torchscript(path)(z), gen(z)
    assert out.dtype == torch.float32 and out.shape == (37, 1, 28, 28)
    assert float((out - ref).abs().mean()) <= BF16_MEAN_TOL and float((out - ref).abs().max()) > TOL
    (again,) = run(cfg_for(repo, only=("dcgan_modified",), measure_engines=False))
    assert again["skipped"]
    path.unlink()
    (redone,) = run(cfg_for(repo, only=("dcgan_modified",), measure_engines=False))
    assert not redone.get("skipped") and path.exists()


def test_a_bf16_export_off_by_more_than_rounding_fails_loudly(repo, monkeypatch):
    stand_in(repo.parent / "ckpt", "mlp", GANArch(arch="mlp", latent_dim=100))
    monkeypatch.setattr("mnistgen.engine.BF16_MEAN_TOL", 1e-9)  # no bf16 model is this close to fp32
    with pytest.raises(ExportError, match="bf16 TorchScript parity failed: mean"):
        run(cfg_for(repo, only=("mlp_generator",), measure_engines=False))


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("native", [True, False])
def test_engine_record_has_the_bf16_column_where_the_cpu_has_native_bf16(repo, monkeypatch, native, machine_skip):
    from mnistgen import engine as eng

    if native and not eng.bf16_native():
        machine_skip("this CPU has no native bf16 kernels")
    monkeypatch.setattr(eng, "bf16_native", lambda: native)
    stand_in(repo.parent / "ckpt", "mlp", GANArch(arch="mlp", latent_dim=100))
    run(cfg_for(repo, only=("mlp_generator",), measure_engines=False))
    v = repo / "mlp_generator" / "1"
    record = eng.measure_engines(v / "model.onnx", v / "model.pt", (1, 8), 1, budget_s=0.01,
                                 bf16_path=v / eng.BF16_FILE, checkpoint_sha256="x")
    assert record["bf16"]["native"] is native and (eng.TORCHSCRIPT_BF16 in record["ms_per_sample"]) is native
    assert record["torchscript_precision"] in ((eng.FP32, eng.BF16) if native else (eng.FP32,))
    if native:
        assert record["bf16"]["within_tolerance"] and 0 < record["bf16"]["mean_abs_diff"] <= eng.BF16_MEAN_TOL
    assert eng.record_matches(record, "x", 1, bf16_file=True)


def test_an_older_export_format_is_stale_and_its_engine_record_dropped(repo, monkeypatch):
    stand_in(repo.parent / "ckpt", "mlp", GANArch(arch="mlp", latent_dim=100))
    run(cfg_for(repo, only=("mlp_generator",), measure_engines=False))
    version = repo / "mlp_generator" / "1"
    (version / "engines.json").write_text("{}")  # timed on the files about to be replaced
    (again,) = run(cfg_for(repo, only=("mlp_generator",), measure_engines=False))
    assert again["skipped"] and (version / "engines.json").exists()
    monkeypatch.setattr(export, "EXPORT_FORMAT", "older-than-" + export.EXPORT_FORMAT)
    (redone,) = run(cfg_for(repo, only=("mlp_generator",), measure_engines=False))
    assert not redone.get("skipped") and not (version / "engines.json").exists()


def test_fresh_export_is_skipped_and_force_redoes_it(repo):
    stand_in(repo.parent / "ckpt", "mlp", GANArch(arch="mlp", latent_dim=100))
    run(cfg_for(repo, only=("mlp_generator",)))
    onnx_path = repo / "mlp_generator" / "1" / "model.onnx"
    first = onnx_path.stat().st_mtime_ns
    (again,) = run(cfg_for(repo, only=("mlp_generator",)))
    assert again["skipped"] and onnx_path.stat().st_mtime_ns == first
    (forced,) = run(cfg_for(repo, only=("mlp_generator",), force=True))
    assert not forced.get("skipped") and onnx_path.stat().st_mtime_ns != first
    # a new checkpoint (different bytes) makes the export stale whatever the timestamps say
    stand_in(repo.parent / "ckpt", "mlp", GANArch(arch="mlp", latent_dim=100, base_channels=32))
    (new,) = run(cfg_for(repo, only=("mlp_generator",)))
    assert not new.get("skipped")


def test_missing_checkpoints_are_skipped_with_a_message(repo, capsys):
    assert run(cfg_for(repo)) == []
    out = capsys.readouterr().out
    assert "dcgan_generator: skipped, checkpoint" in out and "train the DDPM first" in out
    assert not list(repo.glob("*/1/model.onnx"))


def test_latent_dim_is_written_into_config_from_checkpoint(repo):
    stand_in(repo.parent / "ckpt", "dcgan-baseline", GANArch(latent_dim=32))  # config.pbtxt says 256
    run(cfg_for(repo, only=("dcgan_generator",)))
    cfg = read_model_config(repo / "dcgan_generator" / "config.pbtxt")
    assert list(cfg.input[0].dims) == [32]
    assert "# DCGAN generator" in (repo / "dcgan_generator" / "config.pbtxt").read_text()  # comments kept


def test_parity_failure_is_loud_and_leaves_no_model(repo, monkeypatch):
    stand_in(repo.parent / "ckpt", "mlp", GANArch(arch="mlp", latent_dim=100))
    monkeypatch.setattr(export, "onnx_max_abs_diff", lambda *a, **k: 0.5)
    with pytest.raises(ExportError, match="exceeds the tolerance"):
        run(cfg_for(repo, only=("mlp_generator",)))
    assert not (repo / "mlp_generator" / "1" / "model.onnx").exists()
    assert export.main(["--only", "mlp_generator", "--checkpoint-dir", str(repo.parent / "ckpt"),
                        "--model-repository", str(repo)]) == 1


def test_only_rejects_unknown_names():
    with pytest.raises(ValueError, match="expected some of"):
        ExportConfig(only=("dcgan",))


def test_gpu_variant_is_written(repo):
    stand_in(repo.parent / "ckpt", "mlp", GANArch(arch="mlp", latent_dim=100))
    run(cfg_for(repo, only=("mlp_generator",), gpu_variant=True))
    gpu = repo.parent / "gpu"
    assert read_model_config(gpu / "mlp_generator" / "config.pbtxt").platform == "onnxruntime_onnx"
    assert (gpu / "mlp_generator" / "1" / "model.onnx").read_bytes() == \
           (repo / "mlp_generator" / "1" / "model.onnx").read_bytes()


# -- the committed checkpoints' exports (what Triton serves) ------------------------------------------


@pytest.mark.parametrize("name", sorted(catalog.GANS))
def test_served_generator_onnx_matches_checkpoint(name):
    ckpt = REPO_ROOT / "checkpoints" / catalog.GANS[name].checkpoint
    onnx_path = REPO_ROOT / "model_repository" / catalog.GANS[name].triton / "1" / "model.onnx"
    if not ckpt.exists() or not onnx_path.exists():
        pytest.skip("checkpoint or export missing")
    if onnx_metadata(onnx_path).get(export.META_SHA) != export.sha256(ckpt):
        pytest.skip(f"{onnx_path} is stale: run `python -m training.export`")
    gen, config = load_generator(ckpt)
    z = np.random.default_rng(0).standard_normal((16, config["arch"]["latent_dim"]), dtype=np.float32)
    with torch.inference_mode():
        ref = gen(torch.from_numpy(z)).numpy()
    assert np.abs(ort_run(onnx_path, {"latent": z}) - ref).max() <= TOL


def test_served_unet_onnx_matches_checkpoint():
    ckpt = REPO_ROOT / "checkpoints" / catalog.GENERATORS["ddpm"].checkpoint
    paths = [REPO_ROOT / "model_repository" / m.triton / "1" / "model.onnx" for m in catalog.MODELS
             if m.checkpoint == ckpt.name]
    if not ckpt.exists() or not all(p.exists() for p in paths):
        pytest.skip("checkpoint or export missing")
    sha = export.sha256(ckpt)
    if any(onnx_metadata(p).get(export.META_SHA) != sha for p in paths):
        pytest.skip("stale UNet export: run `python -m training.export`")
    from mnistgen.diffusion import load_unet

    unet, _ = load_unet(ckpt)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 1, 28, 28), dtype=np.float32)  # (4, 1, 28, 28)
    t = np.array([0, 10, 500, 999], np.int64)  # (4,)
    with torch.inference_mode():
        ref = unet(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()
    for p in paths:  # ddpm_unet and the loop models' copies (3)
        assert np.abs(ort_run(p, {"sample": x, "timestep": t}) - ref).max() <= TOL


def test_a_corrupt_checkpoint_fails_with_a_message_not_a_traceback(tmp_path):
    (tmp_path / "dcgan-baseline.safetensors").write_bytes(b"not a safetensors file")
    r = subprocess.run([sys.executable, "-m", "training.export", "--checkpoint-dir", str(tmp_path),
                        "--model-repository", str(tmp_path / "repo"), "--only", "dcgan_generator",
                        "--no-measure-engines"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "export FAILED:" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_a_new_catalog_gan_gets_its_model_directory_and_tracked_files_stay_as_they_were(repo):
    """An entry from MNISTGEN_CATALOG with a checkpoint and no model directory: export makes the directory from the
    first GAN's (name and latent dims replaced, the same one-line model.py), exports and measures it; the committed
    configs are untouched (the measurement lands in the untracked 1/engines.json)."""
    stand_in(repo.parent / "ckpt", "mlp", GANArch(arch="mlp", latent_dim=100))
    (repo.parent / "ckpt" / "tiny.safetensors").write_bytes((repo.parent / "ckpt" / "mlp.safetensors").read_bytes())
    extra = repo.parent / "extra.json"
    extra.write_text(json.dumps([{"name": "tiny-gan", "triton": "tiny_generator", "kind": "gan",
                                  "checkpoint": "tiny.safetensors", "max_samples": 8}]))
    before = {p: p.read_bytes() for p in repo.glob("*/config.pbtxt")}
    r = subprocess.run([sys.executable, "-m", "training.export", "--checkpoint-dir", str(repo.parent / "ckpt"),
                        "--model-repository", str(repo), "--only", "tiny_generator", "--engine-budget-s", "0.01"],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "MNISTGEN_CATALOG": str(extra)})
    assert r.returncode == 0, r.stderr[-2000:]
    new = repo / "tiny_generator"
    cfg = read_model_config(new / "config.pbtxt")
    first = next(iter(catalog.GANS.values()))
    assert cfg.name == "tiny_generator" and list(cfg.input[0].dims) == [100] and not cfg.parameters
    assert (new / "1" / "model.py").read_text() == (repo / first.triton / "1" / "model.py").read_text()
    assert '"tiny-gan"' in (new / "config.pbtxt").read_text()
    assert {p: p.read_bytes() for p in repo.glob("*/config.pbtxt") if p.parent != new} == before
    record = json.loads((new / "1" / "engines.json").read_text())
    assert record["measured_by"] == "export" and (new / "1" / "model.onnx").exists()


def test_export_warnings_are_reported_once_not_hidden(capsys):
    """TorchScript's deprecation gets one note saying why model.pt is still exported; any other warning is printed
    once per message."""
    def w(message, category=FutureWarning):
        return warnings.WarningMessage(message, category, "x.py", 1)

    caught = [w("`torch.jit.trace` is deprecated. Please switch to `torch.compile` or `torch.export`."),
              w("`torch.jit.load` is deprecated. Please switch to `torch.export`."),
              w("`torch.jit.trace` is deprecated. Please switch to `torch.compile` or `torch.export`."),
              w("Converting a tensor to a Python boolean might cause the trace to be incorrect.", UserWarning),
              w("Converting a tensor to a Python boolean might cause the trace to be incorrect.", UserWarning)]
    export.explain_warnings(caught)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2, out
    assert "deprecates TorchScript (torch.jit.load, torch.jit.trace:" in out[0] and "model.pt is still exported" in out[0]
    assert out[1] == "  warning: UserWarning: Converting a tensor to a Python boolean might cause the trace to be incorrect."
    export.explain_warnings([])
    assert capsys.readouterr().out == ""
