"""Export committed checkpoints to ONNX + TorchScript in the Triton model repository, checking parity with PyTorch.

    python -m training.export                 # every model whose checkpoint exists; skips fresh exports
    python -m training.export --only dcgan_generator --force
    python -m training.export --gpu-variant   # also write model_repository_gpu/ (native onnxruntime + TensorRT)

A model's export is "fresh" (skipped) when its outputs exist and the ONNX file records the sha256 of the
checkpoint it came from: stricter than comparing timestamps, and immune to `git checkout` touching mtimes.

Engines: after the export, ONNX Runtime and the TorchScript file (as served: frozen, optimize_for_inference) are timed
per batch size on this machine with the threads the model's config.pbtxt gives it; the result lands in
<model>/1/engines.json (per batch ms/sample, the chosen threshold, machine and threads) and a summary in the
config.pbtxt parameter `engines` (what clients see through Triton's model config). Re-measured when the export,
the machine or the thread count changes (or with --force); --no-measure-engines skips it.

bf16: the GAN generators also get 1/model_bf16.pt, the TorchScript traced in bfloat16 behind an fp32 interface (its
mean |diff| to fp32 checked here). Where the CPU has native bf16 (AVX512_BF16 / AMX) it is timed as a column of its
own, and serves as the TorchScript engine when it is faster and within tolerance (engines.json
`torchscript_precision`; config.pbtxt `precision` overrides). Not for the DDPM UNet: measured, bf16 TorchScript loses
to ONNX Runtime fp32 there at every batch size measured (2-core AVX512_BF16 EPYC), and 100 steps would compound its
error.
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

from mnistgen.checkpoint import CHECKPOINT_DIR, REPO_ROOT, read_config
from mnistgen.cli import add_dataclass_args, dataclass_from_args
from mnistgen.engine import BF16_FILE
from mnistgen import engines_param  # the measured `engines` block (kept out of git: see there)
from mnistgen.engines_param import ENGINES_PARAM  # noqa: F401  (re-exported: the tests read the parameter by it)
from mnistgen.files import sha256
from mnistgen.models.dcgan import serving_module
from mnistgen.registry import DDPM_CHECKPOINT, DDPM_COND_CHECKPOINT, GAN_MODELS, load_generator

# Triton model name -> committed generator name (mnistgen.registry.GAN_MODELS).
GENERATORS = {
    "dcgan_generator": "dcgan-baseline",
    "dcgan_modified": "dcgan-modified",
    "mlp_generator": "mlp",
}
UNET_MODEL = "ddpm_unet"  # single-shot UNet: sample, timestep -> noise_pred
DDPM_LOOP_MODELS = ("ddpm_denoise", "ddpm_generate")  # python-backend loops; each gets a copy of the UNet ONNX
DDPM_MODELS = (UNET_MODEL,) + DDPM_LOOP_MODELS
COND_MODELS = ("ddpm_cond_generate",)  # class-conditional UNet (checkpoints/ddpm-cond.safetensors): + class_labels
MODELS = tuple(GENERATORS) + DDPM_MODELS + COND_MODELS  # every model directory in model_repository/
SINGLE_SHOT = tuple(GENERATORS) + (UNET_MODEL,)  # what the GPU variant serves with the native onnxruntime backend

ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.pt"  # beside model.onnx; the python backend only ever loads model.py, so Triton ignores it
META_SHA = "checkpoint_sha256"  # ONNX metadata_props key recording the source checkpoint
# ONNX metadata_props key recording how the files were made; EXPORT_FORMAT changes when the exported graphs do
# (2: GAN generators exported as mnistgen.models.dcgan.serving_module), so older exports count as stale
META_FORMAT, EXPORT_FORMAT = "export_format", "2"


class ExportError(RuntimeError):
    """Export produced a model that disagrees with PyTorch, or the repository does not match the checkpoint."""


@dataclass
class ExportConfig:
    checkpoint_dir: Path = CHECKPOINT_DIR  # committed checkpoints (GAN_MODELS files, ddpm.safetensors)
    model_repository: Path = REPO_ROOT / "model_repository"  # config.pbtxt files are committed; exports land in 1/
    gpu_repository: Path = REPO_ROOT / "model_repository_gpu"  # written by --gpu-variant (git-ignored)
    only: tuple[str, ...] | None = None  # subset of MODELS; None = all
    force: bool = False  # re-export even when fresh
    gpu_variant: bool = False  # also write gpu_repository
    opset: int = 18  # ONNX opset for the torch.export-based exporter
    tolerance: float = 1e-4  # max |onnx - torch| (and |torchscript - torch|) on random inputs, fp32
    parity_batch: int = 8  # rows of random input in the parity check
    seed: int = 0  # parity-check inputs
    measure_engines: bool = True  # time ONNX Runtime vs TorchScript per batch size into engines.json when stale
    engine_budget_s: float = 0.5  # timing budget per batch size and model (more rounds = steadier on busy machines)

    def __post_init__(self) -> None:
        self.checkpoint_dir = Path(self.checkpoint_dir)
        self.model_repository = Path(self.model_repository)
        self.gpu_repository = Path(self.gpu_repository)
        if self.only is not None:
            bad = sorted(set(self.only) - set(MODELS))
            if bad:
                raise ValueError(f"--only got unknown model(s) {bad}: expected some of {list(MODELS)}")
            self.only = tuple(self.only)


# -- helpers ---------------------------------------------------------------------------------------


def onnx_metadata(path: Path) -> dict[str, str]:
    """metadata_props of an ONNX file ({} if unreadable)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return {}
    return {p.key: p.value for p in model.metadata_props}


