"""Which engine runs a single-shot model at a given batch size: ONNX Runtime below a measured threshold, TorchScript
(frozen, torch.jit.optimize_for_inference, oneDNN) at and above it. Shared by training.export (measures once, after
the export) and serving.triton_backend (reads the measurement, or measures at the first start when it is missing).

Why per batch size: on CPU, ONNX Runtime has the lower fixed cost (fastest at batch 1), but its ConvTranspose loops
over the batch while PyTorch's oneDNN deconvolution takes the whole batch (faster from tens of rows on).

The measurement lands in <model>/<version>/engines.json (ENGINES_FILE):
    {"threshold": 16 | null,                # TorchScript at batch >= threshold; null = ONNX Runtime at every batch
     "ort_multithread_from": 8 | 1 | null,  # ONNX Runtime with all its threads from this batch on; below it with one
                                            # thread (null: one thread at every batch; 1: all threads everywhere)
     "ort_split_from": 16 | 1 | null,       # from this batch on, ONNX Runtime's threads run the batch split over
                                            # one-thread sessions side by side instead of one session's intra-op
                                            # pool (null: never)
     "batches": [1, 4, ...],
     "ms_per_sample": {"onnxruntime": {"1": 0.31, ...}, "onnxruntime-1thread": {...}, "onnxruntime-split": {...},
                       "torchscript": {...}},
     "median_ms_per_sample": {...},
     "machine": {"cpu": ..., "cores": 2, "threads": 2, "omp_wait_policy": "PASSIVE", "onnxruntime": ..., "torch": ...},
     "checkpoint_sha256": ..., "measured_by": "export" | "triton-initialize", "measured_at": ISO time}

Batch-parallel ONNX Runtime (ORT_SPLIT): with N threads, a batch can also run as N chunks on N one-thread sessions
side by side (session.run releases the GIL). On these small convolutions (16-128 channels) one session's intra-op pool
synchronises per operator; the chunks never wait for each other: measured on a 2-core EPYC, ms/sample, split vs
intra-op: UNet batch 16 0.93 vs 1.17, generator batch 64 0.130 vs 0.170. Measured per machine like the rest.

Threads: `resolve_threads("0")` = the cores this process may use (CPU affinity, capped by a cgroup CPU quota).
torch's OpenMP pool runs with OMP_WAIT_POLICY=PASSIVE (OMP_ENV, set before torch is imported; an explicit setting
wins): idle OpenMP threads sleep instead of spinning. On shared cores, and next to ONNX Runtime's own pool in the same
process, spinning threads made TorchScript 10-100x slower at small batches (each parallel region waits for a thread
the OS descheduled). Measurements run in a subprocess with the same environment as the served models
(`python -m mnistgen.engine`, measure_in_subprocess).
Only numpy, onnxruntime and (lazily) torch: importable inside Triton's python-backend stub.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

ENGINES_FILE = "engines.json"
ORT, TORCHSCRIPT = "onnxruntime", "torchscript"
ENGINES = (ORT, TORCHSCRIPT)
# measurement column: ONNX Runtime with ONE intra-op thread, next to ORT with the instance's threads (when > 1). At
# small batches a parallel region costs more than it saves (idle workers sleep, OMP_WAIT_POLICY / allow_spinning 0,
# and waking them is per operator), so the served model may run ORT single-threaded below a measured batch size.
ORT_1T = "onnxruntime-1thread"
# measurement column: the batch split into `threads` chunks run side by side on one-thread sessions (SplitOrtRunner)
ORT_SPLIT = "onnxruntime-split"
SPLIT, INTRA_OP = "split", "intra-op"
# config.pbtxt parameter `ort_parallel`: auto = engines.json's `ort_split_from`; split = split from batch 2 on (where
# the instance runs ONNX Runtime multi-threaded); intra-op = never split
ORT_PARALLEL = ("auto", SPLIT, INTRA_OP)
# measurement column: TorchScript traced in bfloat16 (BF16_FILE: fp32 in and out, bf16 weights and activations inside;
# oneDNN's bf16 kernels on CPUs with AVX512_BF16 / AMX). Served as the TorchScript engine when it beats fp32
# TorchScript AND its outputs stay within BF16_MEAN_TOL of fp32's (record["bf16"]); config.pbtxt `precision` overrides.
TORCHSCRIPT_BF16 = "torchscript-bf16"
BF16_FILE = "model_bf16.pt"
FP32, BF16 = "fp32", "bf16"
PRECISIONS = ("auto", FP32, BF16)  # config.pbtxt parameter `precision` (of the TorchScript engine)
BF16_MEAN_TOL = 0.01  # mean |bf16 - fp32| over a measured batch: 1.3 8-bit grey levels on [-1, 1] images
RUNTIMES = ("auto",) + ENGINES  # config.pbtxt parameter `runtime`: auto = per batch size, or one engine always
GENERATOR_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # what export measures for the GAN generators
UNET_BATCHES = (1, 4, 16, 64)  # the DDPM UNet: 10-100x the work per row, so fewer and smaller cells

Feeds = dict  # input name -> np.ndarray with a leading batch axis
OMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}  # defaults for the processes that run TorchScript (before torch loads)


def set_torch_env() -> None:
    """OMP_ENV defaults into os.environ; effective only before torch is first imported in this process."""
    for k, v in OMP_ENV.items():
        os.environ.setdefault(k, v)


# -- cores and threads -----------------------------------------------------------------------------


def cgroup_cpu_quota(root: str | Path = "/sys/fs/cgroup") -> float | None:
    """CPUs granted by the cgroup CPU quota (v2 cpu.max, v1 cpu.cfs_quota_us / cpu.cfs_period_us); None = no quota."""
    root = Path(root)
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # "max 100000" or "150000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity set, capped by the cgroup quota (rounded up), at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        n = min(n, math.ceil(quota))
    return max(1, n)


def resolve_threads(value: str | int | None) -> int:
    """The `intra_op_threads` parameter: a positive number as given; "0", "" or absent = available_cores()."""
    try:
        n = int(value or 0)
    except ValueError:
        raise ValueError(f"intra_op_threads must be an integer >= 0 (0 = the cores this process may use), "
                         f"got {value!r}") from None
    if n < 0:
        raise ValueError(f"intra_op_threads must be >= 0 (0 = the cores this process may use), got {n}")
    return n or available_cores()


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(threads: int) -> dict:
    """What a measurement depends on besides the model: compared before a recorded threshold is trusted."""
    import onnxruntime as ort
    import torch

    return {"cpu": cpu_name(), "cores": available_cores(), "threads": int(threads),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", OMP_ENV["OMP_WAIT_POLICY"]),  # what serving uses
            "onnxruntime": ort.__version__, "torch": torch.__version__.split("+")[0]}


# -- engines -----------------------------------------------------------------------------------------


def ort_session(onnx_path: str | Path, threads: int, allow_spinning: str = "0", providers: list | None = None):
    """An ONNX Runtime session with `threads` intra-op threads (inter-op 1), all graph optimisations."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    # spinning worker threads burn the core they wait on: on a shared machine, and next to torch's own thread pool
    # in the same process (onnxruntime issue 13808), they slow everything down
    opts.add_session_config_entry("session.intra_op.allow_spinning", str(allow_spinning))
    return ort.InferenceSession(str(onnx_path), sess_options=opts, providers=providers or ["CPUExecutionProvider"])


