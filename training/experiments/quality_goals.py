"""The quality goals of the 60k retraining (issue 13), measured in one command: every row a `training.evaluate` run.

    python -m training.experiments.quality_goals [--ddpm CANDIDATE.safetensors --out-dir /tmp/q] [--reuse | --from-json]

The rows (plan) and the goals judged from them (judge): the floor (real test images against the training split),
the GAN's FID / coverage / KL, the mode-collapse case in numbers, the DDPM's served sampler against the floor and
the <= 20-step samplers against DDPM-100 on shared seeds, denoising at sigma 0.3, and the GAN as served in bf16
against its fp32 checkpoint (where that export exists). Each row records its checkpoint's sha256 and training
summary; goals.md is rendered from goals.json alone, a missed goal with its shortfall and next lever. With --reuse a
row whose `key` (settings less threads, checkpoint and classifier sha256) is unchanged is taken over unmeasured.
"""
from __future__ import annotations

import platform
import sys
from dataclasses import asdict, dataclass

from mnistgen import catalog
from mnistgen.checkpoint import CHECKPOINT_DIR
from mnistgen.files import repo_path, repo_relative, sha256
from mnistgen.registry import CLASSIFIER_CHECKPOINT, resolve
from ..evaluate import DDPM_MODELS, SPECIAL_MODELS, EvalConfig, evaluate
from . import fid_history, sweep

DDPM = next(m for m in DDPM_MODELS.values() if not m.conditional)  # the unconditional DDPM's Generate entry
JSON, MD = "goals.json", "goals.md"
FID_HISTORY = "reports/gan/fid_history.json"  # fid_history's points: the GAN lever quotes the last stretch
FLOOR_X_GAN, FLOOR_X_DDPM = 9.0, 3.0  # FID goals as multiples of the floor
MAX_KL, FEW_STEP_TOLERANCE = 0.05, 0.10
MIN_CLASS_PRESERVATION, MIN_PSNR, DENOISE_SIGMA = 0.98, 26.5, 0.3
FAST_SAMPLERS = ("dpm-solver++", "sde-dpm-solver++")  # the <= 20-step candidates
KEEP = ("fid", "fid_sd", "coverage", "kl_uniform", "pairwise_distance", "confidence", "num_samples", "ms_per_sample",
        "class_preservation", "psnr", "ssim", "sampler", "steps", "sigma")


@dataclass
class Config:
    gan: str = catalog.DEFAULT_MODEL  # the GAN the FID goal judges (a name or a .safetensors path)
    modified: str = "dcgan-modified"  # the research's mode-collapse case: the study names it (a catalog GAN)
    ddpm: str = DDPM.name  # the unconditional DDPM (a catalog name or a .safetensors path)
    num_samples: int = 10000  # floor, GANs, the served-default DDPM row
    sampler_samples: int = 1000  # each row of the sampler comparison, and the denoise row
    threads: int = 2  # torch CPU threads
    seed: int = 0
    out_dir: str = "reports/quality"
    from_json: bool = False  # only re-render goals.md from goals.json
    reuse: bool = False  # keep the rows of the existing goals.json whose key (settings, checkpoints) is unchanged
    fid_history: str = FID_HISTORY  # the GAN's FID over training (fid_history), quoted for its lever
    model_repository: str = "model_repository"  # where the served bf16 generator (gan-bf16 row) is looked for


def checkpoint_info(model: str) -> dict:
    """path, sha256 and training summary of a model name or checkpoint path (empty for the real-data rows)."""
    if model in SPECIAL_MODELS and model not in DDPM_MODELS:  # real data, noise: no checkpoint
        return {}
    path = resolve(model, {**catalog.GANS, **DDPM_MODELS})
    info = sweep.checkpoint_info(path)
    return {"checkpoint": str(path), "sha256": info["sha256"], "summary": info["summary"],
            "data_source": info["config"].get("train", {}).get("data_source")}


def row_key(ecfg: EvalConfig, info: dict, classifier_sha256: str) -> dict:
    """What a row's figures depend on: the evaluation's settings (threads change speed, not results), the model
    checkpoint's sha256 (none for real data) and the judging classifier's sha256."""
    settings = {k: v for k, v in asdict(ecfg).items()
                if k not in ("threads", "json") and not (k == "torchscript" and not v)}  # rows before --torchscript
    return {**settings, "sha256": info.get("sha256"), "classifier_sha256": classifier_sha256}


