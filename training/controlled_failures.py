"""Controlled GAN failures, measured: train each broken configuration for an iteration budget, evaluate it, judge it.

Each run is one of training/train_gan.py's controlled-failure CONFIGS, alone or with all five mitigations of
`apply_mitigations` (run name `<config>+all`: label smoothing 0.9, non-saturating G loss, 2 D steps per G step,
instance noise 0.1 annealed linearly to 0 over the budget, D dropout 0.4):

- vanishing-gradient: D lr x10 (2e-3) and the saturating G loss log(1 - D(G(z))).
- mode-collapse: G lr x10 (2e-3).
- d-overfit: D (and G) train on the first 1,000 training images only.

A run trains with `GANTrainer` for `--max-iters` iterations (one G update each; d_steps D updates) into
runs/controlled/<name> (never checkpoints/), then scores the saved generator with training.evaluate's
`generate_gan` + `generation_metrics` on `--num-samples` samples (FID vs the 10k test split, coverage, KL,
pairwise distance...). For runs trained on a limited set (d-overfit) it also measures the discriminator's
train-vs-held-out gap (`discriminator_gap`): mean sigmoid(D(x)) on the images D trained on minus the same on as
many training-split images it never saw (the next ones in the split). An overfit D scores the held-out reals lower.

Verdicts come from `verdict()`, explicit rules on the measured numbers (thresholds below, also written to the JSON):
- collapsed: coverage <= COLLAPSE_COVERAGE (3 classes) or pairwise distance < COLLAPSE_PAIRWISE (0.2; real test
  images score ~0.36, reports/gan/report.md's floor);
- D saturated: final D loss < D_SATURATED_LOSS (0.01): D separates real from fake almost perfectly, so the
  saturating G loss gives G (almost) no gradient;
- D overfits: train-vs-held-out gap >= D_OVERFIT_GAP (0.1 = 10 points of mean D output; with 1,000 images per
  side the sampling noise of that difference is ~0.01-0.02).
A failure config is "reproduced" when its own symptom (EXPECTED_SYMPTOM) fires; a `+all` run is "mitigated" when it
no longer does.

Results accumulate in reports/gan/controlled_failures.json (one entry per run name; re-running a run replaces its
entry) and reports/gan/controlled_failures.md is rendered from that JSON only (`--from-json` just re-renders).

    python -m training.controlled_failures [--runs vanishing-gradient,mode-collapse+all,...] [--max-iters 1250]
        [--num-samples 2000] [--data-source full] [--from-json]

Default budget: 1,250 iterations = 2 epochs of the 60k set at batch 96 (125 epochs of d-overfit's 1,000 images).
Measured on this repo's 2-core CPU, 1 torch thread, shared with two other trainings: ~0.34 s per iteration for a
plain run (~7 min) and ~0.65 s for a `+all` run (2 D steps: ~14 min), about 10 min per run on average plus ~1 min
of evaluation: ~65 min for the six runs.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from mnistgen.checkpoint import REPO_ROOT
from mnistgen.files import repo_path
from mnistgen.cli import add_dataclass_args, dataclass_from_args
from .data import SOURCES, DataConfig, load_mnist

BASE_CONFIGS = ("vanishing-gradient", "mode-collapse", "d-overfit")  # train_gan CONFIGS names
ALL_SUFFIX = "+all"  # <config>+all = the config with every mitigation of train_gan.MITIGATIONS
RUNS = tuple(n for base in BASE_CONFIGS for n in (base, base + ALL_SUFFIX))
DEVICES = ("cpu", "auto", "cuda")  # as train_gan.DEVICES

COLLAPSE_COVERAGE = 3  # classes: coverage <= this is a collapse
COLLAPSE_PAIRWISE = 0.2  # mean pairwise distance (RMS per-pixel) below this is a collapse (real test data ~0.36)
D_SATURATED_LOSS = 0.01  # final D loss below this: D wins outright, G's (saturating) gradient vanishes
D_OVERFIT_GAP = 0.1  # mean D(train reals) - mean D(held-out reals) at or above this: D overfits
EXPECTED_SYMPTOM = {"vanishing-gradient": "d_saturated", "mode-collapse": "collapsed", "d-overfit": "d_overfits"}
SYMPTOM_LABEL = {"collapsed": "collapsed", "d_saturated": "D saturated", "d_overfits": "D overfits"}

JSON_NAME, MD_NAME = "controlled_failures.json", "controlled_failures.md"
MODULE = "python -m training.controlled_failures"


@dataclass
class ControlledConfig:
    runs: str = ",".join(RUNS)  # comma list of RUNS
    max_iters: int = 1250  # iterations per run (2 epochs of the 60k set at batch 96; ~10 min a run here on average)
    num_samples: int = 2000  # generated samples per evaluation (FID at 2k is biased upwards: compare within the table)
    data_source: str = "full"  # one of training.data.SOURCES (embedded = the 5k subset, for tests)
    data_dir: str | None = None  # for data_source idx / torchvision
    seed: int = 0  # evaluation latent seed (training keeps each config's own seed)
    threads: int = 1  # torch intra-op threads
    device: str = "cpu"  # training device, one of DEVICES (evaluation always runs on CPU)
    runs_dir: str = "runs/controlled"  # each run trains into <runs_dir>/<name>
    out_dir: str = "reports/gan"  # where controlled_failures.json / .md live
    from_json: bool = False  # only re-render controlled_failures.md from controlled_failures.json


# ---------------------------------------------------------------- run names and configs

def parse_runs(text: str) -> list[str]:
    """'a,b' -> ['a', 'b'] (order kept, duplicates dropped); an unknown name is a ValueError listing RUNS."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise ValueError(f"--runs is empty: allowed runs are {', '.join(RUNS)}")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise ValueError(f"unknown run name(s) {', '.join(map(repr, unknown))}: allowed runs are {', '.join(RUNS)}")
    return names


