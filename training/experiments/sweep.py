"""The loop every study shares: measure a grid of cells -> one JSON file -> a markdown page (and figures).

A study module defines `Config` (a dataclass with `out_dir` and `from_json`), the names `JSON` and `MD` (files
under out_dir), `measure(cfg) -> dict` and `markdown(data, cfg) -> str`, optionally `figures(data, cfg)` and
`paths(cfg)`; its `main` is `sweep.main(module, argv)`. The page is always rendered from the JSON as written,
so `--from-json` regenerates every committed page byte for byte without measuring anything.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

from tqdm import tqdm

from mnistgen.checkpoint import read_config
from mnistgen.cli import USER_ERRORS, add_dataclass_args, dataclass_from_args
from mnistgen.files import REPO_ROOT, repo_path, sha256


def fmt(v, nd: int = 3, none: str = "—", tiny: bool = False) -> str:
    """A table cell: None -> `none`, floats with `nd` decimals (inf as "inf"; `tiny`: 1.2e-05 below 10^-nd)."""
    if v is None:
        return none
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:.1e}" if tiny and v != 0 and abs(v) < 10 ** -nd else f"{v:.{nd}f}"
    return str(v)


def table(header: str, align: str, rows: Iterable[Iterable]) -> list[str]:
    """Markdown table lines: `header` "a | b", `align` "---|---:" and the rows' cells joined."""
    return [f"| {header} |", f"|{align}|"] + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def page(name: str, **fields) -> str:
    """pages/<name>.md (the page's prose) filled in by str.format: `{c[seed]}` walks the JSON, tables come computed."""
    return (Path(__file__).with_name("pages") / f"{name}.md").read_text().format(**fields)


def paths(mod, cfg) -> tuple[Path, Path]:
    """(JSON, page) of a study: its file names under cfg.out_dir unless the module says otherwise."""
    if hasattr(mod, "paths"):
        return mod.paths(cfg)
    out = repo_path(cfg.out_dir)
    return out / mod.JSON, out / mod.MD


def load(path: Path, default: dict | None = None) -> dict:
    """A study's JSON; `default` (or FileNotFoundError naming the file) when it is missing."""
    if not path.is_file():
        if default is not None:
            return default
        raise FileNotFoundError(f"{path} not found: run the study first (without --from-json)")
    return json.loads(path.read_text())


def save(path: Path, data: dict, indent: int = 1) -> None:
    """Write a study's JSON whole (a stopped run never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=indent, allow_nan=False) + "\n")
    tmp.replace(path)


def cells(todo: Iterable[tuple[str, Callable[[], dict]]], done: dict | None = None, key: Callable | None = None,
          after: Callable[[dict], None] | None = None, desc: str = "cells") -> dict[str, dict]:
    """Measure each (name, fn) in turn -> {name: fn() + wall_s}. A row of `done` whose `key` equals key(name) is
    taken over unmeasured (marked reused); `after(rows)` runs after each measured row (to save what is measured)."""
    rows: dict[str, dict] = {}
    todo = list(todo)
    bar = tqdm(todo, desc=desc, unit="cell")
    for name, fn in bar:
        old = (done or {}).get(name)
        if key is not None and old is not None and old.get("key") == key(name):
            rows[name] = {**old, "reused": True}
            tqdm.write(f"[{name}] reused (same settings and checkpoints)")
            continue
        t0 = time.perf_counter()
        row = fn()
        rows[name] = {**row, "wall_s": round(time.perf_counter() - t0, 1)} | ({"key": key(name)} if key else {})
        tqdm.write(f"[{name}] " + json.dumps({k: v for k, v in row.items() if isinstance(v, (int, float, str))})[:300])
        if after is not None:
            after(rows)
    return rows


def evaluated(ecfg, keys: Iterable[str]) -> dict:
    """training.evaluate's figures for one EvalConfig, only `keys` (those it returned)."""
    from ..evaluate import evaluate

    result = evaluate(ecfg)
    return {k: result[k] for k in keys if k in result}


def checkpoint_info(path: str | Path) -> dict:
    """A checkpoint's path (repository-relative when inside it), sha256, training summary and config."""
    path, config = Path(path), read_config(path)
    shown = path.resolve().relative_to(REPO_ROOT) if path.resolve().is_relative_to(REPO_ROOT) else path
    return {"path": str(shown), "sha256": sha256(path), "summary": config.get("summary", {}), "config": config}


def machine(threads: int) -> str:
    return f"{platform.machine()} CPU, torch threads={threads}"


def run(mod, cfg) -> dict:
    """Measure (unless cfg.from_json) into the JSON, then render the page (and figures) from the JSON alone."""
    json_path, md_path = paths(mod, cfg)
    if not cfg.from_json:
        save(json_path, mod.measure(cfg), getattr(mod, "INDENT", 1))
    data = load(json_path)
    md_path.write_text(mod.markdown(data, cfg))
    if hasattr(mod, "figures"):
        mod.figures(data, cfg)
    print(f"wrote {md_path} from {json_path}")
    return data


def parser(mod) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=mod.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(p, mod.Config, exclude=getattr(mod, "POSITIONAL", ()),
                       help={"from_json": "only re-render the page (and figures) from the JSON"})
    for name in getattr(mod, "POSITIONAL", ()):
        p.add_argument(name, nargs="*", help=f"{name} (see above)")
    return p


def main(mod, argv: list[str] | None = None) -> int:
    """The CLI of a study: its Config's options; 2 with `error: ...` for a bad option or a missing file."""
    p = parser(mod)
    a = p.parse_args(argv)
    try:
        cfg = dataclass_from_args(mod.Config, a, **{n: list(getattr(a, n)) for n in getattr(mod, "POSITIONAL", ())})
        run(mod, cfg)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
