"""Summarise the load test's raw per-request CSV: latency percentiles per request and per sample, throughput, errors.

    python -m loadtest.report out/loadtest/requests.csv --out out/loadtest
writes summary.md, summary.json, latency_over_time.png and latency_hist.png into --out.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# the raw per-request CSV written by loadtest/locustfile.py (its request-event listener)
CSV_COLUMNS = ("start_s", "transport", "rpc", "name", "latency_ms", "samples", "ok", "error")
PERCENTILES = (50, 90, 99)  # reported for per-request and per-sample latency
GROUP_BYS = ("rpc", "name")  # "rpc": one row per transport + rpc; "name": per transport + Locust name (batch size)


@dataclass
class Requests:
    """The raw CSV as columns (one entry per request)."""
    start_s: np.ndarray  # (R,) unix time the request was sent
    latency_ms: np.ndarray  # (R,) unrounded client-side latency
    samples: np.ndarray  # (R,) samples asked for
    ok: np.ndarray  # (R,) bool
    transport: np.ndarray  # (R,) str: grpc | http
    rpc: np.ndarray  # (R,) str: generate | denoise
    name: np.ndarray  # (R,) str: Locust's stats name (rpc, model/sampler, batch size)
    error: np.ndarray  # (R,) str, "" when ok

    def __len__(self) -> int:
        return len(self.latency_ms)

    def subset(self, mask: np.ndarray) -> "Requests":
        return Requests(**{k: v[mask] for k, v in vars(self).items()})


@dataclass
class Summary:
    group: str  # "all", "grpc generate", "http Generate dcgan-baseline n=64", ...
    requests: int
    errors: int
    samples: int  # samples of successful requests
    duration_s: float  # first send to last answer
    requests_per_s: float  # successful requests / duration
    samples_per_s: float  # successful samples / duration
    request_ms: dict[str, float]  # {"p50": ..., "p90": ..., "p99": ...} over successful requests
    sample_ms: dict[str, float]  # per-sample latency (request latency / its samples) percentiles


def read_requests(path: str | Path) -> Requests:
    """Load the CSV written by loadtest/locustfile.py (columns: locustfile.CSV_COLUMNS)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    needed = set(CSV_COLUMNS) - {"error"}
    if rows and not needed <= set(rows[0]):
        raise ValueError(f"{path}: missing columns {sorted(needed - set(rows[0]))}; expected {sorted(needed)}")
    col = lambda k, t: np.array([t(r[k]) for r in rows], dtype=t if t is not str else object)  # noqa: E731
    return Requests(
        start_s=col("start_s", float), latency_ms=col("latency_ms", float), samples=col("samples", int),
        ok=np.array([r["ok"] in ("1", "True", "true") for r in rows], dtype=bool),
        transport=col("transport", str), rpc=col("rpc", str), name=col("name", str),
        error=np.array([r.get("error", "") or "" for r in rows], dtype=object))


def percentiles(values: np.ndarray) -> dict[str, float]:
    """Linear-interpolated percentiles (numpy's default); NaN for no values."""
    if len(values) == 0:
        return {f"p{p}": float("nan") for p in PERCENTILES}
    q = np.percentile(np.asarray(values, np.float64), PERCENTILES)
    return {f"p{p}": float(v) for p, v in zip(PERCENTILES, q)}


def summarize(r: Requests, group: str = "all") -> Summary:
    ok = r.ok
    duration = float(np.max(r.start_s + r.latency_ms / 1e3) - np.min(r.start_s)) if len(r) else 0.0
    samples = int(r.samples[ok].sum())
    per_sample = r.latency_ms[ok] / np.maximum(r.samples[ok], 1)  # (R_ok,)
    rate = (lambda n: n / duration) if duration > 0 else (lambda n: float("nan"))
    return Summary(group=group, requests=len(r), errors=int((~ok).sum()), samples=samples, duration_s=duration,
                   requests_per_s=rate(int(ok.sum())), samples_per_s=rate(samples),
                   request_ms=percentiles(r.latency_ms[ok]), sample_ms=percentiles(per_sample))


def group_keys(r: Requests, by: str) -> np.ndarray:
    if by not in GROUP_BYS:
        raise ValueError(f"group by must be one of {GROUP_BYS}, got {by!r}")
    other = r.rpc if by == "rpc" else r.name
    return np.array([f"{t} {o}" for t, o in zip(r.transport, other)], dtype=object)


