"""The loop every study shares: measure a grid of cells -> one JSON file -> a markdown page (and figures).

A study module defines `Config` (a dataclass with `out_dir` and `from_json`), the file names `JSON` and `MD` under
out_dir (or `paths(cfg)`), `measure(cfg) -> dict` and `markdown(data, cfg) -> str` (its prose in pages/<module>.md),
optionally `figures(data, cfg)`; `python -m` runs `sweep.main(module)`. The page is always rendered from the JSON as
written, so `--from-json` regenerates every committed page byte for byte without measuring anything.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

from tqdm import tqdm

from mnistgen.checkpoint import read_config
from mnistgen.cli import USER_ERRORS, add_dataclass_args, dataclass_from_args
from mnistgen.files import repo_path, repo_relative, sha256


def fmt(v, nd: int = 3, tiny: bool = False) -> str:
    """A table cell: None -> "—", floats with `nd` decimals (inf as "inf"; `tiny`: 1.2e-05 below 10^-nd)."""
    if not isinstance(v, float):
        return "—" if v is None else str(v)
    if math.isinf(v):
        return "inf"
    return f"{v:.1e}" if tiny and v != 0 and abs(v) < 10 ** -nd else f"{v:.{nd}f}"


def table(header: str, align: str, rows: Iterable[Iterable]) -> str:
    """A markdown table: `header` "a | b", `align` "---|---:", one line per row of cells."""
    return "\n".join([f"| {header} |", f"|{align}|"] + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


PAGES = Path(__file__).with_name("pages")  # each study's prose, as str.format templates


def page(name: str, **fields) -> str:
    """pages/<name>.md filled in by str.format: `{c[seed]}` walks the JSON, tables come computed."""
    return (PAGES / f"{name}.md").read_text().format(**fields)


def paths(mod, cfg) -> tuple[Path, Path]:
    """(JSON, page) of a study: its file names under cfg.out_dir unless the module says otherwise."""
    if hasattr(mod, "paths"):
        return mod.paths(cfg)
    return repo_path(cfg.out_dir) / mod.JSON, repo_path(cfg.out_dir) / mod.MD


def load(path: Path, default: dict | None = None) -> dict:
    """A study's JSON; `default` (or FileNotFoundError naming the file) when it is missing."""
    if path.is_file():
        return json.loads(path.read_text())
    if default is None:
        raise FileNotFoundError(f"{path} not found: run the study first (without --from-json)")
    return default


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
    for name, fn in tqdm(list(todo), desc=desc, unit="cell"):
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


def checkpoint_info(path: str | Path) -> dict:
    """A checkpoint's path, sha256, training summary and config."""
    config = read_config(path)
    return {"path": repo_relative(path), "sha256": sha256(path), "summary": config.get("summary", {}), "config": config}


def machine(threads: int, **extra) -> dict:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": threads, "torch": torch.__version__, **extra}


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


def main(mod, argv: list[str] | None = None) -> int:
    """A study's CLI: its Config's options (and POSITIONAL lists); 2 with `error: ...` for a bad option or file."""
    p = argparse.ArgumentParser(description=mod.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    positional = getattr(mod, "POSITIONAL", ())
    add_dataclass_args(p, mod.Config, exclude=positional, help={"from_json": "only re-render from the JSON"})
    for name in positional:
        p.add_argument(name, nargs="*", help=f"{name} (see above)")
    a = p.parse_args(argv)
    try:
        run(mod, dataclass_from_args(mod.Config, a, **{n: list(getattr(a, n)) for n in positional}))
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