def goal(gid: str, name: str, measured: float, comparison: str, target: float, detail: str = "") -> dict:
    met = measured <= target if comparison == "<=" else measured >= target
    return {"id": gid, "goal": name, "measured": measured, "comparison": comparison, "target": target,
            "met": bool(met), "detail": detail}


def _fid(row: dict) -> str:
    """'FID' or 'FID +- sd' (rows measured before fid_sd have no sd)."""
    return f"{row['fid']:.2f}" + (f" ± {row['fid_sd']:.2f}" if row.get("fid_sd") is not None else "")


def judge(rows: dict) -> list[dict]:
    """The goals from the measured rows (pure: tested on made-up rows)."""
    floor = rows["floor"]["fid"]
    gan, served, ref = rows["gan"], rows["ddpm-served"], rows["ddpm-100"]
    best_fast = min(FAST_SAMPLERS, key=lambda s: rows[f"ddpm-{s}-20"]["fid"])
    denoise_goals = []
    for key in ("denoise", "denoise-served"):  # goals.json files from before the served row have only the first
        if key in rows:
            den = rows[key]
            what = f"denoise sigma {DENOISE_SIGMA:g} ({den['sampler']} {den['steps']}"
            what += ", served default)" if key == "denoise-served" else ")"
            denoise_goals += [goal(f"{key}-class", f"{what}: class preservation", den["class_preservation"], ">=",
                                   MIN_CLASS_PRESERVATION),
                              goal(f"{key}-psnr", f"{what}: PSNR (dB)", den["psnr"], ">=", MIN_PSNR)]
    return [
        goal("gan-fid", f"{gan['model']} FID <= {FLOOR_X_GAN:g}x floor", gan["fid"] / floor, "<=", FLOOR_X_GAN,
             f"FID {_fid(gan)} vs floor {floor:.3f}"),
        goal("gan-coverage", f"{gan['model']} coverage 10/10", gan["coverage"], ">=", 10),
        goal("gan-kl", f"{gan['model']} KL to uniform <= {MAX_KL:g}", gan["kl_uniform"], "<=", MAX_KL),
        goal("ddpm-served-fid",
             f"ddpm served default ({served['sampler']} {served['steps']}) FID <= {FLOOR_X_DDPM:g}x floor",
             served["fid"] / floor, "<=", FLOOR_X_DDPM, f"FID {_fid(served)} on {served['num_samples']} samples"),
        goal("dpm-solver++-20-vs-100", "ddpm dpm-solver++ 20 FID / DDPM-100 FID",
             rows["ddpm-dpm-solver++-20"]["fid"] / ref["fid"], "<=", 1 + FEW_STEP_TOLERANCE,
             f"{_fid(rows['ddpm-dpm-solver++-20'])} vs {_fid(ref)}"),
        goal("best-20-vs-100", f"best <= 20-step sampler ({best_fast} 20) FID / DDPM-100 FID",
             rows[f"ddpm-{best_fast}-20"]["fid"] / ref["fid"], "<=", 1 + FEW_STEP_TOLERANCE,
             f"{_fid(rows[f'ddpm-{best_fast}-20'])} vs {_fid(ref)}"),
    ] + denoise_goals + bf16_goals(rows)


def bf16_goals(rows: dict) -> list[dict]:
    """The served bf16 generator's FID minus the fp32 checkpoint's, on the same latents, against twice the spread of
    that difference (draws counted independent: the shared latents make the true spread smaller, so this is lenient
    only by that)."""
    if "gan-bf16" not in rows:
        return []
    bf16, gan = rows["gan-bf16"], rows["gan"]
    two_sd = 2 * ((bf16.get("fid_sd") or 0) ** 2 + (gan.get("fid_sd") or 0) ** 2) ** 0.5
    return [goal("gan-bf16-fid", f"{gan['model']} served in bf16: FID - fp32 FID <= 2 sd of the difference",
                 bf16["fid"] - gan["fid"], "<=", round(two_sd, 3), f"FID {_fid(bf16)} (bf16) vs {_fid(gan)} (fp32)")]


def shortfall(g: dict) -> str:
    """How far a goal is from its target, in words (pure)."""
    m, t = g["measured"], g["target"]
    if g["comparison"] == "<=":
        return f"{m:.3g} vs <= {t:g}: {m / t:.2f}x the target (it must fall {100 * (1 - t / m):.0f} %)"
    return f"{m:.4g} vs >= {t:g}: short by {t - m:.3g} ({100 * (t - m) / t:.1f} % of the target)"


