"""`make bench-mixed`: cheap GAN requests beside floods of the heaviest diffusion requests (docs/loadtest.md).

Default: starts its own Triton + gateway (serving.run's Stack) and runs phases of closed loops (loadtest.load) over
HTTP: batch-1 GAN Generate from 1 client alone; the flood alone from 2, then 8 clients (DDPM Generate at the catalog's
max_samples x 100 ddpm steps alternating with Denoise of max images x 100 ddpm steps); the GAN beside each flood.
-> reports/bench/mixed.{json,md,png}: the GAN's p50/p99, each class's requests/s and samples/s, the status codes.

--isolation: Triton alone (gRPC direct: no gateway admission in the way), once per candidate setting of the diffusion
models' compute isolation (config.pbtxt `nice` / `threads`, serving/triton_backend.py isolate), repeated in turns:
GAN batch-1 latency alone and beside a 2-client flood, the flood's samples/s alone and beside the GAN
-> reports/bench/isolation.{json,md}. --render: rewrite the pages (and plot) from the committed JSON.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mnistgen import catalog
from mnistgen.cli import add_dataclass_args, dataclass_from_args
from mnistgen.files import REPO_ROOT

from .load import closed_loop, relative_paths

GAN_P99_GOAL_MS = 100.0
FLOOD_KEEP_GOAL = 0.8  # flood samples/s beside the GAN over alone
FLOOD_CODES_OK = {"200", "429"}
DIFFUSION = tuple(m.triton for m in catalog.MODELS if m.kind != catalog.GAN)  # the models `isolate` applies to
# candidate isolation settings (config.pbtxt parameters of DIFFUSION): name -> (nice, threads); 0 threads = all cores
VARIANTS = {"none": (0, 0), "nice 19": (19, 0), "threads 1": (0, 1), "nice 19 + threads 1": (19, 1)}
PARAM = re.compile(r'(key: "(nice|threads)" value: \{ string_value: ")(\d+)(")')


@dataclass
class MixedConfig:
    gan_model: str = catalog.DEFAULT_MODEL  # the cheap class: batch-1 Generate of one of catalog.GANS
    flood_clients: tuple[int, ...] = (2, 8)  # closed-loop clients of the heavy class, one phase pair per level
    # the GAN client's pause after each answer: a paced user (~1 / (think + latency) requests/s); 0 = a tight loop
    gan_think_s: float = 0.05
    # seconds each phase sends (answers still in flight at the end are waited for): a flood request takes 10-50 s on
    # 2 cores, so shorter phases count too few of them for a throughput
    phase_s: float = 90.0
    flood_samples: int = 0  # samples / images per flood request; 0 = the catalog's max_samples
    flood_steps: int = 100  # UNet evaluations per flood request (ddpm sampler)
    timeout_s: float = 60.0  # per request (X-Request-Timeout / gRPC deadline)
    isolation: bool = False  # compare the VARIANTS on Triton direct instead (reports/bench/isolation.*)
    variants: tuple[str, ...] = tuple(VARIANTS)  # --isolation: which ones
    repeats: int = 2  # --isolation: turns over the variants
    model_repository: Path = REPO_ROOT / "model_repository"
    out_dir: Path = REPO_ROOT / "reports" / "bench"
    log_dir: Path = REPO_ROOT / "out" / "bench-mixed"

    def __post_init__(self) -> None:
        for name, ok, want in (("gan_model", self.gan_model in catalog.GANS, f"one of {list(catalog.GANS)}"),
                               ("flood_clients", all(c >= 1 for c in self.flood_clients), "levels >= 1"),
                               ("phase_s", self.phase_s > 0, "> 0"), ("timeout_s", self.timeout_s > 0, "> 0"),
                               ("flood_samples", 0 <= self.flood_samples <= catalog.DENOISER.max_samples,
                                f"in 0..{catalog.DENOISER.max_samples}"),
                               ("flood_steps", 1 <= self.flood_steps <= catalog.MAX_STEPS, f"in 1..{catalog.MAX_STEPS}"),
                               ("variants", set(self.variants) <= set(VARIANTS), f"names from {list(VARIANTS)}"),
                               ("repeats", self.repeats >= 1, ">= 1")):
            if not ok:
                raise ValueError(f"{name} must be {want}, got {getattr(self, name)!r}")
        self.flood_samples = self.flood_samples or catalog.DENOISER.max_samples


# ---- phases ---------------------------------------------------------------------------------------------------
def http_codes(result: dict) -> dict[str, int]:
    """A closed_loop result's outcomes as HTTP status counts: "200" for answers, gRPC code names mapped as the
    gateway's HTTP API maps them, other failures (e.g. a client-side timeout) by name."""
    from serving.gateway.http_api import HTTP_STATUS

    codes = {"200": result["ok"]} if result["ok"] else {}
    for code, n in result["error_codes"].items():
        key = str(HTTP_STATUS.get(code, code))
        codes[key] = codes.get(key, 0) + n
    return dict(sorted(codes.items()))


