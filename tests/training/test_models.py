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


@pytest.mark.parametrize("depth,latent", [(3, 256), (4, 64), (5, 16)])
def test_serving_graph_equals_the_generator(depth, latent):
    """DCGANServing (what export writes) computes the generator's function: BatchNorm folded, projection as a
    matrix product, output layer as 3x3 conv + pixel shuffle; checked with non-trivial BatchNorm statistics."""
    from mnistgen.models.dcgan import DCGANServing, serving_module

    torch.manual_seed(depth)
    g = build_generator(GANArch("dcgan", latent, depth, base_channels=16))
    for m in g.modules():
        if isinstance(m, torch.nn.ConvTranspose2d):
            m.weight.data.normal_(0.0, 0.1)  # outputs well inside tanh's range, not ~0
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.3, 3.0)
            m.bias.data.uniform_(-0.2, 0.2)
    g.net[-2].bias.data.uniform_(-0.3, 0.3)  # the output layer's bias
    g.eval()
    s = serving_module(g)
    assert isinstance(s, DCGANServing)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in s.modules())
    z = torch.randn(5, latent)
    with torch.inference_mode():
        ref, got = g(z), s(z)
    assert got.shape == ref.shape == (5, 1, 28, 28)
    assert (got - ref).abs().max() < 1e-5
    assert ref.std() > 0.05  # a generator that outputs a constant would prove nothing


def test_serving_module_passes_other_generators_through():
    from mnistgen.models.dcgan import serving_module

    mlp = build_generator(GANArch(arch="mlp", latent_dim=100))
    assert serving_module(mlp) is mlp
