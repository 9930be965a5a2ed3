"""Per-sample latency, side by side: eager PyTorch vs ONNX Runtime in-process vs Triton over gRPC.

Workloads: a GAN generator of the catalog (--generator) and the catalog's Denoise model with DDPM-100
and DPM-Solver++-20. Every cell is the median of `repeats` timed runs after `warmup` untimed ones; one Triton
request carries the whole batch. Prints a markdown table and writes bench/triton.json.

    python -m loadtest.bench_triton                          # starts its own Triton on free ports
    python -m loadtest.bench_triton --grpc-url 127.0.0.1:8001 --denoise-batches 1 4 16
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mnistgen import catalog
from mnistgen import engine as eng
from mnistgen.checkpoint import CHECKPOINT_DIR, REPO_ROOT
from mnistgen.cli import add_dataclass_args, dataclass_from_args
from mnistgen.latent import sample_latent

# pytorch-eager-bf16: the generator in-process under torch.autocast(bfloat16), CPUs with native bf16 only: what a user
# who turns bf16 on in-process gets (context for the served bf16 TorchScript; the goals compare with fp32 eager)
BACKENDS = ("pytorch-eager", "pytorch-eager-bf16", "onnxruntime", "onnxruntime-trt", "triton-grpc")  # onnxruntime-trt: --device cuda only
DEVICES = ("cpu", "cuda")
GPU_INSTALL_HINT = ("pip install -e '.[gpu]' (onnxruntime-gpu, the CUDA build of ONNX Runtime; remove the CPU wheel "
                    "first: pip uninstall -y onnxruntime) and a CUDA build of torch")
DENOISER = catalog.DENOISER.triton  # the Denoise workload's Triton model
UNET = next(m.triton for m in catalog.MODELS if m.rpc == catalog.INTERNAL)  # one UNet evaluation (its engines.json)


@dataclass
class BenchConfig:
    model_repository: Path = REPO_ROOT / "model_repository"
    checkpoint_dir: Path = CHECKPOINT_DIR
    grpc_url: str | None = None  # a running Triton (host:port); None = start one with just the two models
    generator: str = catalog.DEFAULT_MODEL  # one of catalog.GANS
    generator_batches: tuple[int, ...] = (1, 64, 256)
    generator_repeats: int = 20
    # DDPM-100 at batch 256 is minutes per run on 2 shared CPU cores; raise this on a bigger machine
    denoise_batches: tuple[int, ...] = (1, 4)
    denoise_samplers: tuple[str, ...] = ("ddpm:100", "dpm-solver++:20")  # sampler:steps
    denoise_repeats: int = 2
    sigma: float = 0.5  # noise level of the denoise workload (t* ~ 145, so 100 steps are all run)
    warmup: int = 1  # untimed runs per cell (denoise warm-ups use 2 steps: same shapes, less time)
    # eager torch gets the faster of 1 and `threads` intra-op threads (probed per cell: on a busy machine 2 threads
    # can be several times slower than 1); in-process ONNX Runtime uses the model's config.pbtxt settings
    threads: int = 2
    seed: int = 0
    out: Path = REPO_ROOT / "bench" / "triton.json"
    # cuda: eager PyTorch on the GPU, ONNX Runtime with the CUDA EP and the TensorRT EP (FP16, engines cached in
    # trt_cache_dir); check_device() refuses at once where CUDA or onnxruntime-gpu is missing
    device: str = "cpu"
    trt_cache_dir: Path = REPO_ROOT / "out" / "bench" / "trt_cache"
    onnxruntime: bool = True  # the in-process ONNX Runtime columns; False: none (no ONNX files or onnxruntime-gpu needed)

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.generator not in catalog.GANS:
            raise ValueError(f"generator must be one of {list(catalog.GANS)}, got {self.generator!r}")
        for spec in self.denoise_samplers:
            name, _, steps = spec.partition(":")
            if name not in catalog.SAMPLERS or not steps.isdigit() or not 1 <= int(steps) <= catalog.MAX_STEPS:
                raise ValueError(f"denoise sampler {spec!r}: expected SAMPLER:STEPS with SAMPLER in "
                                 f"{catalog.SAMPLERS} and STEPS in [1, {catalog.MAX_STEPS}]")
        for name in ("generator_batches", "denoise_batches"):
            if any(b < 1 for b in getattr(self, name)):
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def timed(fn: Callable[[], object], repeats: int, warmup: int, warm_fn: Callable[[], object] | None = None) -> list[float]:
    """Wall-clock seconds of `repeats` calls after `warmup` untimed calls of warm_fn (default fn)."""
    for _ in range(warmup):
        (warm_fn or fn)()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


TRITON_PHASES = ("queue", "compute_input", "compute_infer", "compute_output")  # Triton's per-request statistics


def triton_stats(client, model: str) -> dict[str, int]:
    """Triton's cumulative inference statistics of `model` (tritonclient gRPC): ns per phase and the request count."""
    s = client.get_inference_statistics(model).model_stats[0].inference_stats
    return {**{p: int(getattr(s, p).ns) for p in TRITON_PHASES}, "count": int(s.success.count)}