def summary(result: dict, samples: int) -> dict:
    return {"clients": result["clients"], "requests": result["requests"], "p50_ms": result["p50_ms"],
            "p99_ms": result["p99_ms"], "requests_per_s": result["samples_per_s"],  # (closed_loop: answers / wall)
            "samples_per_s": result["samples_per_s"] * samples, "codes": http_codes(result),
            "first_error": result["first_error"], "wall_s": result["wall_s"], "load_avg_1m": result["load_avg_1m"]}


def phase(name: str, seconds: float, gan=None, flood=None, flood_clients: int = 0, flood_samples: int = 1,
          gan_think_s: float = 0.0) -> dict:
    """One phase: the GAN's closed loop (1 client, `gan` a make_call, waiting gan_think_s after each answer) and/or
    the flood's (`flood_clients`, each waiting out a 429's Retry-After), side by side for `seconds`."""
    out: dict = {"phase": name, "flood_clients": flood_clients if flood else 0}
    loops = [(k, mk, c, n) for k, mk, c, n in (("flood", flood, flood_clients, flood_samples), ("gan", gan, 1, 1)) if mk]

    def go(key, make_call, clients, samples):  # (run_phases warmed up)
        think = gan_think_s if key == "gan" else 0.0
        out[key] = summary(closed_loop(make_call, clients, seconds=seconds, think_s=think, backoff=key == "flood"),
                           samples)

    threads = [threading.Thread(target=go, args=loop, daemon=True) for loop in loops]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    line = "  ".join(f"{k}: {v['requests_per_s']:.2f} req/s p50 {v['p50_ms']:.1f} ms p99 {v['p99_ms']:.1f} ms "
                     f"codes {v['codes']}" for k, v in out.items() if isinstance(v, dict))
    print(f"  {name:<24} {line}", flush=True)
    return out


def run_phases(cfg: MixedConfig, gan, flood, levels: tuple[int, ...], gan_s: float | None = None) -> list[dict]:
    """GAN alone, then per flood level: the flood alone, the flood beside the GAN (after one untimed call of each:
    lazy imports and first-call set-up stay out of the figures)."""
    for make_call in (gan, flood):
        try:
            make_call()(0)
        except Exception as e:  # noqa: BLE001  (e.g. a 504 on a busy machine: the phases count such answers)
            print(f"  warm-up call failed: {type(e).__name__}: {e}"[:300], flush=True)
    phases = [phase("gan alone", gan_s or cfg.phase_s, gan=gan, gan_think_s=cfg.gan_think_s)]
    for n in levels:
        phases.append(phase(f"flood {n} alone", cfg.phase_s, flood=flood, flood_clients=n,
                            flood_samples=cfg.flood_samples))
        phases.append(phase(f"gan + flood {n}", cfg.phase_s, gan=gan, flood=flood, flood_clients=n,
                            gan_think_s=cfg.gan_think_s,
                            flood_samples=cfg.flood_samples))
    return phases


def flood_images(n: int, i: int) -> np.ndarray:
    return np.random.default_rng(i).uniform(-1, 1, (n, 1, 28, 28)).astype(np.float32)  # (n, 1, 28, 28)


