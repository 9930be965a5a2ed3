"""The in-process and Triton-direct paths of `make bench` (loadtest/bench.py): eager PyTorch, ONNX Runtime in-process
and Triton over gRPC, each cell timed alike (the median of `repeats` runs after `warmup` untimed ones; one Triton
request carries the whole batch), with Triton's own per-phase statistics for the Triton-direct cells.
`make bench-triton` is `make bench` on these paths alone."""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mnistgen import catalog
from mnistgen import engine as eng
from mnistgen.latent import sample_latent

DEVICES = ("cpu", "cuda")
GPU_INSTALL_HINT = ("pip install -e '.[gpu]' (onnxruntime-gpu, the CUDA build of ONNX Runtime; remove the CPU wheel "
                    "first: pip uninstall -y onnxruntime) and a CUDA build of torch")
DENOISER = catalog.DENOISER.triton  # the Denoise workload's Triton model
UNET = next(m.triton for m in catalog.MODELS if m.rpc == catalog.INTERNAL)  # one UNet evaluation (its engines.json)


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


def time_paths(runs: dict[str, tuple[Callable[[], object], Callable[[], object] | None]], client, model: str,
               repeats: int, warmup: int, workload: str, batch: int, eager_threads: int | None = None,
               label: str | None = None, digits: int = 2, **extra) -> list[dict]:
    """The paths of one workload and batch ({path: (fn, warm_fn or None)}) timed one after the other, a results row
    each (`extra` in every row, `eager_threads` as the pytorch-eager row's torch_threads; triton-grpc's with Triton's
    per-phase statistics of `model`), each printed as it lands (`label`, default the workload)."""
    rows = []
    for backend, (fn, warm) in runs.items():
        if backend == "triton-grpc":
            times, phases = timed_in_triton(client, model, fn, repeats, warmup, warm)
            more = {"triton_ms": phases}
        else:
            times, more = timed(fn, repeats, warmup, warm), {}
        if backend.startswith("pytorch-eager") and eager_threads is not None:
            more["torch_threads"] = eager_threads
        med = statistics.median(times)
        rows.append({"workload": workload, "batch": batch, "backend": backend, "median_ms": med * 1e3,
                     "per_sample_ms": med * 1e3 / batch, "runs_ms": [t * 1e3 for t in times], **extra, **more})
        print(f"  {label or workload:<28} batch {batch:>4} {backend:<14} {rows[-1]['per_sample_ms']:.{digits}f} "
              "ms/sample", flush=True)
    return rows


def best_threads(fn: Callable[[], object], candidates: tuple[int, ...], probes: int = 3) -> int:
    """The torch intra-op thread count (among candidates) with the fastest median of a few calls; leaves it set."""
    def median_with(n: int) -> float:
        torch.set_num_threads(n)
        return statistics.median(timed(fn, probes, 1))

    best = min(dict.fromkeys(candidates), key=median_with)
    torch.set_num_threads(best)
    return best


def check_device(device: str, onnxruntime: bool = True) -> None:
    """SystemExit at once, saying what to install, where `device` cannot be benchmarked on this machine
    (`onnxruntime` False: only torch runs there, so onnxruntime-gpu is not needed)."""
    if device == "cpu":
        return
    if not torch.cuda.is_available():
        raise SystemExit(f"--device cuda: no CUDA device is usable here (torch.cuda.is_available() is False; torch "
                         f"{torch.__version__}, CUDA {torch.version.cuda or 'none'}). Run on a machine with an NVIDIA "
                         f"GPU and driver; needs {GPU_INSTALL_HINT}.")
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
        trt_cache_dir.mkdir(parents=True, exist_ok=True)
        return [("TensorrtExecutionProvider", {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                                               "trt_engine_cache_path": str(trt_cache_dir)}),
                "CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def ort_sessions(model_dir: Path, cfg) -> dict:
    """{path: session} over <model_dir>/1/model.onnx with a served instance's threads: onnxruntime (CPU, or the CUDA
    EP), plus onnxruntime-trt on cuda when the TensorRT EP loads (else that column is skipped, saying why)."""
    if not cfg.ort_paths:
        return {}
    session = lambda providers: eng.ort_session(model_dir / "1" / "model.onnx", eng.available_cores(),  # noqa: E731
                                                providers)
    out = {"onnxruntime": session(ort_providers(cfg.device))}
    if cfg.device == "cuda":
        try:
            sess = session(ort_providers(cfg.device, "onnxruntime-trt", cfg.trt_cache_dir))
            if sess.get_providers()[0] != "TensorrtExecutionProvider":
                raise RuntimeError(f"TensorRT EP not active (session providers {sess.get_providers()})")
            out["onnxruntime-trt"] = sess
        except Exception as e:  # noqa: BLE001  (missing libnvinfer, unsupported op...): skip the column, say why
            print(f"  onnxruntime-trt skipped for {model_dir.name}: {type(e).__name__}: {e}", flush=True)
    return out


def ort_eps(session) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """eps_fn over the exported UNet's session, as the served Denoise model feeds it."""
    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        feeds = {"sample": np.ascontiguousarray(x.cpu().numpy(), dtype=np.float32),
                 "timestep": t.cpu().numpy().astype(np.int64)}
        return torch.from_numpy(session.run(["noise_pred"], feeds)[0])  # (B, 1, 28, 28)
    return eps


class CudaEps:
    """eps_fn of the eager UNet on the GPU: the sampling loop stays on the CPU (its seeded generators), each
    evaluation moves x and t over and eps back (as the python-backend models do with a GPU engine)."""

    def __init__(self, unet):
        self.unet = unet.to("cuda")

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x.to("cuda"), t.to("cuda")).sample.cpu()  # (B, 1, 28, 28); .cpu() synchronizes


