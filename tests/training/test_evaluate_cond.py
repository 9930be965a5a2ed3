"""Class-conditional DDPM evaluation (digit agreement, per-digit FID, guidance) and the guidance sweep report."""
import hashlib
import json
import math

import pytest
import torch

from mnistgen import catalog
from mnistgen.checkpoint import load_checkpoint, read_config, save_checkpoint
from training.evaluate import CONDITIONAL_KEYS, GENERATION_KEYS, EvalConfig, evaluate, main as evaluate_main
from training.experiments import report_cond, sweep
from training.experiments.report_cond import Config as CondReportConfig, recommend

COND = next(m for m in catalog.GENERATORS.values() if m.conditional)
DEFAULT_GUIDANCE = COND.guidance


def run_sweep(cfg):
    return sweep.run(report_cond, cfg)


def report_main(argv):
    return sweep.main(report_cond, argv)

N = 20  # 2 samples per digit: the least the per-digit FID takes
STEPS = 2  # UNet evaluations per sample: plumbing, not quality


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """Every test here on 1 torch thread (tests/training/conftest.py)."""


@pytest.fixture(scope="module")
def cond_ckpt(tmp_path_factory):
    """A 10-step class-conditional DDPM (num_class_embeds 11) from the real trainer (never committed; ~12 s)."""
    from training.train_ddpm import main as train_main

    d = tmp_path_factory.mktemp("ddpm_cond")
    train_main(["--data-source", "embedded", "--limit", "256", "--max-steps", "10", "--epochs", "2",
                "--unet-num-class-embeds", "11", "--run-dir", str(d / "run"), "--checkpoint", str(d / "c.safetensors"),
                "--sample-steps", "3", "--time-budget-min", "0"])
    return d / "c.safetensors"


@pytest.fixture(scope="module")
def uncond_ckpt(tmp_path_factory):
    """An untrained, tiny unconditional UNet in a ddpm checkpoint (as in test_evaluate.py)."""
    from mnistgen import diffusion

    torch.manual_seed(0)
    cfg = diffusion.UNetConfig(block_out_channels=(8, 16), attention=(False, False), attention_head_dim=8)
    path = tmp_path_factory.mktemp("ddpm") / "tiny-ddpm.safetensors"
    save_checkpoint(path, {"ema": diffusion.build_unet(cfg).state_dict()},
                    {"kind": "ddpm", "unet": cfg.to_dict(), "scheduler": dict(diffusion.DEFAULT_SCHEDULER)})
    return path


@pytest.fixture(scope="module")
def cond_result(cond_ckpt):
    return evaluate(EvalConfig(model=str(cond_ckpt), num_samples=N, steps=STEPS))


# ------------------------------------------------------------ evaluate on a conditional checkpoint

