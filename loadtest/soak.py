"""`make soak`: a long run at ~70% of measured capacity: errors, per-window p99 drift, gateway and Triton RSS growth.

    python -m loadtest.soak                          # 10 minutes (starts its own Triton + gateway on free ports)
    python -m loadtest.soak --duration 60 --window-s 10   # a short proof run

The mix: `--denoise-share` of the requests are Denoise of `--denoise-images` test-split images at `--sigma` (answers
checked: shape, values, sampler and steps echoed), the rest Generate of the GAN `--model`. The capacity is the best
throughput of a closed-loop ramp (loadtest.load); then requests go open-loop at `--load-fraction` x capacity for
`--duration` s, latency counted from the scheduled time (a stalled server cannot hide behind a slowed-down client),
while the RSS of the gateway and of Triton (+ its stubs) and the load average are sampled every second. Writes
out/soak/soak.json and soak.png; loadtest/reliability_report.py renders them into docs/reliability.md.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mnistgen import catalog
from mnistgen.cli import add_dataclass_args, dataclass_from_args
from mnistgen.files import CHECKPOINT_DIR, REPO_ROOT, official_test_split
from serving.client import TRANSPORTS, ClientError, GatewayClient
from serving.images import PIXELS, from_uint8

from .load import closed_loop, pct_ms, relative_paths

KINDS = ("generate", "denoise")
RAW_SLACK = 1e-3  # denoised raw pixels must lie in [-1, 1] up to float rounding


@dataclass
class SoakConfig:
    duration_s: float = 600.0  # the soak itself (after the capacity ramp)
    load_fraction: float = 0.7  # offered rate = this x measured capacity
    model: str = catalog.DEFAULT_MODEL  # a GAN of the catalog (cheap, batched by Triton)
    num_samples: tuple[int, ...] = (1, 4, 16)  # each Generate picks one uniformly
    denoise_share: float = 0.2  # share of requests that are Denoise, spread evenly (0.2 = 4 Generate : 1 Denoise)
    denoise_images: tuple[int, ...] = (1, 2, 4)  # each Denoise picks one uniformly (test-split images)
    sigma: float = 0.5  # Denoise noise level
    denoise_sampler: str = ""  # "" = the gateway's default (dpm-solver++)
    denoise_steps: int = 0  # 0 = the gateway's default (20)
    transports: tuple[str, ...] = ("grpc", "http")  # from TRANSPORTS; requests alternate between them
    ramp_clients: tuple[int, ...] = (1, 2, 4, 8)  # closed-loop clients per ramp step
    ramp_step_s: float = 15.0  # seconds per ramp step (Denoise calls take ~0.1-1 s: 5 s steps measured noise)
    window_s: float = 60.0  # p99 and error counts per window of this length ("per-minute p99")
    sample_interval_s: float = 1.0  # RSS sampling period
    timeout_s: float = 10.0  # per request: gRPC deadline / X-Request-Timeout
    workers: int = 32  # sender threads of the open-loop phase (enough to never be the bottleneck)
    seed: int = 0  # request mix (batch sizes, transports, request seeds)
    model_repository: Path = REPO_ROOT / "model_repository"
    checkpoint_dir: Path = CHECKPOINT_DIR
    out_dir: Path = REPO_ROOT / "out" / "soak"

    def __post_init__(self) -> None:
        limit, most = catalog.GANS[self.model].max_samples if self.model in catalog.GANS else 0, \
            catalog.DENOISER.max_samples
        for name, ok, want in (
                ("model", self.model in catalog.GANS, f"one of {list(catalog.GANS)}"),
                ("transports", self.transports and set(self.transports) <= set(TRANSPORTS),
                 f"a non-empty subset of {TRANSPORTS}"),
                ("load_fraction", 0 < self.load_fraction <= 1, "in (0, 1]"),
                ("num_samples", self.num_samples and all(1 <= n <= limit for n in self.num_samples), f"in 1..{limit}"),
                ("denoise_share", 0 <= self.denoise_share <= 1, "in [0, 1]"),
                ("denoise_images", self.denoise_images and all(1 <= n <= most for n in self.denoise_images),
                 f"in 1..{most}"),
                ("sigma", 0 < self.sigma <= 1, "in (0, 1]"),
                ("denoise_steps", 0 <= self.denoise_steps <= catalog.MAX_STEPS, f"in 0..{catalog.MAX_STEPS} (0 = default)"),
                *((n, getattr(self, n) > 0, "> 0") for n in ("duration_s", "ramp_step_s", "window_s",
                                                            "sample_interval_s", "timeout_s"))):
            if not ok:
                raise ValueError(f"{name} must be {want}, got {getattr(self, name)!r}")


# ---- the request mix -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One request of the mix: Generate (n samples) or Denoise (n test-split images)."""

    kind: str  # one of KINDS
    transport: str  # one of TRANSPORTS
    n: int
    seed: int


