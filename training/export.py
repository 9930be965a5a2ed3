"""Export the catalog's checkpoints to ONNX + TorchScript in the Triton model repository, checking parity with PyTorch.

    python -m training.export                 # every catalog model whose checkpoint exists; skips fresh exports
    python -m training.export --only <triton model> --force   (a catalog entry's `triton`)
    python -m training.export --gpu-variant   # also write model_repository_gpu/ (native onnxruntime + TensorRT)

Fresh (skipped): the outputs exist and the ONNX file records the sha256 of its checkpoint and EXPORT_FORMAT (stricter
than timestamps, immune to `git checkout` touching mtimes). GAN entries (mnistgen.catalog.GANS) get 1/model.onnx,
model.pt and model_bf16.pt (bf16 inside an fp32 interface; not the UNet: slower than ONNX Runtime there, measured, and
100 steps would compound its error); an entry without a model directory gets one made from the first GAN's. The
diffusion entries are grouped by checkpoint: one UNet export, copied into each. Then each model's engines are measured
into 1/engines.json (mnistgen.engine) where the record is missing or stale (--no-measure-engines skips it).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mnistgen import catalog
from mnistgen import engine as eng
from mnistgen.checkpoint import CHECKPOINT_DIR, REPO_ROOT, read_config
from mnistgen.cli import add_dataclass_args, dataclass_from_args
from mnistgen.files import sha256
from mnistgen.models.dcgan import serving_module
from mnistgen.registry import load_generator

MODELS = tuple(m.triton for m in catalog.MODELS)  # every model directory export fills
ONNX_FILE, TORCHSCRIPT_FILE = "model.onnx", "model.pt"  # Triton loads model.py only; it ignores the others
META_SHA = "checkpoint_sha256"  # ONNX metadata_props key recording the source checkpoint
# how the files were made: changes when the exported graphs do (2: GANs as mnistgen.models.dcgan.serving_module)
META_FORMAT, EXPORT_FORMAT = "export_format", "2"


class ExportError(RuntimeError):
    """Export produced a model that disagrees with PyTorch, or the repository does not match the checkpoint."""


@dataclass
class ExportConfig:
    checkpoint_dir: Path = CHECKPOINT_DIR  # the catalog's checkpoints
    model_repository: Path = REPO_ROOT / "model_repository"  # config.pbtxt files are committed; exports land in 1/
    gpu_repository: Path = REPO_ROOT / "model_repository_gpu"  # written by --gpu-variant (git-ignored)
    only: tuple[str, ...] | None = None  # Triton models to export; None = all
    force: bool = False  # re-export (and re-measure) even when fresh
    gpu_variant: bool = False  # also write gpu_repository
    opset: int = 18  # ONNX opset for the torch.export-based exporter
    tolerance: float = 1e-4  # max |onnx - torch| (and |torchscript - torch|) on random inputs, fp32
    parity_batch: int = 8  # rows of random input in the parity check
    seed: int = 0  # parity-check inputs
    measure_engines: bool = True  # time the engines per batch size into engines.json where stale
    engine_budget_s: float = 0.5  # timing budget per batch size and model (more rounds = steadier on busy machines)

    def __post_init__(self) -> None:
        self.checkpoint_dir, self.model_repository = Path(self.checkpoint_dir), Path(self.model_repository)
        self.gpu_repository = Path(self.gpu_repository)
        if self.only is not None:
            bad = sorted(set(self.only) - set(MODELS))
            if bad:
                raise ValueError(f"--only got unknown model(s) {bad}: expected some of {list(MODELS)}")
            self.only = tuple(self.only)


def onnx_metadata(path: Path) -> dict[str, str]:
    """metadata_props of an ONNX file ({} if unreadable)."""
    import onnx

    try:
        return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception:  # noqa: BLE001
        return {}


def read_model_config(path: Path):
    """Parse a config.pbtxt into tritonclient's ModelConfig protobuf (a typo raises ParseError)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())


_LATENT_DIMS = re.compile(r'(name:\s*"latent"\s*data_type:\s*TYPE_FP32\s*dims:\s*\[\s*)(\d+)(\s*\])')


