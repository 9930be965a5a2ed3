"""training.recipe: committed recipes match their checkpoints; stages run, resume, stop where they say, fail clearly."""
from __future__ import annotations

import json
import types

import pytest
import torch

from mnistgen.checkpoint import CHECKPOINT_DIR, read_config
from mnistgen.diffusion import UNetConfig
from training import recipe as R
from training import train_ddpm, train_gan

TINY_GAN = ["--config", "baseline", "--base-channels", "8", "--batch-size", "16", "--data-limit", "64",
            "--data-source", "embedded", "--threads", "1", "--epochs", "50"]
TINY_UNET = UNetConfig(block_out_channels=(8, 16), layers_per_block=1, attention=(False, True), attention_head_dim=8)


def _write(tmp_path, data, name="tiny"):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("data, message", [
    ({"trainer": "vae", "stages": [{"until": 1}]}, "trainer must be one of"),
    ({"trainer": "gan", "stages": []}, "stages must be a non-empty list"),
    ({"trainer": "gan", "stages": [{"until": 5}, {"until": 5}]}, "stage 2: until must be an integer above the last"),
    ({"trainer": "gan", "stages": [{"until": 0}]}, "until must be an integer above the last stage's (0)"),
    ({"trainer": "gan", "stages": [{"until": 3, "args": ["--run-dir", "x"]}]}, "set by the recipe runner"),
    ({"trainer": "gan", "args": ["--stop-at=4"], "stages": [{"until": 3}]}, "set by the recipe runner"),
    ({"trainer": "gan", "stages": [{"until": 3, "args": "--max-iters 3"}]}, "args must be a list of strings"),
    ({"trainer": "gan", "stages": [{"until": 3, "steps": 3}]}, "expected an object with until, args and why"),
    ({"trainer": "gan", "stage": [], "stages": [{"until": 3}]}, "unknown keys ['stage']"),
])
def test_bad_recipes_are_refused_by_name(data, message):
    with pytest.raises(R.RecipeError) as e:
        R.parse_recipe(data, "bad")
    assert message in str(e.value) and "'bad'" in str(e.value)


def test_unknown_name_and_broken_file(tmp_path):
    with pytest.raises(R.RecipeError, match="unknown recipe 'nope': expected one of"):
        R.load_recipe("nope")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(R.RecipeError, match="not valid JSON"):
        R.load_recipe(str(broken))
    assert R.main([str(broken), "--plan"]) == 2


@pytest.mark.parametrize("name, checkpoint, trainer, parse, keys, count", [
    ("dcgan-baseline", "dcgan-baseline.safetensors", "gan", lambda argv: train_gan.parse_args(argv),
     ("lr_g", "lr_d", "real_label", "max_iters", "lr_decay_from", "lr_min_ratio", "g_ema", "seed", "batch_size",
      "betas", "g_loss", "data_source"), "iterations"),
    ("ddpm", "ddpm.safetensors", "ddpm", lambda argv: train_ddpm.parse_args(argv)[0],
     ("lr", "lr_min_ratio", "max_steps", "ema_decay", "batch_size", "seed", "warmup_steps", "grad_clip",
      "data_source"), "steps"),
])
def test_committed_recipe_is_the_committed_checkpoints_history(name, checkpoint, trainer, parse, keys, count, tmp_path):
    """Every stage parses with its trainer, and the last stage's settings are what the committed checkpoint records."""
    recipe = R.load_recipe(name)
    assert recipe.trainer == trainer
    cfgs = [parse(recipe.argv(s, tmp_path, tmp_path / "out.safetensors", [])) for s in recipe.stages]
    assert [c.stop_at for c in cfgs] == [s.until for s in recipe.stages]
    config = read_config(CHECKPOINT_DIR / checkpoint)
    last = vars(cfgs[-1])
    for k in keys:
        recorded = config["train"][k]
        assert (list(last[k]) if isinstance(last[k], tuple) else last[k]) == recorded, k
    assert config["summary"][count] == recipe.stages[-1].until


