"""THE model table: every served model once, with its request limits, defaults and cost (standard library only).

Export, the gateway (validation, admission, ListModels), Triton's models, the bench, Locust, the reports, the client's
help and the tests iterate MODELS instead of naming models. Adding a GAN generator takes a checkpoint and one entry
(README, "Add a model"); `MNISTGEN_CATALOG=extra.json` appends entries without editing code (a list of objects with
Model's fields), which is how a deployment, or a test, serves a model this file does not name.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import MISSING, dataclass, fields

# ---- request limits shared by the gateway and the Triton models (check_request below) ----------------------
MAX_SEED = 2**63 - 1  # seeds are int64 >= 0 (numpy's default_rng rejects negative seeds)
MAX_STEPS = 1000  # the DDPM's training timesteps: more sampling steps than this make no sense
DIGITS = 10  # class-conditional models draw digit 0..DIGITS-1; the UNet's null class (any digit) is DIGITS
MAX_GUIDANCE = 10.0  # classifier-free guidance scale upper bound (0 = unconditional, 1 = conditional, no guidance)
# DDPM samplers, all one UNet evaluation per step: ancestral DDPM, deterministic DDIM (eta 0), DPM-Solver++ (2M, ODE)
# and its stochastic variant SDE-DPM-Solver++ (2M SDE; per-item noise like ddpm: at 20 steps it sits nearest DDPM-100
# in FID, reports/ddpm/sampler_study.md)
SAMPLERS = ("ddpm", "ddim", "dpm-solver++", "sde-dpm-solver++")
SAMPLER_STEPS = {"ddpm": 100, "ddim": 50, "dpm-solver++": 20, "sde-dpm-solver++": 20}  # steps=0 with this sampler

GAN, DDPM, DDPM_COND = "gan", "ddpm", "ddpm-cond"
KINDS = (GAN, DDPM, DDPM_COND)
GENERATE, DENOISE, INTERNAL = "Generate", "Denoise", ""  # the RPC a model serves; INTERNAL: Triton only (bench)
RPCS = (GENERATE, DENOISE, INTERNAL)


@dataclass(frozen=True)
class Model:
    name: str  # service name clients use (GenerateRequest.model); a Denoise model shares its Generate twin's name
    triton: str  # Triton model: model_repository/<triton>/
    kind: str  # one of KINDS: what export builds and how a request is priced
    checkpoint: str  # file under checkpoints/ (the config inside rebuilds the network)
    max_samples: int  # Generate num_samples / Denoise images upper bound per request
    rpc: str = GENERATE  # one of RPCS
    sampler: str = ""  # diffusion: the sampler a request that names none gets
    steps: int = 0  # diffusion: the steps a request with steps=0 and the default sampler gets
    guidance: float = 0.0  # ddpm-cond: the guidance scale a request that gives none gets
    about: str = ""  # one line for ListModels and the client's help

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"catalog entry {self.name!r}: kind {self.kind!r} is not one of {list(KINDS)}")
        if self.rpc not in RPCS:
            raise ValueError(f"catalog entry {self.name!r}: rpc {self.rpc!r} is not one of {list(RPCS)}")
        if self.kind != GAN and self.rpc != INTERNAL and self.sampler not in SAMPLERS:
            raise ValueError(f"catalog entry {self.name!r}: sampler {self.sampler!r} is not one of {list(SAMPLERS)}")

    @property
    def conditional(self) -> bool:
        """Takes a digit and a guidance scale (class-conditional DDPM)."""
        return self.kind == DDPM_COND

    def default_steps(self, sampler: str) -> int:
        """What steps=0 means with this sampler: the entry's own steps for its default sampler."""
        return self.steps if sampler == self.sampler and self.steps else SAMPLER_STEPS[sampler]

    def cost(self, samples: int, evaluations: int = 1, guided: bool = False) -> int:
        """Admission cost: model evaluations x samples (a GAN: one pass; diffusion: one UNet call per step and
        sample, two when guided, the digit's and the null pass batched together)."""
        return samples * (1 if self.kind == GAN else evaluations * (2 if guided else 1))


# service name, Triton model, kind, checkpoint, limit, [rpc, default sampler, steps, guidance]
MODELS: tuple[Model, ...] = (
    Model("dcgan-baseline", "dcgan_generator", GAN, "dcgan-baseline.safetensors", 1024,
          about="DCGAN, latent 256, depth 3 (the research's baseline)"),
    Model("dcgan-modified", "dcgan_modified", GAN, "dcgan-modified.safetensors", 1024,
          about="DCGAN, latent 64, depth 4, dropout 0.3 (the research's mode-collapse case)"),
    Model("mlp", "mlp_generator", GAN, "mlp.safetensors", 1024, about="fully connected GAN"),
    # unconditional DDPM: at 20 UNet calls sde-dpm-solver++'s FID is about half dpm-solver++'s
    # (reports/quality/goals.md)
    Model("ddpm", "ddpm_generate", DDPM, "ddpm.safetensors", 64, sampler="sde-dpm-solver++", steps=20,
          about="DDPM UNet, sampling the whole loop in Triton"),
    # guidance chosen by the sweep (reports/ddpm-cond/guidance_sweep.json `recommended_guidance`; a test keeps them
    # equal), with the sampler it was measured with
    Model("ddpm-cond", "ddpm_cond_generate", DDPM_COND, "ddpm-cond.safetensors", 64, sampler="dpm-solver++",
          steps=20, guidance=2.0, about="class-conditional DDPM: a digit 0-9, classifier-free guidance"),
    # Denoise keeps the deterministic dpm-solver++ (higher PSNR: the SDE adds fresh noise every step,
    # reports/ddpm/report.md)
    Model("ddpm", "ddpm_denoise", DDPM, "ddpm.safetensors", 64, rpc=DENOISE, sampler="dpm-solver++", steps=20,
          about="add noise at sigma, then reverse diffusion"),
    Model("ddpm-unet", "ddpm_unet", DDPM, "ddpm.safetensors", 64, rpc=INTERNAL,
          about="one UNet evaluation (bench only)"),
)


