"""Classifier-free guidance sweep of the class-conditional DDPM: digit agreement and FID at each guidance scale.

    python -m training.experiments.report_cond --guidance 0,1,2,3,4,5 --num-samples 1000
    python -m training.experiments.report_cond --from-json   # only re-render report.md and the plot

Every scale w is one `training.evaluate` run with the same seeds (item i: digit i % 10, seed + i), so the scales
differ by w alone, all on one private snapshot of the checkpoint (its sha256 recorded). The recommendation rule is
`recommend()`'s, stated on the page (pages/report_cond.md).
"""
from __future__ import annotations

import math
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mnistgen.catalog import MAX_GUIDANCE, SAMPLERS
from mnistgen.files import repo_path
from ..evaluate import COND, NUM_CLASSES, EvalConfig, evaluate
from ..plots import figure, save_grid
from . import sweep
from .sweep import fmt

JSON, MD, PLOT_NAME, GRID_NAME = "guidance_sweep.json", "report.md", "guidance_sweep.png", "samples_grid.png"
GRID_PER_DIGIT = 8  # samples_grid.png columns: samples per digit row
ROW_KEYS = ("digit_agreement", "agreement_per_digit", "fid", "fid_per_digit", "coverage", "kl_uniform", "confidence",
            "variance", "pairwise_distance", "class_histogram", "requested_digits", "num_samples", "ms_per_sample")
INDENT = 2


