"""Tests for training/diffusion.py: sampler plumbing, seeds, sigma -> timestep, denoise edge cases (tiny UNet)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mnistgen.checkpoint import save_checkpoint
from mnistgen.diffusion import (
    DEFAULT_SCHEDULER,
    SAMPLERS,
    UNetConfig,
    build_unet,
    denoise,
    generate,
    inference_timesteps,
    item_generators,
    load_unet,
    make_scheduler,
    noise_to_signal,
    sample_loop,
    sigma_to_timestep,
)

TINY = UNetConfig(block_out_channels=(8, 16), layers_per_block=1, attention=(False, True), attention_head_dim=8)
BATCH_TOL = 1e-4  # same item computed in different batches: float rounding only


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """Every test here on 1 torch thread (tests/training/conftest.py)."""


@pytest.fixture(scope="module")
def unet(one_thread):
    torch.manual_seed(0)
    return build_unet(TINY).eval()


@pytest.fixture(scope="module")
def clean():
    g = torch.Generator().manual_seed(123)
    return torch.rand((3, 1, 28, 28), generator=g) * 2 - 1  # (3, 1, 28, 28)


def test_unet_shapes(unet):
    x = torch.randn(2, 1, 28, 28)
    out = unet(x, torch.tensor([0, 999])).sample
    assert out.shape == (2, 1, 28, 28)


def test_make_scheduler_rejects_unknown_name():
    with pytest.raises(ValueError, match="ddpm.*ddim.*dpm-solver"):
        make_scheduler("euler")


def test_unet_config_validation():
    with pytest.raises(ValueError, match="attention"):
        UNetConfig(block_out_channels=(8, 16), attention=(True,))
    with pytest.raises(ValueError, match="norm_num_groups"):
        UNetConfig(block_out_channels=(12, 16), attention=(False, False))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_generates_and_is_deterministic(unet, sampler):
    a = generate(unet, 2, sampler, steps=3, seed=5)
    b = generate(unet, 2, sampler, steps=3, seed=5)
    c = generate(unet, 2, sampler, steps=3, seed=6)
    assert a.shape == (2, 1, 28, 28)
    assert torch.isfinite(a).all() and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_generate_independent_of_batch_composition(unet, sampler):
    together = generate(unet, 4, sampler, steps=2, seed=10, batch_size=4)
    alone = generate(unet, 1, sampler, steps=2, seed=12)  # item 2 of the batch above uses seed 10 + 2
    split = generate(unet, 4, sampler, steps=2, seed=10, batch_size=3)
    torch.testing.assert_close(alone[0], together[2], rtol=0, atol=BATCH_TOL)
    torch.testing.assert_close(split, together, rtol=0, atol=BATCH_TOL)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_denoise_shapes_determinism_and_batch_independence(unet, clean, sampler):
    noisy, den = denoise(unet, clean, 0.5, sampler, steps=3, seed=1)
    noisy2, den2 = denoise(unet, clean, 0.5, sampler, steps=3, seed=1)
    assert noisy.shape == den.shape == (3, 1, 28, 28)
    torch.testing.assert_close(den, den2, rtol=0, atol=0)
    # the noise is y - x0 = sigma * n with n ~ N(0, I)
    n = (noisy - clean) / 0.5
    assert abs(n.mean().item()) < 0.1 and abs(n.std().item() - 1) < 0.1
    # item 1 alone with seed 1 + 1 equals item 1 of the batch
    noisy_1, den_1 = denoise(unet, clean[1:2], 0.5, sampler, steps=3, seed=2)
    torch.testing.assert_close(noisy_1[0], noisy[1], rtol=0, atol=0)
    torch.testing.assert_close(den_1[0], den[1], rtol=0, atol=BATCH_TOL)


def test_explicit_per_item_seeds(unet, clean):
    """`seeds` lets a server batch several requests: each item keeps its own request's seed."""
    a = generate(unet, 3, "ddpm", steps=2, seeds=[40, 7, 41])
    torch.testing.assert_close(a[[0, 2]], generate(unet, 2, "ddpm", steps=2, seed=40), rtol=0, atol=BATCH_TOL)
    torch.testing.assert_close(a[1:2], generate(unet, 1, "ddpm", steps=2, seed=7), rtol=0, atol=BATCH_TOL)
    _, d = denoise(unet, clean, 0.3, "ddpm", steps=2, seeds=[5, 9, 6])
    _, d56 = denoise(unet, clean[[0, 2]], 0.3, "ddpm", steps=2, seed=5)
    torch.testing.assert_close(d[[0, 2]], d56, rtol=0, atol=BATCH_TOL)
    with pytest.raises(ValueError, match="seeds"):
        generate(unet, 2, "ddpm", steps=2, seeds=[1])