def summaries(r: Requests) -> list[Summary]:
    """Overall, then per transport + rpc, then per transport + Locust name (batch size)."""
    out = [summarize(r)]
    for by in GROUP_BYS:
        keys = group_keys(r, by)
        out += [summarize(r.subset(keys == k), k) for k in sorted(set(keys))]
    return out


def error_counts(r: Requests) -> dict[str, int]:
    errs = r.error[~r.ok]
    return {e: int((errs == e).sum()) for e in sorted(set(errs))}


def _fmt(v: float) -> str:
    return "n/a" if not np.isfinite(v) else (f"{v:.3f}" if v < 10 else f"{v:.1f}")


def markdown(rows: list[Summary], errors: dict[str, int], source: str) -> str:
    lines = [
        "# Load test summary", "",
        f"Source: `{source}` (one row per request; latencies measured with perf_counter in the Locust client).",
        "Per-sample latency = request latency / samples in the request. Throughput = successful samples / "
        "(last answer - first send).", "",
        "| group | requests | errors | samples/s | req/s | request p50 / p90 / p99 ms | per-sample p50 / p90 / p99 ms |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for s in rows:
        req = " / ".join(_fmt(s.request_ms[f"p{p}"]) for p in PERCENTILES)
        smp = " / ".join(_fmt(s.sample_ms[f"p{p}"]) for p in PERCENTILES)
        lines.append(f"| {s.group} | {s.requests} | {s.errors} | {_fmt(s.samples_per_s)} | "
                     f"{_fmt(s.requests_per_s)} | {req} | {smp} |")
    lines += ["", "## Errors", ""]
    lines += [f"- {n} x `{e}`" for e, n in errors.items()] or ["none"]
    lines += ["", "![latency over time](latency_over_time.png)", "", "![histogram](latency_hist.png)", ""]
    return "\n".join(lines)


def plot(r: Requests, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = group_keys(r, "rpc")
    t0 = float(r.start_s.min()) if len(r) else 0.0
    paths = [out_dir / "latency_over_time.png", out_dir / "latency_hist.png"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for k in sorted(set(keys)):
        m = (keys == k) & r.ok
        ax.scatter(r.start_s[m] - t0, r.latency_ms[m], s=6, label=k, alpha=0.6)
    bad = ~r.ok
    if bad.any():
        ax.scatter(r.start_s[bad] - t0, r.latency_ms[bad], s=14, marker="x", color="red", label="errors")
    ax.set(xlabel="seconds since start", ylabel="request latency (ms)", yscale="log", title="Request latency over time")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4.5))
    per_sample = r.latency_ms / np.maximum(r.samples, 1)
    pos = per_sample[r.ok & (per_sample > 0)]
    bins = np.logspace(np.log10(pos.min()), np.log10(pos.max()) + 1e-9, 50) if len(pos) else 10
    for k in sorted(set(keys)):
        m = (keys == k) & r.ok & (per_sample > 0)
        ax.hist(per_sample[m], bins=bins, alpha=0.55, label=k)
    ax.set(xlabel="per-sample latency (ms)", ylabel="requests", xscale="log", title="Per-sample latency histogram")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def write_report(csv_path: str | Path, out_dir: str | Path, plots: bool = True) -> list[Summary]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    r = read_requests(csv_path)
    rows, errors = summaries(r), error_counts(r)
    (out / "summary.md").write_text(markdown(rows, errors, str(csv_path)))
    (out / "summary.json").write_text(json.dumps({"groups": [asdict(s) for s in rows], "errors": errors}, indent=2))
    if plots and len(r):
        plot(r, out)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", type=Path, help="raw per-request CSV from loadtest/locustfile.py (--raw-csv)")
    p.add_argument("--out", type=Path, default=Path("out/loadtest"), help="output directory")
    p.add_argument("--no-plots", action="store_true", help="markdown + JSON only")
    a = p.parse_args(argv)
    if not a.csv.is_file():
        p.error(f"csv: no such file {a.csv} (run `make loadtest` first)")
    rows = write_report(a.csv, a.out, plots=not a.no_plots)
    print((a.out / "summary.md").read_text().split("\n## Errors")[0])
    return 1 if rows and rows[0].requests == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