def is_fresh(outputs: list[Path], checkpoint_sha: str) -> bool:
    """Every output exists and the ONNX among them was exported from this exact checkpoint by this exporter."""
    if not all(p.exists() for p in outputs):
        return False
    metas = [onnx_metadata(p) for p in outputs if p.suffix == ".onnx"]
    return all(m.get(META_SHA) == checkpoint_sha and m.get(META_FORMAT) == EXPORT_FORMAT for m in metas)


def drop_engine_records(version_dirs: list[Path]) -> None:
    """A new export invalidates the engines.json beside it (timed on the previous files): measured again."""
    from mnistgen import engine as eng

    for d in version_dirs:
        (d / eng.ENGINES_FILE).unlink(missing_ok=True)


def _atomic_replace(tmp: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dst)  # concurrent readers (Triton, other test sessions) never see a half-written file


def _set_metadata(onnx_path: Path, meta: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(onnx_path))
    del model.metadata_props[:]
    for k, v in sorted(meta.items()):
        model.metadata_props.add(key=k, value=str(v))
    onnx.save(model, str(onnx_path))


def export_onnx(
    module: nn.Module, example: tuple[torch.Tensor, ...], path: Path,
    input_names: list[str], output_names: list[str], opset: int, meta: dict[str, str],
) -> None:
    """torch.export-based ONNX export with a dynamic batch axis on every input, weights inside the file."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic_shapes = tuple({0: batch} for _ in example)  # positional: forward()'s own arg names don't matter
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")  # one Dim on several inputs
        torch.onnx.export(
            module, example, str(path), input_names=input_names, output_names=output_names,
            dynamic_shapes=dynamic_shapes, opset_version=opset, dynamo=True, external_data=False, verbose=False,
        )
    _set_metadata(path, meta)


def onnx_max_abs_diff(path: Path, module: nn.Module, feeds: dict[str, np.ndarray], output: str) -> float:
    """max |ONNX Runtime(feeds) - module(*feeds)| on the CPU provider."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run([output], feeds)[0]
    with torch.inference_mode():
        ref = module(*[torch.from_numpy(v) for v in feeds.values()]).numpy()
    if got.shape != ref.shape:
        raise ExportError(f"{path}: ONNX output shape {got.shape} != PyTorch {ref.shape}")
    return float(np.abs(got - ref).max())


def _check_parity(what: str, diff: float, tol: float) -> None:
    if not diff <= tol:  # also catches NaN
        raise ExportError(f"{what}: max |export - PyTorch| = {diff:.3g} exceeds the tolerance {tol:g}")