def triton_phases(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    """ms per request of each phase between two triton_stats snapshots ({} when no request ran between them)."""
    n = after["count"] - before["count"]
    return {p: (after[p] - before[p]) / n / 1e6 for p in TRITON_PHASES} if n > 0 else {}


def timed_in_triton(client, model: str, fn: Callable[[], object], repeats: int, warmup: int,
                    warm_fn: Callable[[], object] | None = None) -> tuple[list[float], dict[str, float]]:
    """timed(), plus where Triton spent each timed request (its statistics before and after; warm-ups excluded)."""
    timed(fn, 0, warmup, warm_fn)
    before = triton_stats(client, model)
    times = timed(fn, repeats, 0)
    return times, triton_phases(before, triton_stats(client, model))


def timed_path(backend: str, client, model: str, fn: Callable[[], object], repeats: int, warmup: int,
               warm_fn: Callable[[], object] | None = None) -> tuple[list[float], dict]:
    """timed() for any path; for triton-grpc also Triton's per-phase statistics of `model` ({"triton_ms": ...})."""
    if backend == "triton-grpc":
        times, phases = timed_in_triton(client, model, fn, repeats, warmup, warm_fn)
        return times, {"triton_ms": phases}
    return timed(fn, repeats, warmup, warm_fn), {}


def time_paths(runs: dict[str, tuple[Callable[[], object], Callable[[], object] | None]], client, model: str,
               repeats: int, warmup: int, workload: str, batch: int, eager_threads: int | None = None,
               label: str | None = None, digits: int = 2, **extra) -> list[dict]:
    """The paths of one workload and batch ({path: (fn, warm_fn or None)}) timed one after the other (timed_path), a
    results row each (`extra` in every row, `eager_threads` as the pytorch-eager row's torch_threads), each printed as
    it lands (`label`, default the workload; per-sample ms with `digits` decimals)."""
    rows = []
    for backend, (fn, warm) in runs.items():
        times, more = timed_path(backend, client, model, fn, repeats, warmup, warm)
        if backend.startswith("pytorch-eager") and eager_threads is not None:
            more["torch_threads"] = eager_threads
        rows.append(_row(workload, batch, backend, times, **extra, **more))
        print(f"  {label or workload:<28} batch {batch:>4} {backend:<14} {rows[-1]['per_sample_ms']:.{digits}f} "
              "ms/sample", flush=True)
    return rows


def best_threads(fn: Callable[[], object], candidates: tuple[int, ...], probes: int = 3) -> int:
    """The torch intra-op thread count (among candidates) with the fastest median of a few calls; leaves it set."""
    best, best_t = candidates[0], float("inf")
    for n in dict.fromkeys(candidates):
        torch.set_num_threads(n)
        t = statistics.median(timed(fn, probes, 1))
        if t < best_t:
            best, best_t = n, t
    torch.set_num_threads(best)
    return best


def check_device(device: str, onnxruntime: bool = True) -> None:
    """Raise SystemExit at once, saying what to install, when `device` cannot be benchmarked on this machine
    (`onnxruntime` False: only torch runs there, so onnxruntime-gpu is not needed)."""
    if device == "cpu":
        return
    if device not in DEVICES:
        raise SystemExit(f"--device must be one of {DEVICES}, got {device!r}")
    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + (f" built for CUDA {torch.version.cuda}" if torch.version.cuda
                                                else " built without CUDA")
        raise SystemExit(f"--device cuda: no CUDA device is usable here (torch.cuda.is_available() is False; "
                         f"{build}). Run on a machine with an NVIDIA GPU and driver; needs {GPU_INSTALL_HINT}.")
    if not onnxruntime:
        return
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SystemExit(f"--device cuda: onnxruntime {ort.__version__} has no CUDAExecutionProvider (providers: "
                         f"{ort.get_available_providers()}); install {GPU_INSTALL_HINT}")


def ort_providers(device: str, engine: str = "onnxruntime", trt_cache_dir: Path | None = None) -> list:
    """ONNX Runtime execution providers of a bench path: CPU; CUDA; or TensorRT (FP16, engine cache) then CUDA."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if engine == "onnxruntime-trt":
        cache = Path(trt_cache_dir or REPO_ROOT / "out" / "bench" / "trt_cache")
        cache.mkdir(parents=True, exist_ok=True)
        return [("TensorrtExecutionProvider", {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                                               "trt_engine_cache_path": str(cache)}),
                "CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def ort_sessions(model_dir: Path, cfg: BenchConfig) -> dict:
    """{path: session}: onnxruntime (CPU, or the CUDA EP), plus onnxruntime-trt on cuda when the TensorRT EP loads
    (a machine without TensorRT libraries skips that column, saying why); {} when cfg.onnxruntime is off."""
    if not cfg.onnxruntime:
        return {}
    out = {"onnxruntime": ort_session(model_dir, ort_providers(cfg.device))}
    if cfg.device == "cuda":
        try:
            sess = ort_session(model_dir, ort_providers(cfg.device, "onnxruntime-trt", cfg.trt_cache_dir))
            if sess.get_providers()[0] != "TensorrtExecutionProvider":
                raise RuntimeError(f"TensorRT EP not active (session providers {sess.get_providers()})")
            out["onnxruntime-trt"] = sess
        except Exception as e:  # noqa: BLE001  (missing libnvinfer, unsupported op...): skip the column, say why
            print(f"  onnxruntime-trt skipped for {model_dir.name}: {type(e).__name__}: {e}", flush=True)
    return out


def ort_session(model_dir: Path, providers: list | None = None):
    """mnistgen.engine's session over <model_dir>/1/model.onnx with the threads a served instance uses."""
    return eng.ort_session(model_dir / "1" / "model.onnx", eng.available_cores(), providers)


class OrtEps:
    """eps_fn over the exported UNet, as the served Denoise model builds it."""

    def __init__(self, session):
        self.session = session

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        feeds = {"sample": np.ascontiguousarray(x.cpu().numpy(), dtype=np.float32),
                 "timestep": t.cpu().numpy().astype(np.int64)}
        return torch.from_numpy(self.session.run(["noise_pred"], feeds)[0])  # (B, 1, 28, 28)


class CudaEps:
    """eps_fn of the eager UNet on the GPU: the sampling loop stays on the CPU (its seeded generators), each
    evaluation moves x and t over and eps back (as the python-backend models do with a GPU engine)."""

    def __init__(self, unet):
        self.unet = unet.to("cuda")

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x.to("cuda"), t.to("cuda")).sample.cpu()  # (B, 1, 28, 28); .cpu() synchronizes