def gateway_calls(cfg: MixedConfig, http_target: str, clients: list):
    """make_call factories over HTTP (serving.client): the GAN's batch-1 Generate, the flood's alternating heaviest
    DDPM Generate and Denoise."""
    from serving.client import GatewayClient

    ddpm = next(m for m in catalog.by_kind(catalog.DDPM) if m.rpc == catalog.GENERATE)

    def factory(call):
        def make():
            c = GatewayClient(transport="http", target=http_target, timeout_s=cfg.timeout_s)
            clients.append(c)
            return lambda i: call(c, i)
        return make

    gan = factory(lambda c, i: c.generate(cfg.gan_model, 1, seed=i))
    flood = factory(lambda c, i: c.generate(ddpm.name, cfg.flood_samples, seed=i, steps=cfg.flood_steps,
                                            sampler="ddpm") if i % 2 == 0 else
                    c.denoise(flood_images(cfg.flood_samples, i), 0.5, cfg.flood_steps, "ddpm", seed=i))
    return gan, flood


def goals(phases: list[dict]) -> list[dict]:
    """The issue's goals per flood level, from the figures: GAN p99 and all 200 beside the flood, the flood's samples/s
    beside the GAN over alone, the flood's codes only 200 / 429."""
    by = {p["phase"]: p for p in phases}
    out = []
    for p in phases:
        if "gan" not in p or "flood" not in p:
            continue
        n, alone = p["flood_clients"], by.get(f"flood {p['flood_clients']} alone", {}).get("flood")
        keep = p["flood"]["samples_per_s"] / alone["samples_per_s"] if alone and alone["samples_per_s"] else 0.0
        gan_codes, flood_codes = p["gan"]["codes"], p["flood"]["codes"]
        out += [{"goal": f"GAN p99 beside {n} flood clients", "measured": f"{p['gan']['p99_ms']:.1f} ms",
                 "target": f"<= {GAN_P99_GOAL_MS:g} ms",
                 "met": bool(p["gan"]["p99_ms"] <= GAN_P99_GOAL_MS) and set(gan_codes) == {"200"}},
                {"goal": f"GAN answers beside {n} flood clients", "measured": _codes(gan_codes), "target": "all 200",
                 "met": set(gan_codes) == {"200"}},
                {"goal": f"flood samples/s beside the GAN, {n} clients", "measured": f"{keep:.0%} of alone",
                 "target": f">= {FLOOD_KEEP_GOAL:.0%}", "met": keep >= FLOOD_KEEP_GOAL},
                {"goal": f"flood codes, {n} clients", "measured": _codes(flood_codes), "target": "only 200 / 429",
                 "met": set(flood_codes) <= FLOOD_CODES_OK}]
    return out


# ---- isolation candidates (Triton direct) ---------------------------------------------------------------------
def variant_repository(src: Path, dst: Path, models: tuple[str, ...], nice: int, threads: int) -> Path:
    """dst/<model>/: config.pbtxt with the diffusion models' nice / threads set, the version's files linked (engines
    records copied: a thread cap re-measures them here, not in src)."""
    for m in models:
        (dst / m / "1").mkdir(parents=True)
        text = (src / m / "config.pbtxt").read_text()
        if m in DIFFUSION:
            text, n = PARAM.subn(lambda g: f"{g[1]}{nice if g[2] == 'nice' else threads}{g[4]}", text)
            if n != 2:
                raise ValueError(f"{src / m / 'config.pbtxt'}: expected the nice and threads parameters")
        (dst / m / "config.pbtxt").write_text(text)
        for f in (src / m / "1").iterdir():
            if f.is_file():
                (shutil.copy if f.suffix == ".json" else lambda a, b: b.symlink_to(a.resolve()))(f, dst / m / "1" / f.name)
    return dst


def triton_calls(cfg: MixedConfig, grpc_url: str, clients: list):
    """make_call factories on Triton direct (tritonclient gRPC): the GAN's batch-1 generator call, the flood's
    DDPM Generate (ddpm sampler)."""
    import tritonclient.grpc as grpcclient

    from mnistgen.latent import sample_latent

    from .bench_triton import _grpc_inputs

    gan_model, ddpm = isolation_models(cfg)

    def make_gan():
        c = grpcclient.InferenceServerClient(grpc_url)
        clients.append(c)
        dim = int(c.get_model_config(gan_model, as_json=True)["config"]["input"][0]["dims"][-1])
        return lambda i: c.infer(gan_model, _grpc_inputs({"latent": sample_latent(1, dim, i)}))

    def make_flood():
        c = grpcclient.InferenceServerClient(grpc_url)
        clients.append(c)
        row = {"num_samples": (cfg.flood_samples, np.int32), "steps": (cfg.flood_steps, np.int32),
               "sampler": (b"ddpm", object)}
        return lambda i: c.infer(ddpm, _grpc_inputs({k: np.full((1, 1), v, t) for k, (v, t) in
                                                     (row | {"seed": (i, np.int64)}).items()}),
                                 client_timeout=cfg.timeout_s)

    return make_gan, make_flood