def test_stages_run_resume_and_record_the_recipe(tmp_path):
    data = {"description": "tiny", "trainer": "gan", "args": TINY_GAN, "stages": [
        {"until": 2, "args": ["--max-iters", "2"]},
        {"until": 4, "args": ["--g-ema", "0.9", "--max-iters", "8", "--lr-decay-from", "2", "--lr-min-ratio", "0"],
         "why": "a plan to 8 stopped at 4"}]}
    path, run_dir, ckpt = _write(tmp_path, data), tmp_path / "run", tmp_path / "out" / "g.safetensors"
    assert R.main([str(path), "--run-dir", str(run_dir), "--checkpoint", str(ckpt), "--plan"]) == 0
    assert R.main([str(path), "--run-dir", str(run_dir), "--checkpoint", str(ckpt)]) == 0
    state = torch.load(run_dir / "state.pt", weights_only=False)
    assert state["iteration"] == 4
    # the last step (iteration index 3) ran on stage 2's plan: 2e-4 x (1 - (3 - 2) / (8 - 2))
    assert state["opt_g"]["param_groups"][0]["lr"] == pytest.approx(2e-4 * 5 / 6)
    rows = (run_dir / "losses.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 4
    config = read_config(ckpt)
    assert config["summary"]["iterations"] == 4 and config["train"]["g_ema"] == 0.9
    assert config["recipe"]["name"] == "tiny" and config["recipe"]["reached"] == 4
    assert [s["until"] for s in config["recipe"]["stages"]] == [2, 4]
    # a finished recipe runs nothing: no subprocess, the state and the checkpoint untouched
    mtime = ckpt.stat().st_mtime_ns
    calls = []
    assert R.run(R.load_recipe(str(path)), run_dir, ckpt, runner=lambda *a, **k: calls.append(a)) == 4
    assert calls == [] and torch.load(run_dir / "state.pt", weights_only=False)["iteration"] == 4
    assert ckpt.stat().st_mtime_ns == mtime
    lines = R.plan_lines(R.load_recipe(str(path)), 4)
    assert "2 stages, 4 of 4 iterations done" in lines[0] and all("done" in line for line in lines[1:])


def test_a_stage_that_stops_short_or_fails_names_what_to_do(tmp_path):
    # 64 images at batch 16: 4 iterations per epoch, and 1 epoch allowed
    data = {"trainer": "gan", "args": TINY_GAN + ["--epochs", "1"], "stages": [{"until": 6, "args": []}]}
    path, run_dir = _write(tmp_path, data), tmp_path / "run"
    with pytest.raises(R.RecipeError, match=r"stage 1 stopped at 4 of 6: the trainer's own limit \(--epochs"):
        R.run(R.load_recipe(str(path)), run_dir, tmp_path / "g.safetensors")
    failing = lambda cmd, **kw: types.SimpleNamespace(returncode=3)  # noqa: E731
    with pytest.raises(R.RecipeError, match="stage 1 failed \\(exit 3\\); fix it and run the same command again"):
        R.run(R.load_recipe(str(path)), tmp_path / "other", tmp_path / "g.safetensors", runner=failing)


def test_stage_command_uses_torchrun_for_several_processes(tmp_path):
    recipe = R.parse_recipe({"trainer": "ddpm", "args": ["--threads", "1"], "stages": [{"until": 9}]}, "x")
    one = R.stage_command(recipe, recipe.stages[0], tmp_path, tmp_path / "c.safetensors", ["--threads", "2"], 1)
    assert one[1:3] == ["-m", "training.train_ddpm"]
    assert one[3:] == ["--threads", "1", "--threads", "2", "--resume", "--run-dir", str(tmp_path), "--stop-at", "9",
                       "--checkpoint", str(tmp_path / "c.safetensors")]
    two = R.stage_command(recipe, recipe.stages[0], tmp_path, tmp_path / "c.safetensors", [], 2)
    assert two[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


def test_ddpm_stop_at_ends_the_run_before_its_plan(tmp_path):
    cfg = train_ddpm.TrainConfig(epochs=3, batch_size=16, limit=32, data_source="embedded", threads=1,
                                 run_dir=str(tmp_path / "run"), checkpoint=str(tmp_path / "d.safetensors"),
                                 sample_every=0, warmup_steps=1, time_budget_min=0.0, max_steps=6, stop_at=3,
                                 unet=TINY_UNET)
    summary = train_ddpm.DDPMTrainer(cfg).train()
    assert summary["steps"] == 3
    again = train_ddpm.DDPMTrainer(cfg)
    assert again.load_state() and again.train()["steps"] == 3  # resumed at its stop: no step more
