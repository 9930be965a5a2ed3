"""Controlled GAN failures, measured: train each broken configuration for an iteration budget, evaluate it, judge it.

    python -m training.experiments.controlled_failures [--runs d-overfit,mode-collapse+all] [--max-iters 1250]

A run is one of train_gan's failure CONFIGS, alone or with every mitigation (`<config>+all`): it trains into
runs/controlled/<name> (never checkpoints/), is scored with training.evaluate and judged by `verdict()` (the rules,
stated on the page: pages/controlled_failures.md); it replaces its entry in reports/gan/controlled_failures.json.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn
from mnistgen.checkpoint import REPO_ROOT
from mnistgen.files import repo_path, repo_relative
from ..data import SOURCES, DataConfig, load_mnist
from ..distributed import DEVICES
from . import sweep

BASE_CONFIGS = ("vanishing-gradient", "mode-collapse", "d-overfit")  # train_gan CONFIGS names
ALL_SUFFIX = "+all"  # <config>+all = the config with every mitigation of train_gan.MITIGATIONS
RUNS = tuple(n for base in BASE_CONFIGS for n in (base, base + ALL_SUFFIX))

COLLAPSE_COVERAGE = 3  # classes: coverage <= this is a collapse
COLLAPSE_PAIRWISE = 0.2  # mean pairwise distance (RMS per-pixel) below this is a collapse (real test data ~0.36)
D_SATURATED_LOSS = 0.01  # final D loss below this: D wins outright, G's (saturating) gradient vanishes
D_OVERFIT_GAP = 0.1  # mean D(train reals) - mean D(held-out reals) at or above this: D overfits
EXPECTED_SYMPTOM = {"vanishing-gradient": "d_saturated", "mode-collapse": "collapsed", "d-overfit": "d_overfits"}
SYMPTOM_LABEL = {"collapsed": "collapsed", "d_saturated": "D saturated", "d_overfits": "D overfits"}

JSON, MD = "controlled_failures.json", "controlled_failures.md"
MODULE = "python -m training.experiments.controlled_failures"
INDENT = 2


@dataclass
class Config:
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


def train_config(name: str, cfg: Config):
    """The train_gan TrainConfig of run `name` under cfg's budget, data and run directory."""
    from ..train_gan import CONFIGS, MITIGATIONS, apply_mitigations

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
    from ..train_gan import CONFIGS, MITIGATIONS, apply_mitigations

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
    """seen_mean - unseen_mean of sigmoid(D(x)) over (N, 1, 28, 28) images in [-1, 1], D scored on a CPU copy as
    on reals in training (BatchNorm on all-real batches of `batch_size`, dropout off)."""
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
    """The symptom flags (d_overfits None when the gap was not measured), the run's expected symptom,
    `failure_present` and a `text` quoting the figures (pure)."""
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


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def command_for(name: str, cfg: Config) -> str:
    """The command that reproduces one entry (output locations left at their defaults unless changed)."""
    parts = [MODULE, "--runs", name, "--max-iters", str(cfg.max_iters), "--num-samples", str(cfg.num_samples),
             "--data-source", cfg.data_source, "--seed", str(cfg.seed), "--threads", str(cfg.threads),
             "--device", cfg.device]
    defaults = Config()
    for field, opt in (("data_dir", "--data-dir"), ("runs_dir", "--runs-dir"), ("out_dir", "--out-dir")):
        if getattr(cfg, field) != getattr(defaults, field):
            parts += [opt, str(getattr(cfg, field))]
    return " ".join(parts)


def run_one(name: str, cfg: Config) -> dict:
    """Train run `name`, evaluate its generator, measure the D gap where it applies; return its JSON entry."""
    from ..evaluate import generate_gan, generation_metrics
    from ..train_gan import GANTrainer

    t_start = time.perf_counter()
    mach = sweep.machine(cfg.threads, device=cfg.device, load_avg_1min_at_start=os.getloadavg()[0])
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
        "run_dir": repo_relative(run_dir), "train_config": json.loads(json.dumps(dataclasses.asdict(tc), default=str)),
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": mach,
        "git_commit": _git_commit(), "command": command_for(name, cfg),
    }


# ---------------------------------------------------------------- JSON and markdown

def empty_result() -> dict:
    return {"about": f"Controlled GAN failures, written by `{MODULE}`; {MD} is rendered from this file only.",
            "thresholds": thresholds(), "runs": {}}


