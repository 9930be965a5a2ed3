"""Classifier-free guidance sweep of the class-conditional DDPM: digit agreement and FID at each guidance scale.

    python -m training.report_cond --guidance 0,1,2,3,4,5 --num-samples 1000
    python -m training.report_cond --from-json   # only re-render report.md (and the plot) from guidance_sweep.json

Every scale w is one `training.evaluate` run (task generate, eps = eps_null + w * (eps_label - eps_null)) with the
same seeds: item i asks for digit i % 10 and is seeded with seed + i, so the scales differ by w alone. The checkpoint
is read once into a private snapshot whose sha256 is recorded, so every row judges the same weights even while a
training run rewrites the file. Written under --out-dir (default reports/ddpm-cond):

- guidance_sweep.json: the config, the checkpoint (path, sha256, training summary), one row per scale and
  `recommended_guidance` with the rule that chose it
- guidance_sweep.png: digit agreement and FID against the scale
- samples_grid.png: a 10x8 grid at the recommended scale (row r: digit r; item i seeded with seed + i)
- report.md: rendered from guidance_sweep.json alone (`--from-json` re-renders it without sampling)

Recommended guidance: the smallest scale with digit_agreement >= --agreement-target (0.97) whose FID is within
--fid-tolerance (10%) of the sweep's best FID. When some scales reach the target but none of them is that close, the
lowest-FID one of them; when none reaches it, the highest-agreement scale (ties: lower FID, then smaller scale).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from mnistgen.checkpoint import read_config  # noqa: E402
from mnistgen.files import repo_path  # noqa: E402
from mnistgen.cli import add_dataclass_args, dataclass_from_args, exit_code  # noqa: E402
from mnistgen.limits import MAX_GUIDANCE  # noqa: E402
from .evaluate import CONDITIONAL_SAMPLING, NUM_CLASSES, SAMPLERS, EvalConfig, evaluate  # noqa: E402
from .plots import save_grid  # noqa: E402

JSON_NAME, MD_NAME, PLOT_NAME, GRID_NAME = "guidance_sweep.json", "report.md", "guidance_sweep.png", "samples_grid.png"
GRID_PER_DIGIT = 8  # grid columns: samples per digit row
ROW_KEYS = ("digit_agreement", "agreement_per_digit", "fid", "fid_per_digit", "coverage", "kl_uniform", "confidence",
            "variance", "pairwise_distance", "class_histogram", "requested_digits", "num_samples", "ms_per_sample")


@dataclass
class CondReportConfig:
    checkpoint: str = "checkpoints/ddpm-cond.safetensors"  # class-conditional DDPM checkpoint (read once, never written)
    out_dir: str = "reports/ddpm-cond"  # guidance_sweep.json, report.md, PNGs
    guidance: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0)  # scales to evaluate (comma list)
    num_samples: int = 1000  # samples per scale, item i asks for digit i % 10
    sampler: str = CONDITIONAL_SAMPLING[0]  # one of SAMPLERS (default: the served one)
    steps: int = CONDITIONAL_SAMPLING[1]  # UNet evaluations per sample (guided ones run a 2x batch)
    seed: int = 0  # item i is seeded with seed + i, at every scale
    batch_size: int = 500  # generation batch size
    threads: int = 1  # torch CPU threads
    agreement_target: float = 0.97  # recommendation: digit_agreement needed
    fid_tolerance: float = 0.10  # recommendation: FID at most (1 + this) x the sweep's best FID
    from_json: bool = False  # only re-render report.md and the plot from out_dir/guidance_sweep.json

    def validate(self) -> None:
        if not self.guidance:
            raise ValueError("--guidance needs at least one scale")
        bad = [w for w in self.guidance if not (math.isfinite(w) and 0 <= w <= MAX_GUIDANCE)]
        if bad:
            raise ValueError(f"--guidance: each scale must be in [0, {MAX_GUIDANCE:g}], got {bad}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"--sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.num_samples < 2 * NUM_CLASSES:
            raise ValueError(f"--num-samples must be >= {2 * NUM_CLASSES} (2 per digit for the per-digit FID), "
                             f"got {self.num_samples}")
        if not 0 < self.agreement_target <= 1 or self.fid_tolerance < 0:
            raise ValueError("--agreement-target must be in (0, 1] and --fid-tolerance >= 0")


# ---------------------------------------------------------------- choosing the default

def recommend(rows: list[dict], agreement_target: float = 0.97, fid_tolerance: float = 0.10) -> tuple[float, str]:
    """(recommended guidance, why) from sweep rows holding guidance, digit_agreement and fid; see the module doc."""
    if not rows:
        raise ValueError("no sweep rows to recommend from")
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


# ---------------------------------------------------------------- the sweep

def _snapshot(src: Path, dst_dir: Path) -> tuple[Path, str, dict]:
    """Copy the checkpoint once (bytes read in one go) -> (snapshot path, sha256 of those bytes, their config)."""
    data = src.read_bytes()
    dst = dst_dir / src.name
    dst.write_bytes(data)
    return dst, hashlib.sha256(data).hexdigest(), read_config(dst)


@torch.no_grad()
def sample_grid(checkpoint: Path, guidance: float, cfg: CondReportConfig, path: Path) -> Path:
    """10 x GRID_PER_DIGIT samples at `guidance`, row r = digit r (item i: digit i // 8, seed + i), as one PNG."""
    from mnistgen import diffusion

    unet, config = diffusion.load_unet(checkpoint)
    labels = [i // GRID_PER_DIGIT for i in range(NUM_CLASSES * GRID_PER_DIGIT)]
    imgs = diffusion.generate(unet, len(labels), cfg.sampler, cfg.steps, seed=cfg.seed, batch_size=cfg.batch_size,
                              scheduler_config=config.get("scheduler"), labels=labels, guidance=guidance)  # (80, ...)
    return save_grid(imgs, path, nrow=GRID_PER_DIGIT)


def run_sweep(cfg: CondReportConfig) -> dict:
    """Evaluate every scale on one snapshot of the checkpoint; write the JSON, the plot, the grid and report.md."""
    cfg.validate()
    torch.set_num_threads(cfg.threads)
    out = repo_path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scales = sorted({float(w) for w in cfg.guidance})
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="report_cond_") as tmp:
        ckpt, sha, ckpt_cfg = _snapshot(repo_path(cfg.checkpoint), Path(tmp))
        if not (ckpt_cfg.get("unet") or {}).get("num_class_embeds"):
            raise ValueError(f"{cfg.checkpoint} is not a class-conditional DDPM (unet.num_class_embeds = 0)")
        summary = ckpt_cfg.get("summary") or {}
        ckpt_info = {"sha256": sha, "steps": summary.get("steps"), "train_time_s": summary.get("train_time_s")}
        rows = []
        bar = tqdm(scales, desc="guidance sweep", unit="scale")
        for w in bar:
            t0 = time.perf_counter()
            m = evaluate(EvalConfig(model=str(ckpt), num_samples=cfg.num_samples, seed=cfg.seed,
                                    batch_size=cfg.batch_size, sampler=cfg.sampler, steps=cfg.steps, guidance=w,
                                    threads=cfg.threads))
            row = {"guidance": w, **{k: m[k] for k in ROW_KEYS}, "wall_s": round(time.perf_counter() - t0, 2),
                   "checkpoint": ckpt_info}
            rows.append(row)
            bar.set_postfix(w=w, agreement=f"{row['digit_agreement']:.3f}", fid=f"{row['fid']:.1f}")
            tqdm.write(json.dumps({k: row[k] for k in ("guidance", "digit_agreement", "fid", "wall_s")}))
        best, reason = recommend(rows, cfg.agreement_target, cfg.fid_tolerance)
        sample_grid(ckpt, best, cfg, out / GRID_NAME)
    data = {
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "from_json"},
        "checkpoint": {"path": cfg.checkpoint, "sha256": sha, "summary": summary,
                       "conditional": ckpt_cfg.get("conditional"), "unet": ckpt_cfg.get("unet")},
        "rows": rows,
        "recommended_guidance": best,
        "recommendation_reason": reason,
        "grid": {"file": GRID_NAME, "guidance": best, "rows": "digit 0..9", "per_digit": GRID_PER_DIGIT},
        "elapsed_s": round(time.perf_counter() - t_start, 1),
        "machine": f"{platform.machine()} CPU, torch threads={cfg.threads}",
    }
    (out / JSON_NAME).write_text(json.dumps(data, indent=2, allow_nan=False))
    render(out)
    print(f"recommended_guidance = {best:g} ({reason})")
    return data