def load_torchscript(path: str | Path, channels_last: bool = False):
    """model.pt frozen and optimised for inference (conv-bn folding, oneDNN layouts where they pay)."""
    import torch

    module = torch.jit.load(str(path), map_location="cpu").eval()
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    return torch.jit.optimize_for_inference(torch.jit.freeze(module))


class OrtRunner:
    """feeds -> list of outputs (in output_names order) through an ONNX Runtime session."""

    engine = ORT

    def __init__(self, session, output_names: list[str]):
        self.session, self.output_names = session, list(output_names)

    def __call__(self, feeds: Feeds) -> list[np.ndarray]:
        return self.session.run(self.output_names, feeds)


class SplitOrtRunner:
    """feeds -> outputs with the batch split into up to len(sessions) contiguous chunks, run side by side on one-thread
    ONNX Runtime sessions of the same model (the caller's thread runs the first chunk) and concatenated in order: the
    same rows out as one session's run, batch-parallel instead of operator-parallel."""

    engine = ORT

    def __init__(self, sessions: list, output_names: list[str]):
        from concurrent.futures import ThreadPoolExecutor

        if not sessions:
            raise ValueError("SplitOrtRunner needs at least one session")
        self.sessions, self.output_names = list(sessions), list(output_names)
        self.pool = ThreadPoolExecutor(max(1, len(sessions) - 1), thread_name_prefix="ort-split")

    def __call__(self, feeds: Feeds) -> list[np.ndarray]:
        batch = len(next(iter(feeds.values())))
        k = min(len(self.sessions), batch)
        if k <= 1:
            return self.sessions[0].run(self.output_names, feeds)
        bounds = np.linspace(0, batch, k + 1).astype(int)  # k chunks, sizes differing by at most one row
        chunks = [{n: v[bounds[i]:bounds[i + 1]] for n, v in feeds.items()} for i in range(k)]
        futures = [self.pool.submit(s.run, self.output_names, c) for s, c in zip(self.sessions[1:], chunks[1:])]
        parts = [self.sessions[0].run(self.output_names, chunks[0])] + [f.result() for f in futures]
        return [np.concatenate([p[j] for p in parts]) for j in range(len(self.output_names))]


