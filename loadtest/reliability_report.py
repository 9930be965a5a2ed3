"""docs/reliability.md, generated: every figure in it is read from the committed JSON files in reports/reliability/.

    python -m loadtest.reliability_report                 # render docs/reliability.md (make reliability-report)
    python -m loadtest.reliability_report --check         # exit 1 when docs/reliability.md differs from a render
    python -m loadtest.reliability_report collect         # after `make reliability`: copy out/reliability/*.json
    python -m loadtest.reliability_report collect-soak    # after `make soak`: copy out/soak/soak.json + soak.png

The template, loadtest/reliability.md.in, is str.format Markdown: `{soak.capacity_rps:.1f}` is soak.json's
capacity_rps, `derived.*` are figures computed here from the files (sums, ranges, tables), never typed in; a field a
file lacks stops the render naming the file and the key, so a renamed figure cannot silently vanish from the page.
The files: what tests/reliability wrote (tests/reliability/reliability_support.py) and `make soak`'s soak.json.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import sys
from pathlib import Path

from mnistgen.files import REPO_ROOT, repo_relative as rel

REPORTS_DIR = REPO_ROOT / "reports" / "reliability"
TEMPLATE = Path(__file__).resolve().parent / "reliability.md.in"
DOC = REPO_ROOT / "docs" / "reliability.md"
TEST_FIGURES = ("bad_input", "triton_faults", "overload", "deadlines", "graceful_stop", "graceful_stop_bound")
SOURCES = ("tests_run", *TEST_FIGURES, "soak")  # the JSON files the template reads (reports/reliability/<name>.json)
RSS_GROWTH_BOUND_PCT = 10.0  # the soak's promise: RSS growth at most this, for the gateway and for Triton


class ReportError(Exception):
    """A committed input is missing or lacks a figure the template quotes."""


# ---- rendering --------------------------------------------------------------------------------------------
def load_sources(reports_dir: Path = REPORTS_DIR) -> dict[str, dict]:
    out = {}
    for name in SOURCES:
        path = reports_dir / f"{name}.json"
        if not path.is_file():
            make, command = ("soak", "collect-soak") if name == "soak" else ("reliability", "collect")
            raise ReportError(f"{rel(path)} is missing: run `make {make}`, then "
                              f"`python -m loadtest.reliability_report {command}`")
        try:
            out[name] = json.loads(path.read_text())
        except ValueError as e:
            raise ReportError(f"{rel(path)} is not valid JSON: {e}") from None
    return out


class Node:
    """A JSON value as str.format walks it: `{soak.rss.gateway.growth_pct}`, list items by index (`{x.ramp.0}`);
    None formats as n/a. A missing key raises ReportError naming the file, the key and the field that wanted it."""

    def __init__(self, value, origin: Path, source: str, path: str = ""):
        self._value, self._origin, self._source, self._path = value, origin, source, path

    def __getattr__(self, key: str) -> Node:
        v, path = self._value, f"{self._path}.{key}".lstrip(".")
        if isinstance(v, dict) and key in v:
            return Node(v[key], self._origin, self._source, path)
        if isinstance(v, list) and key.lstrip("-").isdigit() and -len(v) <= int(key) < len(v):
            return Node(v[int(key)], self._origin, self._source, path)
        have = f"keys {list(v)[:12]}" if isinstance(v, dict) else f"a {type(v).__name__}"
        raise ReportError(f"{rel(self._origin)}: no key {path!r} (found {have} there); the template or a "
                          f"derived figure needs {self._source}.{path}")

    def __format__(self, spec: str) -> str:
        return "n/a" if self._value is None else format(self._value, spec)


def lookup(data, path: str, origin: Path, source: str = ""):
    """data["a"]["b"][0] for "a.b.0" (ReportError naming `origin` and the path when a key is missing)."""
    return functools.reduce(getattr, path.split("."), Node(data, origin, source))._value


def render(reports_dir: Path = REPORTS_DIR, template: Path = TEMPLATE) -> str:
    """The Markdown page from the JSON files in reports_dir."""
    sources = load_sources(reports_dir)
    nodes = {k: Node(v, reports_dir / f"{k}.json", k) for k, v in sources.items()}
    derived = derive(lambda source, path: lookup(sources[source], path, reports_dir / f"{source}.json", source))
    try:
        return Path(template).read_text().format(**nodes, derived=Node(derived, Path(__file__), "derived"))
    except KeyError as e:
        raise ReportError(f"the template quotes an unknown source {e}, expected one of {sorted(nodes)}") from None


# ---- derived figures: computed from the JSON files, never typed in -------------------------------------------
def counts(d: dict) -> str:
    """{"a": 3, "b": 1} -> "a 3, b 1" (in the file's order)."""
    return ", ".join(f"{k} {v}" for k, v in d.items())


def fmt(x, spec: str = ".1f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def derive(get) -> dict:
    """The figures the template quotes as `derived.*`; get(source, path) reads one from a JSON file."""
    d: dict = {}
    # the test run
    files = get("tests_run", "files")
    d["tests_outcome"] = "; ".join(
        f"`{name}` " + ", ".join(f"{v} {k}" for k, v in f["outcome"].items() if v) + f" ({f['time_s']:.0f} s)"
        for name, f in files.items())
    d["tests_wall_min"] = get("tests_run", "wall_s") / 60
    stale = [name for name in TEST_FIGURES if name not in get("tests_run", "written")]
    d["stale_note"] = ("" if not stale else
                       f" The tests did not write {', '.join(f'`{n}.json`' for n in stale)} in that run: those "
                       f"figures are from an earlier one.")
    d["gpu"] = ("a GPU present (unused: Triton runs KIND_CPU)" if get("tests_run", "machine.gpu_devices")
                else "no GPU")
    # bad input
    d["bad_input_campaigns"] = counts(get("bad_input", "per_campaign"))
    d["bad_input_answers"] = counts(get("bad_input", "structure_answers"))
    # Triton faults
    codes = get("triton_faults", "codes")
    d["faults_failures"] = sum(v for k, v in codes.items() if k != "OK")
    d["faults_failure_codes"] = ", ".join(f"{v} `{k}`" for k, v in codes.items() if k != "OK") or "none"
    d["faults_clients"] = sum(get("triton_faults", "clients").values())
    d["faults_readyz_ms"] = get("triton_faults", "readyz_false_after_kill_s") * 1e3
    # overload
    codes = get("overload", "codes")
    d["overload_refused"] = sum(v for k, v in codes.items() if k != "OK")
    d["overload_clients"] = sum(get("overload", "clients").values())
    # graceful stop
    refused = get("graceful_stop", "refused_after_sigterm")
    d["stop_refused"] = sum(refused.values())
    d["stop_refused_codes"] = ", ".join(f"{v} `{k}`" for k, v in refused.items())
    d["stop_clients"] = sum(get("graceful_stop", "clients").values())
    # the soak
    d["soak_generate_pct"] = 100 * (1 - get("soak", "config.denoise_share"))
    d["soak_ramp"] = ", ".join(f"{fmt(r['throughput_rps'])}" for r in get("soak", "ramp"))
    d["soak_ramp_clients"] = ", ".join(str(r["clients"]) for r in get("soak", "ramp"))
    d["soak_batch_sizes"] = "/".join(map(str, get("soak", "config.num_samples")))
    d["soak_denoise_images"] = "/".join(map(str, get("soak", "config.denoise_images")))
    wins = [w for w in get("soak", "windows") if w["requests"]]
    p99s = [w["p99_ms"] for w in wins]
    d["soak_window_p99_min"], d["soak_window_p99_max"] = (min(p99s), max(p99s)) if p99s else (None, None)
    d["soak_codes"] = counts(get("soak", "codes"))
    d["soak_errors_verdict"] = (f"**{get('soak', 'errors')} errors** (promise broken)" if get("soak", "errors")
                                else "**0 errors**")
    growth = [get("soak", f"rss.{name}.growth_pct") for name in ("gateway", "triton")]
    d["soak_rss_bound_pct"] = RSS_GROWTH_BOUND_PCT
    d["soak_rss_verdict"] = ("both within" if all(g is not None and g <= RSS_GROWTH_BOUND_PCT for g in growth)
                             else "**not** both within")
    d["soak_windows_table"] = soak_table(wins, get("soak", "config.window_s"))
    return d


def soak_table(wins: list[dict], window_s: float) -> str:
    head = (f"| window ({window_s:.0f} s) | requests | errors | p50 ms | p99 ms | p99 Generate ms | p99 Denoise ms | "
            "gateway RSS MiB | Triton RSS MiB | load avg |\n" + "|---" * 10 + "|")
    rows = [f"| {w['window'] + 1} | {w['requests']} | {w['errors']} | {fmt(w['p50_ms'])} | {fmt(w['p99_ms'])} | "
            f"{fmt(w['p99_ms_by_kind']['generate'])} | {fmt(w['p99_ms_by_kind']['denoise'])} | "
            f"{fmt(w['gateway_rss_mib'])} | {fmt(w['triton_rss_mib'])} | {fmt(w['load_avg_1m'], '.2f')} |"
            for w in wins]
    return "\n".join([head, *rows])


# ---- collecting the inputs ------------------------------------------------------------------------------------
def collect(reports_dir: Path, src: Path, soak: bool = False) -> int:
    """Copy what the last run wrote into reports_dir: tests_run.json and the figure files it lists as written (from
    out/reliability), or `make soak`'s soak.json and soak.png (from out/soak)."""
    first = src / ("soak.json" if soak else "tests_run.json")
    if not first.is_file():
        raise ReportError(f"{rel(first)} is missing: run `make {'soak' if soak else 'reliability'}` first")
    run = json.loads(first.read_text())
    names = ["soak.png"] if soak else [f"{n}.json" for n in TEST_FIGURES if n in run["written"]]
    for name in [] if soak else (n for n in TEST_FIGURES if n not in run["written"]):
        print(f"warning: that run wrote no {name}.json: {rel(reports_dir)} keeps an earlier one", file=sys.stderr)
    if soak and run["config"]["duration_s"] < 600:
        print(f"note: this soak ran {run['config']['duration_s']:.0f} s, not the full 10 minutes", file=sys.stderr)
    reports_dir.mkdir(parents=True, exist_ok=True)
    for name in [first.name, *names]:
        shutil.copyfile(src / name, reports_dir / name)
    print(f"copied {[first.name, *names]} into {rel(reports_dir)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reports-dir", type=Path, default=REPORTS_DIR, help="the committed JSON inputs")
    p.add_argument("--out", type=Path, default=DOC, help="the page to write (default: docs/reliability.md)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 when --out differs from a render")
    sub = p.add_subparsers(dest="command")
    for command, src, what in (("collect", "reliability", "what the last tests/reliability run wrote"),
                               ("collect-soak", "soak", "`make soak`'s soak.json + soak.png")):
        c = sub.add_parser(command, help=f"copy {what} into --reports-dir")
        c.add_argument("--src", type=Path, default=REPO_ROOT / "out" / src, help="where that run wrote")
    a = p.parse_args(argv)
    try:
        if a.command in ("collect", "collect-soak"):
            return collect(a.reports_dir, a.src, soak=a.command == "collect-soak")
        text = render(a.reports_dir)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.check:
        same = a.out.is_file() and a.out.read_text() == text
        print(f"{rel(a.out)} {'is up to date' if same else 'differs from a render: make reliability-report'}")
        return 0 if same else 1
    a.out.write_text(text)
    print(f"wrote {rel(a.out)} from {rel(a.reports_dir)}/*.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
