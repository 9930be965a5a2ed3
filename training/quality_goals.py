"""The quality goals of the 60k retraining (issue 13), measured in one command: every row a `training.evaluate` run.

    python -m training.quality_goals                      # ~15 min on 2 CPU threads -> reports/quality/
    python -m training.quality_goals --ddpm /tmp/new.safetensors --out-dir /tmp/q   # judge a candidate checkpoint
    python -m training.quality_goals --from-json          # only re-render goals.md from goals.json
    python -m training.quality_goals --reuse              # re-measure only the rows whose checkpoint changed

Rows (FID in the evaluation classifier's feature space against the 10k test split; the floor is real test images
judged against the training split, `--model real-test`):

- floor: real test images, --num-samples (10,000)
- dcgan-baseline (10,000): FID <= 9x the floor, coverage 10/10, KL to uniform <= 0.05
- dcgan-modified (10,000): the mode-collapse verdict in numbers (coverage, KL, pairwise distance vs the real test
  images' own), no goal
- ddpm with the served default sampler of Generate (mnistgen.limits.DEFAULT_GENERATE_SAMPLER, 20 steps, 10,000):
  FID <= 3x the floor
- ddpm, --sampler-samples (1,000) each, same seeds: DDPM-100 (the reference), dpm-solver++ 20 (FID within 10 % of
  DDPM-100: the issue's command), the best <= 20-step sampler (dpm-solver++ or sde-dpm-solver++ at 20) within 10 %
- ddpm denoise at sigma 0.3 (1,000 test images): class preservation >= 0.98 and PSNR >= 26.5 dB, with evaluate's
  default sampler (DDPM-100: the issue's command) and with Denoise's served default (mnistgen.limits.DEFAULT_SAMPLER)
- the GAN as served in bf16 (model_repository/<model>/1/model_bf16.pt, what Triton runs from the engines.json
  threshold on where the CPU has native bf16), same latents (10,000): FID no worse than the fp32 checkpoint's by more
  than twice the spread of the difference (the bf16 engine must not cost quality). Only where the file exists.

Each row records its model's checkpoint sha256 and training summary; goals.md is rendered from goals.json alone.
FIDs carry `fid_sd`, their spread over bootstrap resamples of the samples (training.evaluate): two FIDs of the same
sample count that differ by less than about twice that are within the noise of the draw.

With --reuse, a row of the goals.json already in --out-dir is kept, not re-measured, when its `key` (the evaluation's
settings less threads, the model checkpoint's sha256 and the evaluation classifier's sha256) equals the new one:
after retraining one model, only its rows run. goals.md marks the rows taken over.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mnistgen.checkpoint import CHECKPOINT_DIR, read_config
from mnistgen.cli import add_dataclass_args, dataclass_from_args, exit_code
from mnistgen.files import repo_path, sha256
from mnistgen.limits import DEFAULT_GENERATE_SAMPLER, DEFAULT_SAMPLER, DEFAULT_SAMPLER_STEPS
from mnistgen.registry import CLASSIFIER_CHECKPOINT, GAN_MODELS, resolve

from . import fid_history
from .evaluate import DDPM_MODELS, SPECIAL_MODELS, EvalConfig, evaluate

JSON_NAME, MD_NAME = "goals.json", "goals.md"
FID_HISTORY = "reports/gan/fid_history.json"  # training.fid_history's points: the GAN lever quotes the last stretch
FLOOR_X_GAN, FLOOR_X_DDPM = 9.0, 3.0  # FID goals as multiples of the floor
MAX_KL, FEW_STEP_TOLERANCE = 0.05, 0.10
MIN_CLASS_PRESERVATION, MIN_PSNR, DENOISE_SIGMA = 0.98, 26.5, 0.3
FAST_SAMPLERS = ("dpm-solver++", "sde-dpm-solver++")  # the <= 20-step candidates
KEEP = ("fid", "fid_sd", "coverage", "kl_uniform", "pairwise_distance", "confidence", "num_samples", "ms_per_sample",
        "class_preservation", "psnr", "ssim", "sampler", "steps", "sigma")


@dataclass
class GoalsConfig:
    gan: str = "dcgan-baseline"  # the GAN the FID goal judges (a name or a .safetensors path)
    modified: str = "dcgan-modified"  # the mode-collapse case
    ddpm: str = "ddpm"  # the unconditional DDPM ("ddpm" = checkpoints/ddpm.safetensors, or a path)
    num_samples: int = 10000  # floor, GANs, the served-default DDPM row
    sampler_samples: int = 1000  # each row of the sampler comparison, and the denoise row
    threads: int = 2  # torch CPU threads
    seed: int = 0
    out_dir: str = "reports/quality"
    from_json: bool = False  # only re-render goals.md from goals.json
    reuse: bool = False  # keep the rows of the existing goals.json whose key (settings, checkpoints) is unchanged
    fid_history: str = FID_HISTORY  # the GAN's FID over training (training.fid_history), quoted for its lever
    model_repository: str = "model_repository"  # where the served bf16 generator (gan-bf16 row) is looked for


def checkpoint_info(model: str) -> dict:
    """path, sha256 and training summary of a model name or checkpoint path (empty for the real-data rows)."""
    if model in SPECIAL_MODELS and model not in DDPM_MODELS:  # real data, noise: no checkpoint
        return {}
    path = resolve(model, {**GAN_MODELS, **DDPM_MODELS})
    config = read_config(path)
    return {"checkpoint": str(path), "sha256": sha256(path), "summary": config.get("summary", {}),
            "data_source": config.get("train", {}).get("data_source")}


def row_key(ecfg: EvalConfig, info: dict, classifier_sha256: str) -> dict:
    """What a row's figures depend on: the evaluation's settings (threads change speed, not results), the model
    checkpoint's sha256 (none for real data) and the judging classifier's sha256."""
    settings = {k: v for k, v in asdict(ecfg).items()
                if k not in ("threads", "json") and not (k == "torchscript" and not v)}  # rows before --torchscript
    return {**settings, "sha256": info.get("sha256"), "classifier_sha256": classifier_sha256}


def previous_rows(out_dir: Path) -> dict:
    """Rows of the goals.json in out_dir (none when it is missing or unreadable)."""
    try:
        return json.loads((out_dir / JSON_NAME).read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}


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
             rows["ddpm-dpm-solver++-20"]["fid"] / ref["fid"], "<=", 1 + FEW_STEP_TOLERANCE, f"{_fid(rows['ddpm-dpm-solver++-20'])} vs {_fid(ref)}"),
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
    """What would move a missed goal next, with the measured evidence at hand (rows; the GAN's FID history)."""
    gid, floor = g.get("id", ""), rows["floor"]["fid"]
    if gid == "gan-fid":
        text = (f"FID {rows['gan']['fid']:.2f} must reach {g['target'] * floor:.2f}. ")
        stretch = fid_history.last_stretch(history)
        if stretch:
            text += (f"Its last stretch, {stretch['from_iterations']} -> {stretch['to_iterations']} iterations "
                     f"({stretch['minutes']:g} min on CPU), moved FID {stretch['from_fid']:.2f} -> "
                     f"{stretch['to_fid']:.2f} ({100 * stretch['change']:+.0f} %; the whole curve: "
                     "reports/gan/fid_history.md). ")
        capacity = "capacity (base channels 64 -> 128: ~4x the compute per iteration, a GPU run)"
        if stretch and fid_history.within_noise(stretch):
            return text + (f"That is within the noise of the draw (2 sd: {stretch['noise']:.2f}): more of the same "
                           f"training now buys little. Next: {capacity}.")
        return text + f"Next: more learning-rate cycles (restart, anneal to 0) while each still pays, then {capacity}."
    if gid == "ddpm-served-fid":
        ref, fast = rows["ddpm-100"], rows.get("ddpm-sde-dpm-solver++-20", {})
        return ("The sampler is not what holds it back: on the same 1,000 seeds DDPM-100 scores "
                f"{_fid(ref)} and sde-dpm-solver++ 20 {_fid(fast) if fast else '-'}. The UNet is: next, width "
                "(channels 16/32/64 -> 32/64/128) and more steps, which need a GPU to train in reasonable time.")
    if gid == "dpm-solver++-20-vs-100":
        return ("The ODE sampler integrates the UNet's score errors where the ancestral and stochastic samplers "
                "correct them with fresh noise; the stochastic sde-dpm-solver++ at the same 20 steps is the "
                "served default for Generate (its row and the best-sampler goal). A better UNet narrows both.")
    if gid.endswith("-psnr") or gid.endswith("-class"):
        served = rows.get("denoise-served")
        return ("DDPM-100's ancestral steps add fresh noise to the end: its output is a sample of the posterior, not "
                "its mean, and an exact posterior sample has twice the mean's squared error (-3 dB)."
                + (f" The deterministic {served['sampler']} {served['steps']} (Denoise's served default) scores "
                   f"PSNR {served['psnr']:.2f} dB, class preservation {served['class_preservation']:.3f} on the same "
                   "images." if served else "") + " Next: a better UNet (width, steps).")
    if gid == "gan-bf16-fid":
        return ("Serve the generator in fp32: config.pbtxt parameter `precision` \"fp32\" (TorchScript fp32 from its own "
                "measured threshold, engines.json threshold_fp32); bf16 keeps 8 bits of mantissa, and a generator "
                "that needs more is sensitive to its activations' scale (batch norm folded into the convolutions).")
    return "No lever recorded for this goal."


def missed_lines(goals: list[dict], rows: dict, history: list[dict]) -> list[str]:
    missed = [g for g in goals if not g["met"]]
    if not missed:
        return ["", "Every goal is met."]
    lines = ["", "## Missed goals: by how much, and the next lever", ""]
    for g in missed:
        lines.append(f"- **{g['goal']}**: {shortfall(g)}. {lever(g, rows, history)}")
    return lines


def plan(cfg: GoalsConfig) -> dict[str, EvalConfig]:
    """Row name -> its evaluation (seeds shared, so sampler rows differ by the sampler alone)."""
    n, m, common = cfg.num_samples, cfg.sampler_samples, {"seed": cfg.seed, "threads": cfg.threads}
    rows = {
        "floor": EvalConfig(model="real-test", num_samples=n, **common),
        "gan": EvalConfig(model=cfg.gan, num_samples=n, **common),
        "modified": EvalConfig(model=cfg.modified, num_samples=n, **common),
        "ddpm-served": EvalConfig(model=cfg.ddpm, num_samples=n, sampler=DEFAULT_GENERATE_SAMPLER,
                                  steps=DEFAULT_SAMPLER_STEPS, **common),
        "ddpm-100": EvalConfig(model=cfg.ddpm, num_samples=m, sampler="ddpm", steps=100, **common),
        **{f"ddpm-{s}-20": EvalConfig(model=cfg.ddpm, num_samples=m, sampler=s, steps=20, **common)
           for s in FAST_SAMPLERS},
        "denoise": EvalConfig(model=cfg.ddpm, task="denoise", sigma=DENOISE_SIGMA, num_samples=m, **common),
        "denoise-served": EvalConfig(model=cfg.ddpm, task="denoise", sigma=DENOISE_SIGMA, num_samples=m,
                                     sampler=DEFAULT_SAMPLER, steps=DEFAULT_SAMPLER_STEPS, **common),
    }
    bf16 = served_bf16(cfg)
    if bf16 is not None:
        rows["gan-bf16"] = EvalConfig(model=cfg.gan, num_samples=n, torchscript=bf16, **common)
    return rows


def served_bf16(cfg: GoalsConfig) -> str | None:
    """The exported bf16 TorchScript of cfg.gan in the model repository (relative to the repository root when it
    lies under it), None when cfg.gan is not a served generator or the file is missing."""
    from mnistgen.engine import BF16_FILE
    from training.export import GENERATORS

    triton = {name: t for t, name in GENERATORS.items()}.get(cfg.gan)
    path = repo_path(cfg.model_repository) / str(triton) / "1" / BF16_FILE
    if triton is None or not path.is_file():
        return None
    root = repo_path(".")
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def run(cfg: GoalsConfig) -> dict:
    rows, t_start, out_dir = {}, time.perf_counter(), repo_path(cfg.out_dir)
    before = previous_rows(out_dir) if cfg.reuse else {}
    classifier_sha256 = sha256(CHECKPOINT_DIR / CLASSIFIER_CHECKPOINT)
    for name, ecfg in plan(cfg).items():
        info = checkpoint_info(ecfg.model)
        key = row_key(ecfg, info, classifier_sha256)
        command = (f"python -m training.evaluate --model {ecfg.model} --task {ecfg.task} --num-samples "
                   f"{ecfg.num_samples}" + (f" --sampler {ecfg.sampler} --steps {ecfg.steps}" if ecfg.sampler else "")
                   + (f" --sigma {ecfg.sigma}" if ecfg.task == "denoise" else "")
                   + (f" --torchscript {ecfg.torchscript}" if ecfg.torchscript else ""))
        old = before.get(name)
        if old is not None and old.get("key") == key:
            rows[name] = {**old, "reused": True}
            print(f"[{name}] reused from {out_dir / JSON_NAME} (same settings and checkpoints): {command}", flush=True)
            continue
        print(f"[{name}] {command}", flush=True)
        t0 = time.perf_counter()
        result = evaluate(ecfg)
        rows[name] = {"model": ecfg.model, "task": ecfg.task, **{k: result[k] for k in KEEP if k in result},
                      "wall_s": round(time.perf_counter() - t0, 1), **info, "key": key}
        print(f"  {json.dumps({k: rows[name][k] for k in KEEP if k in rows[name]})}", flush=True)
    out = {"about": __doc__.split("\n\n")[0], "config": asdict(cfg), "rows": rows, "goals": judge(rows),
           "machine": {"platform": platform.platform(), "python": platform.python_version()},
           "wall_s": round(time.perf_counter() - t_start, 1)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / JSON_NAME).write_text(json.dumps(out, indent=1) + "\n")
    render(out_dir)
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def render(out_dir: Path) -> Path:
    """goals.md from goals.json alone."""
    data = json.loads((out_dir / JSON_NAME).read_text())
    rows, floor = data["rows"], data["rows"]["floor"]
    reused = [name for name, r in rows.items() if r.get("reused")]
    lines = ["# Quality goals (issue 13), measured", "",
             f"Generated by `python -m training.quality_goals` from {JSON_NAME} ({data['wall_s'] / 60:.0f} min, "
             f"{data['config']['threads']} torch thread(s)"
             + (f"; {len(reused)} row(s) marked * taken over unchanged from the previous run, same settings and "
                "checkpoints" if reused else "") + "). FID in the evaluation classifier's feature space against the "
             f"10k test split; floor = real test images vs the training split: **{floor['fid']:.3f}**.", "",
             "## Goals", "", "| goal | measured | target | met | detail |", "|---|---:|---:|---|---|"]
    goals = judge(rows)  # (a pure function of the rows: goals.json files from before goal ids render the same)
    for g in goals:
        lines.append(f"| {g['goal']} | {_fmt(g['measured'])} | {g['comparison']} {g['target']:g} | "
                     f"{'yes' if g['met'] else '**no**'} | {g['detail']} |")
    history = fid_history.load_points(repo_path(data["config"].get("fid_history", FID_HISTORY)))
    lines += missed_lines(goals, rows, history)
    lines += ["", "## Rows", "",
              "| row | model | samples | sampler | FID | FID sd | x floor | coverage | KL | pairwise | class pres. | "
              "PSNR | ms/sample | training |", "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in rows.items():
        s = r.get("summary") or {}
        trained = ", ".join(x for x in (
            f"{s['iterations']} iters" if "iterations" in s else f"{s['steps']} steps" if "steps" in s else "",
            f"{s['train_time_s'] / 60:.0f} min" if "train_time_s" in s else "",
            f"data {r['data_source']}" if r.get("data_source") else "") if x)
        fid = r.get("fid")
        lines.append(
            f"| {name}{' *' if r.get('reused') else ''} | {r['model']} | {r.get('num_samples', '-')} | "
            f"{(str(r.get('sampler')) + ' ' + str(r.get('steps'))) if r.get('sampler') else '-'} | {_fmt(fid)} | "
            f"{_fmt(r.get('fid_sd'))} | "
            f"{_fmt(fid / floor['fid']) if fid is not None else '-'} | {_fmt(r.get('coverage'))} | "
            f"{_fmt(r.get('kl_uniform'))} | {_fmt(r.get('pairwise_distance'))} | {_fmt(r.get('class_preservation'))} | "
            f"{_fmt(r.get('psnr'))} | {_fmt(r.get('ms_per_sample'))} | {trained or '-'} |")
    mod = rows["modified"]
    lines += ["", f"Mode collapse (`{mod['model']}`): coverage {mod['coverage']}/10, KL {mod['kl_uniform']:.4f}, pairwise "
              f"distance {mod['pairwise_distance']:.3f} vs {floor['pairwise_distance']:.3f} for real test images "
              f"({100 * mod['pairwise_distance'] / floor['pairwise_distance']:.0f} %): "
              + ("collapsed" if mod["coverage"] <= 3 or mod["pairwise_distance"] < 0.2 else "no collapse")
              + " (training.controlled_failures' rule: coverage <= 3 or pairwise < 0.2).", ""]
    path = out_dir / MD_NAME
    path.write_text("\n".join(lines))
    return path


def parse_args(argv: list[str] | None = None) -> GoalsConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(p, GoalsConfig)
    return dataclass_from_args(GoalsConfig, p.parse_args(argv))


def run_and_print(cfg: GoalsConfig) -> None:
    out = run(cfg)
    for g in out["goals"]:
        print(f"{'MET   ' if g['met'] else 'MISSED'} {g['goal']}: {g['measured']:.4g} (goal {g['comparison']} "
              f"{g['target']:g}) {g['detail']}")
    print(f"wrote {repo_path(cfg.out_dir) / JSON_NAME} and {MD_NAME}")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    return exit_code((lambda: print(f"wrote {render(repo_path(cfg.out_dir))}")) if cfg.from_json
                     else lambda: run_and_print(cfg))


if __name__ == "__main__":
    sys.exit(main())