# -- config.pbtxt checks ---------------------------------------------------------------------------


def read_model_config(path: Path):
    """Parse a config.pbtxt into tritonclient's ModelConfig protobuf (a typo raises ParseError)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())


_LATENT_DIMS = re.compile(r'(name:\s*"latent"\s*data_type:\s*TYPE_FP32\s*dims:\s*\[\s*)(\d+)(\s*\])')


def sync_latent_dim(config_path: Path, latent_dim: int) -> bool:
    """Make the `latent` input dims of config.pbtxt equal the checkpoint's latent_dim; True if rewritten."""
    cfg = read_model_config(config_path)
    dims = [list(i.dims) for i in cfg.input if i.name == "latent"]
    if dims == [[latent_dim]]:
        return False
    text = config_path.read_text()
    new, n = _LATENT_DIMS.subn(lambda m: f"{m.group(1)}{latent_dim}{m.group(3)}", text)
    if n != 1:
        raise ExportError(
            f"{config_path}: expected one input `latent` (TYPE_FP32, dims [{latent_dim}]), found dims {dims}"
        )
    config_path.write_text(new)
    print(f"  {config_path}: latent dims {dims} -> [{latent_dim}] (from the checkpoint)")
    return True


# -- generators ------------------------------------------------------------------------------------


def export_generator(model: str, cfg: ExportConfig) -> dict | None:
    """GAN generator -> 1/model.onnx (`latent` -> `image`) + 1/model.pt; None when the checkpoint is missing."""
    ckpt = cfg.checkpoint_dir / GAN_MODELS[GENERATORS[model]]
    if not ckpt.exists():
        print(f"- {model}: skipped, checkpoint {ckpt} not found")
        return None
    model_dir = cfg.model_repository / model
    latent_dim = int(read_config(ckpt)["arch"]["latent_dim"])
    sync_latent_dim(model_dir / "config.pbtxt", latent_dim)
    sha = sha256(ckpt)
    onnx_path, ts_path = model_dir / "1" / ONNX_FILE, model_dir / "1" / TORCHSCRIPT_FILE
    bf16_path = ts_path.with_name(BF16_FILE)
    if not cfg.force and is_fresh([onnx_path, ts_path, bf16_path], sha):
        print(f"- {model}: up to date ({ckpt.name})")
        return {"model": model, "skipped": True}

    gen, config = load_generator(ckpt)
    # what is exported: the same function rewritten for inference (DCGANServing); parity is checked against `gen`
    served = serving_module(gen)
    z = torch.from_numpy(np.random.default_rng(cfg.seed).standard_normal((cfg.parity_batch, latent_dim), dtype=np.float32))
    meta = {META_SHA: sha, META_FORMAT: EXPORT_FORMAT, "checkpoint": ckpt.name, "latent_dim": str(latent_dim),
            "config": json.dumps(config), "graph": type(served).__name__}
    with tempfile.TemporaryDirectory(dir=model_dir) as tmp:
        tmp_onnx, tmp_ts = Path(tmp) / ONNX_FILE, Path(tmp) / TORCHSCRIPT_FILE
        export_onnx(served, (z[:2],), tmp_onnx, ["latent"], ["image"], cfg.opset, meta)
        d_onnx = onnx_max_abs_diff(tmp_onnx, gen, {"latent": z.numpy()}, "image")
        _check_parity(f"{model} ONNX", d_onnx, cfg.tolerance)
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; TorchScript is still asked for
            traced = torch.jit.trace(served, z[:2], check_trace=False)
            ref = gen(z)  # (B, 1, 28, 28): what the TorchScript files are checked against
            d_ts = float((traced(z) - ref).abs().max())
        _check_parity(f"{model} TorchScript", d_ts, cfg.tolerance)
        traced.save(str(tmp_ts))
        d_ts = max(d_ts, served_torchscript_diff(tmp_ts, gen, (z,)))
        _check_parity(f"{model} TorchScript (frozen, optimised)", d_ts, cfg.tolerance)
        tmp_bf16 = Path(tmp) / BF16_FILE
        bf16 = export_bf16(served, (z,), tmp_bf16, ref)
        _atomic_replace(tmp_bf16, bf16_path)
        _atomic_replace(tmp_ts, ts_path)
        _atomic_replace(tmp_onnx, onnx_path)  # last: model.onnx present == export complete
    drop_engine_records([onnx_path.parent])
    print(f"- {model}: exported {ckpt.name} (latent_dim {latent_dim}); max|diff| onnx {d_onnx:.2e}, "
          f"torchscript {d_ts:.2e}, torchscript bf16 mean {bf16['mean_abs_diff']:.2e} max {bf16['max_abs_diff']:.2e}")
    return {"model": model, "latent_dim": latent_dim, "onnx_max_abs_diff": d_onnx, "torchscript_max_abs_diff": d_ts,
            "bf16": bf16}