def model_dir(cfg: ExportConfig, m: catalog.Model, latent_dim: int = 0) -> Path:
    """model_repository/<m.triton>; a GAN's made from the first GAN's when missing (name, comment and `latent` dims
    replaced, the same one-line model.py), its `latent` dims kept equal to the checkpoint's latent_dim."""
    d = cfg.model_repository / m.triton
    if latent_dim and not d.exists():
        first = next(iter(catalog.GANS.values()))
        src = next(p for p in (cfg.model_repository / first.triton, REPO_ROOT / "model_repository" / first.triton)
                   if p.exists())
        (d / "1").mkdir(parents=True)
        shutil.copyfile(src / "1" / "model.py", d / "1" / "model.py")
        text = (src / "config.pbtxt").read_text().replace(f'"{first.triton}"', f'"{m.triton}"')
        (d / "config.pbtxt").write_text(text.replace(f'"{first.name}"', f'"{m.name}"'))
        print(f"  {d}: made from {src.name}'s configuration")
    path = d / "config.pbtxt"
    dims = [list(i.dims) for i in read_model_config(path).input if i.name == "latent"]
    if latent_dim and dims != [[latent_dim]]:
        text, n = _LATENT_DIMS.subn(lambda g: f"{g.group(1)}{latent_dim}{g.group(3)}", path.read_text())
        if n != 1:
            raise ExportError(f"{path}: expected one input `latent` (TYPE_FP32, dims [{latent_dim}]), found {dims}")
        path.write_text(text)
        print(f"  {path}: latent dims {dims} -> [{latent_dim}] (from the checkpoint)")
    return d


def is_fresh(outputs: list[Path], checkpoint_sha: str) -> bool:
    """Every output exists and the ONNX among them was exported from this exact checkpoint by this exporter."""
    metas = [onnx_metadata(p) for p in outputs if p.suffix == ".onnx" and p.exists()]
    return all(p.exists() for p in outputs) and all(
        (m.get(META_SHA), m.get(META_FORMAT)) == (checkpoint_sha, EXPORT_FORMAT) for m in metas)


def _check(what: str, diff: float, tol: float) -> float:
    if not diff <= tol:  # NaN too
        raise ExportError(f"{what}: max |export - PyTorch| = {diff:.3g} exceeds the tolerance {tol:g}")
    return diff


def onnx_max_abs_diff(path: Path, module: nn.Module, feeds: dict[str, np.ndarray]) -> float:
    """max |ONNX Runtime(feeds) - module(*feeds)| through the served session builder (mnistgen.engine.ort_session)."""
    got = eng.ort_session(path, 1).run(None, feeds)[0]
    with torch.inference_mode():
        ref = module(*[torch.from_numpy(v) for v in feeds.values()]).numpy()
    if got.shape != ref.shape:
        raise ExportError(f"{path}: ONNX output shape {got.shape} != PyTorch {ref.shape}")
    return float(np.abs(got - ref).max())


