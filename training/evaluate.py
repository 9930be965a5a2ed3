"""Sample-quality metrics (Fréchet distance, coverage, KL, diversity) and denoising metrics, as a library and a CLI.

Every metric judges images through the committed digit classifier (`training.classifier`); the generation metrics
are defined in docs/training.md ("Evaluating generators"), each below where it is computed. A class-conditional DDPM
(num_class_embeds > 0) draws item i as digit i % 10 (seed + i) with classifier-free guidance w and is also judged
by `digit_agreement` (argmax == requested digit), `agreement_per_digit` and `fid_per_digit` (against the test
split's images of that class: few samples, so biased upwards and noisy); it denoises with its null-class pass.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance, _compute_fid
from tqdm import tqdm

from mnistgen.checkpoint import CHECKPOINT_DIR, read_config
from mnistgen.cli import add_dataclass_args, dataclass_from_args, exit_code
from mnistgen.files import repo_path
from .classifier import FeatureExtractor, load_classifier, predict
from .data import DataConfig, load_mnist
from mnistgen import catalog
from mnistgen.catalog import MAX_GUIDANCE, MAX_STEPS, SAMPLERS
from mnistgen.registry import load_generator, latent_tensor

NUM_CLASSES = 10
FID_RESAMPLES = 100  # bootstrap resamples behind fid_sd
COVERAGE_MIN_FRACTION = 0.02  # a class "is covered" when it holds at least 2% of the samples
PAIRWISE_SUBSAMPLE = 1000  # images used for the mean pairwise distance
# the catalog's diffusion generators by name -> their entry (checkpoint under checkpoints/)
DDPM_MODELS = {name: m for name, m in catalog.GENERATORS.items() if m.kind != catalog.GAN}
SPECIAL_MODELS = ("real-test", "real-train", "noise", *DDPM_MODELS)  # besides catalog.GANS and checkpoint paths
COND = next(m for m in DDPM_MODELS.values() if m.conditional)  # the served class-conditional DDPM
TASKS = ("generate", "denoise")
GENERATION_KEYS = ("fid", "fid_sd", "coverage", "kl_uniform", "confidence", "variance", "pairwise_distance")
DENOISE_KEYS = ("class_preservation", "psnr", "ssim")
CONDITIONAL_KEYS = ("digit_agreement", "agreement_per_digit", "fid_per_digit", "requested_digits")
UNCONDITIONAL_SAMPLING = ("ddpm", 100)  # --sampler / --steps defaults of an unconditional DDPM
CONDITIONAL_SAMPLING = (COND.sampler, COND.steps)  # ... of a conditional one: the served default


# ---------------------------------------------------------------- pure helpers

def _check_images(x: torch.Tensor, name: str, min_n: int = 1) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (N, 1, 28, 28), got {type(x).__name__}")
    if x.dim() != 4 or tuple(x.shape[1:]) != (1, 28, 28):
        raise ValueError(f"{name} must have shape (N, 1, 28, 28), got {tuple(x.shape)}")
    if x.shape[0] < min_n:
        raise ValueError(f"{name} needs at least {min_n} images, got {x.shape[0]}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return x.detach().cpu().float()


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> [0, 1] (clamped), same shape."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def class_histogram(labels: torch.Tensor) -> list[int]:
    """Counts of each predicted digit 0..9 (length 10)."""
    return torch.bincount(labels.long().flatten(), minlength=NUM_CLASSES).tolist()


def coverage(hist: list[int], min_fraction: float = COVERAGE_MIN_FRACTION) -> int:
    """Number of classes holding at least `min_fraction` of the samples."""
    n = sum(hist)
    return int(sum(c >= min_fraction * n for c in hist)) if n else 0


def kl_uniform(hist: list[int]) -> float:
    """KL(p || U(10)) in nats, with 0 log 0 = 0."""
    p = np.asarray(hist, dtype=np.float64)
    p = p / p.sum()
    nz = p > 0
    return float(np.sum(p[nz] * np.log(p[nz] * NUM_CLASSES)))


def inter_sample_variance(samples: torch.Tensor) -> float:
    """Mean over pixels of the per-pixel variance across samples (ddof=0), images in [0, 1]."""
    x = to_unit(samples).flatten(1).double()  # (N, 784)
    return float(x.var(dim=0, correction=0).mean())


def mean_pairwise_distance(samples: torch.Tensor, max_n: int = PAIRWISE_SUBSAMPLE, seed: int = 0) -> float:
    """Mean L2 distance / sqrt(784) over all pairs i != j of a seeded subsample of [0, 1] images."""
    x = to_unit(samples).flatten(1).double()  # (N, 784)
    if x.shape[0] > max_n:
        idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_n]
        x = x[idx]
    n = x.shape[0]
    if n < 2:
        return 0.0
    d = torch.cdist(x, x)  # (n, n), zero diagonal
    return float(d.sum() / (n * (n - 1)) / math.sqrt(x.shape[1]))


# ---------------------------------------------------------------- metrics

def _fid_metric() -> FrechetInceptionDistance:
    # normalize=True: inputs are float images in [0, 1]; a custom module gets them unchanged and torchmetrics reads
    # its `num_features` (128) instead of probing it with a dummy 3x299x299 image.
    fid = FrechetInceptionDistance(feature=FeatureExtractor(load_classifier()), normalize=True,
                                   reset_real_features=False)
    return fid.eval()  # the metric is an nn.Module: keep BatchNorm/Dropout in inference mode


# metrics holding test-split feature statistics, computed once per process: None -> the whole 10k split, a digit ->
# that class's images
_FID_TEST: dict[int | None, FrechetInceptionDistance] = {}


def _reference_metric(reference: torch.Tensor | None, batch_size: int = 1000,
                      digit: int | None = None) -> FrechetInceptionDistance:
    """A metric holding the reference's feature statistics and no fake features. reference None: the 10k test split
    (or, with `digit`, its images of that class), whose statistics are computed once per process."""
    if reference is None and digit in _FID_TEST:
        fid = _FID_TEST[digit]
        fid.reset()  # drops the fake features only (reset_real_features=False)
        return fid
    fid = _fid_metric()
    if reference is None:
        real = reference_images("test")
        if digit is not None:
            real = real[real_split("test")[1] == digit]  # (~1000, 1, 28, 28)
    else:
        real = reference
    for i in range(0, real.shape[0], batch_size):
        fid.update(to_unit(real[i:i + batch_size]), real=True)  # (B, 1, 28, 28) in [0, 1]
    if reference is None:
        _FID_TEST[digit] = fid
    return fid


@torch.no_grad()
def frechet_distance(samples: torch.Tensor, reference: torch.Tensor | None = None, batch_size: int = 1000,
                     digit: int | None = None) -> float:
    """torchmetrics FrechetInceptionDistance in the classifier's 128-d feature space; images in [-1, 1]."""
    fid = _reference_metric(reference, batch_size, digit)
    for i in range(0, samples.shape[0], batch_size):
        fid.update(to_unit(samples[i:i + batch_size]), real=False)  # (B, 1, 28, 28) in [0, 1]
    return float(fid.compute())