def split_runner(onnx_path: str | Path, threads: int, output_names: list[str], allow_spinning: str = "0",
                 providers: list | None = None) -> SplitOrtRunner:
    """A SplitOrtRunner over `threads` one-thread sessions of onnx_path."""
    return SplitOrtRunner([ort_session(onnx_path, 1, allow_spinning, providers) for _ in range(max(1, threads))],
                          output_names)


class TorchScriptRunner:
    """feeds -> list of outputs through a TorchScript module; inputs are passed positionally, in `input_names` order
    (the order of the traced forward's arguments, which is also the ONNX export's input order)."""

    engine = TORCHSCRIPT

    def __init__(self, module, input_names: list[str]):
        import torch

        self.torch, self.module, self.input_names = torch, module, list(input_names)

    def __call__(self, feeds: Feeds) -> list[np.ndarray]:
        with self.torch.inference_mode():
            out = self.module(*[self.torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.input_names])
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return [o.contiguous().numpy() for o in outs]


# -- measurement -------------------------------------------------------------------------------------


def random_feeds(session, batch: int) -> Feeds:
    """Measurement inputs for an ONNX Runtime session's inputs: standard normal floats, integers in [0, 1000)
    (the UNet's timesteps)."""
    rng = np.random.default_rng(0)
    feeds = {}
    for i in session.get_inputs():
        shape = (batch, *[int(d) for d in i.shape[1:]])
        if i.name == "class_labels":  # a class-conditional UNet: digits 0-9 and the null class 10
            feeds[i.name] = rng.integers(0, 11, size=shape, dtype=np.int64)
        elif "int" in i.type:
            feeds[i.name] = rng.integers(0, 1000, size=shape, dtype=np.int64)
        else:
            feeds[i.name] = rng.standard_normal(shape, dtype=np.float32)
    return feeds