def merged(path: Path, runs: dict) -> dict:
    """The JSON at `path` (re-read: entries another process wrote meanwhile stay) with `runs` replacing theirs,
    in RUNS order."""
    result = sweep.load(path, empty_result())
    if not isinstance(result.get("runs"), dict):
        raise ValueError(f"{path} has no 'runs' object: not a {JSON} written by {MODULE}")
    result["runs"].update(runs)
    order = sorted(result["runs"], key=lambda n: (RUNS + (n,)).index(n))
    return {**result, "thresholds": thresholds(), "runs": {n: result["runs"][n] for n in order}}


def _unproven(name: str, runs: dict) -> str:
    """A note for a `+all` run whose base run (in the same JSON) did not show its failure: nothing to mitigate."""
    base, mitigated = split_run(name)
    if mitigated and base in runs and not runs[base]["verdict"]["failure_present"]:
        return f" (but {base} without mitigations did not fail either: this run shows nothing about the mitigations)"
    return ""


def markdown(result: dict, cfg: Config | None = None) -> str:
    """controlled_failures.md from the JSON's dict alone (prose: pages/controlled_failures.md)."""
    runs = result["runs"]
    table = sweep.table(
        "run | config (vs baseline) | iterations | train wall (min) | final D loss | final G loss | coverage | "
        "FID (n) | pairwise distance | D train-vs-held-out gap | verdict", "---|---|" + "---:|" * 8 + "---",
        [[name, r["description"], f"{r['iterations']:,}", f"{r['train_wall_s'] / 60:.1f}",
          f"{r['losses']['final_loss_d']:.3g}", f"{r['losses']['final_loss_g']:.3g}", r["metrics"]["coverage"],
          f"{r['metrics']['fid']:.1f} ({r['metrics']['num_samples']:,})", f"{r['metrics']['pairwise_distance']:.3f}",
          f"{r['d_gap']['gap']:+.3f}" if r.get("d_gap") else "—", r["verdict"]["text"] + _unproven(name, runs)]
         for name, r in runs.items()])
    provenance = [
        f"- {name}: measured {r['measured_at']} on {m['processor']} ({m['cpu_count']} cores, {m['torch_threads']} "
        f"torch thread(s), {m['device']}, torch {m['torch']}), data `{r['data_source']}`"
        + (f" (first {r['data_limit']:,} images)" if r.get("data_limit") else "")
        + f", {r['iterations']:,} of max {r['max_iters']:,} iterations, total wall {r['total_wall_s'] / 60:.1f} min; "
        f"`{r['command']}`" for name, r in runs.items() for m in [r["machine"]]]
    return sweep.page(
        "controlled_failures", module=MODULE, json=JSON, t=result.get("thresholds", thresholds()),
        table=table if runs else f"No run measured yet. Run `{MODULE}` (all six runs) or "
                                            f"`{MODULE} --runs <name>` for one.",
        provenance="\nProvenance (per run, from the JSON):\n\n" + "\n".join(provenance) + "\n" if runs else "")


# ---------------------------------------------------------------- driver and CLI

def validate(cfg: Config) -> list[str]:
    """The run names to measure; a ValueError naming the option for anything out of range."""
    names = parse_runs(cfg.runs)
    for bad, what, got in ((cfg.max_iters < 1, "--max-iters must be >= 1", cfg.max_iters),
                           (cfg.num_samples < 2, "--num-samples must be >= 2", cfg.num_samples),
                           (cfg.data_source not in SOURCES, f"--data-source must be one of {SOURCES}", cfg.data_source),
                           (cfg.threads < 1, "--threads must be >= 1", cfg.threads),
                           (cfg.device not in DEVICES, f"--device must be one of {DEVICES}", cfg.device)):
        if bad:
            raise ValueError(f"{what}, got {got!r}")
    for name in names:  # refuse a bad --runs-dir before the first (long) run starts
        train_config(name, cfg)
    return names


def measure(cfg: Config) -> dict:
    """Measure the configured runs into the JSON (saved after every run: a stopped series keeps what it measured)."""
    names = validate(cfg)
    torch.set_num_threads(cfg.threads)
    path = repo_path(cfg.out_dir) / JSON
    runs = sweep.cells([(n, lambda n=n: run_one(n, cfg)) for n in names], desc="controlled failures",
                       after=lambda rows: sweep.save(path, merged(path, rows), INDENT))
    return merged(path, runs)


if __name__ == "__main__":
    sys.exit(sweep.main(sys.modules[__name__]))