class Mix:
    """A stream of Jobs (one per ramp client, one for the soak): exactly cfg.denoise_share of them Denoise, spread
    evenly (an accumulator, not a coin per request), so a short ramp step measures the same mix as the soak."""

    def __init__(self, cfg: SoakConfig, rng: random.Random):
        self.cfg, self.rng = cfg, rng
        self.acc = rng.random()

    def next(self, transport: str | None = None) -> Job:
        self.acc += self.cfg.denoise_share
        kind = "denoise" if self.acc >= 1.0 else "generate"
        self.acc -= 1.0 if kind == "denoise" else 0.0
        n = self.rng.choice(self.cfg.denoise_images if kind == "denoise" else self.cfg.num_samples)
        return Job(kind, transport or self.rng.choice(self.cfg.transports), n, self.rng.randrange(2**31))


class Sender:
    """Sends jobs through serving.client (a GatewayClient per transport, shared by the threads): call(job) is "OK",
    the error's code, or WRONG_SHAPE / WRONG_ANSWER when a success lacks the images asked for (a Denoise's: finite,
    in [-1, 1], the sampler and steps echoed)."""

    def __init__(self, grpc_target: str, http_target: str, cfg: SoakConfig):
        self.cfg = cfg
        self.expect_sampler = cfg.denoise_sampler or catalog.DENOISER.sampler
        self.expect_steps = cfg.denoise_steps or catalog.DENOISER.default_steps(self.expect_sampler)
        self.images = from_uint8(official_test_split()[0]) if cfg.denoise_share > 0 else None  # (N, 1, 28, 28)
        self.clients = {t: GatewayClient(transport=t, target=grpc_target if t == "grpc" else http_target,
                                         timeout_s=cfg.timeout_s) for t in TRANSPORTS}

    def call(self, job: Job) -> str:
        c, n = self.clients[job.transport], job.n
        try:
            if job.kind == "generate":
                r = c.generate(self.cfg.model, n, job.seed)
                return "OK" if r.images.count == n and len(r.images.raw) == n * PIXELS * 4 else "WRONG_SHAPE"
            rows = random.Random(job.seed).sample(range(len(self.images)), n)
            r = c.denoise(self.images[rows], self.cfg.sigma, self.cfg.denoise_steps, self.cfg.denoise_sampler, job.seed)
        except ClientError as e:
            return e.code
        x = np.frombuffer(r.denoised.raw, "<f4")
        if x.size != n * PIXELS:
            return "WRONG_SHAPE"
        ok = np.isfinite(x).all() and np.abs(x).max() <= 1 + RAW_SLACK
        return "OK" if ok and (r.sampler, r.steps) == (self.expect_sampler, self.expect_steps) else "WRONG_ANSWER"

    def close(self) -> None:
        for c in self.clients.values():
            c.close()


# ---- process memory -------------------------------------------------------------------------------------
def rss_mib(pid: int, with_children: bool) -> float:
    """RSS of pid (+ all its descendants) in MiB; NaN when the process is gone."""
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p] + (p.children(recursive=True) if with_children else [])
    except psutil.NoSuchProcess:
        return float("nan")
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total / 2**20


class RssSampler(threading.Thread):
    """Every interval: (t, gateway MiB, Triton MiB = tritonserver + its stub processes, 1-minute load average)."""

    def __init__(self, gateway_pid: int, triton_pid: int, interval_s: float):
        super().__init__(daemon=True)
        self.pids, self.interval, self.samples, self.done = (gateway_pid, triton_pid), interval_s, [], threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append((time.monotonic(), *(rss_mib(pid, i == 1) if pid else float("nan")
                                                     for i, pid in enumerate(self.pids)), os.getloadavg()[0]))
            self.done.wait(self.interval)

    def stop(self) -> list[tuple[float, float, float, float]]:
        self.done.set()
        self.join(5)
        return self.samples