def test_conditional_keys_shapes_and_ranges(cond_result):
    out = cond_result
    for key in (*GENERATION_KEYS, *CONDITIONAL_KEYS, "guidance", "num_samples", "ms_per_sample"):
        assert key in out, key
    assert out["sampler"] == "dpm-solver++" and out["steps"] == STEPS  # the served sampler by default
    assert out["guidance"] == DEFAULT_GUIDANCE  # the checkpoint names none: the catalog entry's
    assert out["num_samples"] == N and out["requested_digits"] == [N // 10] * 10  # item i asks for i % 10
    assert 0.0 <= out["digit_agreement"] <= 1.0
    assert len(out["agreement_per_digit"]) == 10 and all(0.0 <= a <= 1.0 for a in out["agreement_per_digit"])
    assert out["digit_agreement"] == pytest.approx(sum(out["agreement_per_digit"]) / 10)  # balanced requests
    assert len(out["fid_per_digit"]) == 10 and all(math.isfinite(f) and f >= 0 for f in out["fid_per_digit"])
    assert math.isfinite(out["fid"]) and 0 <= out["coverage"] <= 10


def test_seeds_do_not_depend_on_chunking(cond_ckpt, cond_result):
    other = evaluate(EvalConfig(model=str(cond_ckpt), num_samples=N, steps=STEPS, batch_size=7))
    assert other["fid"] == pytest.approx(cond_result["fid"], rel=1e-3)
    assert other["agreement_per_digit"] == cond_result["agreement_per_digit"]


def test_guidance_default_comes_from_the_checkpoint(cond_ckpt, tmp_path):
    tensors, config = load_checkpoint(cond_ckpt)
    config["conditional"] = {**config["conditional"], "guidance": 1.5}
    from mnistgen.checkpoint import split_modules

    path = save_checkpoint(tmp_path / "g.safetensors", split_modules(tensors), config)
    cfg = EvalConfig(model=str(path), num_samples=N, steps=1)
    from training.evaluate import validate

    validate(cfg)
    assert cfg.guidance == 1.5 and cfg.num_samples == N
    cfg = EvalConfig(model=str(path))
    validate(cfg)
    assert cfg.num_samples == 1000 and (cfg.sampler, cfg.steps) == ("dpm-solver++", 20)


def test_cli_json_with_guidance(cond_ckpt, capsys):
    assert evaluate_main(["--model", str(cond_ckpt), "--num-samples", str(N), "--steps", "1", "--guidance", "0",
                          "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["guidance"] == 0.0 and len(out["fid_per_digit"]) == 10 and out["requested_digits"] == [2] * 10


def test_guidance_on_unconditional_models_is_an_error(uncond_ckpt, capsys):
    for model in (str(uncond_ckpt), "noise"):
        with pytest.raises(ValueError, match="--guidance applies only to a class-conditional DDPM"):
            evaluate(EvalConfig(model=model, num_samples=4, guidance=2.0))
    assert evaluate_main(["--model", str(uncond_ckpt), "--guidance", "2", "--num-samples", "4"]) == 2
    assert "is unconditional" in capsys.readouterr().err
    # and the unconditional DDPM keeps its own defaults and keys
    out = evaluate(EvalConfig(model=str(uncond_ckpt), num_samples=4, steps=1))
    assert out["sampler"] == "ddpm" and "guidance" not in out and "digit_agreement" not in out


def test_bad_guidance_and_denoise_with_guidance(cond_ckpt):
    with pytest.raises(ValueError, match=r"--guidance must be in \[0, 10\]"):
        evaluate(EvalConfig(model=str(cond_ckpt), num_samples=N, guidance=-1.0))
    with pytest.raises(ValueError, match="--task generate only"):
        evaluate(EvalConfig(model=str(cond_ckpt), task="denoise", num_samples=4, guidance=2.0))


def test_conditional_denoise_uses_the_null_class(cond_ckpt):
    out = evaluate(EvalConfig(model=str(cond_ckpt), task="denoise", num_samples=4, steps=1))
    assert out["num_samples"] == 4 and 0 <= out["class_preservation"] <= 1


# ------------------------------------------------------------ the guidance sweep

def test_recommend_rule():
    rows = [{"guidance": 0.0, "digit_agreement": 0.30, "fid": 10.0},
            {"guidance": 1.0, "digit_agreement": 0.90, "fid": 8.0},
            {"guidance": 2.0, "digit_agreement": 0.97, "fid": 8.7},
            {"guidance": 3.0, "digit_agreement": 0.99, "fid": 8.5},
            {"guidance": 4.0, "digit_agreement": 0.995, "fid": 12.0}]
    assert recommend(rows)[0] == 2.0  # 8.7 <= 1.1 * 8.0, agreement exactly at the target
    assert recommend(rows, fid_tolerance=0.07)[0] == 3.0  # 8.5 <= 8.56 but 8.7 is not
    w, why = recommend(rows, fid_tolerance=0.01)
    assert w == 3.0 and "lowest-FID" in why  # some reach 0.97, none within 1%: the best FID of those
    w, why = recommend(rows, agreement_target=0.999)
    assert w == 4.0 and "highest-agreement" in why  # none reaches the target


def test_sweep_writes_json_md_and_pngs(cond_ckpt, tmp_path, capsys):
    out = tmp_path / "reports"
    data = run_sweep(CondReportConfig(checkpoint=str(cond_ckpt), out_dir=str(out), guidance=(2.0, 0.0),
                                      num_samples=N, steps=STEPS))
    saved = json.loads((out / "guidance_sweep.json").read_text())
    assert saved["recommended_guidance"] == data["recommended_guidance"] in (0.0, 2.0)
    assert f"recommended_guidance = {saved['recommended_guidance']:g}" in capsys.readouterr().out
    assert [r["guidance"] for r in saved["rows"]] == [0.0, 2.0]  # sorted
    sha = hashlib.sha256(cond_ckpt.read_bytes()).hexdigest()
    summary = read_config(cond_ckpt)["summary"]
    assert saved["checkpoint"]["sha256"] == sha and saved["checkpoint"]["summary"]["steps"] == 10
    for r in saved["rows"]:
        assert r["checkpoint"] == {"sha256": sha, "steps": 10, "train_time_s": summary["train_time_s"]}
        assert len(r["fid_per_digit"]) == 10 and len(r["agreement_per_digit"]) == 10
        assert 0 <= r["digit_agreement"] <= 1 and r["wall_s"] > 0 and r["num_samples"] == N
    for png in ("guidance_sweep.png", "samples_grid.png"):
        assert (out / png).stat().st_size > 0, png
    from PIL import Image

    w, h = Image.open(out / "samples_grid.png").size
    assert (w, h) == (8 * 30 + 2, 10 * 30 + 2)  # 8 columns x 10 digit rows of 28 px + 2 px padding
    md = (out / "report.md").read_text()
    for r in saved["rows"]:
        assert f"| {r['fid']:.2f} |" in md and f"| {r['digit_agreement']:.3f} |" in md
    assert f"w = {saved['recommended_guidance']:g}" in md and sha[:16] in md

    # --from-json re-renders from the JSON alone: edited numbers show up, nothing is sampled again
    saved["rows"][0]["fid"], saved["rows"][0]["fid_per_digit"][3] = 123.456, 77.7
    saved["recommended_guidance"], saved["recommendation_reason"] = 0.0, "edited"
    (out / "guidance_sweep.json").write_text(json.dumps(saved))
    assert report_main(["--out-dir", str(out), "--from-json"]) == 0
    md = (out / "report.md").read_text()
    assert "| 123.46 |" in md and "| 77.7 |" in md and "w = 0**: edited" in md


def test_sweep_rejects_an_unconditional_checkpoint(uncond_ckpt, tmp_path, capsys):
    assert report_main(["--checkpoint", str(uncond_ckpt), "--out-dir", str(tmp_path), "--num-samples", "20",
                        "--guidance", "1"]) == 2
    assert "not a class-conditional DDPM" in capsys.readouterr().err
    assert report_main(["--out-dir", str(tmp_path / "none"), "--from-json"]) == 2


def test_served_default_guidance_is_the_recommended_one():
    from mnistgen.checkpoint import REPO_ROOT

    sweep = REPO_ROOT / "reports" / "ddpm-cond" / "guidance_sweep.json"  # committed, from the real checkpoint
    assert json.loads(sweep.read_text())["recommended_guidance"] == DEFAULT_GUIDANCE, (
        "the catalog's ddpm-cond guidance must be the guidance sweep's recommended_guidance")