def _quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def measure(runners: dict[str, Callable[[Feeds], object]], make_feeds: Callable[[int], Feeds],
            batches: tuple[int, ...], budget_s: float = 1.0, min_rounds: int = 5, max_rounds: int = 30,
            warmup: int = 3) -> dict:
    """ms per sample of every runner at every batch size.

    Per batch: `warmup` untimed calls of each runner, then rounds of one timed call per runner, the order alternating
    round to round (so slow phases of a shared machine hit both engines alike), as many rounds as fit `budget_s`
    (between min_rounds and max_rounds). Reports the fastest call (what decides: on a shared machine other load only
    ever adds time, so the minimum is the engine's own speed) and the median.
    """
    names = list(runners)
    best: dict[str, dict[str, float]] = {n: {} for n in names}
    med: dict[str, dict[str, float]] = {n: {} for n in names}
    for b in batches:
        feeds = make_feeds(b)
        first = {}
        for n in names:
            t0 = time.perf_counter()
            for _ in range(warmup):
                runners[n](feeds)
            first[n] = (time.perf_counter() - t0) / max(warmup, 1)
        per_round = sum(first.values())
        rounds = int(min(max_rounds, max(min_rounds, budget_s / max(per_round, 1e-6))))
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            for n in (names if r % 2 == 0 else names[::-1]):
                t0 = time.perf_counter()
                runners[n](feeds)
                times[n].append((time.perf_counter() - t0) * 1e3 / b)
        for n in names:
            best[n][str(b)] = round(min(times[n]), 5)
            med[n][str(b)] = round(_quantile(times[n], 0.5), 5)
    return {"batches": list(batches), "ms_per_sample": best, "median_ms_per_sample": med}


def choose_crossover(ms_per_sample: dict[str, dict[str, float]], batches: list[int], low: str, high: str) -> int | None:
    """The smallest measured batch b from which engine `high` beats `low` and stays ahead: it wins at most of the
    measured batches from b on, and its total over them is lower (one noisy cell does not move the crossover).
    None: `high` never qualifies (`low` at every batch size)."""
    lo, hi = ms_per_sample.get(low, {}), ms_per_sample.get(high, {})
    sizes = sorted(b for b in batches if str(b) in lo and str(b) in hi)
    for i, b in enumerate(sizes):
        above = sizes[i:]
        wins = sum(hi[str(c)] < lo[str(c)] for c in above)
        if (hi[str(b)] < lo[str(b)] and 2 * wins > len(above)
                and sum(hi[str(c)] for c in above) < sum(lo[str(c)] for c in above)):
            return b
    return None


def choose_threshold(ms_per_sample: dict[str, dict[str, float]], batches: list[int]) -> int | None:
    """The batch size from which TorchScript beats ONNX Runtime (choose_crossover); None = ONNX Runtime always."""
    return choose_crossover(ms_per_sample, batches, ORT, TORCHSCRIPT)


def choose_split_from(ms_per_sample: dict[str, dict[str, float]], batches: list[int]) -> int | None:
    """The batch size from which the batch split over one-thread sessions beats one session's intra-op threads and
    stays ahead (choose_crossover); None without a split column or when intra-op wins throughout."""
    if ORT_SPLIT not in ms_per_sample:
        return None
    return choose_crossover(ms_per_sample, batches, ORT, ORT_SPLIT)


def parallel_column(ms_per_sample: dict[str, dict[str, float]], split_from: int | None = None) -> dict[str, float]:
    """ONNX Runtime's all-threads column as served: the split column from split_from on, intra-op below it."""
    ort, split = ms_per_sample.get(ORT, {}), ms_per_sample.get(ORT_SPLIT, {})
    return {b: (split[b] if split_from is not None and int(b) >= split_from and b in split else v)
            for b, v in ort.items()}


def choose_ort_multithread_from(ms_per_sample: dict[str, dict[str, float]], batches: list[int],
                                split_from: int | None = None) -> int | None:
    """The batch size from which ONNX Runtime with all its threads (split from split_from on) beats it with one
    (choose_crossover); 1 when no one-thread column was measured (instances with one thread), None when one thread
    wins at every batch."""
    if ORT_1T not in ms_per_sample:
        return 1
    return choose_crossover({ORT: parallel_column(ms_per_sample, split_from), ORT_1T: ms_per_sample[ORT_1T]},
                            batches, ORT_1T, ORT)


def ort_as_served(ms_per_sample: dict[str, dict[str, float]], multithread_from: int | None,
                  split_from: int | None = None) -> dict[str, float]:
    """ONNX Runtime's ms/sample per batch as the served model runs it: one thread below multithread_from, all threads
    from it on (split from split_from on)."""
    ort, one = parallel_column(ms_per_sample, split_from), ms_per_sample.get(ORT_1T, {})
    return {b: (v if multithread_from is not None and int(b) >= multithread_from else one.get(b, v))
            for b, v in ort.items()}