@torch.no_grad()
def fid_with_sd(samples: torch.Tensor, reference: torch.Tensor | None = None, resamples: int = FID_RESAMPLES,
                seed: int = 0, batch_size: int = 1000) -> tuple[float, float]:
    """(fid, fid_sd): frechet_distance's figure and its sd over `resamples` bootstrap resamples of the samples (the
    reference's statistics fixed). Resampling repeats images, so the resampled FIDs sit a little above `fid`: only
    their spread is reported."""
    samples = _check_images(samples, "samples", min_n=2)
    reference = None if reference is None else _check_images(reference, "reference", min_n=2)
    fid = _reference_metric(reference, batch_size)
    n_real = fid.real_features_num_samples
    mean_real = fid.real_features_sum / n_real  # (128,) float64, as torchmetrics' compute()
    cov_real = (fid.real_features_cov_sum - n_real * torch.outer(mean_real, mean_real)) / (n_real - 1)
    feats = torch.cat([fid.inception(to_unit(samples[i:i + batch_size])).double()
                       for i in range(0, samples.shape[0], batch_size)])  # (N, 128)

    def distance(x: torch.Tensor) -> float:  # (n, 128) features -> Fréchet distance to the reference
        return float(_compute_fid(mean_real, cov_real, x.mean(0), torch.cov(x.T)))

    n, gen = feats.shape[0], torch.Generator().manual_seed(seed)
    values = [distance(feats[torch.randint(0, n, (n,), generator=gen)]) for _ in range(resamples)]
    return distance(feats), float(np.std(values, ddof=1))