# ---- capacity ramp and the soak -------------------------------------------------------------------------
def ramp_step(sender: Sender, cfg: SoakConfig, clients: int, seconds: float, rng_seed: int) -> dict:
    """loadtest.load.closed_loop with the soak's mix for `seconds`: throughput (OK requests/s), latency
    percentiles, errors by code, requests per kind."""
    kinds = dict.fromkeys(KINDS, 0)
    streams = itertools.count()

    def make_call():
        mix = Mix(cfg, random.Random(rng_seed * 1000 + next(streams)))

        def call(_i: int) -> None:
            job = mix.next()
            kinds[job.kind] += 1
            if (code := sender.call(job)) != "OK":
                raise ClientError(code, "the soak's answer check")  # closed_loop counts errors by code
        return call

    r = closed_loop(make_call, clients, seconds=seconds)
    return {"clients": clients, "seconds": round(r["wall_s"], 2), "ok": r["ok"], "errors": r["error_codes"],
            "kinds": kinds, "throughput_rps": round(r["samples_per_s"], 2), "p50_ms": round(r["p50_ms"], 2),
            "p99_ms": round(r["p99_ms"], 2)}


def measure_capacity(sender: Sender, cfg: SoakConfig) -> tuple[float, list[dict]]:
    """Best closed-loop throughput over the ramp (stops early once two steps in a row do not beat the best by 5%:
    one step is not enough on shared cores, where a single slow step is often noise)."""
    steps: list[dict] = []
    flat = 0
    for i, c in enumerate(cfg.ramp_clients):
        s = ramp_step(sender, cfg, c, cfg.ramp_step_s, i)
        steps.append(s)
        print(f"  ramp: {c:3d} clients -> {s['throughput_rps']:7.1f} req/s, p50 {s['p50_ms']:.1f} ms, "
              f"p99 {s['p99_ms']:.1f} ms, errors {s['errors'] or 0}, {s['kinds']}", flush=True)
        best_before = max((x["throughput_rps"] for x in steps[:-1]), default=0.0)
        flat = flat + 1 if best_before and s["throughput_rps"] < 1.05 * best_before else 0
        if flat == 2:
            break
    return max(s["throughput_rps"] for s in steps), steps


Record = tuple[float, float, str, str, str, int]  # (scheduled, end, transport, kind, code, n)


def open_loop(sender: Sender, cfg: SoakConfig, rate: float) -> list[Record]:
    """Requests of the mix at fixed arrival times (rate per second) for cfg.duration_s; transports alternate."""
    mix = Mix(cfg, random.Random(cfg.seed))
    records: list[Record] = []
    lock = threading.Lock()

    def one(t_sched: float, job: Job) -> None:
        code = sender.call(job)
        with lock:
            records.append((t_sched, time.monotonic(), job.transport, job.kind, code, job.n))

    t0 = time.monotonic()
    total = int(cfg.duration_s * rate)
    with ThreadPoolExecutor(cfg.workers) as pool:
        for k in range(total):
            t_sched = t0 + k / rate
            delay = t_sched - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            pool.submit(one, t_sched, mix.next(cfg.transports[k % len(cfg.transports)]))
    return records


def _ms(records: list[Record], q: float, kind: str | None = None) -> float:
    """The q-th percentile latency (ms, from the scheduled time) of the OK records (of `kind`), rounded."""
    return round(pct_ms([r[1] - r[0] for r in records if r[4] == "OK" and kind in (None, r[3])], q), 2)


def windows(records: list[Record], rss, t0: float, window_s: float) -> list[dict]:
    """Per window (by scheduled time): requests, errors, p50/p99 (all, and p99 per kind), RSS and load average at
    its end."""
    out = []
    for w in range(max(1, int(np.ceil(max((r[0] - t0 for r in records), default=0) / window_s + 1e-9)))):
        hi = t0 + (w + 1) * window_s
        rs = [r for r in records if hi - window_s <= r[0] < hi]
        mem = ([s for s in rss if s[0] < hi + 1e-9] or [(0.0,) + (float("nan"),) * 3])[-1]
        out.append({"window": w, "t_start_s": round(w * window_s, 1), "requests": len(rs),
                    "errors": sum(r[4] != "OK" for r in rs), "p50_ms": _ms(rs, 50), "p99_ms": _ms(rs, 99),
                    "p99_ms_by_kind": {k: _ms(rs, 99, k) for k in KINDS}, "gateway_rss_mib": round(mem[1], 1),
                    "triton_rss_mib": round(mem[2], 1), "load_avg_1m": round(mem[3], 2)})
    return out