def _grpc_inputs(arrays: dict):
    """tritonclient InferInputs from {name: array or (array, Triton dtype)} (by default the array's dtype)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    ins = []
    for name, v in arrays.items():
        arr, dtype = v if isinstance(v, tuple) else (v, np_to_triton_dtype(v.dtype))
        i = grpcclient.InferInput(name, list(arr.shape), dtype)
        i.set_data_from_numpy(arr)
        ins.append(i)
    return ins


def bench_generator(cfg, client, gateways: dict) -> list[dict]:
    """cfg.generator at cfg.generator_batches in-process, Triton direct (client: Triton's) and through the gateway
    ({path: serving.client.GatewayClient})."""
    from mnistgen.registry import load_generator

    model = catalog.GANS[cfg.generator].triton
    gen, config = load_generator(cfg.checkpoint_dir / catalog.GANS[cfg.generator].checkpoint)
    gen = gen.to(cfg.device)
    sessions = ort_sessions(cfg.model_repository / model, cfg)
    rows = []
    for b in cfg.generator_batches:
        z = sample_latent(b, config["arch"]["latent_dim"], cfg.seed)  # (B, latent_dim)
        zt = torch.from_numpy(z).to(cfg.device)

        def eager(bf16: bool = False):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = gen(zt).float()  # (B, 1, 28, 28); .float() is a no-op in fp32
            if cfg.device == "cuda":  # kernels run asynchronously: without this a timing measures the launch
                torch.cuda.synchronize()
            return out

        runs = {"pytorch-eager": eager}
        if cfg.device == "cpu" and eng.bf16_native():
            runs["pytorch-eager-bf16"] = lambda: eager(True)
        runs.update({path: (lambda s=s: s.run(["image"], {"latent": z})) for path, s in sessions.items()})
        if client is not None:
            ins = _grpc_inputs({"latent": z})
            runs["triton-grpc"] = lambda: client.infer(model, ins).as_numpy("image")
        runs.update({p: (lambda c=c: c.generate(model=cfg.generator, num_samples=b, seed=cfg.seed))
                     for p, c in gateways.items()})
        threads = best_threads(eager, (1, cfg.threads))
        rows += time_paths({k: (fn, None) for k, fn in runs.items() if k in cfg.paths}, client, model,
                           cfg.generator_repeats, cfg.warmup, f"generator {cfg.generator}", b, threads, digits=4)
    return rows


def bench_denoise(cfg, client, gateways: dict, spec: str, repeats: int) -> list[dict]:
    """Denoise at cfg.sigma with `spec` (SAMPLER:STEPS) at cfg.denoise_batches, every path (as bench_generator)."""
    from mnistgen.diffusion import denoise, inference_timesteps, load_unet, make_scheduler, sigma_to_timestep

    unet, config = load_unet(cfg.checkpoint_dir / catalog.DENOISER.checkpoint)
    sched_cfg = config.get("scheduler")
    ort_eps_fns = {path: ort_eps(s) for path, s in ort_sessions(cfg.model_repository / DENOISER, cfg).items()}
    eager_eps = CudaEps(unet) if cfg.device == "cuda" else unet
    t_star = sigma_to_timestep(cfg.sigma, make_scheduler("ddpm", sched_cfg).alphas_cumprod)
    sampler, steps = spec.split(":")[0], int(spec.split(":")[1])
    rows = []
    for b in cfg.denoise_batches:
        x0 = clean_digits(b)  # (B, 1, 28, 28)
        x0t = torch.from_numpy(x0)

        def run_with(eps_fn, n_steps):
            return lambda: denoise(eps_fn, x0t, cfg.sigma, sampler, n_steps, cfg.seed, scheduler_config=sched_cfg)

        def triton(n_steps):
            ins = _grpc_inputs({"image": x0, "sigma": np.full((b, 1), cfg.sigma, np.float32),
                                "steps": np.full((b, 1), n_steps, np.int32),
                                "sampler": np.full((b, 1), sampler.encode(), dtype=object),
                                "seed": np.arange(cfg.seed, cfg.seed + b, dtype=np.int64).reshape(b, 1)})
            return lambda: client.infer(DENOISER, ins, client_timeout=3600).as_numpy("denoised")

        def gateway(c, n_steps):
            return lambda: c.denoise(x0, sigma=cfg.sigma, steps=n_steps, sampler=sampler, seed=cfg.seed)

        runs = {p: (run_with(e, steps), run_with(e, 2)) for p, e in {"pytorch-eager": eager_eps, **ort_eps_fns}.items()}
        if client is not None:
            runs["triton-grpc"] = (triton(steps), triton(2))
        runs.update({p: (gateway(c, steps), gateway(c, 2)) for p, c in gateways.items()})
        t_probe = torch.full((b,), t_star, dtype=torch.int64)  # (B,)

        def one_eval():
            with torch.inference_mode():
                return eager_eps(x0t, t_probe)

        threads = best_threads(one_eval, (1, cfg.threads))  # one UNet evaluation decides
        rows += time_paths({k: v for k, v in runs.items() if k in cfg.paths}, client, DENOISER, repeats, cfg.warmup,
                           f"denoise {sampler}-{steps}", b, threads, unet_evals=len(inference_timesteps(t_star, steps)))
    return rows


def clean_digits(n: int) -> np.ndarray:
    """The first n MNIST test digits, (n, 1, 28, 28) float32 in [-1, 1] (what every denoise path denoises)."""
    from training.data import DataConfig, load_mnist

    x, _ = load_mnist("test", DataConfig())
    return np.ascontiguousarray(np.asarray(x[:n]), dtype=np.float32)