@functools.cache
def real_split(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """The real split (cached): images (N, 1, 28, 28) in [-1, 1] and their (N,) int64 labels."""
    return load_mnist(split, DataConfig())


def reference_images(split: str = "test") -> torch.Tensor:
    return real_split(split)[0]


def generation_metrics(samples: torch.Tensor, reference: torch.Tensor | None = None, seed: int = 0) -> dict:
    """GENERATION_KEYS, class_histogram and num_samples of images (N, 1, 28, 28) in [-1, 1]; `reference` (M, 1, 28,
    28) defaults to the 10k test split."""
    samples = _check_images(samples, "samples", min_n=2)  # the reference is checked by fid_with_sd
    probs = predict(load_classifier(), samples.clamp(-1, 1))  # (N, 10)
    hist = class_histogram(probs.argmax(1))
    fid, fid_sd = fid_with_sd(samples, reference, seed=seed)
    return {
        "fid": fid,
        "fid_sd": fid_sd,
        "coverage": coverage(hist),
        "kl_uniform": kl_uniform(hist),
        "confidence": float(probs.max(1).values.mean()),
        "variance": inter_sample_variance(samples),
        "pairwise_distance": mean_pairwise_distance(samples, seed=seed),
        "class_histogram": hist,
        "num_samples": int(samples.shape[0]),
    }


@torch.no_grad()
def conditional_metrics(samples: torch.Tensor, requested: torch.Tensor) -> dict:
    """CONDITIONAL_KEYS of `samples` (N, 1, 28, 28) in [-1, 1] that asked for digits `requested` (N,); per-digit
    figures are None for a digit with too few samples."""
    samples = _check_images(samples, "samples", min_n=2)
    requested = torch.as_tensor(requested).long().flatten()  # (N,)
    if requested.shape[0] != samples.shape[0]:
        raise ValueError(f"requested must have one digit per sample ({samples.shape[0]}), got {requested.shape[0]}")
    if requested.min() < 0 or requested.max() >= NUM_CLASSES:
        raise ValueError(f"requested digits must be in [0, {NUM_CLASSES - 1}]")
    hit = predict(load_classifier(), samples.clamp(-1, 1)).argmax(1) == requested  # (N,) bool
    agreement, fids = [], []
    for d in range(NUM_CLASSES):
        mask = requested == d  # (N,)
        k = int(mask.sum())
        agreement.append(int(hit[mask].sum()) / k if k else None)
        fids.append(frechet_distance(samples[mask], digit=d) if k >= 2 else None)
    return {
        "digit_agreement": int(hit.sum()) / hit.shape[0],
        "agreement_per_digit": agreement,
        "fid_per_digit": fids,
        "requested_digits": class_histogram(requested),
    }


@torch.no_grad()
def denoise_metrics(denoised: torch.Tensor, clean: torch.Tensor, labels: torch.Tensor) -> dict:
    """class_preservation, psnr (dB, mean per image; inf when identical) and ssim of [-1, 1] images (N, 1, 28, 28)."""
    denoised = _check_images(denoised, "denoised")
    clean = _check_images(clean, "clean")
    if denoised.shape != clean.shape:
        raise ValueError(f"denoised {tuple(denoised.shape)} and clean {tuple(clean.shape)} must have the same shape")
    labels = torch.as_tensor(labels).long().flatten()
    if labels.shape[0] != clean.shape[0]:
        raise ValueError(f"labels must have one entry per image ({clean.shape[0]}), got {labels.shape[0]}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels must be digits in [0, {NUM_CLASSES - 1}]")
    pred = predict(load_classifier(), denoised.clamp(-1, 1)).argmax(1)  # (N,)
    d01, c01 = to_unit(denoised), to_unit(clean)  # (N, 1, 28, 28) in [0, 1]
    psnr = peak_signal_noise_ratio(d01, c01, data_range=1.0, dim=(1, 2, 3), reduction="elementwise_mean")
    ssim = structural_similarity_index_measure(d01, c01, data_range=1.0)
    return {
        "class_preservation": float((pred == labels).float().mean()),
        "psnr": float(psnr),
        "ssim": float(ssim),
        "num_samples": int(clean.shape[0]),
    }


# ---------------------------------------------------------------- producing samples

@dataclass
class EvalConfig:
    model: str = catalog.DEFAULT_MODEL  # a GAN name, one of SPECIAL_MODELS, or a .safetensors checkpoint path
    task: str = "generate"  # one of TASKS (denoise needs a DDPM model)
    num_samples: int = 0  # images to generate / denoise; 0 = 10,000 for generate, 1,000 for denoise
    seed: int = 0  # latent / noise / subset seed
    batch_size: int = 500  # generation batch size
    sampler: str = ""  # DDPM sampler, one of SAMPLERS; "" = ddpm (unconditional DDPM), dpm-solver++ (conditional)
    steps: int = 0  # DDPM UNet evaluations per sample; 0 = 100 (unconditional DDPM), 20 (conditional)
    guidance: float | None = None  # conditional DDPM: classifier-free guidance w; None = checkpoint's, else catalog's
    sigma: float = 0.5  # denoise: std of the Gaussian noise added to [-1, 1] images
    threads: int = 1  # torch CPU threads
    json: bool = False  # print one JSON object instead of a table
    # a GAN only: score this TorchScript generator file (e.g. the served model_repository/<triton model>/1/
    # model_bf16.pt, as Triton runs it: frozen, optimised) on the same latents instead of the checkpoint's PyTorch
    torchscript: str = ""


def _model_kind(model: str) -> str:
    """'gan', 'ddpm' or the special name itself."""
    if model in catalog.GANS:
        return "gan"
    if model in SPECIAL_MODELS:
        return "ddpm" if model in DDPM_MODELS else model
    path = Path(model)
    if path.suffix != ".safetensors" and not path.exists():
        raise ValueError(f"unknown model {model!r}: expected one of {sorted(catalog.GANS) + list(SPECIAL_MODELS)} "
                         "or a .safetensors checkpoint path")
    kind = read_config(path).get("kind")
    if kind not in ("gan", "ddpm"):
        raise ValueError(f"{model} is a {kind!r} checkpoint; --model needs a 'gan' or 'ddpm' checkpoint")
    return kind


def _ddpm_path(model: str) -> Path:
    """The checkpoint file of a DDPM model name ("ddpm", "ddpm-cond") or path."""
    return CHECKPOINT_DIR / DDPM_MODELS[model].checkpoint if model in DDPM_MODELS else Path(model)


def _ddpm_config(model: str) -> dict:
    """The checkpoint config of a DDPM model (reads the header only)."""
    path = _ddpm_path(model)
    if model in DDPM_MODELS and DDPM_MODELS[model].conditional and not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path} (train it with `python -m training.train_ddpm "
                                f"--unet-num-class-embeds 11 --checkpoint {path}`)")
    return read_config(path)


