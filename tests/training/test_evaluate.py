"""Generation and denoising metrics separate real digits from noise and collapse; the CLI prints one JSON object."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mnistgen.checkpoint import save_checkpoint
from training.data import load_mnist
from training.evaluate import (GENERATION_KEYS, EvalConfig, class_histogram, coverage, denoise_metrics, evaluate,
                               generation_metrics, inter_sample_variance, kl_uniform, mean_pairwise_distance)
from mnistgen.models import GANArch, build_generator

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable


@pytest.fixture(scope="module")
def splits():
    xt, yt = load_mnist("test")
    xr, _ = load_mnist("train")
    return xt[:500], yt[:500], xr[:1000]  # test images, their labels, a training-split reference


@pytest.fixture(scope="module")
def standin_gan(tmp_path_factory):
    """An untrained DCGAN generator in a checkpoint shaped like the committed ones (never committed)."""
    torch.manual_seed(0)
    arch = GANArch(latent_dim=32, base_channels=16)
    path = tmp_path_factory.mktemp("ckpt") / "standin.safetensors"
    save_checkpoint(path, {"generator": build_generator(arch).state_dict()}, {"kind": "gan", "arch": arch.to_dict()})
    return path


# ------------------------------------------------------------ pure helpers

def test_histogram_coverage_kl():
    hist = class_histogram(torch.tensor([0, 0, 1, 9]))
    assert hist == [2, 1, 0, 0, 0, 0, 0, 0, 0, 1]
    assert coverage([100] * 10) == 10
    assert coverage([1000, 19] + [0] * 8) == 1  # 19 / 1019 < 2%
    assert coverage([980, 20] + [0] * 8) == 2  # exactly 2% counts
    assert kl_uniform([7] * 10) == pytest.approx(0.0, abs=1e-12)
    assert kl_uniform([5] + [0] * 9) == pytest.approx(math.log(10), rel=1e-12)


def test_diversity_of_known_images():
    zeros, ones = -torch.ones(1, 1, 28, 28), torch.ones(1, 1, 28, 28)  # black and white in [-1, 1]
    pair = torch.cat([zeros, ones])
    assert inter_sample_variance(pair) == pytest.approx(0.25, abs=1e-9)  # pixels 0 and 1: var 1/4
    assert mean_pairwise_distance(pair) == pytest.approx(1.0, abs=1e-9)  # RMS per-pixel difference
    assert mean_pairwise_distance(zeros.repeat(5, 1, 1, 1)) == 0.0


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"samples must have shape \(N, 1, 28, 28\)"):
        generation_metrics(torch.zeros(4, 28, 28))
    with pytest.raises(ValueError, match="at least 2"):
        generation_metrics(torch.zeros(1, 1, 28, 28))
    with pytest.raises(ValueError, match="labels must have one entry per image"):
        denoise_metrics(torch.zeros(3, 1, 28, 28), torch.zeros(3, 1, 28, 28), torch.zeros(2))


# ------------------------------------------------------------ metrics on real data

def test_real_beats_noise(splits):
    x, _, ref = splits
    real = generation_metrics(x, reference=ref)
    noise = generation_metrics(torch.rand(500, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1,
                               reference=ref)
    assert set(GENERATION_KEYS) <= set(real)
    assert real["coverage"] == 10
    assert noise["coverage"] < 10
    assert real["fid"] * 10 < noise["fid"]
    assert real["kl_uniform"] < 0.05
    assert real["confidence"] > 0.95
    assert sum(real["class_histogram"]) == 500 == real["num_samples"]


def test_constant_generator_collapses(splits):
    x, _, ref = splits
    const = x[:1].repeat(200, 1, 1, 1)  # a generator that always draws the same digit
    m = generation_metrics(const, reference=ref)
    assert m["coverage"] == 1
    assert m["kl_uniform"] == pytest.approx(math.log(10), abs=1e-9)
    assert m["variance"] == pytest.approx(0.0, abs=1e-12)
    assert m["pairwise_distance"] == pytest.approx(0.0, abs=1e-6)


def test_fid_of_a_set_with_itself_is_near_zero(splits):
    x, _, _ = splits
    assert abs(generation_metrics(x, reference=x)["fid"]) < 0.05


def test_metrics_are_seeded(splits):
    x, _, ref = splits
    a, b = generation_metrics(x, reference=ref, seed=3), generation_metrics(x, reference=ref, seed=3)
    assert a == b


def test_denoise_metrics_identical_and_noisy(splits):
    x, y, _ = splits
    same = denoise_metrics(x, x, y)
    assert same["class_preservation"] >= 0.95
    assert same["psnr"] == math.inf or same["psnr"] > 80
    assert same["ssim"] == pytest.approx(1.0, abs=1e-4)
    noisy = (x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    m = denoise_metrics(noisy, x, y)
    assert math.isfinite(m["psnr"]) and 5 < m["psnr"] < same["psnr"]
    assert m["ssim"] < 0.9
    assert 0 <= m["class_preservation"] <= 1


# ------------------------------------------------------------ evaluate() and the CLI

def test_evaluate_standin_gan_and_bad_options(standin_gan):
    out = evaluate(EvalConfig(model=str(standin_gan), num_samples=100))
    assert out["num_samples"] == 100 and out["ms_per_sample"] > 0
    with pytest.raises(ValueError, match="dpm-solver"):
        evaluate(EvalConfig(model="noise", sampler="euler"))
    with pytest.raises(ValueError, match="unknown model 'vae'.*dcgan-baseline"):
        evaluate(EvalConfig(model="vae"))
    with pytest.raises(ValueError, match=r"--num-samples must be in \[2, 60000\]"):  # the full training split
        evaluate(EvalConfig(model="real-train", num_samples=60001))
    with pytest.raises(ValueError, match="--task denoise needs a DDPM model"):
        evaluate(EvalConfig(model="noise", task="denoise"))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_evaluate_scores_an_exported_torchscript_generator_on_the_same_latents(standin_gan, tmp_path):
    from mnistgen.registry import load_generator

    gen, config = load_generator(standin_gan)
    z = torch.zeros(2, int(config["arch"]["latent_dim"]))
    with torch.inference_mode():
        torch.jit.trace(gen.eval(), z, check_trace=False).save(str(tmp_path / "model.pt"))
    ref = evaluate(EvalConfig(model=str(standin_gan), num_samples=100))
    out = evaluate(EvalConfig(model=str(standin_gan), num_samples=100, torchscript=str(tmp_path / "model.pt")))
    assert out["torchscript"] == str(tmp_path / "model.pt") and out["fid"] == pytest.approx(ref["fid"], abs=1e-3)
    with pytest.raises(ValueError, match="--torchscript applies to a GAN's generate task only"):
        evaluate(EvalConfig(model="noise", torchscript=str(tmp_path / "model.pt")))
    with pytest.raises(ValueError, match="--torchscript 'nope.pt': no such file"):
        evaluate(EvalConfig(model=str(standin_gan), torchscript="nope.pt"))


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([PY, "-m", "training.evaluate", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_json(standin_gan):
    proc = _cli("--model", str(standin_gan), "--json", "--num-samples", "200", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # exactly one JSON object on stdout
    for key in (*GENERATION_KEYS, "num_samples", "model", "ms_per_sample"):
        assert key in out, key
    assert out["num_samples"] == 200


def test_cli_bad_value_exits_2(capsys):
    from training.evaluate import main

    assert main(["--model", "real-test", "--task", "paint"]) == 2
    assert "--task must be one of ('generate', 'denoise')" in capsys.readouterr().err


@pytest.mark.skipif(not (REPO / "checkpoints" / "dcgan-baseline.safetensors").exists(),
                    reason="committed dcgan-baseline checkpoint not present")
def test_cli_json_committed_baseline():
    proc = _cli("--model", "dcgan-baseline", "--json", "--num-samples", "200")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["model"] == "dcgan-baseline"
    assert out["coverage"] >= 8  # a trained baseline draws (nearly) every digit


def test_cli_table_for_real_floor(capsys):
    from training.evaluate import main

    assert main(["--model", "real-test", "--num-samples", "300"]) == 0
    text = capsys.readouterr().out
    assert "fid" in text and "coverage" in text and "real-test" in text


@pytest.fixture(scope="module")
def tiny_ddpm(tmp_path_factory):
    """An untrained, tiny UNet in a checkpoint shaped like checkpoints/ddpm.safetensors (never committed)."""
    diffusion = pytest.importorskip("mnistgen.diffusion")
    torch.manual_seed(0)
    cfg = diffusion.UNetConfig(block_out_channels=(8, 16), attention=(False, False), layers_per_block=1,
                                 attention_head_dim=8)
    path = tmp_path_factory.mktemp("ddpm") / "tiny-ddpm.safetensors"
    save_checkpoint(path, {"ema": diffusion.build_unet(cfg).state_dict()},
                    {"kind": "ddpm", "unet": cfg.to_dict(), "scheduler": dict(diffusion.DEFAULT_SCHEDULER)})
    return path


def test_ddpm_generate_and_denoise_plumbing(tiny_ddpm):
    gen = evaluate(EvalConfig(model=str(tiny_ddpm), sampler="ddim", steps=2, num_samples=6, batch_size=4))
    assert gen["num_samples"] == 6 and gen["sampler"] == "ddim" and gen["steps"] == 2
    assert set(GENERATION_KEYS) <= set(gen)
    cfg = EvalConfig(model=str(tiny_ddpm), task="denoise", sampler="dpm-solver++", steps=2, num_samples=6,
                     sigma=0.5, batch_size=4)
    a, b = evaluate(cfg), evaluate(EvalConfig(**{**cfg.__dict__, "batch_size": 6}))
    for key in ("class_preservation", "psnr", "ssim", "noisy_psnr", "noisy_ssim", "ms_per_sample"):
        assert key in a, key
    assert a["psnr"] == pytest.approx(b["psnr"], abs=1e-3)  # chunking does not change the seeded result
    assert math.isfinite(a["noisy_psnr"]) and a["noisy_psnr"] < 20  # sigma 0.5 on [-1, 1] images


def test_cached_default_reference_matches_explicit(splits):
    from training.evaluate import frechet_distance, reference_images

    x = splits[0][:300]
    first, second = frechet_distance(x), frechet_distance(x)  # the second call reuses the test-split statistics
    explicit = frechet_distance(x, reference_images("test"))
    assert first == pytest.approx(second, abs=1e-6)
    assert first == pytest.approx(explicit, rel=1e-5)


def test_fid_sd_shrinks_with_the_sample_count(splits):
    from training.evaluate import fid_with_sd

    def sd(x, **kw):
        return fid_with_sd(x, resamples=kw.pop("resamples", 30), **kw)[1]

    train = splits[2]  # 1,000 real training images judged against the test split
    few, many = sd(train[:100]), sd(train)
    assert 0 < many < few / 1.5  # ~1 / sqrt(N): 10x the samples, ~3x less spread
    assert few < fid_with_sd(train[:100], resamples=2)[0]  # a spread, not a second FID
    assert sd(train[:100]) == few  # seeded
    assert sd(train[:100], seed=1) != few
    # an explicit reference works the same way as the cached test split
    assert sd(train[:500], reference=train[500:], resamples=5) > 0
    with pytest.raises(ValueError, match="reference"):
        sd(train[:100], reference=train[:1])


def test_fid_with_sd_matches_torchmetrics_figure(splits):
    from training.evaluate import fid_with_sd, frechet_distance, reference_images

    x = splits[0][:300]
    fid, sd = fid_with_sd(x, resamples=10)
    assert fid == pytest.approx(frechet_distance(x), rel=1e-6) and sd > 0
    assert fid_with_sd(x, reference_images("test"), resamples=10)[0] == pytest.approx(fid, rel=1e-6)