def rss_stats(during, col: int) -> dict:
    """Start, end, peak, growth (MiB and % of the start) and the fitted trend (MiB/min) of one RSS column."""
    ys = [s[col] for s in during if np.isfinite(s[col])]
    if not ys:
        return dict.fromkeys(("start_mib", "end_mib", "peak_mib", "growth_mib", "growth_pct"), None) | {
            "slope_mib_per_min": float("nan")}
    t = np.array([s[0] for s in during if np.isfinite(s[col])])
    slope = float(np.polyfit((t - t[0]) / 60.0, ys, 1)[0]) if len(ys) >= 3 else float("nan")
    return {"start_mib": round(ys[0], 1), "end_mib": round(ys[-1], 1), "peak_mib": round(max(ys), 1),
            "growth_mib": round(ys[-1] - ys[0], 1),
            "growth_pct": round(100 * (ys[-1] - ys[0]) / ys[0], 2) if ys[0] > 0 else None,
            "slope_mib_per_min": round(slope, 3)}


def summarize(cfg: SoakConfig, capacity: float, ramp: list[dict], rate: float, records: list[Record], rss,
              t0: float, started_utc: str = "") -> dict:
    codes = dict(Counter(r[4] for r in records))
    errors = sum(v for k, v in codes.items() if k != "OK")
    by_kind = {}
    for k in KINDS:
        rs = [r for r in records if r[3] == k]
        lat = [r[1] - r[0] for r in rs if r[4] == "OK"]
        by_kind[k] = {"requests": len(rs), "errors": sum(r[4] != "OK" for r in rs), "images": sum(r[5] for r in rs),
                      "p50_ms": _ms(rs, 50), "p99_ms": _ms(rs, 99), "max_ms": round(max(lat) * 1e3, 2) if lat else None}
    wins = windows(records, rss, t0, cfg.window_s)
    full = [w for w in wins if w["requests"]]
    first, last = (full[0], full[-1]) if full else ({}, {})
    during = [s for s in rss if s[0] >= t0]
    loads = [s[3] for s in during]
    wall = max((r[1] for r in records), default=t0) - t0
    lat_ok = [r[1] - r[0] for r in records if r[4] == "OK"]
    return {
        "config": relative_paths(asdict(cfg)),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "gpu_devices": len(list(Path("/dev").glob("nvidia[0-9]*"))), "started_utc": started_utc,
                    "load_avg_1m": {"min": round(min(loads), 2), "mean": round(float(np.mean(loads)), 2),
                                    "max": round(max(loads), 2)} if loads else None,
                    "load_avg_1m_end": round(os.getloadavg()[0], 2)},
        "capacity_rps": round(capacity, 2), "ramp": ramp, "offered_rps": round(rate, 2),
        "requests": len(records), "achieved_rps": round(len(records) / wall, 2) if wall > 0 else None,
        "by_kind": by_kind, "codes": codes, "errors": errors, "error_rate": round(errors / max(len(records), 1), 6),
        "latency_ms": {"p50": _ms(records, 50), "p99": _ms(records, 99),
                       "max": round(max(lat_ok) * 1e3, 2) if lat_ok else None},
        "p99_drift": {"first_window_ms": first.get("p99_ms"), "last_window_ms": last.get("p99_ms"),
                      "last_over_first": round(last["p99_ms"] / first["p99_ms"], 3)
                      if full and first["p99_ms"] > 0 else None,
                      "max_window_ms": max((w["p99_ms"] for w in full), default=None)},
        "rss": {"gateway": rss_stats(during, 1), "triton": rss_stats(during, 2)}, "windows": wins,
        "rss_series": [[round(s[0] - t0, 2), round(s[1], 1), round(s[2], 1), round(s[3], 2)] for s in rss],
    }


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    w, ws = res["windows"], res["config"]["window_s"]
    for q in ("p99", "p50"):
        a.step([x["t_start_s"] for x in w] + [w[-1]["t_start_s"] + ws], [x[f"{q}_ms"] for x in w] + [w[-1][f"{q}_ms"]],
               where="post", label=q)
    a.set_ylabel("latency (ms)")
    a.set_title(f"soak: {res['offered_rps']} req/s ({res['config']['load_fraction']:.0%} of "
                f"{res['capacity_rps']}), {res['errors']} errors")
    a.legend()
    s = np.array(res["rss_series"], dtype=float)
    if len(s):
        keep = s[:, 0] >= 0
        b.plot(s[keep, 0], s[keep, 1], label="gateway")
        b.plot(s[keep, 0], s[keep, 2], label="Triton (+ stubs)")
    b.set_ylabel("RSS (MiB)")
    b.set_xlabel("seconds into the soak")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(cfg: SoakConfig) -> dict:
    from serving.run import RunConfig, Stack
    from training.export import ExportConfig
    from training.export import run as export

    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    models = (catalog.GANS[cfg.model].triton,) + ((catalog.DENOISER.triton,) if cfg.denoise_share > 0 else ())
    export(ExportConfig(checkpoint_dir=cfg.checkpoint_dir, model_repository=cfg.model_repository, only=models))
    print(f"starting Triton ({', '.join(models)}) and the gateway ...", flush=True)
    with Stack(RunConfig(grpc_port=0, http_port=0, triton_http_port=0, model_repository=cfg.model_repository,
                         models=models, startup_timeout_s=600, log_dir=cfg.out_dir,
                         gateway_log=cfg.out_dir / "gateway.log")) as stack:
        sender = Sender(stack.gateway.grpc_target, stack.gateway.http_target, cfg)
        for t in cfg.transports:  # warm up every path (model configs cached, connections up)
            sender.call(Job("generate", t, max(cfg.num_samples), 0))
            if cfg.denoise_share > 0:
                sender.call(Job("denoise", t, max(cfg.denoise_images), 0))
        sampler = RssSampler(stack.gateway.proc.pid, stack.triton.proc.pid, cfg.sample_interval_s)
        sampler.start()
        print("measuring capacity ...", flush=True)
        capacity, ramp = measure_capacity(sender, cfg)
        rate = cfg.load_fraction * capacity
        print(f"capacity {capacity:.1f} req/s; soaking at {rate:.1f} req/s for {cfg.duration_s:.0f} s ...", flush=True)
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        t0 = time.monotonic()
        records = open_loop(sender, cfg, rate)
        rss = sampler.stop()
        sender.close()
    res = summarize(cfg, capacity, ramp, rate, records, rss, t0, started)
    if cfg.denoise_share > 0:  # what every OK Denoise answer echoed (else it counted as WRONG_ANSWER)
        res["denoise_checked"] = {"sampler": sender.expect_sampler, "steps": sender.expect_steps, "sigma": cfg.sigma}
    (cfg.out_dir / "soak.json").write_text(json.dumps(res, indent=2) + "\n")
    plot(res, cfg.out_dir / "soak.png")
    rss = ", ".join(f"{k} RSS {v['start_mib']} -> {v['end_mib']} MiB" for k, v in res["rss"].items())
    drift = res["p99_drift"]
    print(f"\n{res['requests']} requests at {res['offered_rps']} req/s: {res['errors']} errors {res['codes']}, p99 "
          f"{res['latency_ms']['p99']} ms (first window {drift['first_window_ms']}, last {drift['last_window_ms']}), "
          f"{rss}")
    print(f"written {cfg.out_dir / 'soak.json'} and soak.png (docs/reliability.md renders them: "
          "python -m loadtest.reliability_report collect-soak)")
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(p, SoakConfig, names={"duration_s": "--duration"}, choices={"transports": TRANSPORTS}, help={
        "duration_s": "soak seconds", "denoise_share": "fraction of requests that are Denoise (0 = Generate only)",
        "denoise_images": "images per Denoise (from the official test split); one is picked per request",
        "denoise_sampler": "Denoise sampler ('' = the gateway's default)",
        "denoise_steps": "Denoise steps (0 = the gateway's default)"})
    res = run(dataclass_from_args(SoakConfig, p.parse_args(argv), parser=p))
    return 0 if res["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
