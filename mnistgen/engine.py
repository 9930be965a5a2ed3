"""Which engine runs a single-shot model at a batch size: measured per machine, like cuDNN's benchmark mode, at export
or at model load, and cached beside the exported files in <model>/1/engines.json (untracked, never committed).

On CPU, ONNX Runtime has the lower fixed cost, but its ConvTranspose loops over the batch while PyTorch's oneDNN
deconvolution takes it whole: TorchScript (bf16 where the CPU has native bf16 kernels and it stays within
BF16_MEAN_TOL of fp32) from a measured batch size on. With N threads, ONNX Runtime's batch split over N one-thread
sessions beats one session's intra-op pool (which synchronises per operator) from a measured batch size on.
engines.json holds choose()'s fields, measure()'s table, bf16, machine(), checkpoint_sha256 and measured_by/at.
Only numpy, onnxruntime and (lazily) torch: importable in Triton's python backend.
"""
from __future__ import annotations

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
ORT, ORT_SPLIT, TORCHSCRIPT, TORCHSCRIPT_BF16 = "onnxruntime", "onnxruntime-split", "torchscript", "torchscript-bf16"
ORT_1T = "onnxruntime-1thread"  # a column of records measured before it was dropped (reports/bench/results.json)
BF16_FILE = "model_bf16.pt"  # TorchScript traced in bf16 behind an fp32 interface (GAN generators)
FP32, BF16 = "fp32", "bf16"
BF16_MEAN_TOL = 0.01  # mean |bf16 - fp32| over a measured batch: 1.3 8-bit grey levels on [-1, 1] images
GENERATOR_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # what is measured for the GAN generators
UNET_BATCHES = (1, 4, 16, 64)  # the DDPM UNet: 10-100x the work per row, so fewer and smaller cells
# for the processes that run TorchScript, before torch loads: spinning idle OpenMP threads made TorchScript 10-100x
# slower at small batches on shared cores next to ONNX Runtime's pool
OMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
Feeds = dict  # input name -> np.ndarray with a leading batch axis


def set_torch_env() -> None:
    """OMP_ENV defaults into os.environ; effective only before torch is first imported in this process."""
    for k, v in OMP_ENV.items():
        os.environ.setdefault(k, v)


def cgroup_cpu_quota(root: str | Path = "/sys/fs/cgroup") -> float | None:
    """CPUs granted by the cgroup CPU quota (v2 cpu.max, v1 cpu.cfs_quota_us / cpu.cfs_period_us); None = no quota."""
    root = Path(root)
    with contextlib.suppress(OSError, ValueError):
        quota, period = (root / "cpu.max").read_text().split()[:2]  # "max 100000" or "150000 100000"
        return None if quota == "max" else int(quota) / int(period)
    with contextlib.suppress(OSError, ValueError):
        quota, period = (int((root / "cpu" / f"cpu.cfs_{k}_us").read_text()) for k in ("quota", "period"))
        return None if quota <= 0 or period <= 0 else quota / period
    return None


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity set, capped by the cgroup quota (rounded up), at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, n if quota is None else min(n, math.ceil(quota)))


def machine(threads: int) -> dict:
    """What a measurement depends on besides the model: compared before a record is trusted."""
    import onnxruntime as ort
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": available_cores(), "threads": int(threads),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", OMP_ENV["OMP_WAIT_POLICY"]),
            "onnxruntime": ort.__version__, "torch": torch.__version__.split("+")[0]}


# -- engines -----------------------------------------------------------------------------------------


