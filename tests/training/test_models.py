"""Every named configuration builds, maps z to (B, 1, 28, 28) in [-1, 1], and D returns one logit per image."""
import pytest
import torch

from mnistgen.models import GANArch, build_discriminator, build_generator, weights_init
from training.train_gan import CONFIGS


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_shapes(name):
    arch = CONFIGS[name].arch
    g, d = build_generator(arch), build_discriminator(arch)
    g.apply(weights_init)
    z = torch.randn(3, arch.latent_dim)  # (B, latent)
    x = g(z)
    assert x.shape == (3, 1, 28, 28)
    assert x.min() >= -1 and x.max() <= 1
    assert d(x).shape == (3,)


@pytest.mark.parametrize("depth", [3, 4, 5])
def test_dcgan_depths(depth):
    a = GANArch("dcgan", 32, depth, 0.3, base_channels=8)
    assert build_generator(a)(torch.randn(2, 32)).shape == (2, 1, 28, 28)
    assert build_discriminator(a)(torch.randn(2, 1, 28, 28)).shape == (2,)


def test_bad_arch_and_depth():
    with pytest.raises(ValueError, match="dcgan"):
        build_generator(GANArch(arch="vae"))
    with pytest.raises(ValueError, match="depth"):
        build_generator(GANArch(depth=2))


def test_research_configs():
    assert (CONFIGS["baseline"].arch.latent_dim, CONFIGS["baseline"].arch.depth, CONFIGS["baseline"].arch.dropout) == (256, 3, 0.0)
    assert (CONFIGS["modified"].arch.latent_dim, CONFIGS["modified"].arch.depth, CONFIGS["modified"].arch.dropout) == (64, 4, 0.3)
    assert CONFIGS["mlp"].arch.latent_dim == 100
    assert CONFIGS["baseline"].batch_size == 96 and CONFIGS["baseline"].seed == 77