def test_denoise_sigma_zero_returns_input(unet, clean):
    noisy, den = denoise(unet, clean, 0.0, "ddpm", steps=10)
    torch.testing.assert_close(noisy, clean, rtol=0, atol=1e-7)
    torch.testing.assert_close(den, clean, rtol=0, atol=1e-7)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), 1e6])
def test_denoise_rejects_bad_sigma(unet, clean, bad):
    with pytest.raises(ValueError, match="sigma"):
        denoise(unet, clean, bad)


def test_bad_steps_and_sampler_are_named(unet, clean):
    with pytest.raises(ValueError, match="steps"):
        generate(unet, 1, "ddim", steps=0)
    with pytest.raises(ValueError, match="steps"):
        denoise(unet, clean, 0.3, "ddim", steps=1001)
    with pytest.raises(ValueError, match="sampler"):
        generate(unet, 1, "plms", steps=2)
    with pytest.raises(ValueError, match="shape"):
        denoise(unet, clean[:, :, :14], 0.3)


def test_sigma_to_timestep_monotone_and_exact_on_grid():
    ac = make_scheduler("ddpm").alphas_cumprod
    ratio = noise_to_signal(ac)
    assert np.all(np.diff(ratio) > 0)  # strictly increasing in t
    for t in (0, 1, 10, 88, 144, 500, 999):
        assert sigma_to_timestep(float(ratio[t]), ac) == t
    sigmas = np.linspace(0, 5, 200)
    ts = [sigma_to_timestep(float(s), ac) for s in sigmas]
    assert all(b >= a for a, b in zip(ts, ts[1:]))
    assert sigma_to_timestep(0.0, ac) == 0