def effective_split_from(record: dict | None, threads: int, override: str | None = "auto") -> int | None:
    """From which batch a model with `threads` threads runs ONNX Runtime split over one-thread sessions: the
    `ort_parallel` parameter when set (split: from 2 rows on; intra-op: never), else the record's measured
    `ort_split_from`; None (never) for one thread or without a record."""
    v = (override or "auto").strip().lower()
    if v not in ORT_PARALLEL:
        raise ValueError(f"ort_parallel must be one of {ORT_PARALLEL}, got {override!r}")
    if threads <= 1 or v == INTRA_OP:
        return None
    if v == SPLIT:
        return 2
    return (record or {}).get("ort_split_from")


def effective_multithread_from(record: dict | None, threads: int, threshold: int | None) -> int | None:
    """The record's `ort_multithread_from` as a model with `threads` intra-op threads and this TorchScript threshold
    serves it: 1 (no one-thread session) for a one-thread instance, without a record, or when TorchScript serves
    every batch."""
    if threads <= 1 or (threshold is not None and threshold <= 1):
        return 1
    return (record or {}).get("ort_multithread_from", 1)


def engine_for(batch: int, threshold: int | None, multithread_from: int | None = 1,
               split_from: int | None = None) -> str:
    """Which runner serves `batch`: TORCHSCRIPT from the threshold on, else ORT_1T below multithread_from, else
    ORT_SPLIT from split_from on, else ORT. (A one-row batch on ORT_SPLIT is one chunk on one one-thread session:
    what the split column measured at batch 1, so the crossovers and the served runner agree.)"""
    if threshold is not None and batch >= threshold:
        return TORCHSCRIPT
    if multithread_from is None or batch < multithread_from:
        return ORT_1T
    return ORT_SPLIT if split_from is not None and batch >= split_from else ORT