class Bf16(nn.Module):
    """`module` in bfloat16 behind an fp32 interface (so the served engine swaps files, nothing else)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(module).to(torch.bfloat16).eval()

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.module(*[a.to(torch.bfloat16) if a.is_floating_point() else a for a in args]).float()


def export_files(cfg: ExportConfig, what: str, module: nn.Module, reference: nn.Module, feeds: dict[str, np.ndarray],
                 output: str, meta: dict[str, str], dirs: list[Path], bf16: bool) -> dict:
    """module -> ONNX (dynamic batch axis, inputs named as `feeds`, weights inside) + traced TorchScript (+ bf16),
    each checked against `reference` as served (ONNX Runtime; TorchScript frozen and optimised), then copied into
    every <dir>/1/ with model.onnx last (present == export complete) and their stale engines.json removed."""
    args = tuple(torch.from_numpy(v) for v in feeds.values())
    with tempfile.TemporaryDirectory(dir=cfg.model_repository) as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # collected, then reported once per message by explain_warnings
        onnx_path, files = Path(tmp) / ONNX_FILE, {}
        batch = torch.export.Dim("batch", min=1, max=4096)
        torch.onnx.export(module, tuple(a[:2] for a in args), str(onnx_path), input_names=list(feeds),
                          output_names=[output], dynamic_shapes=tuple({0: batch} for _ in args), dynamo=True,
                          opset_version=cfg.opset, external_data=False, verbose=False)
        import onnx

        model = onnx.load(str(onnx_path))
        for k, v in sorted(meta.items()):
            model.metadata_props.add(key=k, value=str(v))
        onnx.save(model, str(onnx_path))
        out = {"model": what, "onnx_max_abs_diff": _check(f"{what} ONNX", onnx_max_abs_diff(onnx_path, reference,
                                                                                             feeds), cfg.tolerance)}
        with torch.inference_mode():
            ref = reference(*args)
            for name, m in [(TORCHSCRIPT_FILE, module)] + ([(eng.BF16_FILE, Bf16(module))] if bf16 else []):
                torch.jit.trace(m, tuple(a[:2] for a in args), check_trace=False).save(str(Path(tmp) / name))
                d = (eng.load_torchscript(Path(tmp) / name)(*args) - ref).abs()
                files[name] = Path(tmp) / name
                if name == TORCHSCRIPT_FILE:
                    out["torchscript_max_abs_diff"] = _check(f"{what} TorchScript", float(d.max()), cfg.tolerance)
                elif float(d.mean()) > eng.BF16_MEAN_TOL:
                    raise ExportError(f"{what}: bf16 TorchScript parity failed: mean |diff| {float(d.mean()):.3g} > "
                                      f"tolerance {eng.BF16_MEAN_TOL} (max {float(d.max()):.3g})")
                else:
                    out["bf16"] = {"mean_abs_diff": float(d.mean()), "max_abs_diff": float(d.max())}
        files[ONNX_FILE] = onnx_path
        for d in dirs:
            (d / "1").mkdir(parents=True, exist_ok=True)
            (d / "1" / eng.ENGINES_FILE).unlink(missing_ok=True)  # timed on the files being replaced
            for name, src in files.items():  # concurrent readers (Triton, other sessions) never see half a file
                shutil.copyfile(src, Path(tmp) / f"copy-{name}")
                os.replace(Path(tmp) / f"copy-{name}", d / "1" / name)
    print(f"- {what}: exported {meta['checkpoint']}; max|diff| onnx {out['onnx_max_abs_diff']:.2e}, torchscript "
          f"{out['torchscript_max_abs_diff']:.2e}" + (f", bf16 mean {out['bf16']['mean_abs_diff']:.2e}" if bf16 else ""))
    explain_warnings(caught)
    return out


def explain_warnings(caught: list[warnings.WarningMessage]) -> None:
    """Each distinct warning of an export once, TorchScript's deprecation with why model.pt is still written."""
    deprecated = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    jit = sorted({m.split("`")[1] for m in deprecated if m.startswith("`torch.jit.")})
    if jit:
        print(f"  note: torch {torch.__version__} deprecates TorchScript ({', '.join(jit)}: 'switch to torch.compile "
              "or torch.export'). model.pt is still exported and served where engines.json measured it faster: the "
              "product promises it; torch.export + AOTInductor (.pt2) is its successor, not yet measured here.")
    for text in sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:160]}" for w in caught
                        if not str(w.message).startswith("`torch.jit.")}):
        print(f"  warning: {text}")


def export_gan(cfg: ExportConfig, m: catalog.Model) -> dict | None:
    """A GAN generator -> `latent` -> `image`; None when its checkpoint is missing."""
    ckpt = cfg.checkpoint_dir / m.checkpoint
    if not ckpt.exists():
        print(f"- {m.triton}: skipped, checkpoint {ckpt} not found")
        return None
    latent_dim = int(read_config(ckpt)["arch"]["latent_dim"])
    d, sha = model_dir(cfg, m, latent_dim), sha256(ckpt)
    if not cfg.force and is_fresh([d / "1" / f for f in (ONNX_FILE, TORCHSCRIPT_FILE, eng.BF16_FILE)], sha):
        print(f"- {m.triton}: up to date ({ckpt.name})")
        return {"model": m.triton, "skipped": True}
    gen, config = load_generator(ckpt)
    served = serving_module(gen)  # the same function rewritten for inference; parity is checked against `gen`
    z = np.random.default_rng(cfg.seed).standard_normal((cfg.parity_batch, latent_dim), dtype=np.float32)
    meta = {META_SHA: sha, META_FORMAT: EXPORT_FORMAT, "checkpoint": ckpt.name, "latent_dim": str(latent_dim),
            "config": json.dumps(config), "graph": type(served).__name__}
    return {**export_files(cfg, m.triton, served, gen, {"latent": z}, "image", meta, [d], bf16=True),
            "latent_dim": latent_dim}