def test_inference_timesteps_counts_and_ddim_gaps():
    T = DEFAULT_SCHEDULER["num_train_timesteps"]
    gaps_ok = {T // n for n in range(1, T + 1)}
    for t_start in (0, 3, 88, 144, 194, 999):
        for steps in (1, 2, 3, 10, 20, 50, 100):
            ts = inference_timesteps(t_start, steps, T)
            assert len(ts) == min(steps, t_start + 1)  # steps = UNet evaluations actually run
            assert ts[0] == t_start and ts[-1] >= 0
            assert all(b < a for a, b in zip(ts, ts[1:]))
            assert all((a - b) in gaps_ok for a, b in zip(ts, ts[1:]))
    assert inference_timesteps(999, 100, T)[:3] == [999, 989, 979]


def test_sample_loop_counts_eps_calls(unet):
    calls = []

    def eps_fn(x, t):
        assert x.shape == (2, 1, 28, 28) and t.shape == (2,) and t.dtype == torch.int64
        calls.append(int(t[0]))
        return torch.zeros_like(x)

    for sampler in SAMPLERS:
        calls.clear()
        ts = inference_timesteps(200, 7)
        out = sample_loop(eps_fn, torch.randn(2, 1, 28, 28), make_scheduler(sampler), ts)
        assert calls == ts and out.shape == (2, 1, 28, 28) and torch.isfinite(out).all()


def test_eps_fn_callable_matches_module(unet):
    """An eps_fn callable (how ONNX Runtime plugs in) gives the module's result."""

    def eps_fn(x, t):
        with torch.no_grad():
            return unet(x, t).sample

    a = generate(unet, 2, "dpm-solver++", steps=3, seed=0)
    b = generate(eps_fn, 2, "dpm-solver++", steps=3, seed=0)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_denoise_with_true_noise_recovers_image(clean):
    """eps_fn returning the true n: DDIM's single jump gives x0 + (sigma - ratio(t*)) n, so t* maps sigma right."""
    sigma = 0.5
    ac = make_scheduler("ddim").alphas_cumprod
    ratio = float(noise_to_signal(ac)[sigma_to_timestep(sigma, ac)])
    n = torch.cat([torch.randn((1, 1, 28, 28), generator=g) for g in item_generators(7, 3)])  # denoise's own n

    noisy, den = denoise(lambda x, t: n, clean, sigma, "ddim", steps=1, seed=7)
    torch.testing.assert_close(noisy, clean + sigma * n, rtol=0, atol=1e-6)
    expected = (clean + (sigma - ratio) * n).clamp(-1, 1)
    torch.testing.assert_close(den, expected, rtol=0, atol=1e-5)
    assert abs(sigma - ratio) < 0.01  # the grid is fine near sigma = 0.5


def test_load_unet_roundtrip(tmp_path, unet):
    path = tmp_path / "ddpm.safetensors"
    save_checkpoint(path, {"ema": unet.state_dict()},
                    {"kind": "ddpm", "unet": TINY.to_dict(), "scheduler": DEFAULT_SCHEDULER})
    loaded, cfg = load_unet(path)
    assert cfg["kind"] == "ddpm"
    x, t = torch.randn(1, 1, 28, 28), torch.tensor([3])
    torch.testing.assert_close(loaded(x, t).sample, unet(x, t).sample, rtol=0, atol=1e-6)
    save_checkpoint(tmp_path / "gan.safetensors", {"ema": unet.state_dict()}, {"kind": "gan"})
    with pytest.raises(ValueError, match="not a 'ddpm'"):
        load_unet(tmp_path / "gan.safetensors")


def test_numpy_default_schedule_is_diffusers_own():
    """mnistgen.schedule (numpy, used by the torch-free gateway) rebuilds DDPMScheduler's abar_t up to float32
    rounding of the cumulative product (measured: relative 6e-7)."""
    from mnistgen.schedule import default_alphas_cumprod

    ref = make_scheduler("ddpm", DEFAULT_SCHEDULER).alphas_cumprod.numpy()
    np.testing.assert_allclose(default_alphas_cumprod(), ref, rtol=2e-6, atol=0)


# ---- class-conditional UNet + classifier-free guidance -------------------------------------------------------
COND = UNetConfig(block_out_channels=(8, 16), layers_per_block=1, attention=(False, True), attention_head_dim=8,
                  num_class_embeds=11)


@pytest.fixture(scope="module")
def cond_unet(one_thread):
    torch.manual_seed(1)
    unet = build_unet(COND).eval()
    with torch.no_grad():  # a random class embedding of real size, so labels change the prediction
        unet.class_embedding.weight.normal_(0, 1)
    return unet


def test_guided_eps_is_the_cfg_combination_in_one_batched_call(cond_unet):
    from mnistgen.diffusion import guided_eps_fn, null_class

    assert null_class(cond_unet) == 10 and null_class(COND) == 10 and null_class(TINY) is None
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn((3, 1, 28, 28), generator=g), torch.tensor([999, 500, 10])
    labels, w = torch.tensor([7, 10, 2]), torch.tensor([3.0, 3.0, 1.0])
    calls = []

    def eps3(x_, t_, c_):
        calls.append(c_.tolist())
        with torch.inference_mode():
            return cond_unet(x_, t_, class_labels=c_).sample

    got = guided_eps_fn(eps3, labels, w, null=10)(x, t)
    assert calls == [[7, 10, 2, 10]]  # one call: only item 0 needs its null pass (item 1 is null, item 2 has w = 1)
    with torch.inference_mode():
        e = lambda c: cond_unet(x, t, class_labels=torch.tensor(c)).sample  # noqa: E731
        e_lab, e_null = e([7, 10, 2]), e([10, 10, 10])
    want = e_lab.clone()
    want[0] = e_null[0] + 3.0 * (e_lab[0] - e_null[0])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert not torch.allclose(e_lab[0], e_null[0], atol=1e-3)  # the label matters
    torch.testing.assert_close(guided_eps_fn(cond_unet, labels, w, null=10)(x, t), want, atol=1e-4, rtol=0)


def test_conditional_generate_is_deterministic_and_batch_independent(cond_unet):
    kw = dict(sampler="dpm-solver++", steps=3, guidance=2.5)
    a = generate(cond_unet, 4, seed=5, labels=[3, 7, 10, 1], **kw)
    assert a.shape == (4, 1, 28, 28) and a.abs().max() <= 1
    torch.testing.assert_close(a, generate(cond_unet, 4, seed=5, labels=[3, 7, 10, 1], **kw), atol=0, rtol=0)
    one = generate(cond_unet, 1, seeds=[7], labels=[10], **kw)  # item 2 alone: seed 5 + 2, the null label
    torch.testing.assert_close(one[0], a[2], atol=BATCH_TOL, rtol=0)
    mixed = generate(cond_unet, 2, seeds=[6, 6], labels=[7, 1], guidance=[2.5, 2.5], sampler="dpm-solver++", steps=3)
    torch.testing.assert_close(mixed[0], a[1], atol=BATCH_TOL, rtol=0)
    assert not torch.allclose(mixed[0], mixed[1], atol=1e-3)  # same noise, other digit


def test_labels_are_checked(cond_unet, unet):
    with pytest.raises(ValueError, match="labels"):
        generate(cond_unet, 2, steps=2, labels=[1, 11])
    with pytest.raises(ValueError, match="labels"):
        generate(cond_unet, 2, steps=2, labels=[1])
    with pytest.raises(ValueError, match="not class-conditional"):
        generate(unet, 1, steps=2, labels=[1])
    with pytest.raises(ValueError, match="num_class_embeds"):
        from training.train_ddpm import TrainConfig

        TrainConfig(unet=UNetConfig(num_class_embeds=5))