def synced(fn: Callable[[], object], device: str) -> Callable[[], object]:
    """fn, then wait for the GPU (CUDA kernels run asynchronously: without this a timing measures the launch)."""
    if device != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def _grpc_inputs(arrays: dict[str, tuple[np.ndarray, str]]):
    import tritonclient.grpc as grpcclient

    ins = []
    for name, (arr, dtype) in arrays.items():
        i = grpcclient.InferInput(name, list(arr.shape), dtype)
        i.set_data_from_numpy(arr)
        ins.append(i)
    return ins


def bench_generator(cfg: BenchConfig, client) -> list[dict]:
    from mnistgen.registry import load_generator

    model = catalog.GANS[cfg.generator].triton
    gen, config = load_generator(cfg.checkpoint_dir / catalog.GANS[cfg.generator].checkpoint)
    gen = gen.to(cfg.device)
    dim = config["arch"]["latent_dim"]
    sessions = ort_sessions(cfg.model_repository / model, cfg)
    bf16 = cfg.device == "cpu" and eng.bf16_native()
    rows = []
    for b in cfg.generator_batches:
        z = sample_latent(b, dim, cfg.seed)  # (B, latent_dim)
        zt = torch.from_numpy(z).to(cfg.device)
        ins = _grpc_inputs({"latent": (z, "FP32")}) if client is not None else None  # (no tritonclient without Triton)

        def eager_call():
            with torch.inference_mode():
                return gen(zt)

        def eager_bf16():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return gen(zt).float()

        eager = synced(eager_call, cfg.device)
        runs = {"pytorch-eager": eager}
        if bf16:
            runs["pytorch-eager-bf16"] = eager_bf16
        runs.update({path: (lambda s=s: s.run(["image"], {"latent": z})) for path, s in sessions.items()})
        if client is not None:
            runs["triton-grpc"] = lambda: client.infer(model, ins).as_numpy("image")
        threads = best_threads(eager, (1, cfg.threads))
        rows += time_paths({k: (fn, None) for k, fn in runs.items()}, client, model, cfg.generator_repeats,
                           cfg.warmup, f"generator {cfg.generator}", b, threads, digits=4)
    return rows