def isolation_models(cfg: MixedConfig) -> tuple[str, str]:
    return catalog.GANS[cfg.gan_model].triton, next(m for m in catalog.by_kind(catalog.DDPM)
                                                    if m.rpc == catalog.GENERATE).triton


def run_isolation(cfg: MixedConfig) -> dict:
    from serving.triton_server import TritonConfig, TritonServer, free_ports

    runs = []
    for turn in range(cfg.repeats):
        for name in (cfg.variants if turn % 2 == 0 else cfg.variants[::-1]):  # alternate order: drift hits all alike
            nice, threads = VARIANTS[name]
            print(f"turn {turn + 1}/{cfg.repeats}, isolation {name!r} (nice {nice}, threads {threads or 'all'}) ...",
                  flush=True)
            clients: list = []
            with tempfile.TemporaryDirectory(prefix="mnistgen-isolation-") as tmp:
                models, ports = isolation_models(cfg), free_ports(3)
                server = TritonServer(TritonConfig(
                    model_repository=variant_repository(cfg.model_repository, Path(tmp) / "repo", models, nice, threads),
                    models=models, bind_address="127.0.0.1", http_port=ports[0], grpc_port=ports[1],
                    metrics_port=ports[2], startup_timeout_s=600, log_file=cfg.log_dir / "isolation-tritonserver.log"))
                make_gan, make_flood = triton_calls(cfg, server.grpc_url, clients)
                try:
                    server.start().wait_ready()
                    phases = run_phases(cfg, make_gan, make_flood, cfg.flood_clients[:1], gan_s=min(cfg.phase_s, 15))
                finally:
                    for c in clients:
                        c.close()
                    server.stop()
            runs.append({"variant": name, "nice": nice, "threads": threads, "turn": turn + 1, "phases": phases})
    return {"config": relative_paths(asdict(cfg)), "runs": runs}


# ---- the mixed scenario ---------------------------------------------------------------------------------------
def run_mixed(cfg: MixedConfig) -> dict:
    from serving.run import RunConfig, Stack

    ddpm = catalog.by_kind(catalog.DDPM)
    models = (catalog.GANS[cfg.gan_model].triton,) + tuple(m.triton for m in ddpm if m.rpc != catalog.INTERNAL)
    stack = Stack(RunConfig(grpc_port=0, http_port=0, triton_http_port=0, model_repository=cfg.model_repository,
                            models=models, startup_timeout_s=600, log_dir=cfg.log_dir,
                            gateway_log=cfg.log_dir / "gateway.log", gateway_args=("--log-level", "WARNING")))
    clients: list = []
    print(f"starting Triton ({', '.join(models)}) and the gateway ...", flush=True)
    try:
        stack.start().wait_ready()
        gan, flood = gateway_calls(cfg, stack.gateway.http_target, clients)
        phases = run_phases(cfg, gan, flood, cfg.flood_clients)
    finally:
        for c in clients:
            c.close()
        stack.close()
    return {"config": relative_paths(asdict(cfg)), "isolation": isolation_setting(cfg.model_repository),
            "phases": phases, "goals": goals(phases)}


def isolation_setting(repo: Path) -> dict:
    """{model: {nice, threads}} as the repository's diffusion configs set them."""
    return {m: {k: int(v) for _, k, v, _ in PARAM.findall((repo / m / "config.pbtxt").read_text())}
            for m in DIFFUSION if (repo / m / "config.pbtxt").is_file()}


# ---- pages ----------------------------------------------------------------------------------------------------
def _f(x: float) -> str:
    return "-" if x != x else f"{x:.1f}" if abs(x) < 1000 else f"{x:,.0f}"


def _codes(codes: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in codes.items()) or "-"