def subset(x: torch.Tensor, y: torch.Tensor, n: int, seed: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if n > x.shape[0]:
        raise ValueError(f"--num-samples must be in [2, {x.shape[0]}] for {what}, got {n}")
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]


def torchscript_file(path: str) -> Path:
    """--torchscript: as given when it exists (relative to the working directory), else under the repository root."""
    return Path(path) if Path(path).exists() else repo_path(path)


def _timed_batches(n: int, batch_size: int, step, desc: str) -> tuple[list, float]:
    """[step(start, size) per batch] and the ms per item they took; item i is seeded seed + i wherever a seed
    matters, so the chunking does not change the result."""
    out, elapsed = [], 0.0
    for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", leave=False):
        t0 = time.perf_counter()
        with torch.no_grad():
            out.append(step(start, min(batch_size, n - start)))
        elapsed += time.perf_counter() - t0
    return out, 1000 * elapsed / n


def generate_gan(model: str, n: int, seed: int = 0, batch_size: int = 500,
                 torchscript: str = "") -> tuple[torch.Tensor, float]:
    """(samples (n, 1, 28, 28) in [-1, 1], ms per sample) from a GAN generator, z from mnistgen.latent; with
    `torchscript`, from that exported file of it as served (its latent size is the checkpoint's)."""
    gen, config = load_generator(model)
    if torchscript:
        from mnistgen.engine import load_torchscript

        gen = load_torchscript(torchscript_file(torchscript))
    z = latent_tensor(n, int(config["arch"]["latent_dim"]), seed)  # (n, latent_dim)
    out, ms = _timed_batches(n, batch_size, lambda i, b: gen(z[i:i + b]), f"generate {model}")
    return torch.cat(out), ms