# ---------------------------------------------------------------- rendering (from the JSON only)

def _fmt(v, nd: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.{nd}f}"
    return str(v)


def sweep_figure(data: dict, path: Path) -> Path:
    """Digit agreement (left axis) and FID (right axis) against the guidance scale; the recommendation dashed."""
    rows = data["rows"]
    ws = [r["guidance"] for r in rows]
    fig, a1 = plt.subplots(figsize=(7, 3.6), dpi=110)
    a1.plot(ws, [r["digit_agreement"] for r in rows], "o-", color="C0", label="digit agreement")
    a1.axhline(data["config"]["agreement_target"], color="C0", linestyle=":", linewidth=0.8)
    a1.set_xlabel("guidance scale w (eps_null + w (eps_label - eps_null))")
    a1.set_ylabel("digit agreement", color="C0")
    a1.set_ylim(0, 1.02)
    a2 = a1.twinx()
    a2.plot(ws, [r["fid"] for r in rows], "s-", color="C1", label="FID (classifier features)")
    a2.set_ylabel("FID vs test split (lower is better)", color="C1")
    a1.axvline(data["recommended_guidance"], color="gray", linestyle="--", linewidth=0.9,
               label=f"recommended w = {data['recommended_guidance']:g}")
    h1, l1 = a1.get_legend_handles_labels()
    h2, l2 = a2.get_legend_handles_labels()
    a1.legend(h1 + h2, l1 + l2, loc="center right", fontsize=8)
    a1.grid(alpha=0.3)
    c = data["config"]
    fig.suptitle(f"ddpm-cond guidance sweep ({c['num_samples']} samples per scale, {c['sampler']} {c['steps']} steps)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_markdown(data: dict, path: Path) -> Path:
    """report.md from the sweep JSON (`data`) alone: every number in it is one of the JSON's."""
    c, ck, rows = data["config"], data["checkpoint"], data["rows"]
    s = ck.get("summary") or {}
    cond = ck.get("conditional") or {}
    train_min = _fmt((s.get("train_time_s") or 0) / 60, 1)
    digits = " | ".join(str(d) for d in range(NUM_CLASSES))
    lines = [
        "# Class-conditional DDPM (ddpm-cond): classifier-free guidance sweep",
        "",
        f"Checkpoint `{ck['path']}` (sha256 `{ck['sha256'][:16]}…`): {s.get('params', '?')} parameters, trained "
        f"{s.get('epochs')} epochs / {s.get('steps')} steps in {s.get('train_time_s')} s ({train_min} min), "
        f"final epoch loss {_fmt(s.get('final_loss'), 4)}, label dropout {cond.get('label_dropout')} "
        f"(null class {cond.get('null_class')}).",
        "",
        f"Each scale w: {c['num_samples']} samples, item i asks for digit i % 10 and gets seed {c['seed']} + i "
        f"(the same seeds at every scale), {c['sampler']} with {c['steps']} UNet evaluations (a guided step runs the "
        "labelled and the null-class pass as one 2x batch), eps = eps_null + w · (eps_label − eps_null): w = 0 is "
        "unconditional sampling, w = 1 plain conditional. Measured by `python -m training.report_cond` in "
        f"{_fmt(data.get('elapsed_s', 0) / 60, 1)} min on {data.get('machine', '?')}, a CPU shared with other jobs "
        "(wall times are indicative only).",
        "",
        "- **digit agreement**: fraction of samples whose committed classifier's argmax is the requested digit.",
        "- **FID**: Fréchet distance in the classifier's 128-d feature space against the 10k test split, as for "
        f"every other model here (not Inception-FID; with {c['num_samples']} samples it is biased upwards: compare "
        "rows with each other).",
        f"- **per-digit FID**: each digit's {c['num_samples'] // NUM_CLASSES} samples against that class's test "
        "images: on few samples, so biased upwards and noisy; only compare within this table.",
        "",
        f"**Recommended default guidance: w = {data['recommended_guidance']:g}**: {data['recommendation_reason']}. "
        f"Rule: the smallest w with digit agreement ≥ {c['agreement_target']:g} whose FID is within "
        f"{c['fid_tolerance']:.0%} of the sweep's best FID (else the lowest-FID of those reaching "
        f"{c['agreement_target']:g}; else the highest-agreement w).",
        "",
        "| guidance w | digit agreement | FID | coverage | KL(p‖uniform) | confidence | worst digit (agreement) | "
        "mean per-digit FID | ms/sample | wall s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        agree = [(a, d) for d, a in enumerate(r["agreement_per_digit"]) if a is not None]
        worst = min(agree) if agree else (None, None)
        fids = [f for f in r["fid_per_digit"] if f is not None]
        mean_fid = sum(fids) / len(fids) if fids else None
        mark = " ◀" if r["guidance"] == data["recommended_guidance"] else ""
        lines.append(f"| {r['guidance']:g}{mark} | {_fmt(r['digit_agreement'])} | {_fmt(r['fid'], 2)} | "
                     f"{r['coverage']} | {_fmt(r['kl_uniform'])} | {_fmt(r['confidence'])} | "
                     f"{worst[1]} ({_fmt(worst[0])}) | {_fmt(mean_fid, 2)} | {_fmt(r['ms_per_sample'], 1)} | "
                     f"{_fmt(r['wall_s'], 1)} |")
    for title, key, nd in (("Agreement per requested digit", "agreement_per_digit", 3),
                           ("FID per requested digit (few samples: noisy)", "fid_per_digit", 1)):
        lines += ["", f"## {title}", "", f"| w | {digits} |", "|---:|" + "---:|" * NUM_CLASSES]
        lines += [f"| {r['guidance']:g} | " + " | ".join(_fmt(v, nd) for v in r[key]) + " |" for r in rows]
    grid = data.get("grid") or {}
    lines += [
        "",
        "## Figures",
        "",
        f"- `{PLOT_NAME}`: digit agreement and FID against w (dashed: the recommendation).",
        f"- `{grid.get('file', GRID_NAME)}`: {grid.get('per_digit', GRID_PER_DIGIT)} samples per digit at "
        f"w = {grid.get('guidance', data['recommended_guidance']):g}, row r = digit r.",
        "",
        f"![guidance sweep]({PLOT_NAME})",
        "",
        f"![samples]({grid.get('file', GRID_NAME)})",
        "",
    ]
    path.write_text("\n".join(lines))
    return path


def render(out_dir: Path) -> Path:
    """report.md and the plot from out_dir/guidance_sweep.json."""
    src = out_dir / JSON_NAME
    if not src.exists():
        raise FileNotFoundError(f"{src} not found: run the sweep first (python -m training.report_cond)")
    data = json.loads(src.read_text())
    sweep_figure(data, out_dir / PLOT_NAME)
    return write_markdown(data, out_dir / MD_NAME)


# ---------------------------------------------------------------- CLI

def parse_args(argv: list[str] | None = None) -> CondReportConfig:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dataclass_args(p, CondReportConfig, help={"from_json": "only re-render report.md and the plot from "
                                                                "<out-dir>/guidance_sweep.json"})
    return dataclass_from_args(CondReportConfig, p.parse_args(argv), parser=p)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)

    def rerender() -> None:
        path = render(repo_path(cfg.out_dir))
        data = json.loads((repo_path(cfg.out_dir) / JSON_NAME).read_text())
        print(f"wrote {path}; recommended_guidance = {data['recommended_guidance']:g}")

    return exit_code(rerender if cfg.from_json else lambda: run_sweep(cfg))


if __name__ == "__main__":
    sys.exit(main())