class UNetEps(nn.Module):
    """The diffusers UNet as a tensor function: (sample (B, 1, 28, 28), timestep (B,) int64) -> noise_pred."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep).sample  # (B, 1, 28, 28)


class CondUNetEps(UNetEps):
    """A class-conditional UNet: (sample, timestep, class_labels (B,) int64 in 0..10, 10 = no digit) -> noise_pred."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, class_labels=class_labels).sample  # (B, 1, 28, 28)


def export_unet(cfg: ExportConfig, checkpoint: str, models: list[catalog.Model]) -> dict | None:
    """The EMA UNet of one checkpoint -> `sample`, `timestep`[, `class_labels`] -> `noise_pred`, into every model
    that samples with it; None when the checkpoint is missing."""
    from mnistgen.diffusion import DEFAULT_SCHEDULER, load_unet, null_class

    names, ckpt = ", ".join(m.triton for m in models), cfg.checkpoint_dir / checkpoint
    if not ckpt.exists():
        print(f"- {names}: skipped, checkpoint {ckpt} not found (train the DDPM first)")
        return None
    dirs, sha = [model_dir(cfg, m) for m in models], sha256(ckpt)
    if not cfg.force and is_fresh([d / "1" / f for d in dirs for f in (ONNX_FILE, TORCHSCRIPT_FILE)], sha):
        print(f"- {names}: up to date ({ckpt.name})")
        return {"model": models[0].triton, "skipped": True}
    unet, config = load_unet(ckpt)
    null, rng = null_class(unet), np.random.default_rng(cfg.seed)
    feeds = {"sample": rng.standard_normal((cfg.parity_batch, 1, 28, 28), dtype=np.float32),  # (B, 1, 28, 28)
             "timestep": rng.integers(0, 1000, size=(cfg.parity_batch,), dtype=np.int64)}  # (B,)
    if null is not None:  # a class-conditional UNet: digits and the null class
        feeds["class_labels"] = rng.integers(0, null + 1, size=(cfg.parity_batch,), dtype=np.int64)  # (B,)
    meta = {META_SHA: sha, META_FORMAT: EXPORT_FORMAT, "checkpoint": ckpt.name,  # the loops rebuild their schedulers
            "scheduler": json.dumps(config.get("scheduler", DEFAULT_SCHEDULER), sort_keys=True),
            "unet": json.dumps(config.get("unet", {}), sort_keys=True)}
    module = (UNetEps if null is None else CondUNetEps)(unet).eval()
    return export_files(cfg, names, module, module, feeds, "noise_pred", meta, dirs, bf16=False)


def measure_engines(cfg: ExportConfig, models: list[catalog.Model], batches: tuple[int, ...]) -> dict | None:
    """ONNX Runtime vs TorchScript for models sharing one export (measured once) -> each model's 1/engines.json,
    unless every record matches this export, machine and thread count (or --force)."""
    dirs = [cfg.model_repository / m.triton / "1" for m in models]
    onnx_path, ts_path, bf16_path = (dirs[0] / f for f in (ONNX_FILE, TORCHSCRIPT_FILE, eng.BF16_FILE))
    if not (onnx_path.exists() and ts_path.exists()):
        return None
    threads, sha, bf16 = eng.available_cores(), onnx_metadata(onnx_path).get(META_SHA, ""), bf16_path.exists()
    records = [eng.read_record(d / eng.ENGINES_FILE) for d in dirs]
    if not cfg.force and all(eng.record_matches(r, sha, threads, bf16) for r in records):
        return records[0]
    with eng.measuring_lock():
        record = eng.measure_in_subprocess(onnx_path=onnx_path, ts_path=ts_path, batches=batches, threads=threads,
                                           budget_s=cfg.engine_budget_s, bf16_path=bf16_path if bf16 else None,
                                           measured_by="export", checkpoint_sha256=sha)
    for d in dirs:
        eng.write_record(d / eng.ENGINES_FILE, record)
    print(f"- {', '.join(m.triton for m in models)}: engines measured into {eng.ENGINES_FILE}: " + eng.describe(
        record["threshold"], threads=threads, split_from=eng.effective_split_from(record, threads),
        precision=record["torchscript_precision"]))
    return record