def _extra(path: str | None) -> tuple[Model, ...]:
    """Entries from a JSON file (MNISTGEN_CATALOG): a list of objects with Model's fields."""
    if not path:
        return ()
    names = {f.name for f in fields(Model)}
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)
    required = {f.name for f in fields(Model) if f.default is MISSING}
    if not isinstance(rows, list) or not all(isinstance(r, dict) and required <= set(r) <= names for r in rows):
        raise ValueError(f"MNISTGEN_CATALOG {path}: expected a list of objects with the keys {sorted(required)} "
                         f"and any of {sorted(names - required)}")
    return tuple(Model(**r) for r in rows)


MODELS += _extra(os.environ.get("MNISTGEN_CATALOG"))
BY_TRITON = {m.triton: m for m in MODELS}
if len(BY_TRITON) != len(MODELS):
    raise ValueError("catalog: two entries share a Triton model name")
GENERATORS = {m.name: m for m in MODELS if m.rpc == GENERATE}  # Generate's model field -> entry
DENOISER = next(m for m in MODELS if m.rpc == DENOISE)
GANS = {m.name: m for m in MODELS if m.kind == GAN}  # the GAN generators (export, evaluation, reports)
DEFAULT_MODEL = MODELS[0].name  # Generate with model "" gets this
SERVED = tuple(m.triton for m in MODELS if m.rpc != INTERNAL)  # what the gateway needs Triton to serve


def by_kind(kind: str) -> tuple[Model, ...]:
    return tuple(m for m in MODELS if m.kind == kind)


def generator(name: str) -> Model:
    """Generate's entry for a service name ("" -> DEFAULT_MODEL); KeyError naming the choices otherwise."""
    try:
        return GENERATORS[name or DEFAULT_MODEL]
    except KeyError:
        raise KeyError(f"unknown model {name!r}: expected one of {list(GENERATORS)}") from None


class LimitError(ValueError):
    """A request value outside its model's limits; `field` names it, the message says the allowed range."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def check_request(model: Model, samples: int, steps: int = 0, sampler: str = "", seed: int = 0,
                  digit: int = -1, guidance: float = 0.0, sigma: float | None = None) -> None:
    """The one limits check: the gateway runs it on every request and the Triton models on every row they get.
    Values are already integers / floats here (type errors are the caller's); raises LimitError."""
    field = "num_samples" if model.rpc == GENERATE else "images"
    if not 1 <= samples <= model.max_samples:
        raise LimitError(field, f"must be in 1..{model.max_samples} for model {model.name!r}, got {samples}")
    if not 0 <= seed <= MAX_SEED:
        raise LimitError("seed", f"must be in 0..{MAX_SEED}, got {seed}")
    if model.kind == GAN:
        return
    if sampler not in SAMPLERS:
        raise LimitError("sampler", f"unknown sampler {sampler!r}: expected one of {list(SAMPLERS)}")
    if not 1 <= steps <= MAX_STEPS:
        raise LimitError("steps", f"must be in 1..{MAX_STEPS}, got {steps}")
    if sigma is not None and not (math.isfinite(sigma) and 0.0 < sigma <= 1.0):
        raise LimitError("sigma", f"must satisfy 0 < sigma <= 1, got {sigma!r}")
    if model.conditional:
        if not -1 <= digit < DIGITS:
            raise LimitError("digit", f"must be in 0..{DIGITS - 1} (or -1 in Triton: any digit), got {digit}")
        if not (math.isfinite(guidance) and 0.0 <= guidance <= MAX_GUIDANCE):
            raise LimitError("guidance", f"must be in 0..{MAX_GUIDANCE:g}, got {guidance!r}")


def markdown() -> str:
    """The table docs/api.md and README.md show between `<!-- catalog -->` markers (a test keeps them equal)."""
    rows = ["| `model` | RPC | Triton model | kind | samples | defaults | what |", "|---|---|---|---|---|---|---|"]
    for m in MODELS:
        if m.rpc == INTERNAL:
            continue
        default = "" if m.kind == GAN else f"`{m.sampler}`, {m.steps} steps" + (f", guidance {m.guidance:g}"
                                                                                if m.conditional else "")
        first = " (default)" if m.name == DEFAULT_MODEL and m.rpc == GENERATE else ""
        rows.append(f"| `{m.name}`{first} | {m.rpc} | `{m.triton}` | {m.kind} | 1..{m.max_samples} | {default} "
                    f"| {m.about} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
