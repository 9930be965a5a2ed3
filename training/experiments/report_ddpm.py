"""DDPM quality report: generation (FID, coverage, KL, ms/sample) per sampler and steps, denoising at several sigmas.

    python -m training.experiments.report_ddpm [--samplers ddpm,ddim --steps 10,20] [--from-json]
"""
from __future__ import annotations

import dataclasses
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mnistgen.catalog import SAMPLERS
from mnistgen.checkpoint import REPO_ROOT
from mnistgen.diffusion import denoise, generate, load_unet, make_scheduler, sigma_to_timestep
from mnistgen.files import repo_path
from ..data import to_uint8
from ..evaluate import DENOISE_KEYS, EvalConfig, evaluate, real_split, subset, validate
from ..plots import figure, save_grid
from . import sweep
from .sweep import fmt

JSON, MD = "results.json", "report.md"
GEN_KEYS = ("fid", "coverage", "kl_uniform", "confidence", "variance", "pairwise_distance")


@dataclass
class Config:
    checkpoint: str = "checkpoints/ddpm.safetensors"  # the EMA UNet to judge
    out_dir: str = "reports/ddpm"  # report.md, results.json, PNGs
    samplers: tuple[str, ...] = SAMPLERS  # comma list, each one of SAMPLERS
    steps: tuple[int, ...] = (10, 20, 50, 100)  # generation: UNet evaluations per sample (comma list)
    n_generate: int = 300  # samples per (sampler, steps) cell; FID on few samples is biased upwards
    sigmas: tuple[float, ...] = (0.3, 0.5, 0.7)  # denoise noise levels (y = x0 + sigma * n)
    denoise_steps: tuple[int, ...] = (10,)  # denoise: UNet evaluations per image, capped at t* + 1 (comma list)
    n_denoise: int = 500  # seeded subset of the 10k test split
    seed: int = 0
    batch_size: int = 256
    threads: int = 1  # torch CPU threads (the CPU is shared: ms/sample is indicative, not a benchmark)
    from_json: bool = False  # only re-render report.md and quality_vs_steps.png from results.json


def measure(cfg: Config) -> dict:
    """Every cell a training.evaluate run (generation: sampler x steps; denoising: sigma x sampler x steps), plus
    each generation cell's first 64 samples and the denoise figure (the same seeds, so the same images)."""
    samplers, sigmas, dsteps = cfg.samplers, cfg.sigmas, cfg.denoise_steps
    torch.set_num_threads(cfg.threads)
    out, path = repo_path(cfg.out_dir), repo_path(cfg.checkpoint)
    common = {"model": str(path), "seed": cfg.seed, "batch_size": cfg.batch_size, "threads": cfg.threads}
    gen_plan = {(s, n): EvalConfig(num_samples=cfg.n_generate, sampler=s, steps=n, **common)
                for s in samplers for n in cfg.steps}
    den_plan = {(sigma, s, n): EvalConfig(task="denoise", sigma=sigma, num_samples=cfg.n_denoise, sampler=s, steps=n,
                                          **common) for sigma in sigmas for s in samplers for n in dsteps}
    for ecfg in [*gen_plan.values(), *den_plan.values()]:
        validate(ecfg)  # every cell's settings, checked before the first (long) one runs
    unet, ckpt = load_unet(path)
    sched, t0 = ckpt["scheduler"], time.perf_counter()

    def generation(sampler: str, steps: int) -> dict:
        m = evaluate(gen_plan[sampler, steps])
        with torch.inference_mode():
            save_grid(generate(unet, 64, sampler, steps, cfg.seed, cfg.batch_size, scheduler_config=sched),
                      out / "samples" / f"{sampler}_{steps:03d}.png")
        return {"sampler": sampler, "steps": steps, "n": cfg.n_generate, "ms_per_sample": m["ms_per_sample"],
                **{k: m[k] for k in GEN_KEYS}, "class_histogram": m["class_histogram"]}

    def denoising(sigma: float, sampler: str, steps: int) -> dict:
        m = evaluate(den_plan[sigma, sampler, steps])
        t_star = sigma_to_timestep(sigma, make_scheduler("ddpm", sched).alphas_cumprod)
        return {"sigma": sigma, "t_star": t_star, "sampler": sampler, "steps": min(steps, t_star + 1),
                "n": cfg.n_denoise, "ms_per_sample": m["ms_per_sample"], **{k: m[k] for k in DENOISE_KEYS},
                "noisy": {k: m[f"noisy_{k}"] for k in DENOISE_KEYS}}

    gen = sweep.cells([(f"{s}-{n}", lambda s=s, n=n: generation(s, n)) for s, n in gen_plan], desc="generation")
    den = []
    for sigma in sigmas:
        rows = list(sweep.cells([(f"{sigma}-{s}-{n}", lambda s=s, n=n: denoising(sigma, s, n)) for s in samplers
                                 for n in dsteps], desc=f"denoise sigma {sigma}").values())
        den += [{k: v for k, v in r.items() if k != "noisy"} for r in rows] + [{  # the noisy input itself
            **{k: rows[-1][k] for k in ("sigma", "t_star", "n")}, "sampler": "(noisy input)", "steps": 0,
            "ms_per_sample": 0.0, **rows[-1]["noisy"]}]
    elapsed = time.perf_counter() - t0
    denoise_figure(unet, sched, cfg, sigmas, "ddpm" if "ddpm" in samplers else samplers[0], max(dsteps),
                   out / "denoise.png")
    loss_png = REPO_ROOT / ckpt.get("train", {}).get("run_dir", "runs/ddpm") / "loss.png"
    if loss_png.exists():
        (out / "loss.png").write_bytes(loss_png.read_bytes())
    return {"config": dataclasses.asdict(cfg), "checkpoint_summary": ckpt.get("summary"),
            "checkpoint_unet": ckpt.get("unet"), "machine": platform.machine(),
            "generation": list(gen.values()), "denoise": den, "elapsed_s": round(elapsed, 1)}