def _row(head: str, c: dict | None) -> str:
    if c is None:
        return f"{head} | - | - | - | - | - | - | - |"
    return (f"{head} | {c['requests']} | {_f(c['p50_ms'])} | {_f(c['p99_ms'])} | {c['requests_per_s']:.3g} | "
            f"{c['samples_per_s']:.3g} | {_codes(c['codes'])} | {_f(c.get('load_avg_1m', float('nan')))} |")


TABLE_HEAD = ["| phase | class | clients | requests | p50 ms | p99 ms | requests/s | samples/s | codes | load avg 1m |",
              "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]


def phase_rows(phases: list[dict], prefix: str = "") -> list[str]:
    return [_row(f"| {prefix}{p['phase']} | {k} | {p[k]['clients']}", p[k]) for p in phases for k in ("gan", "flood")
            if k in p]


def markdown(result: dict) -> str:
    """reports/bench/mixed.md from mixed.json (a test compares the committed page with this byte for byte)."""
    c = result["config"]
    iso = "; ".join(f"{m}: nice {v.get('nice', 0)}, threads {v.get('threads', 0) or 'all'}"
                    for m, v in result["isolation"].items()) or "none"
    lines = ["# Mixed load: cheap GAN requests beside heavy diffusion floods", "",
             f"Generated by `make bench-mixed` (`python -m loadtest.mixed`) from `mixed.json`; plot: `mixed.png`. "
             f"Each phase sends for {c['phase_s']:g} s (closed loops over HTTP through the gateway; answers in flight "
             f"at the end are waited for). Cheap class: batch-1 `{c['gan_model']}` Generate from 1 client, "
             f"pausing {c.get('gan_think_s', 0):g} s after each answer. Flood (each client waits out a 429's "
             "Retry-After): "
             f"DDPM Generate of {c['flood_samples']} samples x {c['flood_steps']} ddpm steps alternating with Denoise "
             f"of {c['flood_samples']} images x {c['flood_steps']} ddpm steps, per-request timeout "
             f"{c['timeout_s']:g} s. Diffusion models' compute isolation: {iso}. p50/p99 are over the answered (200) "
             "requests; codes count every request (gRPC codes mapped as the HTTP API maps them).", "",
             "## Goals (issue 28)", "", "| goal | measured | target | met |", "|---|---|---|---|",
             *(f"| {g['goal']} | {g['measured']} | {g['target']} | {'yes' if g['met'] else '**no**'} |"
               for g in result["goals"]), "",
             "## Phases", "", *TABLE_HEAD, *phase_rows(result["phases"]), ""]
    return "\n".join(lines)


def isolation_markdown(result: dict) -> str:
    """reports/bench/isolation.md from isolation.json: per variant and turn, the GAN beside the flood vs alone."""
    c = result["config"]
    rows, per_variant = [], {}
    for r in result["runs"]:
        by = {p["phase"]: p for p in r["phases"]}
        alone, mixed = by["gan alone"]["gan"], next(p for p in r["phases"] if "gan" in p and "flood" in p)
        flood_alone = next(p["flood"] for p in r["phases"] if "gan" not in p)
        rows.append(f"| {r['variant']} | {r['turn']} | {_f(alone['p50_ms'])} | {_f(alone['p99_ms'])} | "
                    f"{_f(mixed['gan']['p50_ms'])} | {_f(mixed['gan']['p99_ms'])} | "
                    f"{flood_alone['samples_per_s']:.3g} | {mixed['flood']['samples_per_s']:.3g} |")
        keep = mixed["flood"]["samples_per_s"] / flood_alone["samples_per_s"] if flood_alone["samples_per_s"] else 0.0
        per_variant.setdefault(r["variant"], []).append((mixed["gan"]["p99_ms"], keep))
    medians = [f"| {v} | {len(xs)} | {_f(float(np.median([x[0] for x in xs])))} | "
               f"{float(np.median([x[1] for x in xs])):.0%} |" for v, xs in per_variant.items()]
    return "\n".join([
        "# Compute isolation inside Triton: GAN latency beside a diffusion flood", "",
        f"Generated by `python -m loadtest.mixed --isolation --phase-s {c['phase_s']:g} --flood-samples "
        f"{c['flood_samples']} --repeats {c['repeats']}` from `isolation.json`. Triton alone (gRPC direct, no "
        f"gateway), dcgan + DDPM Generate loaded; per variant of the diffusion models' config.pbtxt parameters `nice` "
        f"/ `threads` (serving/triton_backend.py `isolate`), in turns of alternating order: batch-1 "
        f"`{c['gan_model']}` from 1 client alone, the flood alone ({c['flood_clients'][0]} clients, "
        f"{c['flood_samples']} samples x {c['flood_steps']} ddpm steps per request), then both for "
        f"{c['phase_s']:g} s. Which variant is kept and why: docs/loadtest.md, \"Compute isolation\".", "",
        "| variant | turns | median GAN p99 beside the flood, ms | median flood samples/s beside the GAN / alone |",
        "|---|---:|---:|---:|", *medians, "",
        "| variant | turn | GAN alone p50 ms | alone p99 ms | beside flood p50 ms | beside flood p99 ms | "
        "flood alone samples/s | flood beside GAN samples/s |", "|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows, "", "## Every phase", "", *TABLE_HEAD,
        *(row for r in result["runs"] for row in phase_rows(r["phases"], f"{r['variant']} #{r['turn']}: ")), ""])


def plot(result: dict, path: Path) -> None:
    """mixed.png: the GAN's p50/p99 alone and beside each flood (log scale); the flood's samples/s alone vs mixed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = result["phases"]
    gan = [p for p in phases if "gan" in p]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(gan))
    for q, dx in (("p50_ms", -0.2), ("p99_ms", 0.2)):
        a.bar(x + dx, [np.nan_to_num(p["gan"][q]) for p in gan], 0.4, label=q.split("_")[0])
    for i, p in enumerate(gan):  # a phase without a 200 has no latency: its codes instead
        if p["gan"]["p99_ms"] != p["gan"]["p99_ms"]:
            a.text(i, GAN_P99_GOAL_MS / 2, f"no 200:\n{_codes(p['gan']['codes'])}", ha="center", color="red")
    a.axhline(GAN_P99_GOAL_MS, color="red", ls="--", lw=1, label=f"p99 goal {GAN_P99_GOAL_MS:g} ms")
    a.set(xticks=x, xticklabels=[p["phase"] for p in gan], yscale="log", ylabel="ms",
          title=f"GAN batch-1 latency ({result['config']['gan_model']})")
    a.legend()
    levels = result["config"]["flood_clients"]
    by = {p["phase"]: p for p in phases}
    x = np.arange(len(levels))
    for label, key, dx in (("alone", "flood {} alone", -0.2), ("beside the GAN", "gan + flood {}", 0.2)):
        b.bar(x + dx, [by.get(key.format(n), {}).get("flood", {}).get("samples_per_s", 0) for n in levels], 0.4,
              label=label)
    b.set(xticks=x, xticklabels=[f"{n} clients" for n in levels], ylabel="samples/s", title="diffusion flood throughput")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(result: dict, out_dir: Path, isolation: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "isolation" if isolation else "mixed"
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    render(out_dir, isolation)


def render(out_dir: Path, isolation: bool) -> None:
    stem = "isolation" if isolation else "mixed"
    result = json.loads((out_dir / f"{stem}.json").read_text())
    (out_dir / f"{stem}.md").write_text((isolation_markdown if isolation else markdown)(result))
    if not isolation:
        plot(result, out_dir / "mixed.png")
    print(f"written {out_dir / stem}.md from {stem}.json", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(p, MixedConfig, choices={"gan_model": list(catalog.GANS), "variants": list(VARIANTS)})
    p.add_argument("--render", action="store_true", help="measure nothing: rewrite the page from OUT_DIR's JSON")
    a = p.parse_args(argv)
    cfg = dataclass_from_args(MixedConfig, a, parser=p)
    if a.render:
        render(cfg.out_dir, cfg.isolation)
        return 0
    cfg.log_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the servers this run started are stopped
    t0 = time.perf_counter()
    result = run_isolation(cfg) if cfg.isolation else run_mixed(cfg)
    result["wall_s"] = time.perf_counter() - t0
    write(result, cfg.out_dir, cfg.isolation)
    return 0


if __name__ == "__main__":
    sys.exit(main())