def split_run(name: str) -> tuple[str, bool]:
    """'mode-collapse+all' -> ('mode-collapse', True)."""
    if name.endswith(ALL_SUFFIX):
        return name[: -len(ALL_SUFFIX)], True
    return name, False


def train_config(name: str, cfg: ControlledConfig):
    """The train_gan TrainConfig of run `name` under cfg's budget, data and run directory."""
    from .train_gan import CONFIGS, MITIGATIONS, apply_mitigations

    base, mitigated = split_run(name)
    tc = apply_mitigations(CONFIGS[base], list(MITIGATIONS) if mitigated else [])
    run_dir = repo_path(cfg.runs_dir) / name
    if (REPO_ROOT / "checkpoints").resolve() in (run_dir.resolve(), *run_dir.resolve().parents):
        raise ValueError(f"--runs-dir must not be inside checkpoints/ (got {cfg.runs_dir})")
    return dataclasses.replace(tc, name=name, max_iters=cfg.max_iters, epochs=1, data_source=cfg.data_source,
                               data_dir=cfg.data_dir, threads=cfg.threads, device=cfg.device, run_dir=str(run_dir),
                               checkpoint=None)


def describe(name: str) -> str:
    """What run `name` changes against train_gan's baseline config (from CONFIGS themselves)."""
    from .train_gan import CONFIGS, MITIGATIONS, apply_mitigations

    base, mitigated = split_run(name)
    ref, cfg = CONFIGS["baseline"], CONFIGS[base]
    parts = []
    for f in ("lr_d", "lr_g", "g_loss", "data_limit", "real_label", "d_steps", "instance_noise", "d_dropout"):
        a, b = getattr(ref, f), getattr(cfg, f)
        if a != b:
            ratio = f" (x{b / a:g})" if isinstance(a, float) and isinstance(b, float) and a else ""
            parts.append(f"{f}={b:g}{ratio}" if isinstance(b, float) else f"{f}={b}")
    if cfg.arch != ref.arch:
        parts.append(f"arch={cfg.arch.to_dict()}")
    text = ", ".join(parts) or "baseline"
    if not mitigated:
        return text
    after = apply_mitigations(cfg, list(MITIGATIONS))
    undone = [f"{p.split('=')[0]} -> {getattr(after, p.split('=')[0])}" for p in parts
              if "=" in p and getattr(after, p.split("=")[0]) != getattr(cfg, p.split("=")[0])]
    return text + " + all mitigations" + (f" ({', '.join(undone)})" if undone else "")


# ---------------------------------------------------------------- measurements