@dataclass
class Config:
    checkpoint: str = f"checkpoints/{COND.checkpoint}"  # class-conditional DDPM checkpoint (read once, never written)
    out_dir: str = f"reports/{COND.name}"  # guidance_sweep.json, report.md, PNGs
    guidance: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0)  # scales to evaluate (comma list)
    num_samples: int = 1000  # samples per scale, item i asks for digit i % 10
    sampler: str = COND.sampler  # one of SAMPLERS (default: the served one)
    steps: int = COND.steps  # UNet evaluations per sample (guided ones run a 2x batch)
    seed: int = 0  # item i is seeded with seed + i, at every scale
    batch_size: int = 500  # generation batch size
    threads: int = 1  # torch CPU threads
    agreement_target: float = 0.97  # recommendation: digit_agreement needed
    fid_tolerance: float = 0.10  # recommendation: FID at most (1 + this) x the sweep's best FID
    from_json: bool = False  # only re-render report.md and the plot from out_dir/guidance_sweep.json

    def __post_init__(self) -> None:
        bad = [w for w in self.guidance if not (math.isfinite(w) and 0 <= w <= MAX_GUIDANCE)]
        if not self.guidance or bad:
            raise ValueError(f"--guidance: one or more scales, each in [0, {MAX_GUIDANCE:g}], got {bad}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"--sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.num_samples < 2 * NUM_CLASSES:
            raise ValueError(f"--num-samples must be >= {2 * NUM_CLASSES} (2 per digit for the per-digit FID), "
                             f"got {self.num_samples}")
        if not 0 < self.agreement_target <= 1 or self.fid_tolerance < 0:
            raise ValueError("--agreement-target must be in (0, 1] and --fid-tolerance >= 0")


def recommend(rows: list[dict], agreement_target: float = 0.97, fid_tolerance: float = 0.10) -> tuple[float, str]:
    """(recommended guidance, why): the smallest scale reaching agreement_target with FID within fid_tolerance of the
    best; else the lowest-FID one reaching it; else the highest-agreement one (ties: lower FID, smaller scale)."""
    best_fid = min(r["fid"] for r in rows)
    limit = best_fid + fid_tolerance * abs(best_fid)
    reaching = sorted((r for r in rows if r["digit_agreement"] >= agreement_target), key=lambda r: r["guidance"])
    close = [r for r in reaching if r["fid"] <= limit]
    if close:
        r = close[0]
        return r["guidance"], (f"smallest scale with digit agreement >= {agreement_target:g} "
                               f"({r['digit_agreement']:.3f}) and FID within {fid_tolerance:.0%} of the best "
                               f"({r['fid']:.2f} <= {limit:.2f})")
    if reaching:
        r = min(reaching, key=lambda r: (r["fid"], r["guidance"]))
        return r["guidance"], (f"no scale reaching digit agreement {agreement_target:g} has FID within "
                               f"{fid_tolerance:.0%} of the best ({best_fid:.2f}): the lowest-FID one of those "
                               f"({r['fid']:.2f}, agreement {r['digit_agreement']:.3f})")
    r = min(rows, key=lambda r: (-r["digit_agreement"], r["fid"], r["guidance"]))
    return r["guidance"], (f"no scale reaches digit agreement {agreement_target:g}: the highest-agreement one "
                           f"({r['digit_agreement']:.3f}, FID {r['fid']:.2f})")


@torch.no_grad()
def sample_grid(checkpoint: Path, guidance: float, cfg: Config, path: Path) -> Path:
    """10 x GRID_PER_DIGIT samples at `guidance`, row r = digit r (item i: digit i // 8, seed + i), as one PNG."""
    from mnistgen import diffusion

    unet, config = diffusion.load_unet(checkpoint)
    labels = [i // GRID_PER_DIGIT for i in range(NUM_CLASSES * GRID_PER_DIGIT)]
    imgs = diffusion.generate(unet, len(labels), cfg.sampler, cfg.steps, seed=cfg.seed, batch_size=cfg.batch_size,
                              scheduler_config=config.get("scheduler"), labels=labels, guidance=guidance)  # (80, ...)
    return save_grid(imgs, path, nrow=GRID_PER_DIGIT)


def measure(cfg: Config) -> dict:
    """Evaluate every scale on one snapshot of the checkpoint; draw the grid at the recommended scale."""
    torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="report_cond_") as tmp:
        ckpt = Path(tmp) / Path(cfg.checkpoint).name
        ckpt.write_bytes(repo_path(cfg.checkpoint).read_bytes())  # one read: every row judges the same weights
        info = sweep.checkpoint_info(ckpt)
        if not (info["config"].get("unet") or {}).get("num_class_embeds"):
            raise ValueError(f"{cfg.checkpoint} is not a class-conditional DDPM (unet.num_class_embeds = 0)")
        summary = info["summary"]
        row_ckpt = {"sha256": info["sha256"], **{k: summary.get(k) for k in ("steps", "train_time_s")}}

        def row(w: float) -> dict:
            m = evaluate(EvalConfig(model=str(ckpt), num_samples=cfg.num_samples, seed=cfg.seed, guidance=w,
                                    batch_size=cfg.batch_size, sampler=cfg.sampler, steps=cfg.steps,
                                    threads=cfg.threads))
            return {"guidance": w, **{k: m[k] for k in ROW_KEYS}}

        rows = sweep.cells([(f"w={w:g}", lambda w=w: row(w)) for w in sorted({float(w) for w in cfg.guidance})],
                           desc="guidance sweep")
        rows = [{**r, "checkpoint": row_ckpt} for r in rows.values()]
        best, reason = recommend(rows, cfg.agreement_target, cfg.fid_tolerance)
        sample_grid(ckpt, best, cfg, repo_path(cfg.out_dir) / GRID_NAME)
    print(f"recommended_guidance = {best:g} ({reason})")
    return {"config": {k: v for k, v in asdict(cfg).items() if k != "from_json"},
            "checkpoint": {"path": cfg.checkpoint, "sha256": info["sha256"], "summary": summary,
                           "conditional": info["config"].get("conditional"), "unet": info["config"].get("unet")},
            "rows": rows, "recommended_guidance": best, "recommendation_reason": reason,
            "grid": {"file": GRID_NAME, "guidance": best, "rows": "digit 0..9", "per_digit": GRID_PER_DIGIT},
            "elapsed_s": round(time.perf_counter() - t_start, 1),
            "machine": f"{platform.machine()} CPU, torch threads={cfg.threads}"}


def figures(data: dict, cfg: Config) -> None:
    """guidance_sweep.png: digit agreement (left axis) and FID (right) against the scale; the recommendation dashed."""
    rows, c, best = data["rows"], data["config"], data["recommended_guidance"]
    ws = [r["guidance"] for r in rows]
    with figure(repo_path(cfg.out_dir) / PLOT_NAME, figsize=(7, 3.6)) as (fig, a1):
        a1.plot(ws, [r["digit_agreement"] for r in rows], "o-", color="C0", label="digit agreement")
        a1.axhline(c["agreement_target"], color="C0", linestyle=":", linewidth=0.8)
        a1.set(xlabel="guidance scale w (eps_null + w (eps_label - eps_null))", ylim=(0, 1.02))
        a1.set_ylabel("digit agreement", color="C0")
        a2 = a1.twinx()
        a2.plot(ws, [r["fid"] for r in rows], "s-", color="C1", label="FID (classifier features)")
        a2.set_ylabel("FID vs test split (lower is better)", color="C1")
        a1.axvline(best, color="gray", linestyle="--", linewidth=0.9, label=f"recommended w = {best:g}")
        (h1, l1), (h2, l2) = a1.get_legend_handles_labels(), a2.get_legend_handles_labels()
        a1.legend(h1 + h2, l1 + l2, loc="center right", fontsize=8)
        a1.grid(alpha=0.3)
        fig.suptitle(f"ddpm-cond guidance sweep ({c['num_samples']} samples per scale, {c['sampler']} "
                     f"{c['steps']} steps)", fontsize=9)


def markdown(d: dict, cfg: Config | None = None) -> str:
    """report.md from the sweep JSON alone (prose: pages/report_cond.md)."""
    c, ck, rows, best = d["config"], d["checkpoint"], d["rows"], d["recommended_guidance"]
    s, grid = ck.get("summary") or {}, d.get("grid") or {}
    cells = []
    for r in rows:
        worst = min([(a, n) for n, a in enumerate(r["agreement_per_digit"]) if a is not None] or [(None, None)])
        fids = [f for f in r["fid_per_digit"] if f is not None]
        cells.append([f"{r['guidance']:g}" + (" ◀" if r["guidance"] == best else ""), fmt(r["digit_agreement"]),
                      fmt(r["fid"], 2), r["coverage"], fmt(r["kl_uniform"]), fmt(r["confidence"]),
                      f"{worst[1]} ({fmt(worst[0])})", fmt(sum(fids) / len(fids) if fids else None, 2),
                      fmt(r["ms_per_sample"], 1), fmt(r["wall_s"], 1)])
    per_digit = {key: sweep.table("w | " + " | ".join(map(str, range(NUM_CLASSES))), "|".join(["---:"] * 11),
                                  [[f"{r['guidance']:g}", *(fmt(v, nd) for v in r[key])] for r in rows])
                 for key, nd in (("agreement_per_digit", 3), ("fid_per_digit", 1))}
    return sweep.page(
        "report_cond", d=d, c=c, ck=ck, s=s, cond=ck.get("conditional") or {}, sha=ck["sha256"][:16],
        params=s.get("params", "?"), train_min=fmt((s.get("train_time_s") or 0) / 60, 1),
        final_loss=fmt(s.get("final_loss"), 4), minutes=fmt(d.get("elapsed_s", 0) / 60, 1),
        machine=d.get("machine", "?"), per_digit=c["num_samples"] // NUM_CLASSES, plot=PLOT_NAME,
        grid_file=grid.get("file", GRID_NAME), grid_per_digit=grid.get("per_digit", GRID_PER_DIGIT),
        grid_w=grid.get("guidance", best), agreement=per_digit["agreement_per_digit"], fids=per_digit["fid_per_digit"],
        table=sweep.table("guidance w | digit agreement | FID | coverage | KL(p‖uniform) | confidence | worst digit "
                          "(agreement) | mean per-digit FID | ms/sample | wall s", "|".join(["---:"] * 10), cells))


if __name__ == "__main__":
    sys.exit(sweep.main(sys.modules[__name__]))