def produce_samples(cfg: EvalConfig) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
    """(samples, reference or None for the default test split, ms per sample or None) for a GAN or real data."""
    n, kind = cfg.num_samples, _model_kind(cfg.model)
    if kind == "gan":
        samples, ms = generate_gan(cfg.model, n, cfg.seed, cfg.batch_size, cfg.torchscript)
        return samples, None, ms
    if kind == "noise":  # sanity: uniform noise in [-1, 1]
        return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(cfg.seed)) * 2 - 1, None, None
    # real-test: the floor, real test images judged against the training split; real-train against the test split
    split = kind.removeprefix("real-")
    x = subset(*real_split(split), n, cfg.seed, kind)[0]
    return x, reference_images("train") if split == "test" else None, None


def produce_ddpm(cfg: EvalConfig) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """(samples (n, 1, 28, 28) in [-1, 1], requested digits (n,) or None, ms per sample) of a DDPM; a conditional
    one (cfg.guidance set) draws item i as digit i % 10 with guidance cfg.guidance."""
    from mnistgen import diffusion  # lazy: the DDPM module is optional for GAN-only use

    unet, config = diffusion.load_unet(_ddpm_path(cfg.model))
    labels = None if cfg.guidance is None else torch.arange(cfg.num_samples) % NUM_CLASSES  # (n,) item i: digit i % 10

    def step(i: int, b: int) -> torch.Tensor:
        cond = {} if labels is None else {"labels": labels[i:i + b].tolist(), "guidance": cfg.guidance}
        return diffusion.generate(unet, b, sampler=cfg.sampler, steps=cfg.steps, seed=cfg.seed + i,
                                  batch_size=cfg.batch_size, scheduler_config=config.get("scheduler"), **cond)

    out, ms = _timed_batches(cfg.num_samples, cfg.batch_size, step, f"{cfg.model} {cfg.sampler}-{cfg.steps}")
    return torch.cat(out), labels, ms


