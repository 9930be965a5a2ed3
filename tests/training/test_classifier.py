"""The committed digit classifier loads, reads real digits, exposes 128-d features, and its trainer runs."""
import math

import pytest
import torch

from mnistgen.checkpoint import CHECKPOINT_DIR, read_config
from training.classifier import (FEATURE_DIM, ClassifierConfig, DigitClassifier, FeatureExtractor, accuracy,
                                 augment, load_classifier, predict)
from training.data import load_mnist
from mnistgen.registry import CLASSIFIER_CHECKPOINT


@pytest.fixture(scope="module")
def test_500():
    x, y = load_mnist("test")
    return x[:500], y[:500]  # (500, 1, 28, 28), (500,)


def test_committed_classifier_accuracy(test_500):
    model = load_classifier()
    assert not model.training
    assert accuracy(model, *test_500) >= 0.95  # first 500 test images; the full split scores >= 0.97 (below)


def test_committed_config_records_test_accuracy():
    cfg = read_config(CHECKPOINT_DIR / CLASSIFIER_CHECKPOINT)
    assert cfg["kind"] == "classifier"
    assert cfg["test_accuracy"] >= 0.97
    assert cfg["feature_dim"] == FEATURE_DIM


def test_features_and_probabilities(test_500):
    model = load_classifier()
    x = test_500[0][:8]
    assert model.features(x).shape == (8, FEATURE_DIM)
    probs = predict(model, x)
    assert probs.shape == (8, 10)
    assert torch.allclose(probs.sum(1), torch.ones(8), atol=1e-5)
    fx = FeatureExtractor(model)
    assert fx.num_features == FEATURE_DIM
    assert torch.allclose(fx((x + 1) / 2), model.features(x), atol=1e-5)  # [0, 1] in, same features


def test_load_is_cached_and_deterministic(test_500):
    a, b = load_classifier(), load_classifier()
    assert a is b
    x = test_500[0][:16]
    assert torch.equal(predict(a, x), predict(a, x))


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_classifier(tmp_path / "nope.safetensors")


def test_augment_identity_and_range():
    x, _ = load_mnist("test")
    x = x[:16]
    gen = torch.Generator().manual_seed(0)
    still = augment(x, ClassifierConfig(max_shift=0, max_rotate=0, max_scale=0), gen)
    assert torch.allclose(still, x, atol=1e-4)
    moved = augment(x, ClassifierConfig(), gen)
    assert moved.shape == x.shape
    assert moved.min() >= -1 - 1e-5 and moved.max() <= 1 + 1e-5
    assert not torch.allclose(moved, x, atol=1e-2)


def test_network_size():
    n = sum(p.numel() for p in DigitClassifier().parameters())
    assert n * 4 < 600_000  # a few hundred KB of float32 weights


@pytest.mark.slow
def test_one_epoch_trains(tmp_path):
    from training.classifier import train

    out = tmp_path / "clf.safetensors"
    model, cfg = train(ClassifierConfig(epochs=1, data_source="embedded", out=str(out)))
    assert out.exists()
    assert cfg["test_accuracy"] > 0.8  # one epoch on 5k images
    assert math.isfinite(cfg["train_time_s"])
    reloaded = load_classifier(out)
    x, y = load_mnist("test")
    assert accuracy(reloaded, x[:200], y[:200]) == pytest.approx(accuracy(model.eval(), x[:200], y[:200]), abs=1e-6)
