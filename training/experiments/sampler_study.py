"""Why do the deterministic samplers lose to DDPM, and why does DDIM get worse with more steps? A controlled study.

    python -m training.experiments.sampler_study [--num-samples 500] [--from-json]

Two suspects, each isolated on the same checkpoint, seeds and timestep grid (mnistgen.diffusion.inference_timesteps),
only the scheduler changing: clip_sample (DDIM and DDPM clip the predicted x0 to [-1, 1] every step, DPM-Solver++
does not: `ddim clip=False` should converge where DPM-Solver++ does if that is it), and stochasticity (DDIM eta=0 and
DPM-Solver++ integrate the probability-flow ODE, which carries the network's errors along; DDPM's fresh noise
corrects them, Karras et al. 2022 sec. 4: then DDIM eta=1 and SDE-DPM-Solver++ close the gap at few steps).
Writes reports/ddpm/sampler_study.json (one row per cell) and sampler_study.md from it.
"""
from __future__ import annotations

import platform
import sys
import time
from dataclasses import asdict, dataclass

import torch

from mnistgen.diffusion import as_eps_fn, inference_timesteps, load_unet, make_scheduler, sample_loop
from mnistgen.files import repo_path
from ..evaluate import generation_metrics
from . import sweep

JSON, MD = "sampler_study.json", "sampler_study.md"
INDENT = 2
# (label, scheduler kind, options, steps)
CELLS = [
    ("ddpm", "ddpm", {"clip_sample": True}, 20), ("ddpm", "ddpm", {"clip_sample": True}, 100),
    ("ddim clip", "ddim", {"clip_sample": True}, 20), ("ddim clip", "ddim", {"clip_sample": True}, 50),
    ("ddim clip", "ddim", {"clip_sample": True}, 100),
    ("ddim no-clip", "ddim", {"clip_sample": False}, 20), ("ddim no-clip", "ddim", {"clip_sample": False}, 50),
    ("ddim no-clip", "ddim", {"clip_sample": False}, 100),
    ("ddim eta=1", "ddim", {"clip_sample": True, "eta": 1.0}, 20),
    ("dpm-solver++", "dpm", {"algorithm_type": "dpmsolver++"}, 20),
    ("dpm-solver++", "dpm", {"algorithm_type": "dpmsolver++"}, 50),
    ("sde-dpm-solver++", "dpm", {"algorithm_type": "sde-dpmsolver++"}, 20),
]


@dataclass
class Config:
    checkpoint: str = "checkpoints/ddpm.safetensors"
    num_samples: int = 500  # per cell; FID on few samples is biased upwards, rows compare with each other
    seed: int = 0
    threads: int = 1
    out_dir: str = "reports/ddpm"
    from_json: bool = False  # only re-render sampler_study.md from sampler_study.json


def run_cell(eps_fn, kind: str, opts: dict, steps: int, sched_cfg: dict, n: int, seed: int) -> torch.Tensor:
    """n samples from x_T (item i seeded seed + i) on the shared timestep grid with the served sampler's scheduler
    (this cell's clip_sample); DDIM's eta through a step wrapper."""
    name = {"dpmsolver++": "dpm-solver++", "sde-dpmsolver++": "sde-dpm-solver++"}.get(opts.get("algorithm_type"), kind)
    sched = make_scheduler(name, {**sched_cfg, "clip_sample": opts.get("clip_sample", True)})
    if opts.get("eta"):
        step = sched.step
        sched.step = lambda *a, **kw: step(*a, eta=opts["eta"], **kw)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    x_t = torch.cat([torch.randn((1, 1, 28, 28), generator=g) for g in gens])  # (n, 1, 28, 28)
    ts = inference_timesteps(sched_cfg["num_train_timesteps"] - 1, steps, sched_cfg["num_train_timesteps"])
    with torch.inference_mode():
        return sample_loop(eps_fn, x_t, sched, ts, gens).clamp(-1, 1)


def cell(eps_fn, label: str, kind: str, opts: dict, steps: int, sched_cfg: dict, cfg: Config) -> dict:
    t = time.perf_counter()
    x = run_cell(eps_fn, kind, opts, steps, sched_cfg, cfg.num_samples, cfg.seed)
    ms = (time.perf_counter() - t) * 1e3 / cfg.num_samples
    m = generation_metrics(x)
    return {"label": label, "scheduler": kind, "options": opts, "steps": steps, "ms_per_sample": ms,
            **{k: m[k] for k in ("fid", "coverage", "kl_uniform", "confidence")}}


def measure(cfg: Config) -> dict:
    torch.set_num_threads(cfg.threads)
    info = sweep.checkpoint_info(repo_path(cfg.checkpoint))
    unet, config = load_unet(repo_path(cfg.checkpoint))
    eps_fn, t0 = as_eps_fn(unet), time.perf_counter()
    rows = sweep.cells([(f"{c[0]} {c[3]}", lambda c=c: cell(eps_fn, *c, config["scheduler"], cfg)) for c in CELLS],
                       desc="sampler cells")
    return {"checkpoint": {"path": cfg.checkpoint, "sha256": info["sha256"], "summary": info["summary"]},
            "num_samples": cfg.num_samples, "seed": cfg.seed, "threads": cfg.threads,
            "machine": f"{platform.machine()} CPU", "wall_s": time.perf_counter() - t0,
            "rows": list(rows.values()), "config": asdict(cfg)}


def markdown(result: dict, cfg: Config | None = None) -> str:
    """sampler_study.md from the JSON alone (prose: pages/sampler_study.md)."""
    table = sweep.table("sampler | options | steps | FID | coverage | KL | ms/sample",
                        "---|---|---:|---:|---:|---:|---:",
                        [[r["label"], ", ".join(f"{k}={v}" for k, v in r["options"].items()), r["steps"],
                          f"{r['fid']:.2f}", r["coverage"], f"{r['kl_uniform']:.3f}", f"{r['ms_per_sample']:.1f}"]
                         for r in result["rows"]])
    return sweep.page("sampler_study", r=result, sha=result["checkpoint"]["sha256"][:12],
                      minutes=result["wall_s"] / 60, table=table)


if __name__ == "__main__":
    sys.exit(sweep.main(sys.modules[__name__]))