@torch.inference_mode()
def denoise_figure(unet, sched: dict, cfg: Config, sigmas, sampler: str, steps: int, path: Path) -> None:
    """Research-style figure: clean row, then noisy / denoised rows for each sigma (the first 8 test images of the
    denoise cells, with their seeds)."""
    clean = subset(*real_split("test"), 8, cfg.seed, "the denoise figure")[0]  # (8, 1, 28, 28)
    rows = [("clean", clean)]
    for sigma in sigmas:
        noisy, den = denoise(unet, clean, sigma, sampler, steps, cfg.seed, scheduler_config=sched)
        rows += [(f"noisy σ={sigma}", noisy), (f"denoised σ={sigma}", den)]
    with figure(path, len(rows), 8, figsize=(8 * 0.9, len(rows) * 0.95), dpi=120) as (fig, axes):
        for r, (label, imgs) in enumerate(rows):
            for c, img in enumerate(to_uint8(imgs)):  # (28, 28) each
                axes[r, c].imshow(img, cmap="gray", vmin=0, vmax=255)
                axes[r, c].set(xticks=[], yticks=[])
            axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
        fig.suptitle(f"DDPM denoising ({sampler}, {steps} steps max over [0, t*])", fontsize=9)


def figures(data: dict, cfg: Config) -> None:
    """quality_vs_steps.png: FID and ms/sample against steps, per sampler."""
    rows = data["generation"]
    with figure(repo_path(cfg.out_dir) / "quality_vs_steps.png", 1, 2, figsize=(9, 3.4)) as (fig, axes):
        for i, sampler in enumerate(dict.fromkeys(r["sampler"] for r in rows)):
            rs = [r for r in rows if r["sampler"] == sampler]
            for ax, key in zip(axes, ("fid", "ms_per_sample")):
                ax.plot([r["steps"] for r in rs], [r[key] for r in rs], "o-", color=f"C{i}", label=sampler)
        for ax, yl in zip(axes, ("FID (classifier features, lower is better)", "CPU ms / sample")):
            ax.set_xscale("log")
            ax.set_xlabel("UNet evaluations (steps)")
            ax.set_ylabel(yl, fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"DDPM quality vs steps (n={rows[0]['n']} samples per point)", fontsize=9)


def markdown(d: dict, cfg: Config | None = None) -> str:
    """report.md from results.json alone (prose: pages/report_ddpm.md)."""
    s = d.get("checkpoint_summary") or {}
    generation = sweep.table(
        "sampler | steps | n | FID | coverage | KL(p‖uniform) | confidence | variance | pairwise dist | ms/sample",
        "---|---:|---:|---:|---:|---:|---:|---:|---:|---:",
        [[r["sampler"], r["steps"], r["n"], fmt(r["fid"], 2), r["coverage"], fmt(r["kl_uniform"]),
          fmt(r["confidence"]), fmt(r["variance"], 4), fmt(r["pairwise_distance"]), fmt(r["ms_per_sample"], 1)]
         for r in d["generation"]])
    denoise = sweep.table(
        "sigma | t* | sampler | steps | n | class preservation | PSNR (dB) | SSIM | ms/sample",
        "---:|---:|---|---:|---:|---:|---:|---:|---:",
        [[r["sigma"], r["t_star"], r["sampler"], r["steps"], r["n"], fmt(r["class_preservation"]),
          fmt(r["psnr"], 2), fmt(r["ssim"]), fmt(r["ms_per_sample"], 1)] for r in d["denoise"]])
    return sweep.page("report_ddpm", d=d, c=d["config"], s=s, u=d.get("checkpoint_unet") or {},
                      params=s.get("params", "?"), train_min=fmt((s.get("train_time_s") or 0) / 60, 1),
                      final_loss=fmt(s.get("final_loss"), 4), minutes=d["elapsed_s"] / 60,
                      generation=generation, denoise=denoise)


if __name__ == "__main__":
    sys.exit(sweep.main(sys.modules[__name__]))
