"""A short training run writes its artefacts, is deterministic, resumes, and mitigations switch on."""
import csv
import dataclasses

import pytest
import torch

from mnistgen.checkpoint import load_checkpoint
from mnistgen.registry import load_generator
from training.train_gan import CONFIGS, GANTrainer, apply_mitigations, lr_scale, parse_args

SMALL = dict(epochs=1, max_iters=2, batch_size=16, threads=1, data_limit=64, data_source="embedded")


def _small(name, tmp_path, **kw):
    cfg = CONFIGS[name]
    arch = dataclasses.replace(cfg.arch, base_channels=8) if cfg.arch.arch == "dcgan" else cfg.arch
    return dataclasses.replace(cfg, arch=arch, run_dir=str(tmp_path), **{**SMALL, **kw})


def _first_losses(tmp_path):
    with open(tmp_path / "losses.csv") as f:
        rows = list(csv.DictReader(f))
    return [(float(r["loss_d"]), float(r["loss_g"])) for r in rows]


def test_two_iterations_write_artifacts(tmp_path):
    summary = GANTrainer(_small("baseline", tmp_path)).train()
    assert summary["iterations"] == 2
    for name in ("losses.csv", "loss_curve.png", "summary.json", "generator.safetensors", "state.pt", "samples/epoch_001.png"):
        assert (tmp_path / name).exists(), name
    gen, config = load_generator(tmp_path / "generator.safetensors")
    assert config["arch"]["latent_dim"] == 256 and config["summary"]["iterations"] == 2
    assert gen(torch.randn(2, 256)).shape == (2, 1, 28, 28)


def test_same_seed_same_losses(tmp_path):
    GANTrainer(_small("baseline", tmp_path / "a")).train()
    GANTrainer(_small("baseline", tmp_path / "b")).train()
    GANTrainer(_small("baseline", tmp_path / "c", seed=78)).train()
    a, b, c = (_first_losses(tmp_path / k) for k in "abc")
    assert a == b
    assert a != c


@pytest.mark.parametrize("name", ["modified", "mlp", "vanishing-gradient", "mode-collapse", "d-overfit"])
def test_every_config_trains(name, tmp_path):
    summary = GANTrainer(_small(name, tmp_path, data_limit=None if name == "d-overfit" else 64)).train()
    assert all(torch.isfinite(torch.tensor(v)) for v in _first_losses(tmp_path)[0])
    assert summary["iterations"] == 2


def test_resume_continues(tmp_path):
    cfg = _small("mlp", tmp_path, epochs=2, max_iters=None)
    t1 = GANTrainer(dataclasses.replace(cfg, epochs=1))
    t1.train()
    t2 = GANTrainer(cfg)
    assert t2.load_state() and t2.epoch == 1
    summary = t2.train()
    assert summary["epochs"] == 2 and summary["iterations"] == 2 * t1.iteration
    rows = _first_losses(tmp_path)
    assert len(rows) == summary["iterations"]


def test_mitigations():
    cfg = apply_mitigations(CONFIGS["vanishing-gradient"], ["label-smoothing", "non-saturating", "k-steps", "instance-noise", "d-dropout"])
    assert (cfg.real_label, cfg.g_loss, cfg.d_steps, cfg.instance_noise, cfg.d_dropout) == (0.9, "non-saturating", 2, 0.1, 0.4)
    with pytest.raises(ValueError, match="label-smoothing"):
        apply_mitigations(cfg, ["gradient-penalty"])
    parsed = parse_args(["--config", "mode-collapse", "--mitigations", "all", "--epochs", "3", "--latent-dim", "32"])
    assert parsed.name == "mode-collapse+mitigated" and parsed.epochs == 3 and parsed.arch.latent_dim == 32
    assert parsed.lr_g == 2e-3 and parsed.real_label == 0.9


