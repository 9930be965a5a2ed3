"""Every committed report page a script writes is the render of its committed JSON, byte for byte (no measuring)."""
import importlib
import json

import pytest

from mnistgen.files import REPO_ROOT
from training.experiments import sweep

STUDIES = ("report", "report_ddpm", "report_cond", "quality_goals", "sampler_study", "fid_history",
           "controlled_failures")


@pytest.mark.parametrize("name", STUDIES)
def test_the_committed_page_is_the_render_of_its_committed_json(name):
    mod = importlib.import_module(f"training.experiments.{name}")
    cfg = mod.Config(from_json=True)
    json_path, md_path = sweep.paths(mod, cfg)
    assert json_path.is_relative_to(REPO_ROOT / "reports") and md_path.is_file(), (json_path, md_path)
    assert mod.markdown(sweep.load(json_path), cfg) == md_path.read_text(), (
        f"{md_path.relative_to(REPO_ROOT)} differs from a render of {json_path.name}: run "
        f"`python -m training.experiments.{name} --from-json` (edit the renderer, never the page)")


def test_the_bench_page_is_the_render_of_its_committed_json():
    from loadtest.bench import markdown

    reports = REPO_ROOT / "reports" / "bench"
    assert markdown(json.loads((reports / "results.json").read_text())) == (reports / "results.md").read_text()


def test_every_committed_page_is_covered():
    pages = {sweep.paths(importlib.import_module(f"training.experiments.{n}"),
                         importlib.import_module(f"training.experiments.{n}").Config(from_json=True))[1]
             for n in STUDIES} | {REPO_ROOT / "reports" / "bench" / f"{name}.md" for name in ("results", "mixed", "isolation")}
    # (mixed and isolation: loadtest.mixed's pages, compared with their JSON in tests/loadtest/test_mixed.py)
    assert set((REPO_ROOT / "reports").glob("*/*.md")) == pages


def test_cells_take_over_rows_whose_key_is_unchanged_and_save_after_each():
    saved, calls = [], []

    def cell(name):
        calls.append(name)
        return {"fid": len(calls)}

    done = {"a": {"fid": 9, "key": "ka"}, "b": {"fid": 8, "key": "old"}}
    rows = sweep.cells([(n, lambda n=n: cell(n)) for n in "abc"], done=done, key=lambda n: f"k{n}",
                       after=lambda rows: saved.append(list(rows)))
    assert calls == ["b", "c"] and rows["a"] == {"fid": 9, "key": "ka", "reused": True}
    assert rows["b"]["key"] == "kb" and rows["b"]["fid"] == 1 and rows["b"]["wall_s"] >= 0
    assert saved == [["a", "b"], ["a", "b", "c"]]


def test_a_missing_json_is_a_clear_error(tmp_path, capsys):
    from training.experiments import sampler_study

    assert sweep.main(sampler_study, ["--from-json", "--out-dir", str(tmp_path)]) == 2
    assert "sampler_study.json not found" in capsys.readouterr().err


def test_the_ddpm_report_measures_its_grid_through_evaluate(tmp_path, one_torch_thread):
    """A tiny untrained UNet through the whole DDPM report: every cell a training.evaluate run, figures drawn."""
    import torch

    from mnistgen import diffusion
    from mnistgen.checkpoint import save_checkpoint
    from training.experiments import report_ddpm

    torch.manual_seed(0)
    unet_cfg = diffusion.UNetConfig(block_out_channels=(8, 16), attention=(False, False), attention_head_dim=8)
    ckpt = tmp_path / "tiny.safetensors"
    save_checkpoint(ckpt, {"ema": diffusion.build_unet(unet_cfg).state_dict()},
                    {"kind": "ddpm", "unet": unet_cfg.to_dict(), "scheduler": dict(diffusion.DEFAULT_SCHEDULER),
                     "summary": {"params": 1, "epochs": 1, "steps": 1, "train_time_s": 1.0, "final_loss": 0.5}})
    out = tmp_path / "out"
    data = sweep.run(report_ddpm, report_ddpm.Config(
        checkpoint=str(ckpt), out_dir=str(out), samplers=("ddim", "dpm-solver++"), steps=(2,), n_generate=20,
        sigmas=(0.5,), denoise_steps=(2,), n_denoise=10, batch_size=10))
    assert [(r["sampler"], r["steps"], r["n"]) for r in data["generation"]] == [("ddim", 2, 20), ("dpm-solver++", 2, 20)]
    assert [r["sampler"] for r in data["denoise"]] == ["ddim", "dpm-solver++", "(noisy input)"]
    assert data["denoise"][-1]["psnr"] < data["denoise"][0]["psnr"] + 100 and data["denoise"][0]["t_star"] > 0
    md = (out / "report.md").read_text()
    assert md == report_ddpm.markdown(json.loads((out / "results.json").read_text()))
    assert "| ddim | 2 | 20 |" in md and "| 0.5 |" in md
    for png in ("denoise.png", "quality_vs_steps.png", "samples/ddim_002.png"):
        assert (out / png).stat().st_size > 0, png


def test_a_bad_cell_setting_stops_the_ddpm_report_before_any_cell_runs(tmp_path, capsys):
    from training.experiments import report_ddpm

    assert sweep.main(report_ddpm, ["--samplers", "ddim,euler", "--out-dir", str(tmp_path)]) == 2
    assert "--sampler must be one of" in capsys.readouterr().err and not any(tmp_path.iterdir())
    assert sweep.main(report_ddpm, ["--steps", "0,5000", "--out-dir", str(tmp_path)]) == 2
    assert "--steps must be in [1, 1000]" in capsys.readouterr().err