def bench_denoise(cfg: BenchConfig, client) -> list[dict]:
    from training.data import DataConfig, load_mnist
    from mnistgen.diffusion import denoise, inference_timesteps, load_unet, make_scheduler, sigma_to_timestep

    unet, config = load_unet(cfg.checkpoint_dir / catalog.DENOISER.checkpoint)
    sched_cfg = config.get("scheduler")
    ort_eps = {path: OrtEps(s) for path, s in ort_sessions(cfg.model_repository / DENOISER, cfg).items()}
    eager_eps = CudaEps(unet) if cfg.device == "cuda" else unet
    x_test, _ = load_mnist("test", DataConfig())  # (N, 1, 28, 28) in [-1, 1]
    t_star = sigma_to_timestep(cfg.sigma, make_scheduler("ddpm", sched_cfg).alphas_cumprod)
    rows = []
    for spec in cfg.denoise_samplers:
        sampler, steps = spec.split(":")[0], int(spec.split(":")[1])
        evals = len(inference_timesteps(t_star, steps))
        name = f"denoise {sampler}-{steps}"
        for b in cfg.denoise_batches:
            x0 = np.ascontiguousarray(x_test[:b].numpy(), dtype=np.float32)  # (B, 1, 28, 28)
            x0t = torch.from_numpy(x0)

            def triton_inputs(n_steps):
                return _grpc_inputs({
                    "image": (x0, "FP32"),
                    "sigma": (np.full((b, 1), cfg.sigma, np.float32), "FP32"),
                    "steps": (np.full((b, 1), n_steps, np.int32), "INT32"),
                    "sampler": (np.array([[sampler.encode()]] * b, dtype=object), "BYTES"),
                    "seed": (np.arange(cfg.seed, cfg.seed + b, dtype=np.int64).reshape(b, 1), "INT64"),
                })

            ins, warm_ins = (triton_inputs(steps), triton_inputs(2)) if client is not None else (None, None)

            def run_with(eps_fn, n_steps):
                return lambda: denoise(eps_fn, x0t, cfg.sigma, sampler, n_steps, cfg.seed, scheduler_config=sched_cfg)

            runs = {"pytorch-eager": (run_with(eager_eps, steps), run_with(eager_eps, 2))}
            runs.update({path: (run_with(e, steps), run_with(e, 2)) for path, e in ort_eps.items()})
            if client is not None:
                runs["triton-grpc"] = (
                    lambda: client.infer(DENOISER, ins, client_timeout=3600).as_numpy("denoised"),
                    lambda: client.infer(DENOISER, warm_ins, client_timeout=3600))
            t_probe = torch.full((b,), t_star, dtype=torch.int64)  # (B,)

            def one_eval():
                with torch.inference_mode():
                    return eager_eps(x0t, t_probe) if cfg.device == "cuda" else unet(x0t, t_probe)

            threads = best_threads(one_eval, (1, cfg.threads))  # one UNet evaluation decides
            rows += time_paths(runs, client, DENOISER, cfg.denoise_repeats, cfg.warmup, name, b, threads,
                               unet_evals=evals)
    return rows