def write_gpu_repository(src: Path, dst: Path) -> list[str]:
    """dst/<model>/config.pbtxt for NVIDIA's Triton container on a GPU node (+ model.onnx where exported): single-shot
    models on the native onnxruntime backend with the TensorRT accelerator (FP16), the loops python-backend as here
    (model.py picks CUDAExecutionProvider on a KIND_GPU instance)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    written = []
    for m in catalog.MODELS:
        if not (src / m.triton / "config.pbtxt").exists():
            continue
        cfg = read_model_config(src / m.triton / "config.pbtxt")
        del cfg.instance_group[:]
        cfg.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_GPU)
        single_shot = m.kind == catalog.GAN or m.rpc == catalog.INTERNAL
        if single_shot:
            cfg.backend, cfg.platform, cfg.default_model_filename = "", "onnxruntime_onnx", ONNX_FILE
            trt = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
            trt.parameters["precision_mode"], trt.parameters["max_workspace_size_bytes"] = "FP16", str(1 << 30)
            cfg.dynamic_batching.max_queue_delay_microseconds = 100  # GPU: trade 0.1 ms for fuller batches
        out = dst / m.triton
        (out / "1").mkdir(parents=True, exist_ok=True)
        (out / "config.pbtxt").write_text(f"# Generated by `python -m training.export --gpu-variant` from "
                                          f"model_repository/{m.triton}; do not edit.\n" + text_format.MessageToString(cfg))
        for name in (ONNX_FILE,) if single_shot else (ONNX_FILE, "model.py"):
            if (src / m.triton / "1" / name).exists():
                shutil.copyfile(src / m.triton / "1" / name, out / "1" / name)
        written.append(m.triton)
    return written


@contextlib.contextmanager
def repository_lock(model_repository: Path):
    """Serialise exports into one repository across processes (parallel test sessions, make run)."""
    import fcntl

    key = hashlib.sha256(str(Path(model_repository).resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"mnistgen-export-{key}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def run(cfg: ExportConfig) -> list[dict]:
    """Export every wanted catalog model whose checkpoint exists; one dict per export (parity figures)."""
    wanted = [m for m in catalog.MODELS if cfg.only is None or m.triton in cfg.only]
    unets: dict[str, list[catalog.Model]] = {}  # checkpoint -> the diffusion models sampling with its UNet
    for m in wanted:
        if m.kind != catalog.GAN:
            unets.setdefault(m.checkpoint, []).append(m)
    with repository_lock(cfg.model_repository):
        torch.set_num_threads(min(2, torch.get_num_threads()))  # shared CPU: stay polite
        results = [export_gan(cfg, m) for m in wanted if m.kind == catalog.GAN]
        results += [export_unet(cfg, ckpt, models) for ckpt, models in unets.items()]
        if cfg.measure_engines:
            for m in wanted:
                if m.kind == catalog.GAN:
                    measure_engines(cfg, [m], eng.GENERATOR_BATCHES)
            for models in unets.values():
                measure_engines(cfg, models, eng.UNET_BATCHES)
        if cfg.gpu_variant:
            written = write_gpu_repository(cfg.model_repository, cfg.gpu_repository)
            print(f"- GPU variant: {len(written)} models written to {cfg.gpu_repository}")
    return [r for r in results if r]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(p, ExportConfig, exclude=("opset", "parity_batch", "seed"), choices={"only": MODELS}, help={
        "only": "Triton models to export (default: all)", "force": "re-export (and re-measure) even when fresh",
        "measure_engines": "time the engines per batch size into engines.json where stale",
        "engine_budget_s": "timing budget per batch size and model, seconds",
        "gpu_variant": "also write --gpu-repository", "tolerance": "max |export - PyTorch|, fp32"})
    try:
        run(dataclass_from_args(ExportConfig, p.parse_args(argv)))
    except (ExportError, OSError, ValueError, KeyError) as e:  # what a user can cause and fix: a message
        if os.environ.get("MNISTGEN_DEBUG"):
            raise
        print(f"export FAILED: {type(e).__name__}: {e} (MNISTGEN_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