@torch.no_grad()
def discriminator_gap(D: nn.Module, seen: torch.Tensor, unseen: torch.Tensor, batch_size: int = 96) -> dict:
    """How much better D scores the real images it trained on than real images it never saw.

    `seen`, `unseen`: (N, 1, 28, 28) real images in [-1, 1]. Returns seen_mean / unseen_mean (mean sigmoid(D(x))),
    gap = seen_mean - unseen_mean, n_seen, n_unseen. D is scored as it scored reals while training: BatchNorm on
    batch statistics of all-real batches of `batch_size`, dropout off, no instance noise; on a CPU copy, so the
    caller's D (its running statistics included) is left untouched.
    """
    if seen.shape[0] < 1 or unseen.shape[0] < 1:
        raise ValueError("discriminator_gap needs at least one seen and one unseen image")
    d = copy.deepcopy(D).cpu().train()
    for m in d.modules():
        if isinstance(m, (nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.AlphaDropout)):
            m.eval()

    def mean_score(x: torch.Tensor) -> float:
        scores = [torch.sigmoid(d(x[i:i + batch_size].float())).flatten() for i in range(0, x.shape[0], batch_size)]
        return float(torch.cat(scores).double().mean())

    s, u = mean_score(seen.cpu()), mean_score(unseen.cpu())
    return {"seen_mean": s, "unseen_mean": u, "gap": s - u, "n_seen": int(seen.shape[0]),
            "n_unseen": int(unseen.shape[0]), "batch_size": batch_size}


def verdict(name: str, coverage: int, pairwise_distance: float, final_loss_d: float,
            d_gap: float | None = None) -> dict:
    """The explicit rules of the module docstring applied to measured numbers (pure: no I/O).

    Returns the symptom flags (d_overfits is None when the gap was not measured), the symptom the run's config is
    meant to produce, whether it `failure_present`, and a one-line `text` quoting the numbers and thresholds.
    """
    base, mitigated = split_run(name)
    if base not in EXPECTED_SYMPTOM:
        raise ValueError(f"unknown run {name!r}: allowed runs are {', '.join(RUNS)}")
    flags = {
        "collapsed": coverage <= COLLAPSE_COVERAGE or pairwise_distance < COLLAPSE_PAIRWISE,
        "d_saturated": final_loss_d < D_SATURATED_LOSS,
        "d_overfits": None if d_gap is None else d_gap >= D_OVERFIT_GAP,
    }
    why = {
        "collapsed": " and ".join(
            ([f"coverage {coverage} <= {COLLAPSE_COVERAGE}"] if coverage <= COLLAPSE_COVERAGE else [])
            + ([f"pairwise {pairwise_distance:.3f} < {COLLAPSE_PAIRWISE}"] if pairwise_distance < COLLAPSE_PAIRWISE
               else [])),
        "d_saturated": f"final D loss {final_loss_d:.3g} < {D_SATURATED_LOSS}",
        "d_overfits": f"train-vs-held-out gap {d_gap:+.3f} >= {D_OVERFIT_GAP}" if d_gap is not None else "",
    }
    found = {k: f"{SYMPTOM_LABEL[k]} ({why[k]})" for k, v in flags.items() if v}
    expected = EXPECTED_SYMPTOM[base]
    present = bool(flags[expected])
    absent_why = {  # the expected symptom's figures when its rule did not fire
        "collapsed": f"no collapse: coverage {coverage} > {COLLAPSE_COVERAGE}, pairwise {pairwise_distance:.3f} >= "
                     f"{COLLAPSE_PAIRWISE}",
        "d_saturated": f"no D saturation: final D loss {final_loss_d:.3g} >= {D_SATURATED_LOSS}",
        "d_overfits": f"no D overfitting: gap {d_gap:+.3f} < {D_OVERFIT_GAP}" if d_gap is not None else "",
    }[expected]
    if flags[expected] is None:  # d-overfit without a measured gap
        text = "D overfitting not measured" + (f"; {'; '.join(found.values())}" if found else "")
    elif present:
        text = ("not mitigated: " if mitigated else "failure reproduced: ") + "; ".join(found.values())
    else:
        text = ("mitigated" if mitigated else "failure not reproduced") + f" ({absent_why})"
        text += f"; but {'; '.join(found.values())}" if found else "; no other symptom"
    return {**flags, "expected_symptom": expected, "failure_present": present, "text": text}