def bf16_native() -> bool:
    """oneDNN has native bfloat16 kernels on this CPU (AVX512_BF16 / AMX); without them bf16 is emulated and slower
    than fp32, so it is not measured."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def output_diff(reference: Callable[[Feeds], list], other: Callable[[Feeds], list], feeds: Feeds) -> dict:
    """mean and max |other - reference| over the first output on these feeds."""
    d = np.abs(np.asarray(other(feeds)[0], np.float32) - np.asarray(reference(feeds)[0], np.float32))
    return {"mean_abs_diff": round(float(d.mean()), 6), "max_abs_diff": round(float(d.max()), 6)}


def choose_precision(ms_per_sample: dict[str, dict[str, float]], batches: list[int], bf16: dict | None) -> str:
    """BF16 when the bf16 column was measured, its outputs are within BF16_MEAN_TOL of fp32 TorchScript's
    (bf16["within_tolerance"]) and it beats fp32 TorchScript from some batch on (choose_crossover); else FP32."""
    if not (bf16 or {}).get("within_tolerance") or TORCHSCRIPT_BF16 not in ms_per_sample:
        return FP32
    return BF16 if choose_crossover(ms_per_sample, batches, TORCHSCRIPT, TORCHSCRIPT_BF16) is not None else FP32


def request_groups(sizes: list[int], threshold: int | None) -> list[tuple[list[int], bool]]:
    """Queued requests (their row counts) -> (request indices, on TorchScript?) groups that run together: those below
    the TorchScript threshold on ONNX Runtime (whatever their total) and those at or above it on TorchScript, each in
    queue order, empty groups left out. Choosing by a request's own size, not the batch total, keeps its result
    independent of what it was batched with (ONNX Runtime and TorchScript differ by float rounding, by bf16's when
    TorchScript runs in bf16; each alone gives a row the same result in any batch)."""
    low = [i for i, n in enumerate(sizes) if threshold is None or n < threshold]
    high = [i for i, n in enumerate(sizes) if threshold is not None and n >= threshold]
    return [(g, on_ts) for g, on_ts in ((low, False), (high, True)) if g]


def measure_engines(onnx_path: str | Path, ts_path: str | Path, batches: tuple[int, ...], threads: int,
                    allow_spinning: str = "0", budget_s: float = 1.0, bf16_path: str | Path | None = None,
                    **record) -> dict:
    """Measure ONNX Runtime vs TorchScript (as served: frozen, optimised) on these files with `threads` threads (and
    ONNX Runtime with one thread too, when threads > 1; TorchScript in bf16 too, from bf16_path, where the CPU has
    native bf16), on random inputs (random_feeds); returns the engines.json record (`record` adds fields, e.g.
    measured_by)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    bf16 = None
    try:
        session = ort_session(onnx_path, threads, allow_spinning)
        inputs, outputs = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
        runners = {ORT: OrtRunner(session, outputs), TORCHSCRIPT: TorchScriptRunner(load_torchscript(ts_path), inputs)}
        if threads > 1:
            runners[ORT_SPLIT] = split_runner(onnx_path, threads, outputs, allow_spinning)
            runners[ORT_1T] = OrtRunner(runners[ORT_SPLIT].sessions[0], outputs)  # a one-thread session already
        if bf16_path is not None and Path(bf16_path).exists():
            bf16 = {"native": bf16_native(), "tolerance": BF16_MEAN_TOL}
            if bf16["native"]:
                runners[TORCHSCRIPT_BF16] = TorchScriptRunner(load_torchscript(bf16_path), inputs)
                bf16.update(output_diff(runners[TORCHSCRIPT], runners[TORCHSCRIPT_BF16],
                                        random_feeds(session, min(64, max(batches)))))
                bf16["within_tolerance"] = bf16["mean_abs_diff"] <= BF16_MEAN_TOL
        table = measure(runners, lambda b: random_feeds(session, b), tuple(batches), budget_s=budget_s)
    finally:
        torch.set_num_threads(before)
    ms = table["ms_per_sample"]
    split_from = choose_split_from(ms, table["batches"])
    multithread_from = choose_ort_multithread_from(ms, table["batches"], split_from)
    ort_served = ort_as_served(ms, multithread_from, split_from)
    thresholds = {p: choose_threshold({ORT: ort_served, TORCHSCRIPT: ms[col]}, table["batches"])
                  for p, col in ((FP32, TORCHSCRIPT), (BF16, TORCHSCRIPT_BF16)) if col in ms}
    precision = choose_precision(ms, table["batches"], bf16)
    return {"threshold": thresholds[precision], "torchscript_precision": precision,
            **{f"threshold_{p}": t for p, t in thresholds.items()}, "bf16": bf16,
            "ort_multithread_from": multithread_from, "ort_split_from": split_from, **table,
            "machine": machine(threads), "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"), **record}


def measure_in_subprocess(onnx_path: str | Path, ts_path: str | Path, batches: tuple[int, ...], threads: int,
                          allow_spinning: str = "0", budget_s: float = 1.0, bf16_path: str | Path | None = None,
                          **record) -> dict:
    """measure_engines in a fresh `python -m mnistgen.engine` with OMP_ENV (as the served models run), not in a
    process whose torch is already loaded with other settings (export's)."""
    env = dict(os.environ)
    for k, v in OMP_ENV.items():
        env.setdefault(k, v)
    cmd = [sys.executable, "-m", "mnistgen.engine", str(onnx_path), str(ts_path), "--batches",
           ",".join(map(str, batches)), "--threads", str(threads), "--allow-spinning", str(allow_spinning),
           "--budget-s", str(budget_s), "--record", json.dumps(record)]
    if bf16_path is not None:
        cmd += ["--bf16", str(bf16_path)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"engine measurement failed ({' '.join(cmd[:4])} ...): {out.stderr[-2000:]}")
    return json.loads(out.stdout)


