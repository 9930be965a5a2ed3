"""The GAN report renders from checkpoints alone, says which models are missing, and writes its PNGs."""
import json

import pytest
import torch

from mnistgen.checkpoint import save_checkpoint
from mnistgen.models import GANArch, build_generator
from training.experiments import report, sweep
from training.experiments.report import Config, collapse_verdict


@pytest.fixture(scope="module")
def standin_dir(tmp_path_factory):
    """Untrained stand-ins for two of the three models (mlp deliberately missing); never committed."""
    d = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    it = list(range(0, 200, 10))
    for name, arch in (("dcgan-baseline", GANArch(latent_dim=32, base_channels=16)),
                       ("dcgan-modified", GANArch(latent_dim=16, depth=4, dropout=0.3, base_channels=8))):
        cfg = {"kind": "gan", "arch": arch.to_dict(),
               "summary": {"final_loss_g": 1.5, "final_loss_d": 0.6, "min_loss_g": 0.5, "min_loss_d": 0.3,
                           "train_time_s": 120.0, "time_per_epoch_s": 6.0, "epochs": 20, "iterations": 200},
               "loss_history": {"iter": it, "loss_g": [1.0 + i / 200 for i in it], "loss_d": [0.7] * len(it)}}
        save_checkpoint(d / f"{name}.safetensors", {"generator": build_generator(arch).state_dict()}, cfg)
    return d


def test_report_from_standins(standin_dir, tmp_path):
    out = tmp_path / "report"
    sweep.run(report, Config(checkpoint_dir=str(standin_dir), num_samples=200, latency_repeats=2, out_dir=str(out)))
    text = (out / "report.md").read_text()
    assert "**mlp: not in this report**" in text
    for row in ("Latent Dimension", "Final Gen Loss", "Time/Epoch (sec)", "Inference Time (ms/sample)",
                "FID (classifier features)", "FID spread", "Class coverage", "Real data (floor)"):
        assert row in text, row
    assert "| Training Time (min) | 2.00 | 2.00 | — |" in text  # from the stored summary, 120 s
    for png in ("samples_dcgan-baseline.png", "samples_dcgan-modified.png", "samples_real.png",
                "loss_dcgan-baseline.png", "loss_curves.png", "class_histograms.png"):
        assert (out / png).stat().st_size > 0, png
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["models"]) == {"dcgan-baseline", "dcgan-modified"}
    assert metrics["floor"]["coverage"] == 10
    assert metrics["models"]["dcgan-baseline"]["inference_ms"] > 0
    m = metrics["models"]["dcgan-baseline"]["metrics"]
    assert 0 < m["fid_sd"] < m["fid"]


def test_unknown_model_is_rejected(tmp_path, capsys):
    with pytest.raises(ValueError, match="--models entries must be among"):
        Config(models="vae", out_dir=str(tmp_path))
    assert sweep.main(report, ["--models", "vae", "--out-dir", str(tmp_path)]) == 2
    assert "--models entries must be among" in capsys.readouterr().err


def test_collapse_verdict_reads_the_figures():
    floor = {"pairwise_distance": 0.36}
    healthy = {"metrics": {"coverage": 10, "pairwise_distance": 0.35, "kl_uniform": 0.01}, "summary": {"final_loss_d": 0.7}}
    collapsed = {"metrics": {"coverage": 1, "pairwise_distance": 0.05, "kl_uniform": 2.2}, "summary": {"final_loss_d": 0.0001}}
    partial = {"metrics": {"coverage": 4, "pairwise_distance": 0.27, "kl_uniform": 1.5}, "summary": {"final_loss_d": 0.45}}
    assert "no collapse" in collapse_verdict("a", healthy, floor)
    v = collapse_verdict("b", collapsed, floor)
    assert "collapsed" in v and "coverage 1/10" in v and "final D loss 0.0001" in v and "14% of real" in v
    assert "partial collapse" in collapse_verdict("c", partial, floor)