def lever(g: dict, rows: dict, history: list[dict]) -> str:
    """What would move a missed goal next, with the measured evidence at hand (prose: pages/quality_goals_levers.md)."""
    gid, capacity = g.get("id", ""), "capacity (base channels 64 -> 128: ~4x the compute per iteration, a GPU run)"
    gid = "denoise" if gid.endswith(("-psnr", "-class")) else gid
    stretch, served, fast = fid_history.last_stretch(history), rows.get("denoise-served"), rows.get(
        "ddpm-sde-dpm-solver++-20")
    noisy = stretch is not None and fid_history.within_noise(stretch)
    text = (sweep.PAGES / "quality_goals_levers.md").read_text().split(f"\n## {gid}\n")[1:2] or [
        "No lever recorded for this goal."]
    return text[0].split("\n## ")[0].strip().format(
        gan=rows["gan"], goal=g["target"] * rows["floor"]["fid"], ref=_fid(rows["ddpm-100"]),
        fast=_fid(fast) if fast else "-",
        stretch=(f"Its last stretch, {stretch['from_iterations']} -> {stretch['to_iterations']} iterations "
                 f"({stretch['minutes']:g} min on CPU), moved FID {stretch['from_fid']:.2f} -> {stretch['to_fid']:.2f} "
                 f"({100 * stretch['change']:+.0f} %; the whole curve: reports/gan/fid_history.md). "
                 if stretch else ""),
        next=(f"That is within the noise of the draw (2 sd: {stretch['noise']:.2f}): more of the same training now "
              f"buys little. Next: {capacity}" if noisy else
              f"Next: more learning-rate cycles (restart, anneal to 0) while each still pays, then {capacity}"),
        served=(f" The deterministic {served['sampler']} {served['steps']} (Denoise's served default) scores PSNR "
                f"{served['psnr']:.2f} dB, class preservation {served['class_preservation']:.3f} on the same images."
                if served else ""))


def plan(cfg: Config) -> dict[str, EvalConfig]:
    """Row name -> its evaluation (seeds shared, so sampler rows differ by the sampler alone)."""
    n, m, common = cfg.num_samples, cfg.sampler_samples, {"seed": cfg.seed, "threads": cfg.threads}
    rows = {
        "floor": EvalConfig(model="real-test", num_samples=n, **common),
        "gan": EvalConfig(model=cfg.gan, num_samples=n, **common),
        "modified": EvalConfig(model=cfg.modified, num_samples=n, **common),
        "ddpm-served": EvalConfig(model=cfg.ddpm, num_samples=n, sampler=DDPM.sampler, steps=DDPM.steps, **common),
        "ddpm-100": EvalConfig(model=cfg.ddpm, num_samples=m, sampler="ddpm", steps=100, **common),
        **{f"ddpm-{s}-20": EvalConfig(model=cfg.ddpm, num_samples=m, sampler=s, steps=20, **common)
           for s in FAST_SAMPLERS},
        "denoise": EvalConfig(model=cfg.ddpm, task="denoise", sigma=DENOISE_SIGMA, num_samples=m, **common),
        "denoise-served": EvalConfig(model=cfg.ddpm, task="denoise", sigma=DENOISE_SIGMA, num_samples=m,
                                     sampler=catalog.DENOISER.sampler, steps=catalog.DENOISER.steps, **common),
    }
    bf16 = served_bf16(cfg)
    if bf16 is not None:
        rows["gan-bf16"] = EvalConfig(model=cfg.gan, num_samples=n, torchscript=bf16, **common)
    return rows


def served_bf16(cfg: Config) -> str | None:
    """The exported bf16 TorchScript of cfg.gan in the model repository, None when cfg.gan is not a served generator
    or the file is missing."""
    from mnistgen.engine import BF16_FILE

    model = catalog.GANS.get(cfg.gan)
    path = repo_path(cfg.model_repository) / (model.triton if model else "") / "1" / BF16_FILE
    return repo_relative(path) if model is not None and path.is_file() else None


def command(ecfg: EvalConfig) -> str:
    return (f"python -m training.evaluate --model {ecfg.model} --task {ecfg.task} --num-samples {ecfg.num_samples}"
            + (f" --sampler {ecfg.sampler} --steps {ecfg.steps}" if ecfg.sampler else "")
            + (f" --sigma {ecfg.sigma}" if ecfg.task == "denoise" else "")
            + (f" --torchscript {ecfg.torchscript}" if ecfg.torchscript else ""))