def main(argv: list[str] | None = None) -> int:
    """`python -m mnistgen.engine MODEL.onnx MODEL.pt --threads N`: the engines.json record on stdout."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("onnx")
    p.add_argument("torchscript")
    p.add_argument("--batches", default=",".join(map(str, GENERATOR_BATCHES)))
    p.add_argument("--threads", default="0", help="0 = the cores this process may use")
    p.add_argument("--allow-spinning", default="0")
    p.add_argument("--budget-s", type=float, default=1.0)
    p.add_argument("--record", default="{}", help="JSON object of extra fields for the record")
    p.add_argument("--bf16", default=None, help=f"the bf16 TorchScript ({BF16_FILE}) to measure beside model.pt")
    a = p.parse_args(argv)
    import warnings

    warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notices
    record = measure_engines(a.onnx, a.torchscript, tuple(int(b) for b in a.batches.split(",")),
                             resolve_threads(a.threads), a.allow_spinning, a.budget_s, a.bf16, **json.loads(a.record))
    print(json.dumps(record))
    return 0


# -- the record --------------------------------------------------------------------------------------


def read_record(path: str | Path) -> dict | None:
    """engines.json, or None when missing or unreadable."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "threshold" in record else None


def write_record(path: str | Path, record: dict) -> bool:
    """Atomically (re)write engines.json; False when the directory is read-only (the record stays in memory)."""
    path = Path(path)
    try:
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".engines-", suffix=".tmp", delete=False) as f:
            json.dump(record, f, indent=1)
            f.write("\n")
        os.replace(f.name, path)
        return True
    except OSError:
        with contextlib.suppress(OSError, UnboundLocalError):
            os.unlink(f.name)
        return False


def record_matches(record: dict | None, checkpoint_sha: str, threads: int, bf16_file: bool = False) -> bool:
    """The record was measured for this export, with these threads, on this kind of machine (and, where a bf16
    TorchScript exists beside model.pt, with its column or the finding that this CPU has no native bf16)."""
    if not record or (bf16_file and not record.get("bf16")):
        return False
    m = record.get("machine", {})
    here = machine(threads)
    return (record.get("checkpoint_sha256") == checkpoint_sha
            and (("ort_multithread_from" in record and "ort_split_from" in record)  # the one-thread and split columns
                 or threads <= 1)
            and all(m.get(k) == here[k] for k in ("cpu", "cores", "threads", "omp_wait_policy", "onnxruntime",
                                                  "torch")))


@contextlib.contextmanager
def measuring_lock():
    """One measurement at a time on this machine (Triton loads models in parallel; they would time each other)."""
    import fcntl

    with open(Path(tempfile.gettempdir()) / "mnistgen-engine-measure.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# -- the choice --------------------------------------------------------------------------------------


def parse_threshold(value: str | None) -> tuple[bool, int | None]:
    """The `engine_threshold` parameter: (overridden?, threshold). "" / "auto" = use the measurement; "none" = ONNX
    Runtime at every batch; N >= 1 = TorchScript from batch N on."""
    v = (value or "auto").strip().lower()
    if v == "auto":
        return False, None
    if v in ("none", "never", "off"):
        return True, None
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"engine_threshold must be auto, none or an integer >= 1, got {value!r}")
    return True, n


def effective_precision(value: str | None, record: dict | None, bf16_file: bool) -> str:
    """The `precision` parameter of the TorchScript engine: "fp32"; "bf16" (needs BF16_FILE); "auto" / absent = the
    record's measured choice (torchscript_precision), fp32 without a bf16 file or a record."""
    v = (value or "auto").strip().lower()
    if v not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {value!r}")
    if v == BF16 and not bf16_file:
        raise ValueError(f"precision bf16 needs {BF16_FILE} beside model.pt: re-run `python -m training.export --force`")
    if v == "auto":
        v = (record or {}).get("torchscript_precision", FP32) if bf16_file else FP32
    return v