def test_checkpoint_written_to_extra_path(tmp_path):
    GANTrainer(_small("mlp", tmp_path / "run", checkpoint=str(tmp_path / "ck.safetensors"))).train()
    tensors, config = load_checkpoint(tmp_path / "ck.safetensors", "generator")
    assert config["kind"] == "gan" and config["name"] == "mlp" and tensors


def test_generator_ema_is_what_the_checkpoint_holds(tmp_path):
    """g_ema > 0: the checkpoint's generator is the moving average (not the raw G); a run resumed from a state saved
    without an average starts it at G; out-of-range decays are refused."""
    cfg = _small("baseline", tmp_path / "ema", g_ema=0.5, max_iters=3)
    trainer = GANTrainer(cfg)
    summary = trainer.train()
    assert summary["g_ema"] == 0.5
    tensors, _ = load_checkpoint(tmp_path / "ema" / "generator.safetensors", "generator")
    ema, raw = trainer.ema.model.state_dict(), trainer.G.state_dict()
    for k in ema:
        torch.testing.assert_close(tensors[k], ema[k], rtol=0, atol=0)
    weights = [k for k in ema if k.endswith("weight") and ema[k].dim() > 1]
    assert any((ema[k] - raw[k]).abs().max() > 0 for k in weights)  # the average lags G
    for k in ema:  # BatchNorm statistics are G's own
        if "running" in k:
            torch.testing.assert_close(ema[k], raw[k], rtol=0, atol=0)
    plain = _small("baseline", tmp_path / "plain", epochs=2, max_iters=2)
    GANTrainer(plain).train()
    resumed = GANTrainer(dataclasses.replace(plain, g_ema=0.9, max_iters=4))
    assert resumed.load_state()
    for k, v in resumed.G.state_dict().items():
        torch.testing.assert_close(resumed.ema.model.state_dict()[k], v, rtol=0, atol=0)
    with pytest.raises(ValueError, match="g_ema"):
        GANTrainer(_small("baseline", tmp_path / "bad", g_ema=1.0))


def test_lr_scale_is_linear_from_the_decay_start():
    assert lr_scale(5, None, 10, 0.0) == 1.0  # constant (DCGAN)
    assert lr_scale(4, 4, 10, 0.0) == 1.0
    assert lr_scale(7, 4, 10, 0.0) == pytest.approx(0.5)
    assert lr_scale(10, 4, 10, 0.2) == pytest.approx(0.2)
    assert lr_scale(99, 4, 10, 0.2) == pytest.approx(0.2)  # past the plan: stays at the floor


def test_lr_decay_sets_both_optimizers_and_resumes_on_the_same_line(tmp_path):
    """A run resumed with --lr-decay-from at its iteration trains G and D at the linearly falling rate; the summary
    records the decay; bad settings are refused."""
    plain = _small("baseline", tmp_path, epochs=2, max_iters=2)
    GANTrainer(plain).train()
    cfg = dataclasses.replace(plain, max_iters=6, lr_decay_from=2, lr_min_ratio=0.25)
    trainer = GANTrainer(cfg)
    assert trainer.load_state() and trainer.iteration == 2
    lrs = []
    batch = next(iter(trainer.loader))
    for _ in range(4):
        trainer.train_batch(batch)
        lrs.append((trainer.opt_g.param_groups[0]["lr"], trainer.opt_d.param_groups[0]["lr"]))
        trainer.iteration += 1
    assert [g for g, _ in lrs] == pytest.approx([2e-4 * s for s in (1.0, 0.8125, 0.625, 0.4375)])
    assert all(g == d for g, d in lrs)  # (baseline: lr_g == lr_d)
    summary = GANTrainer(cfg).train()
    assert summary["lr_decay_from"] == 2 and summary["lr_final_scale"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="lr_min_ratio"):
        GANTrainer(dataclasses.replace(plain, lr_min_ratio=1.5))
    with pytest.raises(ValueError, match="lr_decay_from"):
        GANTrainer(dataclasses.replace(plain, lr_decay_from=-1))
