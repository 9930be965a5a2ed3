"""Tests for training/train_ddpm.py: one step learns, a tiny run writes checkpoint + logs, resume continues, CLI."""
from __future__ import annotations

import csv

import pytest
import torch
from diffusers import DDPMScheduler

from mnistgen.checkpoint import read_config
from mnistgen.diffusion import DEFAULT_SCHEDULER, UNetConfig, build_unet, load_unet
from training.train_ddpm import DDPMTrainer, TrainConfig, main, parse_args, train_step

TINY = UNetConfig(block_out_channels=(8, 16), layers_per_block=1, attention=(False, True), attention_head_dim=8)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=16, limit=32, data_source="embedded", threads=1, run_dir=str(tmp_path / "run"),
                checkpoint=str(tmp_path / "ddpm.safetensors"), sample_steps=2, warmup_steps=1,
                time_budget_min=0.0, unet=TINY)
    base.update(kw)
    return TrainConfig(**base)


def test_train_step_changes_params_and_loss_is_finite():
    torch.manual_seed(0)
    unet = build_unet(TINY)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in unet.parameters()]
    x0 = torch.rand(4, 1, 28, 28) * 2 - 1  # (4, 1, 28, 28)
    loss = train_step(unet, x0, DDPMScheduler(**DEFAULT_SCHEDULER), opt)
    assert torch.isfinite(torch.tensor(loss)) and 0.1 < loss < 10  # MSE against N(0, I) noise starts near 1
    assert any(not torch.equal(a, b) for a, b in zip(before, unet.parameters()))


def test_tiny_run_writes_checkpoint_logs_and_resumes(tmp_path):
    trainer = DDPMTrainer(_cfg(tmp_path, epochs=1))
    summary = trainer.train()
    assert summary["epochs"] == 1 and summary["steps"] == 2
    run = tmp_path / "run"
    for name in ("loss.csv", "loss.png", "state.pt", "samples/epoch_001.png"):
        assert (run / name).exists(), name
    cfg = read_config(tmp_path / "ddpm.safetensors")
    assert cfg["kind"] == "ddpm" and cfg["summary"]["epochs"] == 1
    assert cfg["scheduler"] == DEFAULT_SCHEDULER and tuple(cfg["unet"]["block_out_channels"]) == (8, 16)
    unet, _ = load_unet(tmp_path / "ddpm.safetensors")
    assert unet(torch.zeros(1, 1, 28, 28), torch.tensor([10])).sample.shape == (1, 1, 28, 28)

    resumed = DDPMTrainer(_cfg(tmp_path, epochs=2))
    assert resumed.load_state() and resumed.epoch == 1 and resumed.step == 2
    summary = resumed.train()
    assert summary["epochs"] == 2 and summary["steps"] == 4
    rows = list(csv.DictReader(open(run / "loss.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(float(r["loss"]) > 0 for r in rows)


def test_time_budget_stops_early(tmp_path):
    summary = DDPMTrainer(_cfg(tmp_path, epochs=3, time_budget_min=1e-6, sample_every=0)).train()
    assert summary["epochs"] == 1


def test_resume_past_the_time_budget_says_so(tmp_path, capsys):
    """The budget is the run's total: a resumed run already past it is told so (and runs one more epoch)."""
    argv = ["--data-source", "embedded", "--limit", "32", "--batch-size", "16", "--threads", "1", "--sample-every",
            "0", "--warmup-steps", "1", "--unet-block-out-channels", "8,16", "--unet-attention", "0,1",
            "--unet-attention-head-dim", "8", "--run-dir", str(tmp_path / "run"),
            "--checkpoint", str(tmp_path / "ddpm.safetensors"), "--time-budget-min", "1e-6"]
    main(argv + ["--epochs", "1"])
    assert "past --time-budget-min" not in capsys.readouterr().out
    main(argv + ["--epochs", "3", "--resume"])
    out = capsys.readouterr().out
    assert "resumed at epoch 1" in out and "past --time-budget-min 1e-06" in out and "raise --time-budget-min" in out
    assert read_config(tmp_path / "ddpm.safetensors")["summary"]["epochs"] == 2


def test_cli_overrides_and_validation():
    cfg, resume = parse_args(["--epochs", "3", "--lr", "2e-4", "--unet-block-out-channels", "8,16",
                              "--unet-attention", "0,1", "--resume"])
    assert cfg.epochs == 3 and cfg.lr == 2e-4 and resume
    assert cfg.unet.block_out_channels == (8, 16) and cfg.unet.attention == (False, True)
    defaults, resume = parse_args([])
    assert defaults == TrainConfig() and not resume
    with pytest.raises(ValueError, match="sample_sampler.*ddpm"):
        TrainConfig(sample_sampler="heun")


def test_class_conditional_run_drops_labels_and_records_it(tmp_path, monkeypatch):
    """num_class_embeds 11: labels reach the UNet, ~label_dropout of them as the null class 10; the checkpoint
    says it is conditional and loads as such."""
    seen = []
    import training.train_ddpm as td

    real = td.train_step

    def spy(unet, x0, sched, opt, clip=1.0, labels=None):
        seen.append(labels.clone())
        return real(unet, x0, sched, opt, clip, labels)

    monkeypatch.setattr(td, "train_step", spy)
    cond = UNetConfig(**{**TINY.to_dict(), "num_class_embeds": 11})
    trainer = DDPMTrainer(_cfg(tmp_path, epochs=1, limit=0, max_steps=4, batch_size=64, label_dropout=0.5, unet=cond))
    trainer.train()
    labels = torch.cat(seen)
    assert labels.shape == (256,) and labels.min() >= 0 and labels.max() <= 10
    assert 0.3 < float((labels == 10).float().mean()) < 0.7  # label_dropout 0.5
    assert len(set(labels[labels < 10].tolist())) >= 8  # real digits for the rest
    cfg = read_config(tmp_path / "ddpm.safetensors")
    assert cfg["conditional"] == {"null_class": 10, "label_dropout": 0.5} and cfg["unet"]["num_class_embeds"] == 11
    unet, _ = load_unet(tmp_path / "ddpm.safetensors")
    out = unet(torch.zeros(2, 1, 28, 28), torch.tensor([10, 10]), class_labels=torch.tensor([3, 10])).sample
    assert out.shape == (2, 1, 28, 28)
    assert (tmp_path / "run" / "samples" / "epoch_001.png").exists()  # the per-epoch grid: row r = digit r