def measure(cfg: Config) -> dict:
    """Every planned row (taken over from the previous goals.json with --reuse when its key is unchanged)."""
    classifier_sha256 = sha256(CHECKPOINT_DIR / CLASSIFIER_CHECKPOINT)
    planned = {name: (ecfg, checkpoint_info(ecfg.model)) for name, ecfg in plan(cfg).items()}

    def row(ecfg: EvalConfig, info: dict) -> dict:
        print(command(ecfg), flush=True)
        result = evaluate(ecfg)
        return {"model": ecfg.model, "task": ecfg.task, **{k: result[k] for k in KEEP if k in result}, **info}

    rows = sweep.cells([(name, lambda e=e, i=i: row(e, i)) for name, (e, i) in planned.items()],
                       done=sweep.load(repo_path(cfg.out_dir) / JSON, {"rows": {}})["rows"] if cfg.reuse else None,
                       desc="quality goals",
                       key=lambda name: row_key(planned[name][0], planned[name][1], classifier_sha256))
    return {"about": __doc__.split("\n\n")[0], "config": asdict(cfg), "rows": rows, "goals": judge(rows),
            "machine": {"platform": platform.platform(), "python": platform.python_version()},
            "wall_s": round(sum(r["wall_s"] for r in rows.values() if not r.get("reused")), 1)}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def markdown(data: dict, cfg: Config | None = None) -> str:
    """goals.md from goals.json alone (and the GAN's FID history its lever quotes)."""
    from .controlled_failures import COLLAPSE_COVERAGE, COLLAPSE_PAIRWISE

    rows, floor, mod = data["rows"], data["rows"]["floor"], data["rows"]["modified"]
    goals = judge(rows)  # (a pure function of the rows: goals.json files from before goal ids render the same)
    history = fid_history.load_points(repo_path(data["config"].get("fid_history", FID_HISTORY)))
    missed = [f"- **{g['goal']}**: {shortfall(g)}. {lever(g, rows, history)}" for g in goals if not g["met"]]
    reused = sum(bool(r.get("reused")) for r in rows.values())
    cells = []
    for name, r in rows.items():
        s = r.get("summary") or {}
        trained = ", ".join(x for x in (
            f"{s['iterations']} iters" if "iterations" in s else f"{s['steps']} steps" if "steps" in s else "",
            f"{s['train_time_s'] / 60:.0f} min" if "train_time_s" in s else "",
            f"data {r['data_source']}" if r.get("data_source") else "") if x)
        cells.append([name + " *" * bool(r.get("reused")), r["model"], r.get("num_samples", "-"),
                      f"{r['sampler']} {r.get('steps')}" if r.get("sampler") else "-", _fmt(r.get("fid")),
                      _fmt(r.get("fid_sd")), _fmt(r["fid"] / floor["fid"]) if r.get("fid") is not None else "-",
                      *(_fmt(r.get(k)) for k in ("coverage", "kl_uniform", "pairwise_distance", "class_preservation",
                                                 "psnr", "ms_per_sample")), trained or "-"])
    goals_table = sweep.table("goal | measured | target | met | detail", "---|---:|---:|---|---",
                              [[g["goal"], _fmt(g["measured"]), f"{g['comparison']} {g['target']:g}",
                                "yes" if g["met"] else "**no**", g["detail"]] for g in goals])
    collapsed = mod["coverage"] <= COLLAPSE_COVERAGE or mod["pairwise_distance"] < COLLAPSE_PAIRWISE
    return sweep.page(
        "quality_goals", d=data, json=JSON, minutes=data["wall_s"] / 60, floor=floor, mod=mod,
        coverage=COLLAPSE_COVERAGE, pairwise=COLLAPSE_PAIRWISE, collapsed="collapsed" if collapsed else "no collapse",
        pct=100 * mod["pairwise_distance"] / floor["pairwise_distance"], goals=goals_table,
        reused=f"; {reused} row(s) marked * taken over unchanged from the previous run, same settings and checkpoints"
        if reused else "",
        missed="\n## Missed goals: by how much, and the next lever\n\n" + "\n".join(missed) if missed
        else "\nEvery goal is met.",
        rows=sweep.table("row | model | samples | sampler | FID | FID sd | x floor | coverage | KL | pairwise | "
                         "class pres. | PSNR | ms/sample | training",
                         "---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---", cells))


if __name__ == "__main__":
    sys.exit(sweep.main(sys.modules[__name__]))