class Bf16(nn.Module):
    """`module` in bfloat16 behind an fp32 interface: floating inputs cast to bf16 on the way in, outputs back to fp32
    (so the served engine swaps files, nothing else)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(module).to(torch.bfloat16).eval()

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.module(*[a.to(torch.bfloat16) if a.is_floating_point() else a for a in args]).float()


def export_bf16(module: nn.Module, example: tuple[torch.Tensor, ...], path: Path, reference: torch.Tensor) -> dict:
    """Trace `module` in bf16 (Bf16) to `path` (BF16_FILE: the TorchScript engine's bf16 variant, chosen at serving
    time only where measured faster and within mnistgen.engine.BF16_MEAN_TOL); the file as served is checked against
    `reference` (fp32 outputs on `example`): its mean |diff| must be within that tolerance."""
    from mnistgen.engine import BF16_MEAN_TOL, load_torchscript

    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(Bf16(module), tuple(a[:2] for a in example), check_trace=False).save(str(path))
        d = (load_torchscript(path)(*example) - reference).abs()
    diff = {"mean_abs_diff": float(d.mean()), "max_abs_diff": float(d.max())}
    if diff["mean_abs_diff"] > BF16_MEAN_TOL:
        raise ExportError(f"bf16 TorchScript parity failed: mean |diff| {diff['mean_abs_diff']:.3g} > tolerance "
                           f"{BF16_MEAN_TOL} (max {diff['max_abs_diff']:.3g})")
    return diff


# -- DDPM ------------------------------------------------------------------------------------------


class UNetEps(nn.Module):
    """The diffusers UNet as a plain tensor function: (sample (B, 1, 28, 28), timestep (B,) int64) -> noise_pred."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep).sample  # (B, 1, 28, 28)