def thresholds() -> dict:
    return {"collapse_coverage_at_most": COLLAPSE_COVERAGE, "collapse_pairwise_below": COLLAPSE_PAIRWISE,
            "d_saturated_loss_below": D_SATURATED_LOSS, "d_overfit_gap_at_least": D_OVERFIT_GAP}


def machine(cfg: ControlledConfig) -> dict:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": cfg.threads,
            "device": cfg.device, "load_avg_1min_at_start": load}


def _git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=10)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def command_for(name: str, cfg: ControlledConfig) -> str:
    """The command that reproduces one entry (output locations left at their defaults unless changed)."""
    parts = [MODULE, "--runs", name, "--max-iters", str(cfg.max_iters), "--num-samples", str(cfg.num_samples),
             "--data-source", cfg.data_source, "--seed", str(cfg.seed), "--threads", str(cfg.threads),
             "--device", cfg.device]
    defaults = ControlledConfig()
    for field, opt in (("data_dir", "--data-dir"), ("runs_dir", "--runs-dir"), ("out_dir", "--out-dir")):
        if getattr(cfg, field) != getattr(defaults, field):
            parts += [opt, str(getattr(cfg, field))]
    return " ".join(parts)


def run_one(name: str, cfg: ControlledConfig) -> dict:
    """Train run `name`, evaluate its generator, measure the D gap where it applies; return its JSON entry."""
    from .evaluate import generate_gan, generation_metrics
    from .train_gan import GANTrainer

    t_start = time.perf_counter()
    mach = machine(cfg)
    tc = train_config(name, cfg)
    run_dir = Path(tc.run_dir)
    for stale in (run_dir / "samples").glob("epoch_*.png"):  # grids of an earlier run of the same name
        stale.unlink()
    trainer = GANTrainer(tc)
    per_epoch = len(trainer.loader)
    if per_epoch == 0:
        raise ValueError(f"{name}: the training set holds fewer images than one batch ({tc.batch_size})")
    # epochs only bound the loop here (max_iters stops it) and set the instance-noise schedule, which anneals over
    # epochs * iterations per epoch: make that the budget, so the noise reaches 0 at the last iteration
    trainer.cfg = tc = dataclasses.replace(tc, epochs=math.ceil(cfg.max_iters / per_epoch))
    summary = trainer.train()
    h = trainer.history

    gap = None
    if tc.data_limit is not None:  # the D-overfitting probe: seen images vs the next ones of the same split
        seen = trainer.loader.dataset.tensors[0]  # (data_limit, 1, 28, 28), what D trained on
        everything, _ = load_mnist("train", DataConfig(tc.data_source, tc.data_dir, None))
        unseen = everything[tc.data_limit: tc.data_limit + seen.shape[0]]
        if unseen.shape[0] < seen.shape[0]:
            raise ValueError(f"{name}: data source {tc.data_source!r} has {everything.shape[0]} training images; "
                             f"the gap needs {2 * seen.shape[0]}")
        gap = discriminator_gap(trainer.D, seen, unseen, batch_size=tc.batch_size)

    t_eval = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    samples, _ = generate_gan(str(run_dir / "generator.safetensors"), cfg.num_samples, cfg.seed)
    metrics = generation_metrics(samples, seed=cfg.seed)
    eval_s = time.perf_counter() - t_eval

    base, mitigated = split_run(name)
    losses = {k: summary[k] for k in ("final_loss_d", "final_loss_g", "min_loss_d", "min_loss_g")}
    return {
        "name": name, "config": base, "mitigations": "all" if mitigated else None, "description": describe(name),
        "iterations": summary["iterations"], "epochs": summary["epochs"], "max_iters": cfg.max_iters,
        "batch_size": tc.batch_size, "data_source": tc.data_source, "data_limit": tc.data_limit,
        "train_seed": tc.seed, "eval_seed": cfg.seed,
        "losses": losses, "final_d_real": h["d_real"][-1], "final_d_fake": h["d_fake"][-1],
        "train_wall_s": summary["train_time_s"], "eval_wall_s": eval_s, "total_wall_s": time.perf_counter() - t_start,
        "metrics": metrics, "d_gap": gap,
        "verdict": {**verdict(name, metrics["coverage"], metrics["pairwise_distance"], losses["final_loss_d"],
                              None if gap is None else gap["gap"]), "thresholds": thresholds()},
        "run_dir": _rel(run_dir), "train_config": json.loads(json.dumps(dataclasses.asdict(tc), default=str)),
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": mach,
        "git_commit": _git_commit(), "command": command_for(name, cfg),
    }


