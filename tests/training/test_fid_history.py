"""training.experiments.fid_history: checkpoints scored once and merged by iterations; table and plot rendered from the JSON."""
from __future__ import annotations

import dataclasses
import json

import pytest

from training.experiments import fid_history as fh
from training.experiments import sweep
from training.train_gan import CONFIGS, GANTrainer


def main(argv):
    return sweep.main(fh, argv)


def _point(iterations, fid, sha, minutes=1.0):
    return {"iterations": iterations, "train_min": minutes, "name": "baseline", "lr_g": 2e-4, "lr_decay_from": None,
            "max_iters": iterations, "real_label": 1.0, "g_ema": 0.999, "fid": fid, "fid_sd": 0.5, "coverage": 10,
            "kl_uniform": 0.01, "num_samples": 10000, "key": {"sha256": sha}}


def test_last_stretch_uses_the_two_latest_iterations():
    assert fh.last_stretch([_point(10, 50.0, "a")]) is None
    s = fh.last_stretch([_point(30, 20.0, "c", 9.0), _point(10, 50.0, "a"), _point(20, 25.0, "b", 4.0)])
    assert (s["from_iterations"], s["to_iterations"], s["from_fid"], s["to_fid"]) == (20, 30, 25.0, 20.0)
    assert s["change"] == pytest.approx(-0.2) and s["minutes"] == 5.0
    assert s["noise"] == pytest.approx(2 * 0.5 * 2 ** 0.5) and not fh.within_noise(s)  # 5 apart, noise 1.41
    s = fh.last_stretch([_point(10, 25.5, "a"), _point(20, 25.0, "b")])
    assert fh.within_noise(s)


def test_table_and_plot_from_the_json_with_the_goal_line(tmp_path):
    out, goals = tmp_path / "h.json", tmp_path / "goals.json"
    out.write_text(json.dumps({"points": [_point(10, 50.0, "a"), _point(20, 25.0, "b", 4.0)]}))
    goals.write_text(json.dumps({"rows": {"floor": {"fid": 0.8}}}))
    assert main(["--from-json", "--out", str(out), "--goals", str(goals)]) == 0
    md = (tmp_path / "h.md").read_text()
    assert "goal 9x the floor 0.800 = **7.20**" in md
    assert "| 20 | 4 | 25.00 | 0.50 | 3.47 | 10 | 0.0100 | baseline, lr 0.0002, to 20 |" in md
    assert "Last stretch: 10 -> 20 iterations (3 min of training): FID 50.00 -> 25.00 (-50 %)." in md
    assert (tmp_path / "h.png").stat().st_size > 10_000
    goals.unlink()  # no floor at hand: the table says nothing about the goal
    assert main(["--from-json", "--out", str(out), "--goals", str(goals)]) == 0
    assert "goal" not in (tmp_path / "h.md").read_text().split("\n")[2]


def test_errors_are_clear(tmp_path, capsys):
    assert main([]) == 2  # nothing to score and not --from-json
    assert "name at least one checkpoint" in capsys.readouterr().err
    assert main(["--from-json", "--out", str(tmp_path / "none.json")]) == 2
    assert "none.json not found" in capsys.readouterr().err
    (tmp_path / "empty.json").write_text('{"points": []}')
    assert main(["--from-json", "--out", str(tmp_path / "empty.json")]) == 2
    assert "holds no points" in capsys.readouterr().err


def test_a_checkpoint_is_scored_once(tmp_path, monkeypatch):
    cfg = CONFIGS["baseline"]
    run = dataclasses.replace(cfg, arch=dataclasses.replace(cfg.arch, base_channels=8), run_dir=str(tmp_path / "r"),
                              epochs=1, max_iters=2, batch_size=16, threads=1, data_limit=64, data_source="embedded")
    GANTrainer(run).train()
    ckpt = tmp_path / "r" / "generator.safetensors"
    calls = []

    def fake_evaluate(ecfg):  # the scoring itself is training.evaluate's (its own tests); here: what gets scored
        calls.append(ecfg)
        return {"fid": 100.0 + len(calls), "fid_sd": 1.0, "coverage": 7, "kl_uniform": 0.2, "num_samples": ecfg.num_samples}

    monkeypatch.setattr(fh, "evaluate", fake_evaluate)
    out = tmp_path / "h.json"
    args = [str(ckpt), "--out", str(out), "--num-samples", "300", "--threads", "1", "--goals", str(tmp_path / "g.json")]
    assert main(args) == 0
    assert [(c.model, c.num_samples) for c in calls] == [(str(ckpt), 300)]
    points = json.loads(out.read_text())["points"]
    assert [(p["iterations"], p["fid"], p["coverage"]) for p in points] == [(2, 101.0, 7)]
    assert main(args) == 0 and len(calls) == 1  # same sha256 and settings: not scored again
    assert main(args[:-4] + ["--num-samples", "400", "--goals", str(tmp_path / "g.json")]) == 0
    assert len(calls) == 2 and len(json.loads(out.read_text())["points"]) == 2  # other settings: a new point
    ddpm_like = tmp_path / "x.safetensors"
    from mnistgen.checkpoint import load_checkpoint, save_checkpoint, split_modules

    tensors, config = load_checkpoint(ckpt)
    save_checkpoint(ddpm_like, split_modules(tensors), {**config, "kind": "ddpm"})
    assert main([str(ddpm_like), "--out", str(out)]) == 2