def ort_session(onnx_path: str | Path, threads: int, providers: list | None = None):
    """THE ONNX Runtime session builder: `threads` intra-op threads (inter-op 1), all graph optimisations, idle
    workers sleeping (spinning ones burn shared cores and fight torch's pool in the same process, onnxruntime#13808)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads, opts.inter_op_num_threads = int(threads), 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(onnx_path), sess_options=opts, providers=providers or ["CPUExecutionProvider"])


def load_torchscript(path: str | Path):
    """model.pt frozen and optimised for inference (conv-bn folding, oneDNN layouts where they pay)."""
    import torch

    return torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.load(str(path), map_location="cpu").eval()))


class OrtRunner:
    """feeds -> outputs (in output_names order). One session: it runs the batch. Several one-thread sessions: the
    batch split into up to len(sessions) contiguous chunks run side by side (session.run releases the GIL; the
    caller's thread runs the first) and concatenated in order: the same rows out, batch- instead of operator-parallel."""

    def __init__(self, sessions: list, output_names: list[str], engine: str = ORT):
        from concurrent.futures import ThreadPoolExecutor

        self.sessions, self.output_names, self.engine = list(sessions), list(output_names), engine
        self.pool = ThreadPoolExecutor(len(sessions) - 1, "ort-split") if len(sessions) > 1 else None

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


def split_runner(onnx_path: str | Path, threads: int, output_names: list[str]) -> OrtRunner:
    return OrtRunner([ort_session(onnx_path, 1) for _ in range(max(1, threads))], output_names, ORT_SPLIT)


class TorchScriptRunner:
    """feeds -> outputs through a TorchScript module; inputs positionally in `input_names` order (the traced forward's
    argument order, which is also the ONNX export's input order)."""

    def __init__(self, module, input_names: list[str], engine: str = TORCHSCRIPT):
        import torch

        self.torch, self.module, self.input_names, self.engine = torch, module, list(input_names), engine

    def __call__(self, feeds: Feeds) -> list[np.ndarray]:
        with self.torch.inference_mode():
            out = self.module(*[self.torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.input_names])
        return [o.contiguous().numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]


# -- measurement -------------------------------------------------------------------------------------


def random_feeds(session, batch: int) -> Feeds:
    """Inputs for a session: standard normal floats, timesteps in [0, 1000), class labels in 0..10 (10: null)."""
    rng = np.random.default_rng(0)
    feeds = {}
    for i in session.get_inputs():
        shape = (batch, *[int(d) for d in i.shape[1:]])
        if "int" in i.type:
            feeds[i.name] = rng.integers(0, 11 if i.name == "class_labels" else 1000, size=shape, dtype=np.int64)
        else:
            feeds[i.name] = rng.standard_normal(shape, dtype=np.float32)
    return feeds


def measure(runners: dict[str, Callable[[Feeds], object]], make_feeds: Callable[[int], Feeds],
            batches: tuple[int, ...], budget_s: float = 1.0, min_rounds: int = 5, max_rounds: int = 30,
            warmup: int = 3) -> dict:
    """ms per sample of every runner at every batch: `warmup` untimed calls, then rounds of one timed call each, the
    order alternating, as many as fit `budget_s`. The fastest decides (load only adds time); the median is kept."""
    best: dict[str, dict[str, float]] = {n: {} for n in runners}
    med: dict[str, dict[str, float]] = {n: {} for n in runners}
    for b in batches:
        feeds = make_feeds(b)
        t0 = time.perf_counter()
        for _ in range(warmup):
            for run in runners.values():
                run(feeds)
        per_round = (time.perf_counter() - t0) / max(warmup, 1)
        rounds = int(min(max_rounds, max(min_rounds, budget_s / max(per_round, 1e-6))))
        times: dict[str, list[float]] = {n: [] for n in runners}
        for r in range(rounds):
            for n in (list(runners) if r % 2 == 0 else list(runners)[::-1]):
                t0 = time.perf_counter()
                runners[n](feeds)
                times[n].append((time.perf_counter() - t0) * 1e3 / b)
        for n, ts in times.items():
            best[n][str(b)], med[n][str(b)] = round(min(ts), 5), round(sorted(ts)[len(ts) // 2], 5)
    return {"batches": list(batches), "ms_per_sample": best, "median_ms_per_sample": med}


def choose_crossover(ms: dict[str, dict[str, float]], batches: list[int], low: str, high: str) -> int | None:
    """The smallest measured batch b from which engine `high` beats `low` and stays ahead: it wins at b, at most of
    the batches from b on, and in total over them (one noisy cell does not move it). None: `low` at every batch."""
    lo, hi = ms.get(low, {}), ms.get(high, {})
    sizes = sorted(b for b in batches if str(b) in lo and str(b) in hi)
    for i, b in enumerate(sizes):
        above = [str(c) for c in sizes[i:]]
        if (hi[str(b)] < lo[str(b)] and 2 * sum(hi[c] < lo[c] for c in above) > len(above)
                and sum(hi[c] for c in above) < sum(lo[c] for c in above)):
            return b
    return None


def choose(ms: dict[str, dict[str, float]], batches: list[int], bf16: dict | None = None) -> dict:
    """The choice from a measured table: where the split beats one session's threads (ort_split_from), TorchScript's
    precision (bf16 where measured, within tolerance and faster than fp32 from some batch on) and where it beats
    ONNX Runtime as served (threshold)."""
    split_from = choose_crossover(ms, batches, ORT, ORT_SPLIT)
    served = {b: ms.get(ORT_SPLIT, {}).get(b, v) if split_from is not None and int(b) >= split_from else v
              for b, v in ms.get(ORT, {}).items()}
    precision = BF16 if ((bf16 or {}).get("within_tolerance")
                         and choose_crossover(ms, batches, TORCHSCRIPT, TORCHSCRIPT_BF16) is not None) else FP32
    ts = {BF16: TORCHSCRIPT_BF16, FP32: TORCHSCRIPT}[precision]
    return {"threshold": choose_crossover({ORT: served, ts: ms.get(ts, {})}, batches, ORT, ts),
            "torchscript_precision": precision, "ort_split_from": split_from}


def bf16_native() -> bool:
    """oneDNN has native bfloat16 kernels on this CPU (AVX512_BF16 / AMX); emulated bf16 is slower than fp32."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def measure_engines(onnx_path: str | Path, ts_path: str | Path, batches: tuple[int, ...], threads: int,
                    budget_s: float = 1.0, bf16_path: str | Path | None = None, **record) -> dict:
    """ONNX Runtime (one session; split over one-thread sessions when threads > 1) vs TorchScript as served (fp32;
    bf16 from bf16_path where the CPU has native bf16) with `threads` threads on random inputs -> the engines.json
    record (`record` adds fields, e.g. measured_by)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    bf16 = None
    try:
        session = ort_session(onnx_path, threads)
        inputs, outputs = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
        runners = {ORT: OrtRunner([session], outputs), TORCHSCRIPT: TorchScriptRunner(load_torchscript(ts_path), inputs)}
        if threads > 1:
            runners[ORT_SPLIT] = split_runner(onnx_path, threads, outputs)
        if bf16_path is not None and Path(bf16_path).exists():
            bf16 = {"native": bf16_native(), "tolerance": BF16_MEAN_TOL}
            if bf16["native"]:
                runners[TORCHSCRIPT_BF16] = TorchScriptRunner(load_torchscript(bf16_path), inputs)
                feeds = random_feeds(session, min(64, max(batches)))
                d = np.abs(runners[TORCHSCRIPT_BF16](feeds)[0] - runners[TORCHSCRIPT](feeds)[0])
                bf16.update(mean_abs_diff=round(float(d.mean()), 6), max_abs_diff=round(float(d.max()), 6),
                            within_tolerance=bool(d.mean() <= BF16_MEAN_TOL))
        table = measure(runners, lambda b: random_feeds(session, b), tuple(batches), budget_s=budget_s)
    finally:
        torch.set_num_threads(before)
    return {**choose(table["ms_per_sample"], table["batches"], bf16), "bf16": bf16, **table,
            "machine": machine(threads), "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"), **record}


def measure_in_subprocess(**kwargs) -> dict:
    """measure_engines(**kwargs) in a fresh `python -m mnistgen.engine` with OMP_ENV (as the served models run), not in
    a process whose torch already loaded with other settings (export's)."""
    cmd = [sys.executable, "-m", "mnistgen.engine", json.dumps(kwargs, default=str)]
    out = subprocess.run(cmd, env={**OMP_ENV, **os.environ}, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"engine measurement failed ({' '.join(cmd)}): {out.stderr[-2000:]}")
    return json.loads(out.stdout)


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
        os.replace(f.name, path)
        return True
    except OSError:
        with contextlib.suppress(OSError, NameError):
            os.unlink(f.name)
        return False


def record_matches(record: dict | None, checkpoint_sha: str, threads: int, bf16_file: bool = False) -> bool:
    """The record was measured for this export, with these threads, on this kind of machine, with the split column
    (threads > 1) and, where a bf16 TorchScript exists, its column or the finding that this CPU has no native bf16."""
    if not record or (bf16_file and not record.get("bf16")) or "ort_split_from" not in record:
        return False
    m, here = record.get("machine", {}), machine(threads)
    return record.get("checkpoint_sha256") == checkpoint_sha and all(m.get(k) == v for k, v in here.items())


@contextlib.contextmanager
def measuring_lock():
    """One measurement at a time on this machine (Triton loads models in parallel; they would time each other)."""
    import fcntl

    with open(Path(tempfile.gettempdir()) / "mnistgen-engine-measure.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


# -- the choice --------------------------------------------------------------------------------------


def engine_for(batch: int, threshold: int | None, multithread_from: int | None = 1,
               split_from: int | None = None) -> str:
    """Which runner serves `batch`: TORCHSCRIPT from the threshold on, else ORT_SPLIT from split_from on, else ORT
    (ORT_1T below multithread_from: records measured with that column). A one-row batch on ORT_SPLIT is one chunk
    on one one-thread session: what the split column measured at batch 1."""
    if threshold is not None and batch >= threshold:
        return TORCHSCRIPT
    if multithread_from is None or batch < multithread_from:
        return ORT_1T
    return ORT_SPLIT if split_from is not None and batch >= split_from else ORT


def describe(threshold: int | None, source: str | None = None, threads: int | None = None,
             multithread_from: int | None = 1, split_from: int | None = None, precision: str = FP32) -> str:
    """The choice in words, as the models log it: "onnxruntime (the batch split over 2 one-thread sessions from 4)
    for batch 1-15, torchscript bf16 from 16 (engines.json, 2 threads)"."""
    ts = f"{TORCHSCRIPT} bf16" if precision == BF16 else TORCHSCRIPT
    last = 1 << 30 if threshold is None else threshold - 1  # the largest batch ONNX Runtime serves
    one = multithread_from is None or multithread_from > last  # one thread wherever ONNX Runtime serves
    parts = ["1 thread"] if one else [f"1 thread below batch {multithread_from}"] if multithread_from > 1 else []
    start = max(split_from or 0, multithread_from or 0)
    if not one and split_from is not None and threads != 1 and start <= last:
        parts.append(f"the batch split over {f'{threads} ' if threads else ''}one-thread sessions"
                     + (f" from {start}" if start > multithread_from else ""))
    ort = f"{ORT} ({', '.join(parts)})" if parts else ORT
    how = (f"{ort} at every batch size" if threshold is None else f"{ts} at every batch size" if threshold <= 1
           else f"{ort} for batch 1-{last}, {ts} from {threshold}")
    extra = ", ".join(x for x in (source, f"{threads} threads" if threads else None) if x)
    return f"{how} ({extra})" if extra else how


def effective_split_from(record: dict | None, threads: int) -> int | None:
    """The record's ort_split_from as a model with `threads` threads serves it (never with one thread)."""
    return (record or {}).get("ort_split_from") if threads > 1 else None


def request_groups(sizes: list[int], threshold: int | None) -> list[tuple[list[int], bool]]:
    """Queued requests' row counts -> (request indices, on TorchScript?) groups run together, by each request's OWN
    size (not the batch total: its result never depends on what it was batched with), in queue order."""
    low = [i for i, n in enumerate(sizes) if threshold is None or n < threshold]
    high = [i for i, n in enumerate(sizes) if threshold is not None and n >= threshold]
    return [(g, on_ts) for g, on_ts in ((low, False), (high, True)) if g]


def warmup_batches(threshold: int | None, max_batch: int) -> list[int]:
    """TorchScript warm-up sizes (its profiling executor specialises on the first calls at a shape): the threshold
    and the powers of two above it up to max_batch."""
    if threshold is None:
        return []
    return sorted({min(s, max_batch) for s in [threshold] + [2**k for k in range(max_batch.bit_length()) if 2**k > threshold]})


if __name__ == "__main__":  # measure_in_subprocess: the keyword arguments as JSON in, the record as JSON out
    import warnings

    set_torch_env()
    warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notices
    print(json.dumps(measure_engines(**json.loads(sys.argv[1]))))
