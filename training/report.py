"""The GAN comparison report: the research's Table I plus classifier-based quality metrics, grids and loss curves."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mnistgen.checkpoint import CHECKPOINT_DIR, REPO_ROOT, read_config
from mnistgen.cli import add_dataclass_args, dataclass_from_args
from .classifier import load_classifier
from .data import to_uint8
from .evaluate import EvalConfig, evaluate, reference_images
from mnistgen.registry import CLASSIFIER_CHECKPOINT, GAN_MODELS, load_generator, latent_tensor

REAL_FLOOR = "real-test"  # the real test split judged against the training split: the best a generator can hope for


@dataclass
class ReportConfig:
    models: str = "dcgan-baseline,dcgan-modified,mlp"  # comma-separated names from GAN_MODELS
    checkpoint_dir: str = str(CHECKPOINT_DIR)  # where <name>.safetensors are looked up
    num_samples: int = 10_000  # samples per model for the quality metrics
    seed: int = 0  # latent seed for metrics and grids
    latency_batch: int = 64  # batch size for the inference-time row
    latency_repeats: int = 30  # timed batches (median reported), after 3 warm-up batches
    threads: int = 1  # torch CPU threads for generation and timing
    out_dir: str = str(REPO_ROOT / "reports" / "gan")  # report.md, metrics.json and PNGs go here


# ---------------------------------------------------------------- measurements

@torch.no_grad()
def inference_ms(gen: torch.nn.Module, latent_dim: int, batch: int, repeats: int, seed: int = 0) -> float:
    """Median wall time of one generator forward at `batch`, divided by the batch: ms per sample."""
    z = latent_tensor(batch, latent_dim, seed)  # (B, latent_dim)
    for _ in range(3):
        gen(z)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gen(z)  # (B, 1, 28, 28)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times) / batch


def image_grid(x: torch.Tensor, nrow: int = 8, pad: int = 2, scale: int = 2) -> np.ndarray:
    """[-1, 1] images (B, 1, 28, 28) -> one uint8 (H, W) grid, white padding, upscaled by `scale`."""
    imgs = to_uint8(x)  # (B, 28, 28)
    ncol = nrow
    nrows = -(-len(imgs) // ncol)
    cell = 28 + pad
    grid = np.full((nrows * cell + pad, ncol * cell + pad), 255, dtype=np.uint8)
    for i, im in enumerate(imgs):
        r, c = divmod(i, ncol)
        grid[pad + r * cell: pad + r * cell + 28, pad + c * cell: pad + c * cell + 28] = im
    return np.kron(grid, np.ones((scale, scale), dtype=np.uint8))


def save_grid(x: torch.Tensor, path: Path) -> None:
    from PIL import Image

    Image.fromarray(image_grid(x)).save(path)


def plot_losses(histories: dict[str, dict], path: Path) -> None:
    """One panel per model: generator and discriminator loss against iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(histories), figsize=(5 * len(histories), 3.6), squeeze=False)
    for ax, (name, h) in zip(axes[0], histories.items()):
        for key, label, color in (("loss_g", "generator", "C0"), ("loss_d", "discriminator", "C1")):
            y = np.asarray(h[key], dtype=float)
            ax.plot(h["iter"], y, color=color, lw=0.5, alpha=0.35)
            w = max(1, len(y) // 50)  # moving average over ~2% of the run
            smooth = np.convolve(y, np.ones(w) / w, mode="valid")
            ax.plot(np.asarray(h["iter"])[w - 1:], smooth, color=color, lw=1.4, label=f"{label} ({w}-point moving avg)")
        ax.set_title(name)
        ax.set_xlabel("iteration")
        ax.set_ylabel("BCE loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_histograms(hists: dict[str, list[int]], path: Path) -> None:
    """Predicted-class histograms side by side (fraction of samples per digit)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.4))
    width = 0.8 / max(1, len(hists))
    for k, (name, h) in enumerate(hists.items()):
        frac = np.asarray(h, dtype=float) / max(1, sum(h))
        ax.bar(np.arange(10) + (k - (len(hists) - 1) / 2) * width, frac, width, label=name)
    ax.axhline(0.1, color="k", lw=0.6, ls="--")
    ax.set_xticks(range(10))
    ax.set_xlabel("predicted digit")
    ax.set_ylabel("fraction of samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- assembling

def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if v != 0 and abs(v) < 10 ** -digits:
            return f"{v:.1e}"
        return f"{v:.{digits}f}"
    return str(v)


def _depth_label(arch: dict) -> str:
    return f"{arch['depth']}" if arch.get("arch") == "dcgan" else "3 (linear)"


TRAINING_DATA = {"full": "60k (full)", "embedded": "5k (subset)"}  # training.data sources, as the table says them

# (label, how to get it from a model's collected row, digits)
TABLE_ROWS = [
    ("Architecture", lambda r: r["arch"]["arch"], 0),
    ("Latent Dimension", lambda r: r["arch"]["latent_dim"], 0),
    ("Network Depth", lambda r: _depth_label(r["arch"]), 0),
    ("Dropout (D)", lambda r: r["arch"]["dropout"], 2),
    ("Final Gen Loss", lambda r: r["summary"].get("final_loss_g"), 2),
    ("Final Disc Loss", lambda r: r["summary"].get("final_loss_d"), 4),
    ("Min Generator Loss", lambda r: r["summary"].get("min_loss_g"), 2),
    ("Min Discriminator Loss", lambda r: r["summary"].get("min_loss_d"), 4),
    ("Training data", lambda r: TRAINING_DATA.get(r.get("data_source"), r.get("data_source")), 0),
    ("Epochs / Iterations", lambda r: _epochs_iters(r["summary"]), 0),
    ("Training Time (min)", lambda r: _div(r["summary"].get("train_time_s"), 60), 2),
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


def _pct(v: float, ref: float) -> str:
    if not ref:
        return "—"
    r = 100 * v / ref
    return f"{r:.0f}%" if r >= 10 else f"{r:.2g}%"


def _div(v, d):
    return None if v is None else v / d


def _epochs_iters(s: dict) -> str | None:
    if s.get("epochs") is None and s.get("iterations") is None:
        return None
    return f"{_fmt(s.get('epochs'))} / {_fmt(s.get('iterations'))}"


def collect(cfg: ReportConfig) -> dict:
    """Measure every model (or note it missing) and the real-data floor; returns a JSON-able dict."""
    torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [m.strip() for m in cfg.models.split(",") if m.strip()]
    bad = [m for m in names if m not in GAN_MODELS]
    if bad:
        raise ValueError(f"--models entries must be among {sorted(GAN_MODELS)}, got {bad}")
    result: dict = {"models": {}, "missing": {}, "config": asdict(cfg)}
    for name in names:
        path = Path(cfg.checkpoint_dir) / GAN_MODELS[name]
        if not path.exists():
            result["missing"][name] = f"checkpoint {path.name} not found in {cfg.checkpoint_dir}"
            continue
        try:
            config = read_config(path)
            gen, _ = load_generator(path)
        except (ValueError, KeyError, RuntimeError) as e:
            result["missing"][name] = f"checkpoint {path.name} could not be loaded: {e}"
            continue
        latent_dim = int(config["arch"]["latent_dim"])
        row = {
            "checkpoint": path.name,
            "arch": config["arch"],
            "summary": config.get("summary", {}),
            # checkpoints from before the `full` source record no data_source: they trained on the 5k subset
            "data_source": config.get("train", {}).get("data_source", "embedded"),
            "inference_ms": inference_ms(gen, latent_dim, cfg.latency_batch, cfg.latency_repeats, cfg.seed),
            "metrics": evaluate(EvalConfig(model=str(path), num_samples=cfg.num_samples, seed=cfg.seed,
                                           threads=cfg.threads)),
        }
        with torch.no_grad():
            save_grid(gen(latent_tensor(64, latent_dim, cfg.seed)), out_dir / f"samples_{name}.png")
        history = config.get("loss_history")
        if history and history.get("iter"):
            plot_losses({name: history}, out_dir / f"loss_{name}.png")
            row["has_loss_curve"] = True
        result["models"][name] = row
    n_floor = min(cfg.num_samples, reference_images("test").shape[0])
    result["floor"] = evaluate(EvalConfig(model=REAL_FLOOR, num_samples=n_floor, seed=cfg.seed, threads=cfg.threads))
    save_grid(reference_images("test")[:64], out_dir / "samples_real.png")
    histories = {n: r for n, r in result["models"].items() if r.get("has_loss_curve")}
    if len(histories) > 1:
        plot_losses({n: read_config(Path(cfg.checkpoint_dir) / GAN_MODELS[n])["loss_history"] for n in histories},
                    out_dir / "loss_curves.png")
    hists = {n: r["metrics"]["class_histogram"] for n, r in result["models"].items()}
    hists["real test"] = result["floor"]["class_histogram"]
    plot_histograms(hists, out_dir / "class_histograms.png")
    clf_cfg = read_config(CHECKPOINT_DIR / CLASSIFIER_CHECKPOINT)
    result["classifier"] = {k: clf_cfg.get(k) for k in ("test_accuracy", "feature_dim", "parameters")}
    result["machine"] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                         "cpu_count": os.cpu_count(), "torch_threads": cfg.threads, "torch": torch.__version__}
    return result


COLLAPSE_COVERAGE = 2  # classes
COLLAPSE_PAIRWISE = 0.5  # fraction of the real data's mean pairwise distance
COLLAPSE_D_LOSS = 0.01  # final discriminator loss


def collapse_verdict(name: str, model: dict, floor: dict) -> str:
    """One line saying whether the figures show mode collapse, and which figures say so."""
    m, summary = model["metrics"], model.get("summary") or {}
    d_loss = summary.get("final_loss_d")
    ratio = m["pairwise_distance"] / floor["pairwise_distance"]
    reasons = []
    if m["coverage"] <= COLLAPSE_COVERAGE:
        reasons.append(f"coverage {m['coverage']}/10")
    if ratio < COLLAPSE_PAIRWISE:
        reasons.append(f"pairwise distance {ratio:.0%} of real")
    if d_loss is not None and d_loss < COLLAPSE_D_LOSS:
        reasons.append(f"final D loss {d_loss:.4g}")
    figures = (f"coverage {m['coverage']}/10, pairwise distance {m['pairwise_distance']:.3f} ({ratio:.0%} of real), "
               f"final D loss {_fmt(d_loss, 4)}")
    if reasons:
        return f"**{name}: collapsed** ({', '.join(reasons)}); {figures}."
    if m["coverage"] < 10:
        return f"**{name}: partial collapse** ({m['coverage']}/10 classes covered, KL {m['kl_uniform']:.3f}); {figures}."
    return f"**{name}: no collapse on this data**; {figures}."


def render(result: dict) -> str:
    """The markdown report from collect()'s dict."""
    cfg = result["config"]
    models = result["models"]
    names = list(models)
    lines = ["# GAN comparison: DCGAN baseline vs modified vs MLP", ""]
    lines += [
        "Generated by `python -m training.report` from the committed checkpoints alone: training losses and times "
        "come from each checkpoint's stored `summary` / `loss_history`; everything else was measured when this "
        "report was generated.",
        "",
        f"- Quality metrics: {cfg['num_samples']:,} samples per model (latent seed {cfg['seed']}), judged by the "
        f"committed digit classifier (test accuracy {_fmt(result['classifier']['test_accuracy'], 4)}, "
        f"{result['classifier']['feature_dim']}-d features); reference set: the 10k MNIST test split.",
        f"- Inference time: median of {cfg['latency_repeats']} generator forwards at batch {cfg['latency_batch']}, "
        f"on CPU with {cfg['threads']} torch thread(s) ({result['machine']['processor']}, "
        f"{result['machine']['cpu_count']} cores, torch {result['machine']['torch']}), divided by the batch.",
        f"- Floor: the real test split scored against the training split ({result['floor']['num_samples']:,} images).",
        "",
    ]
    for name, why in result["missing"].items():
        lines += [f"> **{name}: not in this report** — {why}. Train it, then rerun `python -m training.report`.", ""]
    lines += ["## Table I (research rows) and quality metrics", ""]
    header = ["Metric"] + names + ["Real data (floor)"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for label, get, digits in TABLE_ROWS:
        cells = [label] + [_fmt(get(models[n]), digits) for n in names] + ["—"]
        lines.append("| " + " | ".join(cells) + " |")
    for label, key, digits in METRIC_ROWS:
        cells = [label] + [_fmt(models[n]["metrics"][key], digits) for n in names] + [_fmt(result["floor"][key], digits)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "How to read the metrics (definitions in `training/evaluate.py`):",
        "",
        "- **FID** is the Fréchet distance between Gaussians fitted to the classifier's penultimate activations "
        "(torchmetrics `FrechetInceptionDistance` with a custom feature module). Lower is better; it is on this "
        "classifier's scale, not comparable with Inception-v3 FID numbers. FID is biased upwards at small sample "
        "sizes, so compare rows computed with the same number of samples (as here). Its **spread** is the standard "
        "deviation of the FID over 100 bootstrap resamples of the samples: two FIDs closer than about twice it are "
        "within the noise of the draw.",
        "- **Coverage** counts digit classes holding at least 2% of the samples; **KL** is the predicted-class "
        "histogram's divergence from uniform in nats (0 = balanced, ln 10 ≈ 2.303 = one class).",
        "- **Confidence** is the classifier's mean max-softmax: low values mean digits it cannot read.",
        "- **Inter-sample variance** is the per-pixel variance across samples (images in [0, 1]) averaged over pixels; "
        "**mean pairwise distance** is the RMS per-pixel difference between two samples (1,000-image subsample). "
        "Both are near 0 for a collapsed generator.",
        "",
    ]
    lines += ["## Observations (computed from the table)", ""]
    floor = result["floor"]
    for n in names:
        m = models[n]["metrics"]
        lines.append(
            f"- **{n}**: FID {_fmt(m['fid'])} (floor {_fmt(floor['fid'])}), {m['coverage']}/10 classes covered, "
            f"KL {_fmt(m['kl_uniform'], 3)}, variance {_fmt(m['variance'], 4)} "
            f"({_pct(m['variance'], floor['variance'])} of the real data's), "
            f"{_fmt(models[n]['inference_ms'], 3)} ms/sample."
        )
    if names:
        best = min(names, key=lambda n: models[n]["metrics"]["fid"])
        lines.append(f"- Lowest FID: **{best}**.")
    lines.append("")
    lines += ["## Mode collapse verdict", "",
              f"A model counts as collapsed when coverage <= {COLLAPSE_COVERAGE} classes, or its mean pairwise distance "
              f"is below {COLLAPSE_PAIRWISE:.0%} of the real data's, or its final D loss is below {COLLAPSE_D_LOSS} "
              "(the research's signature: D rejects every sample). Partial collapse: fewer than 10 classes covered.", ""]
    for n in names:
        lines.append(f"- {collapse_verdict(n, models[n], floor)}")
    lines.append("")
    lines += ["## Samples (8×8, latent seed %d)" % cfg["seed"], ""]
    lines.append("| " + " | ".join(names + ["real test images"]) + " |")
    lines.append("|" + "---|" * (len(names) + 1))
    lines.append("| " + " | ".join([f"![{n}](samples_{n}.png)" for n in names] + ["![real](samples_real.png)"]) + " |")
    lines += ["", "## Predicted-class histograms", "", "![class histograms](class_histograms.png)", ""]
    curves = [n for n in names if models[n].get("has_loss_curve")]
    lines += ["## Training loss curves", ""]
    if len(curves) > 1:
        lines += ["![loss curves](loss_curves.png)", "", "One file per model:", ""]
    elif curves:
        lines += [f"![{curves[0]} losses](loss_{curves[0]}.png)", ""]
    for n in curves:
        lines.append(f"- {n}: [loss_{n}.png](loss_{n}.png)")
    for n in names:
        if n not in curves:
            lines.append(f"- {n}: no `loss_history` stored in its checkpoint.")
    lines += ["", "Raw numbers: `metrics.json` beside this file.", ""]
    return "\n".join(lines)


def write_report(cfg: ReportConfig) -> Path:
    result = collect(cfg)
    out_dir = Path(cfg.out_dir)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    path = out_dir / "report.md"
    path.write_text(render(result))
    return path


def parse_args(argv: list[str] | None = None) -> ReportConfig:
    p = argparse.ArgumentParser(description=__doc__)
    add_dataclass_args(p, ReportConfig)
    cfg = dataclass_from_args(ReportConfig, p.parse_args(argv))
    for name in ("num_samples", "latency_batch", "latency_repeats", "threads"):
        if getattr(cfg, name) < (2 if name == "num_samples" else 1):
            p.error(f"--{name.replace('_', '-')} must be >= {2 if name == 'num_samples' else 1}")
    return cfg


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    load_classifier()  # fail early with a clear message if the classifier is missing
    path = write_report(cfg)
    print(f"wrote {path}")
    print(path.read_text())


if __name__ == "__main__":
    main()
