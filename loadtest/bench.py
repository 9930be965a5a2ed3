"""`make bench`: the per-sample latency of every serving path on this machine, side by side.

Paths: eager PyTorch, ONNX Runtime in-process, Triton direct (gRPC), the gateway over gRPC and HTTP/JSON, timed alike
by loadtest/bench_triton.py on a GAN generator, DDPM-100 and a fast sampler denoising, class-conditional Generate;
then batch-1 requests from 1, 4, 16 closed-loop clients (loadtest.load) through the gateway against eager PyTorch
serving the same stream one at a time. Starts its own Triton + gateway (serving.run's Stack); writes
bench/results.json and results.md (headline: served / eager ratios).

    python -m loadtest.bench                                   # a few minutes on 2 CPU cores
    python -m loadtest.bench --quick                           # fewer repeats, for a smoke run
    python -m loadtest.bench --device cuda                     # the same table on a GPU (+ TensorRT EP, Locust)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mnistgen import catalog
from mnistgen import engine as eng
from mnistgen.files import CHECKPOINT_DIR, REPO_ROOT
from mnistgen.cli import add_dataclass_args, dataclass_from_args

from . import bench_triton as bt
from .load import closed_loop, relative_paths

COND = catalog.by_kind(catalog.DDPM_COND)[0]  # the class-conditional Generate workload's model
# table column order; onnxruntime-trt (TensorRT EP) runs with --device cuda only, pytorch-eager-bf16 (torch.autocast)
# on CPUs with native bf16 only (context for the served bf16 TorchScript: the goals compare with fp32 eager)
PATHS = ("pytorch-eager", "pytorch-eager-bf16", "onnxruntime", "onnxruntime-trt", "triton-grpc", "gateway-grpc", "gateway-http")
SERVED = ("triton-grpc", "gateway-grpc", "gateway-http")
DENOISE_TIMEOUT_S = 3600.0  # one DDPM-100 request at a large batch is minutes on a small CPU
OVERHEAD_GOAL_MS = 1.0  # gateway-grpc p50 over Triton direct, batch-1 Generate
CONCURRENCY_PATHS = ("pytorch-eager", "gateway-grpc")  # the sweep: in-process one at a time vs served
LOCUST_TIME_S_CUDA = 30.0  # --device cuda runs Locust for this long unless --locust-time-s says otherwise


@dataclass
class Goal:
    name: str
    measured: float
    target: float
    comparison: str  # "<=" or ">="
    unit: str  # "x" (ratio) or "ms"

    @property
    def met(self) -> bool:  # (a NaN, not measured, meets nothing)
        return bool(self.measured <= self.target if self.comparison == "<=" else self.measured >= self.target)


@dataclass
class GatewayBenchConfig:
    model_repository: Path = REPO_ROOT / "model_repository"  # exported first when a checkpoint is newer
    checkpoint_dir: Path = CHECKPOINT_DIR
    generator: str = catalog.DEFAULT_MODEL  # one of catalog.GANS
    generator_batches: tuple[int, ...] = (1, 64, 256)
    generator_repeats: int = 20  # timed runs per cell (median and p99 over these)
    denoise_batches: tuple[int, ...] = (1, 4, 16)  # small on purpose: DDPM-100 at 16 is ~10 s per run on 2 cores
    fast_sampler: str = "dpm-solver++:20"  # SAMPLER:STEPS compared against DDPM-100
    ddpm_repeats: int = 2  # DDPM-100 is slow: fewer timed runs
    fast_repeats: int = 4
    cond_digit: int = 7  # class-conditional generate row (COND, the fast sampler, the served default guidance)
    cond_batches: tuple[int, ...] = (1, 16)  # "give me sixteen 7s"
    overhead_repeats: int = 200  # interleaved batch-1 pairs (Triton direct, gateway gRPC) for the overhead goal
    sigma: float = 0.5  # denoise noise level
    warmup: int = 1  # untimed runs per cell (denoise warm-ups use 2 steps)
    # eager torch: bench_triton probes 1 and this many intra-op threads per cell and keeps the faster (on a busy
    # machine more threads can be far slower); in-process ORT uses the threads a served instance uses
    threads: int = 2
    seed: int = 0
    out_dir: Path = REPO_ROOT / "bench"  # results.json, results.md
    paths: tuple[str, ...] = PATHS  # which paths to run (subset of PATHS)
    log_dir: Path = field(default_factory=lambda: REPO_ROOT / "out" / "bench")  # Triton and gateway logs
    # concurrency sweep: closed-loop clients per level (empty or 0: no sweep), batch-1 requests per level and path
    concurrency: tuple[int, ...] = (1, 4, 16)
    concurrency_requests: int = 400  # batch-1 Generate requests per level and path
    concurrency_denoise_requests: int = 32  # batch-1 fast-sampler denoise requests per level and path (~0.4 s each)
    # cpu | cuda: eager on the GPU, ONNX Runtime CUDA + TensorRT EPs (FP16, engines in trt_cache_dir), Triton on
    # model_repository_gpu/ (`python -m training.export --gpu-variant`); refused at once without CUDA/onnxruntime-gpu
    device: str = "cpu"
    trt_cache_dir: Path = field(default_factory=lambda: REPO_ROOT / "out" / "bench" / "trt_cache")
    locust_time_s: float | None = None  # Locust against the bench's gateway for this long; None: 30 on cuda, 0 on cpu

    def __post_init__(self) -> None:
        if bad := [p for p in self.paths if p not in PATHS]:
            raise ValueError(f"paths: unknown {bad}: expected a subset of {PATHS}")
        sampler, _, steps = self.fast_sampler.partition(":")
        steps_ok = steps.isdigit() and 1 <= int(steps) <= catalog.MAX_STEPS
        batches = self.generator_batches + self.denoise_batches + self.cond_batches
        for name, ok, want in (
                ("device", self.device in bt.DEVICES, f"one of {bt.DEVICES}"),
                ("generator", self.generator in catalog.GANS, f"one of {list(catalog.GANS)}"),
                ("concurrency", all(c >= 0 for c in self.concurrency), "levels >= 1 (0 = no sweep)"),
                ("sigma", 0 < self.sigma <= 1, "in (0, 1]"),
                ("fast_sampler", sampler in catalog.SAMPLERS and steps_ok,
                 f"SAMPLER:STEPS with SAMPLER in {catalog.SAMPLERS} and STEPS in [1, {catalog.MAX_STEPS}]"),
                ("generator, denoise and cond batches", all(b >= 1 for b in batches), ">= 1"),
                *((n, getattr(self, n) >= 1, ">= 1") for n in ("generator_repeats", "ddpm_repeats", "fast_repeats",
                  "overhead_repeats", "concurrency_requests", "concurrency_denoise_requests"))):
            if not ok:
                raise ValueError(f"{name} must be {want}, got {getattr(self, name, batches)!r}")
        self.concurrency = tuple(c for c in self.concurrency if c > 0)
        if self.locust_time_s is None:
            self.locust_time_s = LOCUST_TIME_S_CUDA if self.device == "cuda" else 0.0

    # the requested paths that need Triton and the gateway (none: neither is started), the in-process ONNX Runtime
    # ones, and whether any runs the exported models (then they are exported first; --device cuda needs onnxruntime-gpu)
    served_paths = property(lambda self: [p for p in self.paths if p in SERVED])
    ort_paths = property(lambda self: [p for p in self.paths if p.startswith("onnxruntime")])
    reads_onnx = property(lambda self: bool(self.ort_paths or self.served_paths))


# ---- workloads beyond bench_triton's ------------------------------------------------------------------------
def bench_conditional(cfg: GatewayBenchConfig, clients: dict, direct) -> list[dict]:
    """Generate `cond_digit` from COND with the fast sampler and the served default guidance: eager PyTorch
    (the same guided loop in-process: labelled and null passes in one batch), Triton direct, the gateway."""
    from mnistgen.diffusion import generate, load_unet
    guidance = COND.guidance
    unet, config = load_unet(cfg.checkpoint_dir / COND.checkpoint)
    sampler, steps = cfg.fast_sampler.split(":")[0], int(cfg.fast_sampler.split(":")[1])
    name = f"generate {COND.name} digit {cfg.cond_digit} {sampler}-{steps} (guidance {guidance:g})"
    rows = []
    for b in cfg.cond_batches:
        def eager(n_steps):
            return lambda: generate(unet, b, sampler, n_steps, cfg.seed, scheduler_config=config.get("scheduler"),
                                    labels=[cfg.cond_digit] * b, guidance=guidance)

        def triton(n_steps):
            ins = bt._grpc_inputs({k: np.full((1, 1), v, dtype) for k, v, dtype in (
                ("num_samples", b, np.int32), ("steps", n_steps, np.int32), ("sampler", sampler.encode(), object),
                ("seed", cfg.seed, np.int64), ("digit", cfg.cond_digit, np.int32), ("guidance", guidance, np.float32))})
            return lambda: direct.infer(COND.triton, ins, client_timeout=DENOISE_TIMEOUT_S)

        def gateway(c, n_steps):
            return lambda: c.generate(COND.name, b, cfg.seed, n_steps, sampler, digit=cfg.cond_digit)

        runs = {"pytorch-eager": (eager(steps), eager(2))}
        if direct is not None and "triton-grpc" in cfg.paths:
            runs["triton-grpc"] = (triton(steps), triton(2))
        runs.update({path: (gateway(c, steps), gateway(c, 2)) for path, c in clients.items()})
        threads = bt.best_threads(eager(2), (1, cfg.threads))
        rows += bt.time_paths(runs, direct, COND.triton, cfg.fast_repeats, cfg.warmup, name, b, threads,
                              label=f"generate {COND.name}", unet_evals=steps)
    return rows


def bench_overhead(cfg: GatewayBenchConfig, tclient, gateway_client) -> dict:
    """Batch-1 Generate, Triton direct and gateway gRPC alternating request by request, so that the load of a
    shared machine drifts over both alike; the overhead is the median of the paired differences."""
    from mnistgen.latent import sample_latent

    model = catalog.GANS[cfg.generator].triton
    dim = int(tclient.get_model_config(model, as_json=True)["config"]["input"][0]["dims"][-1])
    ins = bt._grpc_inputs({"latent": sample_latent(1, dim, cfg.seed)})
    direct = lambda: tclient.infer(model, ins).as_numpy("image")  # noqa: E731
    gateway = lambda: gateway_client.generate(model=cfg.generator, num_samples=1, seed=cfg.seed)  # noqa: E731
    pairs = [(bt.timed(direct, 1, 0)[0], bt.timed(gateway, 1, 0)[0])
             for _ in range(cfg.overhead_repeats + 10)][10:]  # the first 10 pairs warm up
    d, g = (np.array(x) * 1e3 for x in zip(*pairs))
    out = {"repeats": len(pairs), "triton_p50_ms": float(np.median(d)), "gateway_p50_ms": float(np.median(g)),
           "overhead_p50_ms": float(np.median(g - d)), "triton_p99_ms": float(np.percentile(d, 99)),
           "gateway_p99_ms": float(np.percentile(g, 99))}
    print(f"  batch-1 overhead, {len(pairs)} interleaved pairs: Triton {out['triton_p50_ms']:.2f} ms, gateway "
          f"{out['gateway_p50_ms']:.2f} ms, overhead p50 {out['overhead_p50_ms']:.2f} ms", flush=True)
    return out


# ---- concurrency sweep ------------------------------------------------------------------------------------
def bench_concurrency(cfg: GatewayBenchConfig, gateway_target: str | None, has_ddpm: bool) -> dict:
    """{workload: {path: {clients: cell}}}: batch-1 requests from 1, 4, 16... closed-loop clients, through the
    gateway (gRPC, one channel per client) and in-process eager PyTorch serving the same stream one at a time.
    The level order alternates (eager first, then gateway first, ...) so load drifts hit both alike."""
    import torch

    from mnistgen.latent import sample_latent
    from mnistgen.registry import load_generator
    from serving.client import GatewayClient

    paths = [p for p in CONCURRENCY_PATHS if p in cfg.paths and (p != "gateway-grpc" or gateway_target)]
    clients: list = []

    def served(fn):
        def make():
            c = GatewayClient(transport="grpc", target=gateway_target, timeout_s=DENOISE_TIMEOUT_S)
            clients.append(c)
            return lambda i: fn(c, i)
        return make

    gen, gconf = load_generator(cfg.checkpoint_dir / catalog.GANS[cfg.generator].checkpoint)
    gen, dim = gen.to(cfg.device), gconf["arch"]["latent_dim"]

    def eager_generate(i: int):
        z = torch.from_numpy(sample_latent(1, dim, cfg.seed + i)).to(cfg.device)  # (1, latent_dim)
        with torch.inference_mode():
            return gen(z).cpu()  # (1, 1, 28, 28); .cpu() waits for the GPU

    workloads = {f"generate {cfg.generator} batch 1": (
        eager_generate, served(lambda c, i: c.generate(model=cfg.generator, num_samples=1, seed=cfg.seed + i)),
        cfg.concurrency_requests)}
    if has_ddpm:
        from mnistgen.diffusion import denoise, load_unet

        sampler, steps = cfg.fast_sampler.split(":")[0], int(cfg.fast_sampler.split(":")[1])
        unet, uconf = load_unet(cfg.checkpoint_dir / catalog.DENOISER.checkpoint)
        eps = bt.CudaEps(unet) if cfg.device == "cuda" else unet
        digits = bt.clean_digits(64)  # (64, 1, 28, 28): request i denoises digit i % 64

        def eager_denoise(i: int):
            x0 = torch.from_numpy(digits[i % len(digits)][None])  # (1, 1, 28, 28)
            return denoise(eps, x0, cfg.sigma, sampler, steps, cfg.seed + i, scheduler_config=uconf.get("scheduler"))

        workloads[f"denoise {sampler}-{steps} batch 1"] = (eager_denoise, served(
            lambda c, i: c.denoise(digits[i % len(digits)][None], sigma=cfg.sigma, steps=steps, sampler=sampler,
                                   seed=cfg.seed + i)), cfg.concurrency_denoise_requests)
    out: dict = {}
    try:
        for name, (eager, make_served, n) in workloads.items():
            threads = bt.best_threads(lambda: eager(0), (1, cfg.threads)) if "pytorch-eager" in paths else 0
            for k, level in enumerate(cfg.concurrency):
                for path in (paths if k % 2 == 0 else paths[::-1]):
                    if path == "pytorch-eager":
                        c = closed_loop(lambda: eager, level, n, serial=True)
                        c["torch_threads"] = threads
                    else:
                        c = closed_loop(make_served, level, n, warm=True)
                    out.setdefault(name, {}).setdefault(path, {})[str(level)] = c
                    err = f", {c['errors']} errors (first: {c['first_error']})" if c["errors"] else ""
                    print(f"  {name:<32} {level:>3} clients {path:<14} {c['samples_per_s']:8.1f} samples/s  "
                          f"p50 {c['p50_ms']:8.2f} ms  p99 {c['p99_ms']:8.2f} ms{err}", flush=True)
    finally:
        for c in clients:
            c.close()
    return out


# ---- Locust (--locust-time-s; --device cuda runs it by default) -------------------------------------------------
def run_locust(cfg: GatewayBenchConfig, grpc_target: str, http_url: str, has_ddpm: bool) -> dict:
    """`make loadtest`'s Locust run (gRPC + HTTP users) against the bench's gateway, then loadtest.report's
    per-request and per-sample latency; the raw CSV and summary land in <log_dir>/locust/."""
    from .report import write_report

    out = cfg.log_dir / "locust"
    out.mkdir(parents=True, exist_ok=True)
    users = 8
    cmd = [sys.executable, "-m", "locust", "-f", str(REPO_ROOT / "loadtest" / "locustfile.py"), "--headless",
           "-u", str(users), "-r", "4", "-t", f"{max(int(cfg.locust_time_s), 1)}s", "--grpc-host", grpc_target,
           "--http-host", http_url, "--raw-csv", str(out / "requests.csv"), "--stop-timeout", "30", "--only-summary",
           "--model", cfg.generator, "--num-samples", "1,64", *(() if has_ddpm else ("--mix", "generate=1")),
           "GrpcGatewayUser", "HttpGatewayUser"]
    print(f"Locust: {users} users for {cfg.locust_time_s:g} s against the gateway ...", flush=True)
    with open(out / "locust.log", "wb") as log:
        subprocess.run(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=cfg.locust_time_s + 180)
    rows = write_report(out / "requests.csv", out, plots=False)
    return {"time_s": cfg.locust_time_s, "users": users, "csv": str(out / "requests.csv"),
            "groups": [asdict(r) for r in rows]}


# ---- results ----------------------------------------------------------------------------------------------
def cell(row: dict) -> dict:
    """The figures kept per path and batch."""
    runs = np.asarray(row["runs_ms"], np.float64)
    return {"ms_per_sample": row["per_sample_ms"], "samples_per_s": 1e3 / row["per_sample_ms"],
            "p50_ms": float(np.percentile(runs, 50)), "p99_ms": float(np.percentile(runs, 99)),
            "runs": len(runs), "runs_ms": row["runs_ms"],
            **{k: row[k] for k in ("unet_evals", "torch_threads", "triton_ms") if k in row}}


def results_table(rows: list[dict]) -> dict:
    """{workload: {path: {batch: cell}}}."""
    out: dict = {}
    for r in rows:
        out.setdefault(r["workload"], {}).setdefault(r["backend"], {})[str(r["batch"])] = cell(r)
    return out


def _get(res: dict, workload: str, path: str, batch: int, key: str = "ms_per_sample") -> float:
    return res.get(workload, {}).get(path, {}).get(str(batch), {}).get(key, float("nan"))


GENERATOR_GOAL_BATCHES = (1, 64, 256)  # generator through the gateway <= 1.0x eager at each (issue 12)
DDPM_GOAL = {1: 0.4}  # DDPM-100 denoise through the gateway / eager at batch 1; every other batch: DDPM_GOAL_OTHER
DDPM_GOAL_OTHER = 0.7
CONCURRENCY_GOAL_CLIENTS = 16  # batch-1 Generate rate through the gateway at 16 clients >= eager's sequential rate


def goals(res: dict, cfg: GatewayBenchConfig, overhead: dict | None = None,
          concurrency: dict | None = None) -> list[Goal]:
    gen = f"generator {cfg.generator}"
    fast_name = "denoise " + cfg.fast_sampler.replace(":", "-")
    big = max(cfg.denoise_batches)
    out = []
    for b in (b for b in GENERATOR_GOAL_BATCHES if b in cfg.generator_batches):
        for path in ("gateway-grpc", "gateway-http") if b == 64 else ("gateway-grpc",):
            out.append(Goal(f"generator through {path} at batch {b} vs eager PyTorch (per sample)",
                            _get(res, gen, path, b) / _get(res, gen, "pytorch-eager", b), 1.0, "<=", "x"))
    for b in cfg.denoise_batches:
        out.append(Goal(f"denoise DDPM-100 through gateway-grpc vs the eager diffusers loop, batch {b} (per sample)",
                        _get(res, "denoise ddpm-100", "gateway-grpc", b)
                        / _get(res, "denoise ddpm-100", "pytorch-eager", b), DDPM_GOAL.get(b, DDPM_GOAL_OTHER),
                        "<=", "x"))
    out.append(Goal(f"{cfg.fast_sampler} speed-up over DDPM-100 through gateway-grpc, batch {big} (per sample)",
                    _get(res, "denoise ddpm-100", "gateway-grpc", big) / _get(res, fast_name, "gateway-grpc", big),
                    5.0, ">=", "x"))
    if overhead:
        out.append(Goal(f"gateway-grpc p50 overhead over Triton direct at generator batch 1 ({overhead['repeats']} "
                        "interleaved pairs)", overhead["overhead_p50_ms"], OVERHEAD_GOAL_MS, "<=", "ms"))
    elif 1 in cfg.generator_batches:
        out.append(Goal("gateway-grpc p50 overhead over Triton direct at generator batch 1",
                        _get(res, gen, "gateway-grpc", 1, "p50_ms") - _get(res, gen, "triton-grpc", 1, "p50_ms"),
                        OVERHEAD_GOAL_MS, "<=", "ms"))
    if (n := CONCURRENCY_GOAL_CLIENTS) in cfg.concurrency:
        conc, w = concurrency or {}, f"generate {cfg.generator} batch 1"
        ratio = _get(conc, w, "gateway-grpc", n, "samples_per_s") / _get(conc, w, "pytorch-eager", 1, "samples_per_s")
        out.append(Goal(f"batch-1 Generate samples/s through gateway-grpc at {n} clients / eager's sequential rate",
                        ratio, 1.0, ">=", "x"))
    return out


def machine_info(device: str = "cpu") -> dict:
    import onnxruntime
    import torch

    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or cpu
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "onnxruntime": onnxruntime.__version__,
            "load_avg_1m": os.getloadavg()[0], "device": device,
            **({"gpu": torch.cuda.get_device_name(0)} if device == "cuda" else {})}


def _f(v: float) -> str:
    if not np.isfinite(v):
        return "-"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _ratio(served: float, eager: float) -> str:
    """A headline cell: served / eager, or "-" where either side was not measured (NaN) or eager is 0."""
    r = served / eager if np.isfinite(eager) and eager > 0 else float("nan")
    return f"{r:.2f}x" if np.isfinite(r) else "-"


def markdown(result: dict) -> str:
    res, m, cfg = result["results"], result["machine"], result["config"]
    paths = [p for p in PATHS if any(p in w for w in res.values())]
    served = [p for p in paths if p != "pytorch-eager"]
    lines = [
        "# Serving benchmark: per-sample latency, served / eager", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}"
        + (f", GPU {m['gpu']} (--device cuda)" if m.get("gpu") else "") + f"; Python {m['python']}, torch {m['torch']} "
        f"(eager: the faster of 1 and {cfg['threads']} threads per cell, shown as thr), onnxruntime {m['onnxruntime']}. Load average (1 min) {m['load_avg_1m']:.1f} "
        f"at the start, {result['load_avg_end']:.1f} at the end (shared machine: figures are noisy).",
        f"Medians of {cfg['generator_repeats']} runs (generator), {cfg['ddpm_repeats']} (DDPM-100) and "
        f"{cfg['fast_repeats']} ({cfg['fast_sampler']}) after {cfg['warmup']} warm-up; denoise sigma {cfg['sigma']} "
        f"at small batches {list(cfg['denoise_batches'])} (CPU time). Run took {result['wall_s']:.0f} s.", "",
        *_section("Headline: per-sample time of each path / eager PyTorch (below 1 = faster than eager)", "",
                  "| workload | batch | " + " | ".join(served) + " |",
                  [f"| {w} | {b} | " + " | ".join(_ratio(_get(res, w, p, b), _get(res, w, "pytorch-eager", b))
                                                  for p in served) + " |"
                   for w, by_path in res.items() for b in sorted({int(b) for p in by_path.values() for b in p})])]
    if o := result.get("overhead_batch1"):
        lines += [f"Batch-1 Generate, {o['repeats']} requests alternating between Triton direct and the gateway "
                  f"(gRPC): p50 {o['triton_p50_ms']:.2f} ms vs {o['gateway_p50_ms']:.2f} ms (p99 "
                  f"{o['triton_p99_ms']:.2f} vs {o['gateway_p99_ms']:.2f} ms); median paired overhead "
                  f"{o['overhead_p50_ms']:.2f} ms.", ""]
    lines += ["## Goals", ""]
    for g in result["goals"]:
        val = (f"{g['measured']:.2f}{'x' if g['unit'] == 'x' else ' ms'}" if np.isfinite(g["measured"])
               else "not measured")
        lines.append(f"- {'MET' if g['met'] else 'MISSED'}: {g['name']}: {val} (goal {g['comparison']} "
                     f"{g['target']:g}{g['unit'] if g['unit'] == 'x' else ' ms'})")
    rows = [f"| {w} | {b} | {_label(p, c)} | {_f(c['ms_per_sample'])} | {_f(c['samples_per_s'])} | "
            f"{_f(c['p50_ms'])} | {_f(c['p99_ms'])} | {c['runs']} |"
            for w, by_path in res.items() for p in paths for b, c in _cells(by_path, p)]
    lines += ["", *_section("All figures", "", "| workload | batch | path | ms/sample | samples/s | request p50 ms | "
                            "request p99 ms | runs |", rows, "|---|---:|---|---:|---:|---:|---:|---:|"),
              "p99 over this few runs is close to the slowest run.", ""]
    lines += bounds_markdown(result)
    lines += triton_phases_markdown(res)
    lines += engines_markdown(result.get("engines") or {})
    lines += concurrency_markdown(result.get("concurrency") or {})
    lines += locust_markdown(result.get("locust"))
    return "\n".join(lines)


def bounds_markdown(result: dict) -> list[str]:
    """What bounds the two goals that sit on structure rather than on an engine: batch-1 Generate and the speed-up."""
    res, cfg, o = result["results"], result["config"], result.get("overhead_batch1") or {}
    gen = f"generator {cfg['generator']}"
    out = []
    eager, engine = _get(res, gen, "pytorch-eager", 1, "p50_ms"), _get(res, gen, "onnxruntime", 1, "p50_ms")
    served = o.get("gateway_p50_ms", _get(res, gen, "gateway-grpc", 1, "p50_ms"))
    if all(np.isfinite(v) for v in (eager, engine, served)):
        t = res.get(gen, {}).get("triton-grpc", {}).get("1", {}).get("triton_ms") or {}
        split = ""
        if t and o:
            outside = o["triton_p50_ms"] - sum(t.values())
            split = (f", in ms: Triton's queue {_f(t['queue'])}, the python-backend model's execute {_f(t['compute_infer'])} "
                     f"(the engine plus the stub round trip), input + output copies "
                     f"{_f(t['compute_input'] + t['compute_output'])}, the Triton gRPC hop {_f(outside)}, the gateway "
                     f"{_f(o['overhead_p50_ms'])} (means of Triton's statistics; p50 of the paired runs)")
        out += [f"- **{gen}, batch 1**: the engine in-process (ONNX Runtime) takes {_f(engine)} ms, the gateway path "
                f"{_f(served)} ms{split}. What the served path spends outside the engine, {_f(served - engine)} ms, "
                f"is {(served - engine) / eager:.2f}x eager PyTorch's whole call ({_f(eager)} ms): the hops bound "
                "this goal, not the engine."]
    fast = "denoise " + cfg["fast_sampler"].replace(":", "-")
    big = str(max(cfg["denoise_batches"]))
    cells = [res.get(w, {}).get("gateway-grpc", {}).get(big) for w in ("denoise ddpm-100", fast)]
    if all(c and c.get("unet_evals") for c in cells):
        (slow, quick) = ((c["ms_per_sample"] * int(big), c["unet_evals"]) for c in cells)
        per = [slow[0] / slow[1], quick[0] / quick[1]]
        out += [f"- **{cfg['fast_sampler']} speed-up, batch {big}**: {slow[1]} vs {quick[1]} UNet evaluations per "
                f"request ({slow[1] / quick[1]:.2f}x), {_f(per[0])} vs {_f(per[1])} ms per evaluation through the "
                f"gateway (UNet, sampler step and the request's share of fixed costs): speed-up "
                f"{slow[1] / quick[1]:.2f} x {per[0] / per[1]:.3f} = {slow[0] / quick[0]:.2f}x. The goal of 5x is "
                "the ratio of evaluations itself: it is met when the per-evaluation costs tie or the slow "
                "sampler's is higher (its ancestral step draws fresh noise per item), and missed by the fixed "
                "per-request costs (queue delay, transfers), which weigh 5x more on the short run."]
    return ["## What bounds the batch-1 and speed-up goals", "", *out, ""] if out else []


def triton_phases_markdown(res: dict) -> list[str]:
    """Where a Triton-direct request's time goes, from the cells' `triton_ms` (Triton's own statistics)."""
    out = []
    for w, by_path in res.items():
        for b, c in _cells(by_path, "triton-grpc"):
            t = c.get("triton_ms") or {}
            if t:
                client = float(np.mean(c["runs_ms"]))
                out.append(f"| {w} | {b} | {_f(client)} | {_f(t['queue'])} | {_f(t['compute_input'])} | "
                           f"{_f(t['compute_infer'])} | {_f(t['compute_output'])} | {_f(client - sum(t.values()))} |")
    return _section("Inside Triton: where a request's time goes",
                    "Triton-direct requests, ms per request, means over the timed runs: the client's wall time and "
                    "Triton's inference statistics (execute = the python-backend model: stub round trip + engine); "
                    "outside = client minus the server's phases (gRPC transfer and (de)serialisation).",
                    "| workload | batch | client | queue | input | execute | output | outside |", out)


def engine_records(repo: Path, models: tuple[str, ...]) -> dict:
    """{model: its 1/engines.json's figures and choice} for the benchmarked models that have one."""
    out = {}
    for m in models:
        record = eng.read_record(repo / m / "1" / eng.ENGINES_FILE)
        if record is None:
            continue
        threads = record.get("machine", {}).get("threads")
        r = out[m] = {k: record.get(k) for k in ("threshold", "batches", "ms_per_sample", "measured_by", "measured_at",
                                                 "bf16")} | {"threads": threads}
        r["torchscript_precision"] = record.get("torchscript_precision", eng.FP32)
        r["ort_multithread_from"] = record.get("ort_multithread_from", 1)  # absent: measured before the column
        r["ort_split_from"] = eng.effective_split_from(record, threads or 1)
        r["choice"] = eng.describe(r["threshold"], source=eng.ENGINES_FILE, threads=threads,
                                   multithread_from=r["ort_multithread_from"], split_from=r["ort_split_from"],
                                   precision=r["torchscript_precision"])
    return out


def engines_markdown(engines: dict) -> list[str]:
    lines = []
    for m, r in engines.items():
        ms = r.get("ms_per_sample") or {}
        for b in r.get("batches") or []:
            cells = [ms.get(c, {}).get(str(b), float("nan"))
                     for c in (eng.ORT, eng.ORT_1T, eng.ORT_SPLIT, eng.TORCHSCRIPT, eng.TORCHSCRIPT_BF16)]
            which = eng.engine_for(b, r.get("threshold"), r["ort_multithread_from"], r.get("ort_split_from"))
            which = {eng.ORT_1T: "onnxruntime, 1 thread", eng.ORT_SPLIT: "onnxruntime, split",
                     eng.TORCHSCRIPT: f"torchscript {r['torchscript_precision']}"}.get(which, which)
            lines.append(f"| {m} | {b} | " + " | ".join(_f(c) for c in cells) + f" | {which} |")
        bf16 = r.get("bf16") or {}
        diff = (f"; bf16 vs fp32 mean |diff| {bf16['mean_abs_diff']:.2g}, max {bf16['max_abs_diff']:.2g}"
                if "mean_abs_diff" in bf16 else "")
        lines.append(f"| {m} | | | | | | | {r['choice']}; measured by {r.get('measured_by')} at "
                     f"{r.get('measured_at')}{diff} |")
    return _section("Engine choice per batch size (each model's 1/engines.json, measured at export)",
                    "ms/sample of ONNX Runtime (one session with all threads; with one thread; the batch split over "
                    "one-thread sessions side by side) vs TorchScript (frozen, optimize_for_inference; fp32, and bf16 "
                    "where the CPU has native bf16) as the served model runs them, best of interleaved calls; the "
                    "served model uses TorchScript from the threshold on, in bf16 where that was faster and its "
                    f"outputs within {eng.BF16_MEAN_TOL} (mean |diff|) of fp32's.",
                    "| model | batch | onnxruntime | onnxruntime 1 thread | onnxruntime split | torchscript | "
                    "torchscript bf16 | served by |", lines, "|---|---:|---:|---:|---:|---:|---:|---|")


def concurrency_markdown(conc: dict) -> list[str]:
    lines = []
    for w, by_path in conc.items():
        levels = sorted({int(c) for cells in by_path.values() for c in cells})
        for level in levels:
            eager = by_path.get("pytorch-eager", {}).get(str(level), {}).get("samples_per_s", float("nan"))
            for path in CONCURRENCY_PATHS:
                c = by_path.get(path, {}).get(str(level))
                if c is None:
                    continue
                ratio = _ratio(c["samples_per_s"], eager) if path != "pytorch-eager" else "-"
                lines.append(f"| {w} | {level} | {_label(path, c)} | {_f(c['samples_per_s'])} | {_f(c['p50_ms'])} | "
                             f"{_f(c['p99_ms'])} | {c['ok']} | {c['errors']} | {ratio} | {c['load_avg_1m']:.1f} |")
    return _section("Concurrency: batch-1 requests from N closed-loop clients",
                    "Through the gateway over gRPC (one channel per client), against eager PyTorch serving the same "
                    "stream in-process one request at a time (its latency includes the wait for its turn). samples/s "
                    "= answered requests / wall time; the last column is the served samples/s over eager's at the "
                    "same level.", "| workload | clients | path | samples/s | request p50 ms | request p99 ms | "
                    "requests | errors | vs eager | load avg 1m |", lines, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")


def locust_markdown(loc: dict | None) -> list[str]:
    if not loc:
        return []
    rows = [f"| {g['group']} | {g['requests']} | {g['errors']} | {_f(g['samples_per_s'])} | {_f(g['request_ms']['p50'])} "
            f"| {_f(g['request_ms']['p99'])} | {_f(g['sample_ms']['p50'])} | {_f(g['sample_ms']['p99'])} |"
            for g in loc["groups"]]
    return _section(f"Locust: {loc['users']} users for {loc['time_s']:g} s (gRPC + HTTP, closed loop)", "",
                    "| group | requests | errors | samples/s | request p50 ms | request p99 ms | per-sample p50 ms | "
                    "per-sample p99 ms |", rows) + [f"Raw per-request CSV: {loc['csv']}", ""]


def _cells(by_path: dict, path: str) -> list[tuple[str, dict]]:
    """(batch or clients, cell) of one path, in increasing order."""
    return sorted(by_path.get(path, {}).items(), key=lambda kv: int(kv[0]))


def _label(path: str, c: dict) -> str:
    return f"{path} ({c['torch_threads']} thr)" if "torch_threads" in c else path


def _section(title: str, intro: str, head: str, rows: list[str], align: str = "") -> list[str]:
    """A markdown section: the title, an intro paragraph ("" for none), a table (`align` by default: the first column
    left, the others right), a blank line; nothing without rows."""
    align = align or "|---|" + "---:|" * (head.count("|") - 2)
    return [f"## {title}", "", *([intro, ""] if intro else []), head, align, *rows, ""] if rows else []


# ---- the run ----------------------------------------------------------------------------------------------
def run(cfg: GatewayBenchConfig) -> dict:
    """The bench. Triton and the gateway start only where a served path is among cfg.paths, and the models are
    exported only where a path reads ONNX: `--paths pytorch-eager pytorch-eager-bf16` needs torch and the
    checkpoints alone (a GPU machine without Triton or onnxruntime-gpu gets its eager rows)."""
    # --device cuda without CUDA (or onnxruntime-gpu, where a path needs it): refused here, before anything slow
    bt.check_device(cfg.device, onnxruntime=cfg.reads_onnx)
    import torch

    from serving.client import GatewayClient

    t_start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    machine = machine_info(cfg.device)
    gen_model = catalog.GANS[cfg.generator].triton
    if cfg.reads_onnx:
        from training.export import ExportConfig
        from training.export import run as export

        ecfg = ExportConfig(checkpoint_dir=cfg.checkpoint_dir, model_repository=cfg.model_repository,
                            only=(gen_model, bt.UNET, bt.DENOISER, COND.triton), gpu_variant=cfg.device == "cuda")
        export(ecfg)
        if cfg.device == "cuda":  # Triton and the in-process ONNX sessions use the GPU variant
            cfg.model_repository = ecfg.gpu_repository
    has_ddpm = (cfg.checkpoint_dir / catalog.DENOISER.checkpoint).is_file()
    has_cond = (cfg.checkpoint_dir / COND.checkpoint).is_file() and bool(cfg.cond_batches)
    models = (gen_model,) + ((bt.DENOISER,) if has_ddpm else ()) + ((COND.triton,) if has_cond else ())
    cfg.log_dir.mkdir(parents=True, exist_ok=True)
    stack = gw = tclient = None
    if cfg.served_paths:
        from serving.run import RunConfig, Stack

        stack = Stack(RunConfig(grpc_port=0, http_port=0, triton_http_port=0, model_repository=cfg.model_repository,
                                models=models, startup_timeout_s=600, log_dir=cfg.log_dir,
                                gateway_log=cfg.log_dir / "gateway.log", gateway_args=("--log-level", "WARNING")))
        print(f"starting Triton ({', '.join(models)}, {cfg.model_repository.name}) and the gateway ...", flush=True)
    else:
        print(f"paths {list(cfg.paths)}: in-process only, no Triton or gateway started", flush=True)
    rows, overhead, concurrency, locust, skipped = [], None, {}, None, {}  # results.json's sections
    try:
        if stack is not None:
            try:
                stack.start().wait_ready()
            except Exception as e:
                if cfg.device != "cuda":
                    raise
                # e.g. a tritonserver without the onnxruntime backend the GPU variant's single-shot models use:
                # the in-process GPU paths still run (NVIDIA's Triton container has every backend)
                skipped["triton-grpc, gateway"] = f"Triton on {cfg.model_repository} did not start: {e}"
                print(f"  Triton/gateway paths skipped: {e} (log: {cfg.log_dir / 'tritonserver.log'})", flush=True)
            else:  # Triton's client with the launch key: the launcher's Triton restricts every API but health
                gw, tclient = stack.gateway, stack.triton.client()
        clients = {p: GatewayClient(transport=p.split("-")[1], timeout_s=DENOISE_TIMEOUT_S,
                                    target=gw.grpc_target if p == "gateway-grpc" else gw.http_target)
                   for p in ("gateway-grpc", "gateway-http") if p in cfg.paths and gw is not None}
        direct = tclient if "triton-grpc" in cfg.paths else None
        rows += bt.bench_generator(cfg, direct, clients)
        if "gateway-grpc" in clients and direct is not None:
            overhead = bench_overhead(cfg, tclient, clients["gateway-grpc"])
        if has_ddpm:
            for spec, repeats in (("ddpm:100", cfg.ddpm_repeats), (cfg.fast_sampler, cfg.fast_repeats)):
                rows += bt.bench_denoise(cfg, direct, clients, spec, repeats)
        else:
            print(f"no {catalog.DENOISER.checkpoint} in {cfg.checkpoint_dir}: denoise workloads skipped", flush=True)
        if has_cond:
            rows += bench_conditional(cfg, clients, direct)
        for c in clients.values():
            c.close()
        if cfg.concurrency:
            print(f"concurrency sweep: {list(cfg.concurrency)} clients, batch 1 ...", flush=True)
            concurrency = bench_concurrency(cfg, gw.grpc_target if gw is not None else None, has_ddpm)
        if cfg.locust_time_s and gw is not None:
            locust = run_locust(cfg, gw.grpc_target, gw.http_url, has_ddpm)
    finally:
        if stack is not None:
            stack.close()
    res = results_table(rows)
    result = {
        "config": relative_paths(asdict(cfg)),
        "machine": machine, "load_avg_end": os.getloadavg()[0], "wall_s": time.perf_counter() - t_start,
        "results": res, "overhead_batch1": overhead, "concurrency": concurrency, "locust": locust,
        "skipped": skipped, "rows": rows,
        "goals": [{**asdict(g), "met": g.met} for g in goals(res, cfg, overhead, concurrency)],
        "engines": (engine_records(cfg.model_repository, (gen_model, bt.UNET, COND.triton))
                    if cfg.reads_onnx else {}),  # (what the ONNX / served paths ran with)
    }
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / "results.json").write_text(json.dumps(result, indent=2))
    (cfg.out_dir / "results.md").write_text(markdown(result))
    print("\n" + markdown(result))
    print(f"written {cfg.out_dir / 'results.json'} and {cfg.out_dir / 'results.md'}")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(p, GatewayBenchConfig, exclude=("seed", "log_dir"),
                       choices={"generator": list(catalog.GANS), "paths": PATHS, "device": bt.DEVICES},
                       help={"fast_sampler": "SAMPLER:STEPS compared with ddpm:100",
                             "concurrency": "closed-loop client counts of the batch-1 sweep (0 = no sweep)",
                             "device": "cuda: the same table on a GPU (eager CUDA, ONNX Runtime CUDA + TensorRT EPs, "
                                       "Triton on model_repository_gpu/, gateway) plus Locust; needs "
                                       "pip install -e '.[gpu]'",
                             "locust_time_s": f"seconds of Locust against the gateway (default "
                                              f"{LOCUST_TIME_S_CUDA:g} with --device cuda, else 0 = none)"})
    p.add_argument("--quick", action="store_true", help="5 generator repeats, 1 per denoise cell, batch 1 only, "
                                                        "concurrency 1 and 4 with few requests")
    p.add_argument("--render", action="store_true", help="measure nothing: rewrite OUT_DIR/results.md from its "
                                                         "results.json (after a change to the report's layout)")
    a = p.parse_args(argv)
    if a.render:
        out = Path(a.out_dir) if a.out_dir else GatewayBenchConfig.out_dir
        src = out / "results.json"
        if not src.is_file():
            p.error(f"--render: {src} does not exist; run the bench first")
        (out / "results.md").write_text(markdown(json.loads(src.read_text())))
        print(f"written {out / 'results.md'} from {src}")
        return 0
    quick = dict(generator_repeats=5, denoise_batches=(1,), ddpm_repeats=1, fast_repeats=1, overhead_repeats=50,
                 cond_batches=(1,), concurrency=(1, 4), concurrency_requests=40, concurrency_denoise_requests=4)
    quick = {k: v for k, v in quick.items() if getattr(a, k, None) is None}  # options given win over --quick
    cfg = dataclass_from_args(GatewayBenchConfig, a, parser=p, **(quick if a.quick else {}))
    # SIGTERM unwinds like Ctrl-C, so the Triton and gateway this run started are stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