class CondUNetEps(UNetEps):
    """A class-conditional UNet: (sample, timestep, class_labels (B,) int64 in 0..10, 10 = no digit) -> noise_pred."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, class_labels=class_labels).sample  # (B, 1, 28, 28)


def served_torchscript_diff(path: Path, module: nn.Module, example: tuple[torch.Tensor, ...]) -> float:
    """max |served TorchScript - module|: the file as Triton runs it (frozen, optimize_for_inference)."""
    from mnistgen.engine import load_torchscript

    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        served = load_torchscript(path)
        return float((served(*example) - module(*example)).abs().max())


def export_ddpm(cfg: ExportConfig, models: tuple[str, ...], checkpoint: str = DDPM_CHECKPOINT) -> dict | None:
    """EMA UNet -> ddpm_unet/1/model.onnx (`sample`, `timestep` -> `noise_pred`) + a traced model.pt (the TorchScript
    engine), both copied into the loop models. A class-conditional checkpoint (ddpm-cond) adds the input
    `class_labels` (B,) int64."""
    from mnistgen.diffusion import DEFAULT_SCHEDULER, load_unet, null_class

    ckpt = cfg.checkpoint_dir / checkpoint
    if not ckpt.exists():
        print(f"- {', '.join(models)}: skipped, checkpoint {ckpt} not found (train the DDPM first)")
        return None
    sha = sha256(ckpt)
    targets = [cfg.model_repository / m / "1" / ONNX_FILE for m in models]
    ts_targets = [t.with_name(TORCHSCRIPT_FILE) for t in targets]
    if not cfg.force and is_fresh(targets + ts_targets, sha):
        print(f"- {', '.join(models)}: up to date ({ckpt.name})")
        return {"model": UNET_MODEL, "skipped": True}

    unet, config = load_unet(ckpt)
    null = null_class(unet)
    module = (UNetEps(unet) if null is None else CondUNetEps(unet)).eval()
    rng = np.random.default_rng(cfg.seed)
    x = rng.standard_normal((cfg.parity_batch, 1, 28, 28), dtype=np.float32)  # (B, 1, 28, 28)
    t = rng.integers(0, 1000, size=(cfg.parity_batch,), dtype=np.int64)  # (B,)
    names, feeds = ["sample", "timestep"], {"sample": x, "timestep": t}
    if null is not None:
        names.append("class_labels")
        feeds["class_labels"] = rng.integers(0, null + 1, size=(cfg.parity_batch,), dtype=np.int64)  # (B,) with null
    args = [torch.from_numpy(feeds[n]) for n in names]
    what = models[0] if null is not None else "ddpm_unet"
    scheduler = config.get("scheduler", DEFAULT_SCHEDULER)  # the loop models rebuild their schedulers from this
    meta = {META_SHA: sha, META_FORMAT: EXPORT_FORMAT, "checkpoint": ckpt.name,
            "scheduler": json.dumps(scheduler, sort_keys=True),
            "unet": json.dumps(config.get("unet", {}), sort_keys=True)}
    with tempfile.TemporaryDirectory(dir=cfg.model_repository) as tmp:
        tmp_onnx = Path(tmp) / ONNX_FILE
        export_onnx(module, tuple(a[:2] for a in args), tmp_onnx, names, ["noise_pred"], cfg.opset, meta)
        diff = onnx_max_abs_diff(tmp_onnx, module, feeds, "noise_pred")
        _check_parity(f"{what} ONNX", diff, cfg.tolerance)
        tmp_ts = Path(tmp) / TORCHSCRIPT_FILE
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit deprecation; tracer warnings on diffusers' shape checks
            traced = torch.jit.trace(module, tuple(a[:2] for a in args), check_trace=False)  # checked at parity_batch
            d_ts = float((traced(*args) - module(*args)).abs().max())
        _check_parity(f"{what} TorchScript", d_ts, cfg.tolerance)
        traced.save(str(tmp_ts))
        d_ts = max(d_ts, served_torchscript_diff(tmp_ts, module, tuple(args)))
        _check_parity(f"{what} TorchScript (frozen, optimised)", d_ts, cfg.tolerance)
        for target in targets:
            for src, dst in ((tmp_ts, target.with_name(TORCHSCRIPT_FILE)), (tmp_onnx, target)):  # model.onnx last
                copy = Path(tmp) / f"{target.parent.parent.name}{src.suffix}"
                shutil.copyfile(src, copy)
                _atomic_replace(copy, dst)
    drop_engine_records([t.parent for t in targets])
    print(f"- {', '.join(models)}: exported {ckpt.name}; max|diff| onnx {diff:.2e}, torchscript {d_ts:.2e}")
    return {"model": what, "onnx_max_abs_diff": diff, "torchscript_max_abs_diff": d_ts}


# -- engines -----------------------------------------------------------------------------------------



def model_params(config_path: Path) -> dict[str, str]:
    return {k: v.string_value for k, v in read_model_config(config_path).parameters.items()}


def sync_engines_param(config_path: Path, summary: dict) -> bool:
    """Write `summary` as the config.pbtxt parameter `engines` (one line of JSON, padded: mnistgen.engines_param);
    True if the file changed."""
    new, text = engines_param.block(summary), config_path.read_text()
    if new in text:
        return False
    text, n = engines_param.BLOCK.subn(lambda _: new, text)
    if n == 0:
        text = text.rstrip("\n") + "\n" + new
    config_path.write_text(text)
    read_model_config(config_path)  # still parses
    return True


def measure_model_engines(cfg: ExportConfig, models: tuple[str, ...], batches: tuple[int, ...]) -> dict | None:
    """ONNX Runtime vs TorchScript for models sharing one export (the UNet's three copies: measured once) ->
    each model's 1/engines.json and `engines` parameter. Skipped when every record matches this export, machine and
    thread count (unless --force)."""
    from mnistgen import engine as eng

    dirs = [cfg.model_repository / m for m in models]
    first = dirs[0] / "1"
    onnx_path, ts_path = first / ONNX_FILE, first / TORCHSCRIPT_FILE
    if not (onnx_path.exists() and ts_path.exists()):
        return None
    bf16_path = ts_path.with_name(BF16_FILE)
    bf16_path = bf16_path if bf16_path.exists() else None
    params = model_params(dirs[0] / "config.pbtxt")
    threads = eng.resolve_threads(params.get("intra_op_threads", "0"))
    sha = onnx_metadata(onnx_path).get(META_SHA, "")
    records = [eng.read_record(d / "1" / eng.ENGINES_FILE) for d in dirs]
    if not cfg.force and all(eng.record_matches(r, sha, threads, bf16_path is not None) for r in records):
        record = records[0]
        print(f"- {', '.join(models)}: engines up to date (threshold {record['threshold']}, {threads} threads)")
    else:
        with eng.measuring_lock():
            record = eng.measure_in_subprocess(onnx_path, ts_path, batches, threads, params.get("allow_spinning", "0"),
                                               budget_s=cfg.engine_budget_s, bf16_path=bf16_path, measured_by="export",
                                               checkpoint_sha256=sha)
        for d in dirs:
            eng.write_record(d / "1" / eng.ENGINES_FILE, record)
        ms = record["ms_per_sample"]
        cols = [c for c in (eng.ORT, eng.TORCHSCRIPT, eng.ORT_1T, eng.ORT_SPLIT, eng.TORCHSCRIPT_BF16) if c in ms]
        cells = ", ".join(f"{b}: " + "/".join(f"{ms[c][str(b)]:.3g}" for c in cols) for b in batches)
        print(f"- {', '.join(models)}: engines measured with {threads} threads, ms/sample {'/'.join(cols)} "
              f"{cells}; threshold {record['threshold']}, onnxruntime multi-threaded from "
              f"{record.get('ort_multithread_from')}, split over one-thread sessions from "
              f"{record.get('ort_split_from')}, torchscript precision {record.get('torchscript_precision')} "
              f"(bf16: {record.get('bf16')})")
    for d in dirs:
        p = model_params(d / "config.pbtxt")
        precision = eng.effective_precision(p.get("precision"), record, bf16_path is not None)
        threshold, source = eng.effective_threshold(p.get("runtime", "auto"), p.get("engine_threshold"), record,
                                                    precision)
        summary = eng.summary(record, threshold, source, p.get("ort_parallel", "auto"), precision)
        summary["measured_threshold"] = record["threshold"]
        if sync_engines_param(d / "config.pbtxt", summary):
            print(f"  {d / 'config.pbtxt'}: parameter engines = {json.dumps(summary)}")
    return record


# -- GPU variant -----------------------------------------------------------------------------------


def gpu_model_config(cpu_config, single_shot: bool):
    """The CPU repository's ModelConfig rewritten for NVIDIA's Triton container on a GPU node.

    Single-shot models use the native onnxruntime backend with the TensorRT accelerator (FP16);
    loop models stay python-backend (model.py picks CUDAExecutionProvider on a KIND_GPU instance).
    """
    from tritonclient.grpc import model_config_pb2 as mc

    cfg = mc.ModelConfig()
    cfg.CopyFrom(cpu_config)
    del cfg.instance_group[:]
    cfg.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_GPU)
    if single_shot:
        cfg.backend = ""
        cfg.platform = "onnxruntime_onnx"
        cfg.default_model_filename = ONNX_FILE
        for key in list(cfg.parameters):  # python-backend knobs mean nothing to onnxruntime
            del cfg.parameters[key]
        trt = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        trt.parameters["precision_mode"] = "FP16"
        trt.parameters["max_workspace_size_bytes"] = str(1 << 30)
        if cfg.max_batch_size > 0:
            cfg.dynamic_batching.max_queue_delay_microseconds = 100  # GPU: trade 0.1 ms for fuller batches
    return cfg


def write_gpu_repository(src: Path, dst: Path) -> list[str]:
    """Write dst/<model>/config.pbtxt (+ model.py for loop models, + model.onnx where exported)."""
    from google.protobuf import text_format

    written = []
    for model in MODELS:
        src_dir = src / model
        if not (src_dir / "config.pbtxt").exists():
            continue
        cfg = gpu_model_config(read_model_config(src_dir / "config.pbtxt"), model in SINGLE_SHOT)
        out = dst / model
        (out / "1").mkdir(parents=True, exist_ok=True)
        header = (f"# Generated by `python -m training.export --gpu-variant` from model_repository/{model}; "
                  "for NVIDIA's Triton container on a GPU node. Do not edit.\n")
        (out / "config.pbtxt").write_text(header + text_format.MessageToString(cfg))
        if model not in SINGLE_SHOT:
            shutil.copyfile(src_dir / "1" / "model.py", out / "1" / "model.py")
        onnx = src_dir / "1" / ONNX_FILE
        if onnx.exists():
            shutil.copyfile(onnx, out / "1" / ONNX_FILE)
        written.append(model)
    return written


# -- entry point -----------------------------------------------------------------------------------


@contextlib.contextmanager
def repository_lock(model_repository: Path):
    """Serialise exports into one repository across processes (parallel test sessions, make run)."""
    import fcntl

    key = hashlib.sha256(str(Path(model_repository).resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"mnistgen-export-{key}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def run(cfg: ExportConfig) -> list[dict]:
    """Export every wanted model whose checkpoint exists; returns one dict per model (parity figures)."""
    with repository_lock(cfg.model_repository):
        return _run(cfg)


def _run(cfg: ExportConfig) -> list[dict]:
    torch.set_num_threads(min(2, torch.get_num_threads()))  # shared CPU: stay polite
    wanted = cfg.only or MODELS
    results = []
    for model in GENERATORS:
        if model in wanted:
            r = export_generator(model, cfg)
            if r:
                results.append(r)
    ddpm = tuple(m for m in DDPM_MODELS if m in wanted)
    if ddpm:
        r = export_ddpm(cfg, ddpm)
        if r:
            results.append(r)
    cond = tuple(m for m in COND_MODELS if m in wanted)
    if cond:
        r = export_ddpm(cfg, cond, DDPM_COND_CHECKPOINT)
        if r:
            results.append(r)
    if cfg.measure_engines:
        from mnistgen import engine as eng

        for model in GENERATORS:
            if model in wanted:
                measure_model_engines(cfg, (model,), eng.GENERATOR_BATCHES)
        if ddpm:
            measure_model_engines(cfg, ddpm, eng.UNET_BATCHES)
        if cond:
            measure_model_engines(cfg, cond, eng.UNET_BATCHES)
    if cfg.gpu_variant:
        written = write_gpu_repository(cfg.model_repository, cfg.gpu_repository)
        print(f"- GPU variant: {len(written)} models written to {cfg.gpu_repository}")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(p, ExportConfig, exclude=("opset", "parity_batch", "seed"), choices={"only": MODELS}, help={
        "only": "models to export (default: all)", "force": "re-export (and re-measure) even when fresh",
        "measure_engines": "time ONNX Runtime vs TorchScript per batch size into engines.json when stale",
        "engine_budget_s": "timing budget per batch size and model, seconds",
        "gpu_variant": "also write --gpu-repository", "tolerance": "max |export - PyTorch|, fp32"})
    cfg = dataclass_from_args(ExportConfig, p.parse_args(argv))
    try:
        run(cfg)
    except EXPECTED_FAILURES as e:  # a missing/corrupt checkpoint, a failed parity check: a message, not a traceback
        if os.environ.get("MNISTGEN_DEBUG"):
            raise
        print(f"export FAILED: {type(e).__name__}: {e} (MNISTGEN_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    return 0


# what a user can cause and fix (paths, files, parity); anything else is a bug and keeps its traceback
EXPECTED_FAILURES = (ExportError, OSError, ValueError, KeyError)


if __name__ == "__main__":
    sys.exit(main())