# ---------------------------------------------------------------- JSON and markdown

def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(REPO_ROOT.resolve()))
    except ValueError:
        return str(p)


def empty_result() -> dict:
    return {"about": f"Controlled GAN failures, written by `{MODULE}`; {MD_NAME} is rendered from this file only.",
            "thresholds": thresholds(), "runs": {}}


def load_result(path: Path) -> dict:
    if not path.exists():
        return empty_result()
    data = json.loads(path.read_text())
    if not isinstance(data.get("runs"), dict):
        raise ValueError(f"{path} has no 'runs' object: not a {JSON_NAME} written by {MODULE}")
    return data


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # never a half-written report


def save_result(result: dict, out_dir: Path) -> dict:
    """Write the JSON (runs in RUNS order) and the markdown rendered from it; return what was written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ordered = {n: result["runs"][n] for n in sorted(result["runs"], key=lambda n: (RUNS + (n,)).index(n))}
    result = {**result, "thresholds": thresholds(), "runs": ordered}
    _write(out_dir / JSON_NAME, json.dumps(result, indent=2, allow_nan=False) + "\n")
    _write(out_dir / MD_NAME, markdown(result))
    return result


def _g(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def _unproven(name: str, runs: dict) -> str:
    """A note for a `+all` run whose base run (in the same JSON) did not show its failure: nothing to mitigate."""
    base, mitigated = split_run(name)
    if mitigated and base in runs and not runs[base]["verdict"]["failure_present"]:
        return f" (but {base} without mitigations did not fail either: this run shows nothing about the mitigations)"
    return ""


def markdown(result: dict) -> str:
    """controlled_failures.md from the JSON's dict alone."""
    runs = result["runs"]
    t = result.get("thresholds", thresholds())
    lines = ["# Controlled GAN failures", "",
             f"Generated by `{MODULE}` from `{JSON_NAME}` (next to this file): every number below is read from that "
             f"JSON; `{MODULE} --from-json` re-renders this page. Each run trains one controlled-failure "
             "configuration of `training/train_gan.py` for an iteration budget, then scores the saved generator "
             "with `training/evaluate.py` (`generate_gan` + `generation_metrics`).", ""]
    if not runs:
        lines += [f"No run measured yet. Run `{MODULE}` (all six runs, ~65 min on this 2-core CPU) or "
                  f"`{MODULE} --runs <name>` for one."]
    else:
        lines += ["| run | config (vs baseline) | iterations | train wall (min) | final D loss | final G loss | "
                  "coverage | FID (n) | pairwise distance | D train-vs-held-out gap | verdict |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for name, r in runs.items():
            m, loss, gap = r["metrics"], r["losses"], r.get("d_gap")
            lines.append(
                f"| {name} | {r['description']} | {r['iterations']:,} | {r['train_wall_s'] / 60:.1f} | "
                f"{loss['final_loss_d']:.3g} | {loss['final_loss_g']:.3g} | {m['coverage']} | "
                f"{m['fid']:.1f} ({m['num_samples']:,}) | {m['pairwise_distance']:.3f} | "
                f"{_g(gap and gap['gap'], '+.3f')} | {r['verdict']['text']}{_unproven(name, runs)} |")
    lines += [
        "",
        "How to read it:",
        "",
        "- `+ all mitigations` = every mitigation of `train_gan.apply_mitigations`: one-sided label smoothing 0.9, "
        "non-saturating G loss, 2 D steps per G step, instance noise 0.1 (annealed linearly to 0 over the budget), "
        "D dropout 0.4. An iteration is one G update (and `d_steps` D updates).",
        "- FID (classifier features, vs the 10k test split) is computed on the n samples in brackets. At n = 2,000 it "
        "is biased upwards against the 10,000-sample figures of report.md: compare rows of this table only.",
        "- Pairwise distance: mean RMS per-pixel difference between two samples (real test images: ~0.36, "
        "report.md's floor); coverage: classes holding >= 2% of the classifier's labels.",
        "- D train-vs-held-out gap (measured for runs on a limited training set only; — elsewhere): mean "
        "sigmoid(D(x)) over the images D trained on minus the same over as many training-split images it never saw "
        "(the next ones in the split), D scored as on reals during training (BatchNorm batch statistics, dropout off). "
        "An overfit D scores held-out reals much lower.",
        f"- Verdict rules (`training/controlled_failures.py: verdict`): collapsed = coverage <= "
        f"{t['collapse_coverage_at_most']} or pairwise distance < {t['collapse_pairwise_below']}; D saturated = "
        f"final D loss < {t['d_saturated_loss_below']}; D overfits = gap >= {t['d_overfit_gap_at_least']}. A failure "
        "config is *reproduced* when its own symptom fires (vanishing-gradient: D saturated, mode-collapse: "
        "collapsed, d-overfit: D overfits); a `+all` run is *mitigated* when that symptom no longer fires.",
        "- Losses are the last logged iteration's (noisy: one batch); min losses are in the JSON.",
        "",
    ]
    if runs:
        lines += ["Provenance (per run, from the JSON):", ""]
        for name, r in runs.items():
            mach = r["machine"]
            lines.append(
                f"- {name}: measured {r['measured_at']} on {mach['processor']} ({mach['cpu_count']} cores, "
                f"{mach['torch_threads']} torch thread(s), {mach['device']}, torch {mach['torch']}), data "
                f"`{r['data_source']}`" + (f" (first {r['data_limit']:,} images)" if r.get("data_limit") else "")
                + f", {r['iterations']:,} of max {r['max_iters']:,} iterations, total wall "
                f"{r['total_wall_s'] / 60:.1f} min; `{r['command']}`")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- driver and CLI

def validate(cfg: ControlledConfig) -> list[str]:
    """The run names to measure; a ValueError naming the option for anything out of range."""
    names = parse_runs(cfg.runs)
    if cfg.max_iters < 1:
        raise ValueError(f"--max-iters must be >= 1, got {cfg.max_iters}")
    if cfg.num_samples < 2:
        raise ValueError(f"--num-samples must be >= 2, got {cfg.num_samples}")
    if cfg.data_source not in SOURCES:
        raise ValueError(f"--data-source must be one of {SOURCES}, got {cfg.data_source!r}")
    if cfg.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {cfg.threads}")
    if cfg.device not in DEVICES:
        raise ValueError(f"--device must be one of {DEVICES}, got {cfg.device!r}")
    return names


def run(cfg: ControlledConfig) -> dict:
    """Measure the configured runs (or only re-render with from_json); return the whole JSON dict."""
    out = repo_path(cfg.out_dir)
    if cfg.from_json:
        path = out / JSON_NAME
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run `{MODULE}` first")
        result = load_result(path)
        _write(out / MD_NAME, markdown(result))
        return result
    names = validate(cfg)
    for name in names:  # refuse a bad --runs-dir before the first (long) run starts
        train_config(name, cfg)
    torch.set_num_threads(cfg.threads)
    result = load_result(out / JSON_NAME)
    for name in tqdm(names, desc="controlled failures", unit="run"):
        entry = run_one(name, cfg)
        result = load_result(out / JSON_NAME)  # re-read: keep entries another process wrote meanwhile
        result["runs"][name] = entry
        result = save_result(result, out)  # after every run: a stopped series keeps what it measured
        m = entry["metrics"]
        tqdm.write(f"[{name}] {entry['iterations']} iterations, {entry['train_wall_s'] / 60:.1f} min: coverage "
                   f"{m['coverage']}, FID {m['fid']:.1f}, pairwise {m['pairwise_distance']:.3f} -> "
                   f"{entry['verdict']['text']}")
    print(f"wrote {out / JSON_NAME} and {out / MD_NAME}")
    return result


def parse_args(argv: list[str] | None = None) -> ControlledConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(p, ControlledConfig, help={"runs": f"comma list of: {', '.join(RUNS)}"})
    return dataclass_from_args(ControlledConfig, p.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        run(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