def effective_threshold(runtime: str, engine_threshold: str | None, record: dict | None,
                        precision: str | None = None) -> tuple[int | None, str]:
    """(threshold, where it came from) for a model's runtime / engine_threshold parameters and its record; with a
    `precision`, the record's threshold measured for TorchScript in that precision (threshold_fp32 / threshold_bf16)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if runtime == ORT:
        return None, "runtime=onnxruntime"
    if runtime == TORCHSCRIPT:
        return 1, "runtime=torchscript"
    overridden, threshold = parse_threshold(engine_threshold)
    if overridden:
        return threshold, "engine_threshold parameter"
    if record is None:
        return None, "no measurement"
    return record.get(f"threshold_{precision}", record.get("threshold")) if precision else record.get("threshold"), \
        ENGINES_FILE


def summary(record: dict | None, threshold: int | None, source: str, ort_parallel: str | None = "auto",
            precision: str = FP32) -> dict:
    """What the gateway shows (config.pbtxt parameter `engines`): engines used, threshold, threads, how ONNX Runtime
    uses them, TorchScript's precision, cpu, and all of it in words (`description`, what ListModels shows).
    `ort_parallel`: the model's parameter of that name (auto = the record's ort_split_from)."""
    m = (record or {}).get("machine", {})
    engines = [ORT] if threshold is None else ([TORCHSCRIPT] if threshold <= 1 else [ORT, TORCHSCRIPT])
    threads = m.get("threads") or 1
    multithread_from = effective_multithread_from(record, threads, threshold)
    split_from = effective_split_from(record, threads, ort_parallel)
    return {"engines": engines, "threshold": threshold, "source": source, "threads": m.get("threads"),
            "ort_multithread_from": multithread_from, "ort_split_from": split_from,
            "torchscript_precision": precision if threshold is not None else None, "cpu": m.get("cpu"),
            "description": describe(threshold, engines, source, m.get("threads"), multithread_from, split_from,
                                    precision)}


def describe(threshold: int | None, engines: list[str] | None = None, source: str | None = None,
             threads: int | None = None, multithread_from: int | None = 1, split_from: int | None = None,
             precision: str = FP32) -> str:
    """The engine choice in words, as Triton logs it and the gateway's ListModels shows it: "onnxruntime (1 thread
    below batch 4, the batch split over 2 one-thread sessions from 16) for batch 1-31, torchscript bf16 from 32
    (engines.json, 2 threads)"."""
    ts = f"{TORCHSCRIPT} bf16" if precision == BF16 else TORCHSCRIPT
    parts = []
    last = None if threshold is None else int(threshold) - 1  # the largest batch ONNX Runtime serves
    if multithread_from is None or (last is not None and multithread_from > last):
        parts.append("1 thread")  # never, or not before TorchScript takes over, with all its threads
    else:
        if multithread_from > 1:
            parts.append(f"1 thread below batch {multithread_from}")
        start = max(split_from or 0, multithread_from)  # engine_for: ORT_SPLIT from split_from, not below 1 thread's
        if split_from is not None and threads != 1 and (last is None or start <= last):
            sessions = f"{threads} one-thread sessions" if threads else "one-thread sessions"
            parts.append(f"the batch split over {sessions}" + (f" from {start}" if start > multithread_from else ""))
    ort = f"{ORT} ({', '.join(parts)})" if parts else ORT
    if threshold is None:
        how = f"{ort if not engines or engines[0] == ORT else engines[0]} at every batch size"
    elif int(threshold) <= 1:
        how = f"{ts} at every batch size"
    else:
        how = f"{ort} for batch 1-{int(threshold) - 1}, {ts} from {int(threshold)}"
    extra = ", ".join(str(x) for x in (source, f"{threads} threads" if threads else None) if x)
    return f"{how} ({extra})" if extra else how


def warmup_batches(threshold: int | None, max_batch: int) -> list[int]:
    """TorchScript warm-up sizes: the threshold and powers of two above it up to max_batch (its profiling executor
    specialises on the first calls at a shape: the first requests should not pay for it)."""
    if threshold is None:
        return []
    sizes, b = [threshold], 1
    while b <= max_batch:
        if b > threshold:
            sizes.append(b)
        b *= 2
    return sorted(set(min(s, max_batch) for s in sizes))


if __name__ == "__main__":
    set_torch_env()
    sys.exit(main())
