"""`make soak`: a long run at ~70% of measured capacity: errors, per-window p99 drift, gateway and Triton RSS growth.

    python -m loadtest.soak                          # 10 minutes (starts its own Triton + gateway on free ports)
    python -m loadtest.soak --duration 60 --window-s 10   # a short proof run

Steps: start Triton (only the generator the soak calls) and the gateway; measure capacity with a short
closed-loop ramp (1, 2, 4, 8 ... clients, `--ramp-step-s` each; capacity = the best throughput); then send
requests open-loop at `--load-fraction` x capacity for `--duration` seconds (fixed arrival times; a request's
latency counts from its scheduled time, so a stalled server cannot hide behind a slowed-down client); sample
the RSS of the gateway and of Triton (tritonserver + its python-backend stub processes) every second.
Writes out/soak/soak.json, soak.md and soak.png (p99 per window and RSS over time).
A command, not a test: the full 10-minute soak is not part of `make test`.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mnistgen.cli import add_dataclass_args, dataclass_from_args

REPO_ROOT = Path(__file__).resolve().parent.parent
TRANSPORTS = ("grpc", "http")
MAX_MESSAGE_BYTES = 64 << 20


@dataclass
class SoakConfig:
    duration_s: float = 600.0  # the soak itself (after the capacity ramp)
    load_fraction: float = 0.7  # offered rate = this x measured capacity
    model: str = "dcgan-baseline"  # a GAN from serving.validation.MODELS (cheap, batched by Triton)
    num_samples: tuple[int, ...] = (1, 4, 16)  # each request picks one uniformly
    transports: tuple[str, ...] = ("grpc", "http")  # from TRANSPORTS; requests alternate between them
    ramp_clients: tuple[int, ...] = (1, 2, 4, 8)  # closed-loop clients per ramp step
    ramp_step_s: float = 5.0  # seconds per ramp step
    window_s: float = 60.0  # p99 and error counts per window of this length ("per-minute p99")
    sample_interval_s: float = 1.0  # RSS sampling period
    timeout_s: float = 10.0  # per request: gRPC deadline / X-Request-Timeout
    workers: int = 32  # sender threads of the open-loop phase (enough to never be the bottleneck)
    seed: int = 0  # request mix (batch sizes, transports, request seeds)
    model_repository: Path = REPO_ROOT / "model_repository"
    checkpoint_dir: Path = REPO_ROOT / "checkpoints"
    out_dir: Path = REPO_ROOT / "out" / "soak"
    triton_url: str = ""  # "" = start our own Triton; else use this one (host:port, gRPC)
    triton_pid: int = 0  # with --triton-url: tritonserver's pid for the RSS series (0 = not sampled)

    def __post_init__(self) -> None:
        from serving.validation import MODELS

        if self.model not in MODELS or MODELS[self.model].kind != "gan":
            raise ValueError(f"model must be one of {[m for m, s in MODELS.items() if s.kind == 'gan']}, "
                             f"got {self.model!r}")
        bad = [t for t in self.transports if t not in TRANSPORTS]
        if bad or not self.transports:
            raise ValueError(f"transports must be a non-empty subset of {TRANSPORTS}, got {list(self.transports)}")
        if not 0 < self.load_fraction <= 1:
            raise ValueError(f"load_fraction must be in (0, 1], got {self.load_fraction}")
        limit = MODELS[self.model].max_num_samples
        if not self.num_samples or any(not 1 <= n <= limit for n in self.num_samples):
            raise ValueError(f"num_samples must be in 1..{limit}, got {list(self.num_samples)}")
        for name in ("duration_s", "ramp_step_s", "window_s", "sample_interval_s", "timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


# ---- one request over either transport ------------------------------------------------------------------
class Client:
    """Thread-safe Generate over gRPC (one shared channel) or HTTP (one connection per request)."""

    def __init__(self, grpc_target: str, http_url: str, cfg: SoakConfig):
        import grpc

        from serving.generated.mnistgen.v1 import generation_pb2 as pb
        from serving.generated.mnistgen.v1 import generation_pb2_grpc as pb_grpc

        self.pb, self.cfg, self.http_url = pb, cfg, http_url
        self.channel = grpc.insecure_channel(grpc_target, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
        self.stub = pb_grpc.GenerationServiceStub(self.channel)

    def generate(self, transport: str, n: int, seed: int) -> str:
        """"OK" or the error's code name (gRPC status / the HTTP error body's code / CLIENT:<exception>)."""
        import grpc

        if transport == "grpc":
            try:
                r = self.stub.Generate(self.pb.GenerateRequest(model=self.cfg.model, num_samples=n, seed=seed),
                                       timeout=self.cfg.timeout_s)
            except grpc.RpcError as e:
                return e.code().name
            return "OK" if r.images.count == n and len(r.images.raw) == n * 784 * 4 else "WRONG_SHAPE"
        return self._http(n, seed)

    def _http(self, n: int, seed: int) -> str:
        import urllib.error
        import urllib.request

        body = json.dumps({"model": self.cfg.model, "num_samples": n, "seed": seed}).encode()
        req = urllib.request.Request(f"{self.http_url}/v1/generate", data=body, method="POST", headers={
            "Content-Type": "application/json", "X-Request-Timeout": str(self.cfg.timeout_s)})
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.timeout_s + 2) as r:
                images = json.loads(r.read())["images"]
        except urllib.error.HTTPError as e:
            try:
                return json.loads(e.read())["error"]["code"]
            except (ValueError, KeyError):
                return f"HTTP{e.code}"
        except OSError as e:
            return f"CLIENT:{type(getattr(e, 'reason', e)).__name__}"
        return "OK" if len(base64.b64decode(images["raw"])) == n * 784 * 4 else "WRONG_SHAPE"

    def close(self) -> None:
        self.channel.close()


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
    """Every interval: (t, gateway MiB, Triton MiB = tritonserver + its stub processes)."""

    def __init__(self, gateway_pid: int, triton_pid: int, interval_s: float):
        super().__init__(daemon=True)
        self.pids, self.interval = (gateway_pid, triton_pid), interval_s
        self.samples: list[tuple[float, float, float]] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            gw = rss_mib(self.pids[0], False) if self.pids[0] else float("nan")
            tr = rss_mib(self.pids[1], True) if self.pids[1] else float("nan")
            self.samples.append((time.monotonic(), gw, tr))
            self.stop_event.wait(self.interval)

    def stop(self) -> list[tuple[float, float, float]]:
        self.stop_event.set()
        self.join(5)
        return self.samples


# ---- capacity ramp and the soak -------------------------------------------------------------------------
def closed_loop(client: Client, cfg: SoakConfig, clients: int, seconds: float, rng_seed: int) -> dict:
    """`clients` threads back to back for `seconds`: throughput (OK requests/s), latency percentiles, errors."""
    lat: list[float] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def loop(k: int) -> None:
        rng = random.Random(rng_seed * 1000 + k)
        while time.monotonic() < end:
            t0 = time.monotonic()
            code = client.generate(rng.choice(cfg.transports), rng.choice(cfg.num_samples), rng.randrange(2**31))
            with lock:
                if code == "OK":
                    lat.append(time.monotonic() - t0)
                else:
                    errors[code] = errors.get(code, 0) + 1

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    return {"clients": clients, "seconds": round(wall, 2), "ok": len(lat), "errors": errors,
            "throughput_rps": len(lat) / wall, "p50_ms": pct_ms(lat, 50), "p99_ms": pct_ms(lat, 99)}


def pct_ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(seconds, q) * 1e3) if seconds else float("nan")


def measure_capacity(client: Client, cfg: SoakConfig) -> tuple[float, list[dict]]:
    """Best closed-loop throughput over the ramp (stops early once more clients stop helping)."""
    steps: list[dict] = []
    for i, c in enumerate(cfg.ramp_clients):
        s = closed_loop(client, cfg, c, cfg.ramp_step_s, i)
        steps.append(s)
        print(f"  ramp: {c:3d} clients -> {s['throughput_rps']:7.1f} req/s, p50 {s['p50_ms']:.1f} ms, "
              f"p99 {s['p99_ms']:.1f} ms, errors {s['errors'] or 0}", flush=True)
        best_before = max((x["throughput_rps"] for x in steps[:-1]), default=0.0)
        if best_before and s["throughput_rps"] < 1.05 * best_before:
            break
    return max(s["throughput_rps"] for s in steps), steps


def open_loop(client: Client, cfg: SoakConfig, rate: float) -> list[tuple[float, float, str, str, int]]:
    """Requests at fixed arrival times (rate per second) for cfg.duration_s: (scheduled, end, transport, code, n)."""
    rng = random.Random(cfg.seed)
    records: list[tuple[float, float, str, str, int]] = []
    lock = threading.Lock()

    def one(t_sched: float, transport: str, n: int, seed: int) -> None:
        code = client.generate(transport, n, seed)
        with lock:
            records.append((t_sched, time.monotonic(), transport, code, n))

    t0 = time.monotonic()
    total = int(cfg.duration_s * rate)
    with ThreadPoolExecutor(cfg.workers) as pool:
        for k in range(total):
            t_sched = t0 + k / rate
            delay = t_sched - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            pool.submit(one, t_sched, cfg.transports[k % len(cfg.transports)], rng.choice(cfg.num_samples),
                        rng.randrange(2**31))
    return records


def windows(records, rss, t0: float, window_s: float) -> list[dict]:
    """Per window (by scheduled time): requests, errors, p50/p99 from the scheduled time, RSS at its end."""
    out = []
    n_win = max(1, int(np.ceil(max((r[0] - t0 for r in records), default=0) / window_s + 1e-9)))
    for w in range(n_win):
        lo, hi = t0 + w * window_s, t0 + (w + 1) * window_s
        rs = [r for r in records if lo <= r[0] < hi]
        lat = [r[1] - r[0] for r in rs if r[3] == "OK"]
        mem = [s for s in rss if s[0] < hi + 1e-9]
        out.append({
            "window": w, "t_start_s": round(w * window_s, 1), "requests": len(rs),
            "errors": sum(r[3] != "OK" for r in rs), "p50_ms": round(pct_ms(lat, 50), 2),
            "p99_ms": round(pct_ms(lat, 99), 2),
            "gateway_rss_mib": round(mem[-1][1], 1) if mem else float("nan"),
            "triton_rss_mib": round(mem[-1][2], 1) if mem else float("nan"),
        })
    return out


def slope_mib_per_min(rss, col: int) -> float:
    t = np.array([s[0] for s in rss])
    y = np.array([s[col] for s in rss])
    ok = np.isfinite(y)
    if ok.sum() < 3:
        return float("nan")
    return float(np.polyfit((t[ok] - t[ok][0]) / 60.0, y[ok], 1)[0])


def summarize(cfg: SoakConfig, capacity: float, ramp: list[dict], rate: float, records, rss, t0: float) -> dict:
    lat_ok = [r[1] - r[0] for r in records if r[3] == "OK"]
    codes: dict[str, int] = {}
    for r in records:
        codes[r[3]] = codes.get(r[3], 0) + 1
    wins = windows(records, rss, t0, cfg.window_s)
    full = [w for w in wins if w["requests"]]
    first, last = (full[0], full[-1]) if full else ({}, {})
    during = [s for s in rss if s[0] >= t0]
    rss_stats = {}
    for name, col in (("gateway", 1), ("triton", 2)):
        ys = [s[col] for s in during if np.isfinite(s[col])]
        rss_stats[name] = {
            "start_mib": round(ys[0], 1) if ys else None, "end_mib": round(ys[-1], 1) if ys else None,
            "peak_mib": round(max(ys), 1) if ys else None,
            "growth_mib": round(ys[-1] - ys[0], 1) if ys else None,
            "slope_mib_per_min": round(slope_mib_per_min(during, col), 3),
        }
    wall = max((r[1] for r in records), default=t0) - t0
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_1m_end": round(os.getloadavg()[0], 2)},
        "capacity_rps": round(capacity, 2), "ramp": ramp, "offered_rps": round(rate, 2),
        "requests": len(records), "achieved_rps": round(len(records) / wall, 2) if wall > 0 else None,
        "codes": codes, "errors": sum(v for k, v in codes.items() if k != "OK"),
        "error_rate": round(sum(v for k, v in codes.items() if k != "OK") / max(len(records), 1), 6),
        "latency_ms": {"p50": round(pct_ms(lat_ok, 50), 2), "p99": round(pct_ms(lat_ok, 99), 2),
                       "max": round(max(lat_ok) * 1e3, 2) if lat_ok else None},
        "p99_drift": {"first_window_ms": first.get("p99_ms"), "last_window_ms": last.get("p99_ms"),
                      "last_over_first": round(last["p99_ms"] / first["p99_ms"], 3)
                      if full and first["p99_ms"] > 0 else None,
                      "max_window_ms": max((w["p99_ms"] for w in full), default=None)},
        "rss": rss_stats, "windows": wins,
        "rss_series": [[round(s[0] - t0, 2), round(s[1], 1), round(s[2], 1)] for s in rss],
    }


def markdown(res: dict) -> str:
    c = res["config"]
    lines = [
        "# Soak run", "",
        f"{res['machine']['cpus']} CPUs ({res['machine']['platform']}), load average at the end "
        f"{res['machine']['load_avg_1m_end']}. Model `{c['model']}`, batch sizes {c['num_samples']}, "
        f"transports {c['transports']}, request deadline {c['timeout_s']} s.", "",
        f"- capacity (closed-loop ramp {c['ramp_clients']}, {c['ramp_step_s']} s each): "
        f"**{res['capacity_rps']} req/s**",
        f"- offered: {c['load_fraction']:.0%} of it = {res['offered_rps']} req/s for {c['duration_s']:.0f} s "
        f"(achieved {res['achieved_rps']} req/s, {res['requests']} requests)",
        f"- errors: **{res['errors']}** ({res['error_rate']:.4%}); codes {res['codes']}",
        f"- latency from scheduled time: p50 {res['latency_ms']['p50']} ms, p99 {res['latency_ms']['p99']} ms, "
        f"max {res['latency_ms']['max']} ms",
        f"- p99 drift: first window {res['p99_drift']['first_window_ms']} ms, last "
        f"{res['p99_drift']['last_window_ms']} ms (x{res['p99_drift']['last_over_first']}), worst window "
        f"{res['p99_drift']['max_window_ms']} ms",
    ]
    for name in ("gateway", "triton"):
        r = res["rss"][name]
        lines.append(f"- {name} RSS: {r['start_mib']} -> {r['end_mib']} MiB (growth {r['growth_mib']} MiB, "
                     f"peak {r['peak_mib']} MiB, trend {r['slope_mib_per_min']} MiB/min)")
    lines += ["", f"| window ({c['window_s']:.0f} s) | requests | errors | p50 ms | p99 ms | gateway RSS MiB "
                  "| Triton RSS MiB |", "|---|---|---|---|---|---|---|"]
    for w in res["windows"]:
        lines.append(f"| {w['window']} | {w['requests']} | {w['errors']} | {w['p50_ms']} | {w['p99_ms']} | "
                     f"{w['gateway_rss_mib']} | {w['triton_rss_mib']} |")
    lines += ["", "![p99 and RSS over time](soak.png)", ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    w = res["windows"]
    ws = res["config"]["window_s"]
    a.step([x["t_start_s"] for x in w] + [w[-1]["t_start_s"] + ws], [x["p99_ms"] for x in w] + [w[-1]["p99_ms"]],
           where="post", label="p99")
    a.step([x["t_start_s"] for x in w] + [w[-1]["t_start_s"] + ws], [x["p50_ms"] for x in w] + [w[-1]["p50_ms"]],
           where="post", label="p50")
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
    from serving.triton_server import TritonConfig, TritonServer, free_ports
    from serving.validation import MODELS

    from .stack import GatewayProcess, GatewayProcessConfig

    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    triton = None
    triton_url, triton_pid = cfg.triton_url, cfg.triton_pid
    if not triton_url:
        from training.export import ExportConfig
        from training.export import run as export

        model = MODELS[cfg.model].triton_model
        export(ExportConfig(checkpoint_dir=cfg.checkpoint_dir, model_repository=cfg.model_repository, only=(model,)))
        http, grpc_port, metrics = free_ports(3)
        triton = TritonServer(TritonConfig(
            model_repository=cfg.model_repository, models=(model,), bind_address="127.0.0.1", http_port=http,
            grpc_port=grpc_port, metrics_port=metrics, startup_timeout_s=600,
            log_file=cfg.out_dir / "tritonserver.log"))
    try:
        if triton is not None:
            print(f"starting Triton ({triton.config.models[0]}) and the gateway ...", flush=True)
            triton.start().wait_ready()
            triton_url, triton_pid = triton.grpc_url, triton.proc.pid
        with GatewayProcess(GatewayProcessConfig(triton_url=triton_url, startup_timeout_s=120,
                                                 log_file=cfg.out_dir / "gateway.log")) as gw:
            client = Client(gw.grpc_target, gw.http_url, cfg)
            for t in cfg.transports:  # warm up both paths (model config cached, connections up)
                client.generate(t, max(cfg.num_samples), 0)
            sampler = RssSampler(gw.proc.pid, triton_pid, cfg.sample_interval_s)
            sampler.start()
            print("measuring capacity ...", flush=True)
            capacity, ramp = measure_capacity(client, cfg)
            rate = cfg.load_fraction * capacity
            print(f"capacity {capacity:.1f} req/s; soaking at {rate:.1f} req/s for {cfg.duration_s:.0f} s ...",
                  flush=True)
            t0 = time.monotonic()
            records = open_loop(client, cfg, rate)
            rss = sampler.stop()
            client.close()
    finally:
        if triton is not None:
            triton.close()
    res = summarize(cfg, capacity, ramp, rate, records, rss, t0)
    (cfg.out_dir / "soak.json").write_text(json.dumps(res, indent=2) + "\n")
    (cfg.out_dir / "soak.md").write_text(markdown(res))
    plot(res, cfg.out_dir / "soak.png")
    print("\n" + markdown(res))
    print(f"written {cfg.out_dir / 'soak.json'}, soak.md, soak.png")
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(p, SoakConfig, names={"duration_s": "--duration"}, choices={"transports": TRANSPORTS}, help={
        "duration_s": "soak seconds", "triton_url": "use a running Triton (host:port) instead of starting one",
        "triton_pid": "with --triton-url: its pid, for RSS"})
    res = run(dataclass_from_args(SoakConfig, p.parse_args(argv), parser=p))
    return 0 if res["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