def run_denoise(cfg: EvalConfig) -> dict:
    """Denoise cfg.num_samples seeded test images at cfg.sigma; metrics of the denoised and of the noisy input."""
    if _model_kind(cfg.model) != "ddpm":
        raise ValueError(f"--task denoise needs a DDPM model ('ddpm' or a ddpm checkpoint), got {cfg.model!r}")
    from mnistgen import diffusion

    clean, labels = subset(*real_split("test"), cfg.num_samples, cfg.seed, "denoise (test split)")
    unet, config = diffusion.load_unet(_ddpm_path(cfg.model))
    null = diffusion.null_class(unet)
    if null is not None:  # a conditional UNet denoises with its null-class ("any digit") pass

        @torch.inference_mode()
        def model(x, t):  # (B, 1, 28, 28), (B,) -> eps (B, 1, 28, 28)
            return unet(x, t, class_labels=torch.full((x.shape[0],), null, dtype=torch.int64)).sample
    else:
        model = unet
    out, ms = _timed_batches(cfg.num_samples, cfg.batch_size, lambda i, b: diffusion.denoise(
        model, clean[i:i + b], cfg.sigma, sampler=cfg.sampler, steps=cfg.steps, seed=cfg.seed + i,
        scheduler_config=config.get("scheduler")), f"denoise sigma={cfg.sigma}")
    noisy, denoised = (torch.cat(parts) for parts in zip(*out))  # (N, 1, 28, 28) each
    noisy_m = denoise_metrics(noisy.clamp(-1, 1), clean, labels)
    return {**denoise_metrics(denoised, clean, labels), **{f"noisy_{k}": noisy_m[k] for k in DENOISE_KEYS},
            "ms_per_sample": ms, "sigma": cfg.sigma, "sampler": cfg.sampler, "steps": cfg.steps}


def evaluate(cfg: EvalConfig) -> dict:
    """Run the configured evaluation and return one flat dict (what the CLI prints)."""
    validate(cfg)
    torch.set_num_threads(cfg.threads)
    head = {"model": cfg.model, "task": cfg.task, "seed": cfg.seed} | (
        {"torchscript": cfg.torchscript} if cfg.torchscript else {})
    if _model_kind(cfg.model) == "ddpm":
        head.update({"sampler": cfg.sampler, "steps": cfg.steps})
    if cfg.task == "denoise":
        return {**head, **run_denoise(cfg)}
    if _model_kind(cfg.model) == "ddpm":
        samples, requested, ms = produce_ddpm(cfg)  # requested: a conditional DDPM (validate() set cfg.guidance)
        cond = requested is not None
        return {**head, **({"guidance": cfg.guidance} if cond else {}), **generation_metrics(samples, seed=cfg.seed),
                **(conditional_metrics(samples, requested) if cond else {}), "ms_per_sample": ms}
    samples, ref, ms = produce_samples(cfg)
    return {**head, **generation_metrics(samples, ref, seed=cfg.seed), "ms_per_sample": ms}


