"""DDPM quality report: generation (FID, coverage, KL, ms/sample) per sampler and step count, denoising at several sigmas."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from mnistgen.checkpoint import REPO_ROOT  # noqa: E402
from mnistgen.files import repo_path  # noqa: E402
from mnistgen.cli import add_dataclass_args, dataclass_from_args  # noqa: E402
from .data import DataConfig, load_mnist, to_uint8  # noqa: E402
from mnistgen.diffusion import SAMPLERS, denoise, generate, load_unet, make_scheduler, sigma_to_timestep  # noqa: E402
from .plots import save_grid  # noqa: E402


@dataclass
class ReportConfig:
    checkpoint: str = "checkpoints/ddpm.safetensors"  # the EMA UNet to judge
    out_dir: str = "reports/ddpm"  # report.md, results.json, PNGs
    samplers: str = "ddpm,ddim,dpm-solver++,sde-dpm-solver++"  # comma list, each one of SAMPLERS
    steps: str = "10,20,50,100"  # generation: UNet evaluations per sample (comma list)
    n_generate: int = 300  # samples per (sampler, steps) cell; FID on few samples is biased upwards
    sigmas: str = "0.3,0.5,0.7"  # denoise noise levels (y = x0 + sigma * n)
    denoise_steps: str = "10"  # denoise: UNet evaluations per image, capped at t* + 1 (comma list)
    n_denoise: int = 500  # seeded subset of the 10k test split
    seed: int = 0
    batch_size: int = 256
    threads: int = 1  # torch CPU threads (the CPU is shared: ms/sample is indicative, not a benchmark)

    def lists(self) -> tuple[list[str], list[int], list[float], list[int]]:
        samplers = [s.strip() for s in self.samplers.split(",") if s.strip()]
        for s in samplers:
            if s not in SAMPLERS:
                raise ValueError(f"samplers: each must be one of {SAMPLERS}, got {s!r}")
        steps = [int(s) for s in self.steps.split(",") if s.strip()]
        dsteps = [int(s) for s in self.denoise_steps.split(",") if s.strip()]
        sigmas = [float(s) for s in self.sigmas.split(",") if s.strip()]
        for name, vals in (("steps", steps), ("denoise_steps", dsteps)):
            if any(not 1 <= v <= 1000 for v in vals):
                raise ValueError(f"{name}: each must be an integer in [1, 1000], got {vals}")
        if any(not 0 < s <= 10 for s in sigmas):
            raise ValueError(f"sigmas: each must be in (0, 10], got {sigmas}")
        if self.n_generate < 2 or not 1 <= self.n_denoise <= 10000:
            raise ValueError("n_generate must be >= 2 and n_denoise in [1, 10000]")
        return samplers, steps, sigmas, dsteps


def _timed(fn, *args, **kw):
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = fn(*args, **kw)
    return out, time.perf_counter() - t0


def run_generation(unet, sched_cfg: dict, cfg: ReportConfig, samplers, steps, out: Path) -> list[dict]:
    from .evaluate import generation_metrics

    rows = []
    for sampler in samplers:
        for s in steps:
            imgs, dt = _timed(generate, unet, cfg.n_generate, sampler, s, cfg.seed, cfg.batch_size,
                              scheduler_config=sched_cfg)  # (N, 1, 28, 28)
            m = generation_metrics(imgs, seed=cfg.seed)
            save_grid(imgs[:64], out / "samples" / f"{sampler}_{s:03d}.png")
            row = {"sampler": sampler, "steps": s, "n": cfg.n_generate, "ms_per_sample": 1000 * dt / cfg.n_generate,
                   **{k: m[k] for k in ("fid", "coverage", "kl_uniform", "confidence", "variance",
                                        "pairwise_distance")}, "class_histogram": m["class_histogram"]}
            print(json.dumps({k: v for k, v in row.items() if k != "class_histogram"}), flush=True)
            rows.append(row)
    return rows


def run_denoise(unet, sched_cfg: dict, cfg: ReportConfig, samplers, sigmas, dsteps) -> tuple[list[dict], dict]:
    from .evaluate import denoise_metrics

    x, y = load_mnist("test", DataConfig())
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(cfg.seed))[:cfg.n_denoise]
    clean, labels = x[idx], y[idx]  # (N, 1, 28, 28), (N,)
    ac = make_scheduler("ddpm", sched_cfg).alphas_cumprod
    rows, examples = [], {}
    for sigma in sigmas:
        t_star = sigma_to_timestep(sigma, ac)
        noisy = None
        for sampler in samplers:
            for s in dsteps:
                den, dt = [], 0.0
                noisy_parts = []
                for i in range(0, cfg.n_denoise, cfg.batch_size):
                    (nz, d), t = _timed(denoise, unet, clean[i:i + cfg.batch_size], sigma, sampler, s,
                                        cfg.seed + i, scheduler_config=sched_cfg)
                    noisy_parts.append(nz)
                    den.append(d)
                    dt += t
                den = torch.cat(den)  # (N, 1, 28, 28)
                noisy = torch.cat(noisy_parts)
                m = denoise_metrics(den, clean, labels)
                row = {"sigma": sigma, "t_star": t_star, "sampler": sampler, "steps": min(s, t_star + 1),
                       "n": cfg.n_denoise, "ms_per_sample": 1000 * dt / cfg.n_denoise,
                       **{k: m[k] for k in ("class_preservation", "psnr", "ssim")}}
                print(json.dumps(row), flush=True)
                rows.append(row)
                examples[(sigma, sampler, s)] = den[:8]
        m = denoise_metrics(noisy.clamp(-1, 1), clean, labels)  # the input itself, for reference
        rows.append({"sigma": sigma, "t_star": t_star, "sampler": "(noisy input)", "steps": 0, "n": cfg.n_denoise,
                     "ms_per_sample": 0.0, **{k: m[k] for k in ("class_preservation", "psnr", "ssim")}})
        examples[(sigma, "noisy")] = noisy[:8]
    examples["clean"] = clean[:8]
    return rows, examples


def denoise_figure(examples: dict, sigmas, sampler: str, steps: int, path: Path) -> None:
    """Research-style figure: clean row, then noisy / denoised rows for each sigma (8 test images)."""
    rows = [("clean", examples["clean"])]
    for sigma in sigmas:
        rows.append((f"noisy σ={sigma}", examples[(sigma, "noisy")]))
        rows.append((f"denoised σ={sigma}", examples[(sigma, sampler, steps)]))
    fig, axes = plt.subplots(len(rows), 8, figsize=(8 * 0.9, len(rows) * 0.95), dpi=120)
    for r, (label, imgs) in enumerate(rows):
        u8 = to_uint8(imgs)  # (8, 28, 28)
        for c in range(8):
            ax = axes[r, c]
            ax.imshow(u8[c], cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(f"DDPM denoising ({sampler}, {steps} steps max over [0, t*])", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def steps_figure(gen_rows: list[dict], path: Path) -> None:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
    for i, sampler in enumerate(dict.fromkeys(r["sampler"] for r in gen_rows)):
        rs = [r for r in gen_rows if r["sampler"] == sampler]
        a1.plot([r["steps"] for r in rs], [r["fid"] for r in rs], "o-", color=f"C{i}", label=sampler)
        a2.plot([r["steps"] for r in rs], [r["ms_per_sample"] for r in rs], "o-", color=f"C{i}", label=sampler)
    for ax, yl in ((a1, "FID (classifier features, lower is better)"), (a2, "CPU ms / sample")):
        ax.set_xscale("log")
        ax.set_xlabel("UNet evaluations (steps)")
        ax.set_ylabel(yl, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"DDPM quality vs steps (n={gen_rows[0]['n']} samples per point)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt(v, nd=3):
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.{nd}f}"
    return str(v)


def write_markdown(cfg: ReportConfig, ckpt_cfg: dict, gen_rows, den_rows, elapsed: float, path: Path) -> None:
    s = ckpt_cfg.get("summary", {})
    u = ckpt_cfg.get("unet", {})
    lines = [
        "# DDPM report",
        "",
        f"Checkpoint `{cfg.checkpoint}`: UNet2DModel block_out_channels={u.get('block_out_channels')}, "
        f"layers_per_block={u.get('layers_per_block')}, attention={u.get('attention')}, "
        f"{s.get('params', '?')} parameters; trained {s.get('epochs')} epochs / {s.get('steps')} steps in "
        f"{s.get('train_time_s')} s ({_fmt((s.get('train_time_s') or 0) / 60, 1)} min) of CPU training, "
        f"final epoch loss (MSE on eps) {_fmt(s.get('final_loss'), 4)}.",
        "",
        f"Measured by `python -m training.report_ddpm` in {elapsed / 60:.1f} min on {platform.machine()} CPU, "
        f"torch threads={cfg.threads}, a CPU shared with other jobs: ms/sample are indicative only.",
        "FID is computed in the project classifier's 128-d feature space against the 10k test split "
        f"(not Inception-FID; with n={cfg.n_generate} samples it is biased upwards; compare rows with each other).",
        "",
        "## Generation",
        "",
        "| sampler | steps | n | FID | coverage | KL(p‖uniform) | confidence | variance | pairwise dist | ms/sample |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in gen_rows:
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['n']} | {_fmt(r['fid'], 2)} | {r['coverage']} | "
                     f"{_fmt(r['kl_uniform'])} | {_fmt(r['confidence'])} | {_fmt(r['variance'], 4)} | "
                     f"{_fmt(r['pairwise_distance'])} | {_fmt(r['ms_per_sample'], 1)} |")
    lines += [
        "",
        "## Denoising",
        "",
        "y = x0 + sigma * n on seeded test images; t* = argmin |sqrt((1 - abar_t) / abar_t) - sigma|; the sampler runs "
        "`steps` UNet evaluations over [0, t*] (capped at t* + 1). The `(noisy input)` rows score y itself.",
        "",
        "| sigma | t* | sampler | steps | n | class preservation | PSNR (dB) | SSIM | ms/sample |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in den_rows:
        lines.append(f"| {r['sigma']} | {r['t_star']} | {r['sampler']} | {r['steps']} | {r['n']} | "
                     f"{_fmt(r['class_preservation'])} | {_fmt(r['psnr'], 2)} | {_fmt(r['ssim'])} | "
                     f"{_fmt(r['ms_per_sample'], 1)} |")
    lines += [
        "",
        "## Figures",
        "",
        "- `denoise.png`: clean / noisy / denoised rows at each sigma.",
        "- `quality_vs_steps.png`: FID and CPU ms/sample against steps, per sampler.",
        "- `samples/<sampler>_<steps>.png`: the first 64 samples of each generation cell.",
        "- `loss.png`: the training loss per epoch (copied from the training run, when present).",
        "",
    ]
    path.write_text("\n".join(lines))


def run(cfg: ReportConfig) -> dict:
    samplers, steps, sigmas, dsteps = cfg.lists()
    torch.set_num_threads(cfg.threads)
    out = repo_path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = repo_path(cfg.checkpoint)
    unet, ckpt_cfg = load_unet(ckpt)
    sched_cfg = ckpt_cfg["scheduler"]
    t0 = time.perf_counter()
    gen_rows = run_generation(unet, sched_cfg, cfg, samplers, steps, out)
    den_rows, examples = run_denoise(unet, sched_cfg, cfg, samplers, sigmas, dsteps)
    elapsed = time.perf_counter() - t0
    fig_sampler = "ddpm" if "ddpm" in samplers else samplers[0]
    denoise_figure(examples, sigmas, fig_sampler, max(dsteps), out / "denoise.png")
    steps_figure(gen_rows, out / "quality_vs_steps.png")
    loss_png = REPO_ROOT / ckpt_cfg.get("train", {}).get("run_dir", "runs/ddpm") / "loss.png"
    if loss_png.exists():
        (out / "loss.png").write_bytes(loss_png.read_bytes())
    result = {"config": dataclasses.asdict(cfg), "checkpoint_summary": ckpt_cfg.get("summary"),
              "generation": gen_rows, "denoise": den_rows, "elapsed_s": round(elapsed, 1)}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    write_markdown(cfg, ckpt_cfg, gen_rows, den_rows, elapsed, out / "report.md")
    print((out / "report.md").read_text())
    return result


def parse_args(argv: list[str] | None = None) -> ReportConfig:
    p = argparse.ArgumentParser(description=__doc__)
    add_dataclass_args(p, ReportConfig)
    return dataclass_from_args(ReportConfig, p.parse_args(argv))


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