def _row(workload: str, batch: int, backend: str, times: list[float], **extra) -> dict:
    med = statistics.median(times)
    return {"workload": workload, "batch": batch, "backend": backend, "median_ms": med * 1e3,
            "per_sample_ms": med * 1e3 / batch, "runs_ms": [t * 1e3 for t in times], **extra}


def markdown_table(rows: list[dict]) -> str:
    cells: dict[tuple[str, int], dict[str, float]] = {}
    for r in rows:
        cells.setdefault((r["workload"], r["batch"]), {})[r["backend"]] = r["per_sample_ms"]
    backends = [b for b in BACKENDS if any(b in c for c in cells.values())]
    head = ("| workload | batch | " + " | ".join(f"{b} ms/sample" for b in backends)
            + " | Triton vs eager |\n|---|---:|" + "---:|" * len(backends) + "---:|")
    lines = [head]
    for (workload, batch), c in cells.items():
        vals = " | ".join(f"{c[b]:.4g}" if b in c else "-" for b in backends)
        ratio = c["pytorch-eager"] / c["triton-grpc"] if {"pytorch-eager", "triton-grpc"} <= c.keys() else float("nan")
        lines.append(f"| {workload} | {batch} | {vals} | {ratio:.2f}x |")
    return "\n".join(lines)


def run(cfg: BenchConfig) -> dict:
    import tritonclient.grpc as grpcclient

    from serving.triton_server import TritonConfig, TritonServer, free_ports
    from training.export import ExportConfig
    from training.export import run as export

    check_device(cfg.device)
    torch.set_num_threads(cfg.threads)
    gen_model = catalog.GANS[cfg.generator].triton
    ecfg = ExportConfig(checkpoint_dir=cfg.checkpoint_dir, model_repository=cfg.model_repository,
                        only=(gen_model, UNET, DENOISER), gpu_variant=cfg.device == "cuda")
    export(ecfg)
    if cfg.device == "cuda":  # Triton and the in-process sessions read the GPU variant (--gpu-variant)
        cfg.model_repository = ecfg.gpu_repository
    server = None
    url = cfg.grpc_url
    if url is None:
        http, grpc, metrics = free_ports(3)
        server = TritonServer(TritonConfig(
            model_repository=cfg.model_repository, models=(gen_model, DENOISER), bind_address="127.0.0.1",
            http_port=http, grpc_port=grpc, metrics_port=metrics, startup_timeout_s=600))
        print("starting Triton ...", flush=True)
        server.start().wait_ready()
        url = server.grpc_url
    try:
        client = grpcclient.InferenceServerClient(url)
        rows = bench_generator(cfg, client) + bench_denoise(cfg, client)
    finally:
        if server is not None:
            server.close()
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__, "load_avg_1m": __import__("os").getloadavg()[0]},
        "rows": rows,
    }
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(result, indent=2))
    print()
    print(markdown_table(rows))
    print(f"\nwritten {cfg.out}")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(p, BenchConfig, exclude=("seed",),
                       choices={"generator": list(catalog.GANS), "device": DEVICES},
                       help={"grpc_url": "use a running Triton (host:port) instead of starting one",
                             "denoise_samplers": "SAMPLER:STEPS ...",
                             "device": "cuda: eager on the GPU, ONNX Runtime CUDA + TensorRT EPs, Triton on "
                                       "model_repository_gpu/ (needs pip install -e '.[gpu]')"})
    run(dataclass_from_args(BenchConfig, p.parse_args(argv), parser=p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