def validate(cfg: EvalConfig) -> None:
    """Fill defaults and reject bad values with an error naming the field and the allowed range."""
    if cfg.task not in TASKS:
        raise ValueError(f"--task must be one of {TASKS}, got {cfg.task!r}")
    if cfg.sampler and cfg.sampler not in SAMPLERS:
        raise ValueError(f"--sampler must be one of {SAMPLERS}, got {cfg.sampler!r}")
    config = _ddpm_config(cfg.model) if _model_kind(cfg.model) == "ddpm" else {}  # also rejects unknown models
    conditional = bool((config.get("unet") or {}).get("num_class_embeds"))  # a class-conditional UNet
    if cfg.model in DDPM_MODELS and DDPM_MODELS[cfg.model].conditional and not conditional:
        raise ValueError(f"{_ddpm_path(cfg.model)} is not class-conditional (unet.num_class_embeds = 0)")
    if cfg.guidance is not None and not conditional:
        raise ValueError(f"--guidance applies only to a class-conditional DDPM ('ddpm-cond' or a ddpm checkpoint with "
                         f"unet.num_class_embeds > 0); {cfg.model!r} is unconditional")
    if cfg.guidance is not None and cfg.task != "generate":
        raise ValueError("--guidance applies to --task generate only (a conditional DDPM denoises unguided)")
    sampler, steps = CONDITIONAL_SAMPLING if conditional else UNCONDITIONAL_SAMPLING
    cfg.sampler, cfg.steps = cfg.sampler or sampler, cfg.steps or steps
    if conditional and cfg.task == "generate" and cfg.guidance is None:
        cfg.guidance = float((config.get("conditional") or {}).get("guidance", COND.guidance))
    if cfg.num_samples == 0:  # 10,000 generated (by a conditional DDPM 1,000; real-train: at most its split)
        cfg.num_samples = 1_000 if conditional or cfg.task == "denoise" else 10_000
        if cfg.model == "real-train":
            cfg.num_samples = min(cfg.num_samples, reference_images("train").shape[0])
    if cfg.num_samples < 2:
        raise ValueError(f"--num-samples must be >= 2 (0 = default), got {cfg.num_samples}")
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if not 1 <= cfg.steps <= MAX_STEPS:
        raise ValueError(f"--steps must be in [1, {MAX_STEPS}], got {cfg.steps}")
    if not 0 <= cfg.sigma <= 10:
        raise ValueError(f"--sigma must be in [0, 10], got {cfg.sigma}")
    if cfg.guidance is not None and not (math.isfinite(cfg.guidance) and 0 <= cfg.guidance <= MAX_GUIDANCE):
        raise ValueError(f"--guidance must be in [0, {MAX_GUIDANCE:g}], got {cfg.guidance}")
    if cfg.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {cfg.threads}")
    if cfg.torchscript and (_model_kind(cfg.model) != "gan" or cfg.task != "generate"):
        raise ValueError(f"--torchscript applies to a GAN's generate task only, got --model {cfg.model!r} "
                         f"--task {cfg.task!r}")
    if cfg.torchscript and not torchscript_file(cfg.torchscript).is_file():
        raise ValueError(f"--torchscript {cfg.torchscript!r}: no such file (run `python -m training.export` first)")


# ---------------------------------------------------------------- CLI

def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # strict JSON has no Infinity/NaN (e.g. PSNR of identical images)
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    return v


def format_table(result: dict) -> str:
    rows = []
    for k, v in result.items():
        if isinstance(v, float):
            v = f"{v:.4f}"
        elif v is None:
            v = "-"
        elif isinstance(v, list) and any(isinstance(x, float) for x in v):  # per-digit figures
            v = "[" + ", ".join("-" if x is None else f"{x:.4f}" for x in v) + "]"
        rows.append((k, str(v)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def parse_args(argv: list[str] | None = None) -> EvalConfig:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dataclass_args(p, EvalConfig, help={
        "json": "print one JSON object",
        "sampler": f"DDPM sampler, one of {SAMPLERS}; \"\" = {UNCONDITIONAL_SAMPLING[0]} for an unconditional DDPM, "
                   f"{CONDITIONAL_SAMPLING[0]} (the served default) for a conditional one",
        "steps": f"DDPM UNet evaluations per sample; 0 = {UNCONDITIONAL_SAMPLING[1]} for an unconditional DDPM, "
                 f"{CONDITIONAL_SAMPLING[1]} for a conditional one",
        "num_samples": "images to generate / denoise; 0 = 10,000 generated (1,000 by a conditional DDPM), "
                       "1,000 denoised",
        "guidance": f"class-conditional DDPM only: classifier-free guidance w in [0, {MAX_GUIDANCE:g}] "
                    "(eps = eps_null + w * (eps_label - eps_null)); default: the checkpoint's conditional.guidance, "
                    f"else {COND.guidance:g}",
    })
    return dataclass_from_args(EvalConfig, p.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)

    def run() -> None:
        result = evaluate(cfg)
        print(json.dumps({k: _json_safe(v) for k, v in result.items()}, allow_nan=False) if cfg.json
              else format_table(result))
    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
