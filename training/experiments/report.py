"""The GAN comparison report: the research's Table I plus classifier-based quality metrics, grids and loss curves.

    python -m training.experiments.report [--models dcgan-baseline,mlp] [--from-json]

Training losses and times come from each checkpoint's stored `summary` / `loss_history`; everything else is measured
(metrics.json), and report.md is rendered from metrics.json alone.
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mnistgen import catalog
from mnistgen.checkpoint import CHECKPOINT_DIR, REPO_ROOT, read_config
from mnistgen.registry import CLASSIFIER_CHECKPOINT, latent_tensor, load_generator
from ..evaluate import EvalConfig, evaluate, reference_images
from ..plots import figure, plot_losses, save_grid
from . import sweep
from .sweep import fmt as _fmt

JSON, MD = "metrics.json", "report.md"
REAL_FLOOR = "real-test"  # the real test split judged against the training split: the best a generator can hope for


@dataclass
class Config:
    models: str = ",".join(catalog.GANS)  # comma-separated names from catalog.GANS
    checkpoint_dir: str = str(CHECKPOINT_DIR)  # where the catalog's checkpoints are looked up
    num_samples: int = 10_000  # samples per model for the quality metrics
    seed: int = 0  # latent seed for metrics and grids
    latency_batch: int = 64  # batch size for the inference-time row
    latency_repeats: int = 30  # timed batches (median reported), after 3 warm-up batches
    threads: int = 1  # torch CPU threads for generation and timing
    out_dir: str = str(REPO_ROOT / "reports" / "gan")  # report.md, metrics.json and PNGs go here
    from_json: bool = False  # only re-render report.md from metrics.json

    def __post_init__(self):
        bad = [m for m in self.names() if m not in catalog.GANS]
        if bad:
            raise ValueError(f"--models entries must be among {sorted(catalog.GANS)}, got {bad}")
        if self.num_samples < 2 or min(self.latency_batch, self.latency_repeats, self.threads) < 1:
            raise ValueError("--num-samples must be >= 2; --latency-batch, --latency-repeats, --threads >= 1")

    def names(self) -> list[str]:
        return [m.strip() for m in self.models.split(",") if m.strip()]


@torch.no_grad()
def inference_ms(gen: torch.nn.Module, latent_dim: int, batch: int, repeats: int, seed: int = 0) -> float:
    """Median wall time of one generator forward at `batch`, divided by the batch: ms per sample."""
    z = latent_tensor(batch, latent_dim, seed)  # (B, latent_dim)
    times = []
    for i in range(3 + repeats):
        t0 = time.perf_counter()
        gen(z)  # (B, 1, 28, 28)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times) / batch


def _loss_panel(h: dict) -> tuple[list, dict]:
    return h["iter"], {"generator": h["loss_g"], "discriminator": h["loss_d"]}


def measure_model(name: str, path: Path, cfg: Config, out: Path) -> dict:
    gen, config = load_generator(path)
    latent_dim = int(config["arch"]["latent_dim"])
    row = {"checkpoint": path.name, "arch": config["arch"], "summary": config.get("summary", {}),
           # checkpoints from before the `full` source record no data_source: they trained on the 5k subset
           "data_source": config.get("train", {}).get("data_source", "embedded"),
           "inference_ms": inference_ms(gen, latent_dim, cfg.latency_batch, cfg.latency_repeats, cfg.seed),
           "metrics": evaluate(EvalConfig(model=str(path), num_samples=cfg.num_samples, seed=cfg.seed,
                                          threads=cfg.threads))}
    with torch.no_grad():
        save_grid(gen(latent_tensor(64, latent_dim, cfg.seed)), out / f"samples_{name}.png")
    h = config.get("loss_history")
    if h and h.get("iter"):
        plot_losses({name: _loss_panel(h)}, out / f"loss_{name}.png")
        row["has_loss_curve"] = True
    return row


def measure(cfg: Config) -> dict:
    """Measure every model (or note it missing) and the real-data floor; figures that need the models are drawn here."""
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"models": {}, "missing": {}, "config": asdict(cfg)}
    todo = []
    for name in cfg.names():
        path = Path(cfg.checkpoint_dir) / catalog.GANS[name].checkpoint
        try:
            read_config(path)
            todo.append((name, lambda name=name, path=path: measure_model(name, path, cfg, out)))
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            result["missing"][name] = (f"checkpoint {path.name} not found in {cfg.checkpoint_dir}"
                                       if not path.exists() else f"checkpoint {path.name} could not be loaded: {e}")
    result["models"] = sweep.cells(todo, desc="GAN report")
    n_floor = min(cfg.num_samples, reference_images("test").shape[0])
    result["floor"] = evaluate(EvalConfig(model=REAL_FLOOR, num_samples=n_floor, seed=cfg.seed, threads=cfg.threads))
    save_grid(reference_images("test")[:64], out / "samples_real.png")
    curves = {n: _loss_panel(read_config(Path(cfg.checkpoint_dir) / catalog.GANS[n].checkpoint)["loss_history"])
              for n, r in result["models"].items() if r.get("has_loss_curve")}
    if len(curves) > 1:
        plot_losses(curves, out / "loss_curves.png")
    clf_cfg = read_config(CHECKPOINT_DIR / CLASSIFIER_CHECKPOINT)
    result["classifier"] = {k: clf_cfg.get(k) for k in ("test_accuracy", "feature_dim", "parameters")}
    return result | {"machine": sweep.machine(cfg.threads)}


def figures(data: dict, cfg: Config) -> None:
    """Predicted-class histograms side by side (fraction of samples per digit), from the JSON."""
    hists = {n: r["metrics"]["class_histogram"] for n, r in data["models"].items()}
    hists["real test"] = data["floor"]["class_histogram"]
    with figure(Path(cfg.out_dir) / "class_histograms.png", figsize=(8, 3.4)) as (fig, ax):
        width = 0.8 / len(hists)
        for k, (name, h) in enumerate(hists.items()):
            x = np.arange(10) + (k - (len(hists) - 1) / 2) * width
            ax.bar(x, np.asarray(h) / max(1, sum(h)), width, label=name)
        ax.axhline(0.1, color="k", lw=0.6, ls="--")
        ax.set(xticks=range(10), xlabel="predicted digit", ylabel="fraction of samples")
        ax.legend(fontsize=8)


def fmt(v, nd: int = 2) -> str:  # every cell of this report: tiny values in e-notation
    return _fmt(v, nd, tiny=True)


def _epochs_iters(s: dict) -> str | None:
    if s.get("epochs") is None and s.get("iterations") is None:
        return None
    return f"{fmt(s.get('epochs'), 2)} / {fmt(s.get('iterations'), 2)}"


TRAINING_DATA = {"full": "60k (full)", "embedded": "5k (subset)"}  # training.data sources, as the table says them
# (label, how to get it from a model's collected row, digits)
TABLE_ROWS = [
    ("Architecture", lambda r: r["arch"]["arch"], 0),
    ("Latent Dimension", lambda r: r["arch"]["latent_dim"], 0),
    ("Network Depth", lambda r: f"{r['arch']['depth']}" if r["arch"].get("arch") == "dcgan" else "3 (linear)", 0),
    ("Dropout (D)", lambda r: r["arch"]["dropout"], 2),
    ("Final Gen Loss", lambda r: r["summary"].get("final_loss_g"), 2),
    ("Final Disc Loss", lambda r: r["summary"].get("final_loss_d"), 4),
    ("Min Generator Loss", lambda r: r["summary"].get("min_loss_g"), 2),
    ("Min Discriminator Loss", lambda r: r["summary"].get("min_loss_d"), 4),
    ("Training data", lambda r: TRAINING_DATA.get(r.get("data_source"), r.get("data_source")), 0),
    ("Epochs / Iterations", lambda r: _epochs_iters(r["summary"]), 0),
    ("Training Time (min)", lambda r: None if (t := r["summary"].get("train_time_s")) is None else t / 60, 2),
    ("Time/Epoch (sec)", lambda r: r["summary"].get("time_per_epoch_s"), 2),
    ("Training CPU threads", lambda r: r["summary"].get("threads"), 0),
    ("Inference Time (ms/sample)", lambda r: r.get("inference_ms"), 3),
]
METRIC_ROWS = [
    ("FID (classifier features) ↓", "fid", 2),
    ("FID spread (sd over 100 bootstrap resamples)", "fid_sd", 2),
    ("Class coverage (of 10) ↑", "coverage", 0),
    ("KL(class hist ‖ uniform) ↓", "kl_uniform", 3),
    ("Classifier confidence ↑", "confidence", 3),
    ("Inter-sample variance", "variance", 4),
    ("Mean pairwise distance", "pairwise_distance", 3),
]
COLLAPSE_COVERAGE = 2  # classes
COLLAPSE_PAIRWISE = 0.5  # fraction of the real data's mean pairwise distance
COLLAPSE_D_LOSS = 0.01  # final discriminator loss


def _pct(v: float, ref: float) -> str:
    if not ref:
        return "—"
    r = 100 * v / ref
    return f"{r:.0f}%" if r >= 10 else f"{r:.2g}%"


def collapse_verdict(name: str, model: dict, floor: dict) -> str:
    """One line saying whether the figures show mode collapse, and which figures say so."""
    m, d_loss = model["metrics"], (model.get("summary") or {}).get("final_loss_d")
    ratio = m["pairwise_distance"] / floor["pairwise_distance"]
    reasons = ([f"coverage {m['coverage']}/10"] if m["coverage"] <= COLLAPSE_COVERAGE else []) + (
        [f"pairwise distance {ratio:.0%} of real"] if ratio < COLLAPSE_PAIRWISE else []) + (
        [f"final D loss {d_loss:.4g}"] if d_loss is not None and d_loss < COLLAPSE_D_LOSS else [])
    figures = (f"coverage {m['coverage']}/10, pairwise distance {m['pairwise_distance']:.3f} ({ratio:.0%} of real), "
               f"final D loss {fmt(d_loss, 4)}")
    if reasons:
        return f"**{name}: collapsed** ({', '.join(reasons)}); {figures}."
    if m["coverage"] < 10:
        return (f"**{name}: partial collapse** ({m['coverage']}/10 classes covered, KL {m['kl_uniform']:.3f}); "
                f"{figures}.")
    return f"**{name}: no collapse on this data**; {figures}."


def markdown(d: dict, cfg: Config | None = None) -> str:
    """report.md from metrics.json's dict (prose: pages/report.md)."""
    models, floor = d["models"], d["floor"]
    names, curves = list(models), [n for n in models if models[n].get("has_loss_curve")]
    lowest = [f"- Lowest FID: **{min(names, key=lambda n: models[n]['metrics']['fid'])}**."] if names else []
    return sweep.page(
        "report", d=d, c=d["config"], accuracy=fmt(d["classifier"]["test_accuracy"], 4),
        coverage=COLLAPSE_COVERAGE, pairwise=COLLAPSE_PAIRWISE, d_loss=COLLAPSE_D_LOSS,
        missing="".join(f"> **{n}: not in this report** — {why}. Train it, then rerun "
                        "`python -m training.experiments.report`.\n\n" for n, why in d["missing"].items()),
        table=sweep.table(
            " | ".join(["Metric", *names, "Real data (floor)"]), "|".join(["---"] * (len(names) + 2)),
            [[label, *(fmt(get(models[n]), nd) for n in names), "—"] for label, get, nd in TABLE_ROWS]
            + [[label, *(fmt(models[n]["metrics"][k], nd) for n in names), fmt(floor[k], nd)]
               for label, k, nd in METRIC_ROWS]),
        observations="\n".join([
            f"- **{n}**: FID {fmt(m['fid'])} (floor {fmt(floor['fid'])}), {m['coverage']}/10 classes covered, KL "
            f"{fmt(m['kl_uniform'], 3)}, variance {fmt(m['variance'], 4)} ({_pct(m['variance'], floor['variance'])} "
            f"of the real data's), {fmt(models[n]['inference_ms'], 3)} ms/sample."
            for n, m in ((n, models[n]["metrics"]) for n in names)] + lowest),
        verdicts="\n".join(f"- {collapse_verdict(n, models[n], floor)}" for n in names),
        samples=sweep.table(" | ".join(names + ["real test images"]), "|".join(["---"] * (len(names) + 1)),
                            [[f"![{n}](samples_{n}.png)" for n in names] + ["![real](samples_real.png)"]]),
        curves="".join(["![loss curves](loss_curves.png)\n\nOne file per model:\n\n" if len(curves) > 1 else
                        f"![{curves[0]} losses](loss_{curves[0]}.png)\n\n" if curves else ""]
                       + [f"- {n}: [loss_{n}.png](loss_{n}.png)\n" for n in curves]
                       + [f"- {n}: no `loss_history` stored in its checkpoint.\n" for n in names if n not in curves]))


if __name__ == "__main__":
    sys.exit(sweep.main(sys.modules[__name__]))
