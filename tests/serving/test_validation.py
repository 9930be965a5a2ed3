"""Unit tests of serving.validation, serving.images and serving.metrics (pure functions, no servers)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from serving import images as imgs
from serving.metrics import GatewayMetrics, mean_pairwise_distance
from mnistgen import catalog
from serving.validation import ValidationError, decode_png_image, decode_raw_images, validate_denoise, validate_generate

DEFAULT_DENOISE_STEPS = catalog.DENOISER.steps
MAX_GAN_SAMPLES = catalog.GENERATORS["dcgan-baseline"].max_samples
MAX_DDPM_SAMPLES = catalog.GENERATORS["ddpm"].max_samples
MAX_DENOISE_IMAGES = catalog.DENOISER.max_samples


def png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


DIGIT = (np.arange(784, dtype=np.uint16) % 256).astype(np.uint8).reshape(28, 28)


def raises(field: str, *fragments: str):
    """Context manager: a ValidationError whose field is `field` and whose message has every fragment."""

    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(ValidationError)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            e = self.info.value
            assert e.field == field, e.message
            assert e.code == "INVALID_ARGUMENT"
            assert e.message.startswith(field)
            for f in fragments:
                assert f in e.message, e.message
            return handled

    return _Check()


# ---- Generate -----------------------------------------------------------------------------------------
def test_generate_defaults():
    p = validate_generate("", 0, None, 0, "", 0)
    assert (p.model.name, p.model.triton, p.num_samples, p.format) == ("dcgan-baseline", "dcgan_generator", 1,
                                                                              "RAW_FLOAT32")
    assert 0 <= p.seed < 2**32 and p.steps == 0 and p.sampler == ""


def test_generate_ddpm_defaults_per_sampler():
    for sampler, steps in {**catalog.SAMPLER_STEPS, catalog.GENERATORS["ddpm"].sampler: 20}.items():
        p = validate_generate("ddpm", 2, 5, 0, sampler, 2)
        assert (p.steps, p.sampler, p.seed, p.format) == (steps, sampler, 5, "PNG")
    # no sampler named: the model's default (unconditional ddpm: the SDE solver; ddpm-cond and Denoise: dpm-solver++)
    assert validate_generate("ddpm", 1, 1, 0, "", 3).sampler == "sde-dpm-solver++"
    assert validate_generate("ddpm", 1, 1, 0, "", 3).steps == 20
    assert validate_generate("ddpm-cond", 1, 1, 0, "", 3).sampler == "dpm-solver++"


@pytest.mark.parametrize("kwargs, field, fragments", [
    (dict(model="gan"), "model", ["'gan'", "dcgan-baseline", "dcgan-modified", "mlp", "ddpm"]),
    (dict(num_samples=MAX_GAN_SAMPLES + 1), "num_samples", [f"1..{MAX_GAN_SAMPLES}", "1025"]),
    (dict(num_samples=-3), "num_samples", ["1..1024", "-3"]),
    (dict(model="ddpm", num_samples=MAX_DDPM_SAMPLES + 1), "num_samples", [f"1..{MAX_DDPM_SAMPLES}", "ddpm"]),
    (dict(model="ddpm", steps=1001), "steps", ["1..1000", "1001"]),
    (dict(model="ddpm", steps=-1), "steps", ["1..1000"]),
    (dict(model="ddpm", sampler="euler"), "sampler", ["'euler'", "ddpm", "ddim", "dpm-solver++"]),
    (dict(steps=10), "steps", ["only the ddpm models"]),
    (dict(sampler="ddim"), "sampler", ["only the ddpm models"]),
    (dict(seed=-1), "seed", ["0..9223372036854775807"]),
    (dict(fmt=9), "format", ["RAW_FLOAT32", "PNG", "PNG_GRID"]),
])
def test_generate_rejects(kwargs, field, fragments):
    args = dict(model="", num_samples=1, seed=None, steps=0, sampler="", fmt=0) | kwargs
    with raises(field, *fragments):
        validate_generate(**args)


# ---- Denoise ------------------------------------------------------------------------------------------
def test_denoise_png_and_raw_agree():
    x = imgs.from_uint8(DIGIT[None])  # (1, 1, 28, 28)
    a = validate_denoise([png(DIGIT)], b"", 0.5, 0, "", 3, 0)
    b = validate_denoise([], x.astype("<f4").tobytes(), 0.5, 0, "", 3, 0)
    assert a.images.shape == (1, 1, 28, 28) and a.images.dtype == np.float32
    np.testing.assert_allclose(a.images, b.images, atol=1e-6)
    assert (a.steps, a.sampler, a.sigma, a.seed) == (DEFAULT_DENOISE_STEPS, "dpm-solver++", 0.5, 3)


def test_png_modes_converted_to_grayscale():
    """RGB/RGBA/LA/16-bit grayscale are accepted and converted to 8-bit L (explicit policy)."""
    ref = decode_png_image(png(DIGIT), 0)
    rgb = np.repeat(DIGIT[..., None], 3, axis=2)
    np.testing.assert_allclose(decode_png_image(png(rgb), 0), ref, atol=1 / 127.5)
    rgba = np.concatenate([rgb, np.full((28, 28, 1), 255, np.uint8)], axis=2)
    np.testing.assert_allclose(decode_png_image(png(rgba), 0), ref, atol=1 / 127.5)
    i16 = DIGIT.astype(np.uint16) * 257
    np.testing.assert_allclose(decode_png_image(png(i16), 0), ref, atol=1e-6)
    assert ref.min() == -1.0 and ref.max() == 1.0


@pytest.mark.parametrize("make, field, fragments", [
    (lambda: dict(png_images=[b"not a png"]), "png_images[0]", ["not a decodable PNG"]),
    (lambda: dict(png_images=[png(DIGIT), png(np.zeros((32, 32), np.uint8))]), "png_images[1]",
     ["32x32", "expected 28x28"]),
    (lambda: dict(png_images=[png(DIGIT)] * (MAX_DENOISE_IMAGES + 1)), "png_images", [f"1..{MAX_DENOISE_IMAGES}"]),
    (lambda: dict(raw_images=b"\0" * (784 * 4 * (MAX_DENOISE_IMAGES + 1))), "raw_images", ["1..64", "65"]),
    (lambda: dict(raw_images=b"\0" * 1000), "raw_images", ["multiple of 3136", "1000"]),
    (lambda: dict(raw_images=np.full(784, np.nan, "<f4").tobytes()), "raw_images", ["NaN/Inf"]),
    (lambda: dict(raw_images=np.full(784, np.inf, "<f4").tobytes()), "raw_images", ["NaN/Inf"]),
    (lambda: dict(raw_images=np.full(784, 2.0, "<f4").tobytes()), "raw_images", ["[-1, 1]", "max 2"]),
    (lambda: dict(png_images=[png(DIGIT)], raw_images=b"\0" * 3136), "images", ["not both"]),
    (lambda: dict(), "images", ["no images", "1..64"]),
    (lambda: dict(sigma=0.0), "sigma", ["0 < sigma <= 1"]),
    (lambda: dict(sigma=1.5), "sigma", ["0 < sigma <= 1", "1.5"]),
    (lambda: dict(sigma=float("nan")), "sigma", ["0 < sigma <= 1"]),
    (lambda: dict(steps=2000), "steps", ["1..1000"]),
    (lambda: dict(sampler="heun"), "sampler", ["ddpm", "ddim", "dpm-solver++"]),
    (lambda: dict(seed=2**63), "seed", ["0..9223372036854775807"]),
    (lambda: dict(fmt=7), "format", ["PNG_GRID"]),
])
def test_denoise_rejects(make, field, fragments):
    args = dict(png_images=[], raw_images=b"", sigma=0.5, steps=0, sampler="", seed=None, fmt=0)
    kw = make()
    if "png_images" not in kw and "raw_images" not in kw and field != "images":
        kw["png_images"] = [png(DIGIT)]
    with raises(field, *fragments):
        validate_denoise(**(args | kw))


def test_every_truncation_and_corruption_of_a_png_is_refused():
    """PIL decodes a PNG cut inside its last IDAT or without IEND (hypothesis found one reaching the model): every
    proper prefix of a good PNG, and a flipped byte anywhere in a chunk, must be refused naming the image."""
    good = png(DIGIT)
    assert decode_png_image(good, 0).shape == (1, 28, 28)
    for n in range(len(good)):
        with raises("png_images[2]", "not a decodable PNG"):
            decode_png_image(good[:n], 2)
    for i in range(8, len(good)):  # every byte after the signature: lengths, chunk types, data, CRCs
        flipped = good[:i] + bytes([good[i] ^ 0x5A]) + good[i + 1:]
        with raises("png_images[0]"):
            decode_png_image(flipped, 0)


def test_raw_roundtrip_and_tolerance():
    x = np.linspace(-1, 1, 784 * 2, dtype=np.float32).reshape(2, 1, 28, 28)
    np.testing.assert_array_equal(decode_raw_images(x.astype("<f4").tobytes()), x)
    y = decode_raw_images((x * 1.0005).astype("<f4").tobytes())  # float rounding slack is clipped
    assert y.min() == -1.0 and y.max() == 1.0


# ---- images -------------------------------------------------------------------------------------------
def test_uint8_roundtrip_and_grid():
    x = imgs.from_uint8(np.stack([DIGIT, 255 - DIGIT]))  # (2, 1, 28, 28)
    np.testing.assert_array_equal(imgs.to_uint8(x), np.stack([DIGIT, 255 - DIGIT]))
    g = imgs.grid(np.repeat(x, 5, axis=0))  # 10 tiles -> 4 columns, 3 rows
    assert g.shape == (3 * 28 + 2 * 2, 4 * 28 + 3 * 2)
    s = imgs.strip([x, x, x])  # (2 rows, 3 columns)
    assert s.shape == (2 * 28 + 2, 3 * 28 + 2 * 2)
    decoded = np.asarray(imgs.decode_png(imgs.encode_png(g)))
    np.testing.assert_array_equal(decoded, g)


# ---- metrics ------------------------------------------------------------------------------------------
def test_mean_pairwise_distance():
    rng = np.random.default_rng(0)
    same = np.repeat(rng.uniform(-1, 1, (1, 784)), 10, axis=0)
    assert mean_pairwise_distance(same) == pytest.approx(0.0, abs=1e-6)
    # two images at +1 and -1 everywhere: distance 2 * sqrt(784) / sqrt(784) = 2
    assert mean_pairwise_distance(np.stack([np.ones(784), -np.ones(784)])) == pytest.approx(2.0)
    # iid uniform[-1, 1] pixels: E|a - b|^2 = 2/3 per pixel -> ~sqrt(2/3)
    assert mean_pairwise_distance(rng.uniform(-1, 1, (64, 784))) == pytest.approx(np.sqrt(2 / 3), rel=0.02)


def test_diversity_gauge_window_and_exposition():
    m = GatewayMetrics(diversity_window=8)
    rng = np.random.default_rng(1)
    m.diversity.add("mlp", rng.uniform(-1, 1, (20, 1, 28, 28)).astype(np.float32))
    assert len(m.diversity._buf["mlp"]) == 8
    m.diversity.add("mlp", np.zeros((8, 1, 28, 28), np.float32))  # collapse: the window is now one image
    assert m.diversity.value("mlp") == pytest.approx(0.0, abs=1e-6)
    m.observe("Generate", "mlp", "grpc", "OK", 0.0004, 4, 0.0003)
    text = m.exposition().decode()
    assert 'mnistgen_gateway_sample_diversity{model="mlp"} 0.0' in text
    assert 'mnistgen_gateway_requests_total{code="OK",model="mlp",rpc="Generate",transport="grpc"} 1.0' in text
    assert 'mnistgen_gateway_sample_latency_seconds_bucket{le="0.0001",model="mlp",rpc="Generate"} 1.0' in text
    assert 'mnistgen_gateway_batch_size_bucket{le="4.0",model="mlp",rpc="Generate"} 1.0' in text
