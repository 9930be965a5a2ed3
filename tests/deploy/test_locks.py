"""The locks (requirements/<role>.txt, written by `make lock`) still match pyproject.toml: offline, from the files alone.

uv marks each locked package with what asked for it (`# via`). A lock matches its extra when the packages it marks
`mnistgen-serve (pyproject.toml)` are exactly the extra's requirements (self-references expanded), each pinned inside
its specifier, and the ones marked `-r requirements/build.in` exactly pyproject.toml's [build-system] requires. Every
package is pinned with == and carries hashes (pip's --require-hashes installs nothing else), everything a package
names as its reason is in the same lock, and the role locks are subsets of the dev lock at the same versions and
hashes (what `make setup` installs and the tests run is what the images install).
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from test_dockerfile import PROJECT, PYPROJECT, REPO, project_requirements

LOCK_DIR = REPO / "requirements"
BUILD_IN = LOCK_DIR / "build.in"
ROLES = ("dev", "serve", "triton", "export", "train", "loadtest")  # Makefile's `lock` target, dev first
NOT_LOCKED = {"gpu": "onnxruntime-gpu on CUDA: installed by hand beside a lock (docs/deployment.md)"}
SELF = f"{PROJECT} (pyproject.toml)"
BUILD = "-r requirements/build.in"
DEV_BOUND = "-c requirements/dev.txt"


@dataclass
class Pin:
    version: str
    hashes: set[str] = field(default_factory=set)
    via: set[str] = field(default_factory=set)


def read_lock(text: str) -> dict[str, Pin]:
    """uv's requirements output: `name==version \\`, `--hash=sha256:...` lines, then `# via X` or `# via` + `#   X`."""
    pins: dict[str, Pin] = {}
    current = None
    for line in text.splitlines():
        if m := re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==(\S+?)\s*\\?$", line):
            current = pins.setdefault(canonicalize_name(m.group(1)), Pin(m.group(2)))
        elif line.startswith(" ") and current is not None:
            item = line.strip().rstrip("\\").strip()
            if item.startswith("--hash="):
                current.hashes.add(item.removeprefix("--hash="))
            elif (m := re.match(r"#\s+(?:via\b)?\s*(.*)$", item)) and m.group(1):
                current.via.add(m.group(1).strip())
        elif line.strip() and not line.startswith("#"):
            raise AssertionError(f"not a pinned requirement: {line!r}")
    return pins


def build_requirements() -> list[Requirement]:
    with open(PYPROJECT, "rb") as f:
        return [Requirement(r) for r in tomllib.load(f)["build-system"]["requires"]]


def mismatches(pins: dict[str, Pin], wanted: list[Requirement], build: list[Requirement]) -> list[str]:
    """Why a lock does not match its extra's requirements (`wanted`) and the build requirements; [] when it does."""
    problems = []
    for reason, reqs in ((SELF, wanted), (BUILD, build)):
        marked = {name for name, p in pins.items() if reason in p.via}
        by_name: dict[str, list[Requirement]] = {}
        for r in reqs:
            by_name.setdefault(canonicalize_name(r.name), []).append(r)
        if missing := sorted(set(by_name) - marked):
            problems.append(f"{reason} asks for {missing}, not locked for it")
        if extra := sorted(marked - set(by_name)):
            problems.append(f"locked for {reason} but no longer asked for: {extra}")
        for name in sorted(set(by_name) & marked):
            for r in by_name[name]:
                if not r.specifier.contains(Version(pins[name].version), prereleases=True):
                    problems.append(f"{name}=={pins[name].version} is outside {reason}'s {r}")
    return problems


def lock(role: str) -> dict[str, Pin]:
    path = LOCK_DIR / f"{role}.txt"
    assert path.exists(), f"{path.relative_to(REPO)} missing: run `make lock`"
    return read_lock(path.read_text())


def test_every_extra_has_a_lock():
    with open(PYPROJECT, "rb") as f:
        extras = set(tomllib.load(f)["project"]["optional-dependencies"])
    assert extras - set(NOT_LOCKED) == set(ROLES), "pyproject.toml's extras and the locks differ"
    assert {p.stem for p in LOCK_DIR.glob("*.txt")} == set(ROLES)
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"LOCK_ROLES := (.*)", makefile).group(1).split() == [r for r in ROLES if r != "dev"]
    assert "--require-hashes -r requirements/dev.txt" in makefile, "make setup must install the dev lock hash-checked"


def test_build_in_is_pyprojects_build_system():
    listed = [Requirement(line.split("#")[0]) for line in BUILD_IN.read_text().splitlines() if line.split("#")[0].strip()]
    assert sorted(map(str, listed)) == sorted(map(str, build_requirements()))


@pytest.mark.parametrize("role", ROLES)
def test_lock_matches_pyproject(role):
    pins = lock(role)
    assert not (problems := mismatches(pins, project_requirements({role}), build_requirements())), \
        f"requirements/{role}.txt no longer matches pyproject.toml (run `make lock`): {problems}"


@pytest.mark.parametrize("role", ROLES)
def test_lock_is_complete_and_hashed(role):
    pins, dev = lock(role), lock("dev")
    unhashed = sorted(n for n, p in pins.items() if not p.hashes)
    assert not unhashed, f"requirements/{role}.txt: no hashes for {unhashed}"
    for name, p in pins.items():
        reasons = {v for v in p.via if v not in (SELF, BUILD, DEV_BOUND)}
        assert {canonicalize_name(v) for v in reasons} <= set(pins), f"{role}: {name} is asked for by {reasons}"
        assert p.via - {DEV_BOUND}, f"{role}: nothing asks for {name}"
        if role != "dev":
            assert name in dev and dev[name].version == p.version and p.hashes <= dev[name].hashes, \
                f"{role}: {name}=={p.version} is not the dev lock's (dev bounds every role: `make lock`)"


def test_one_grpc_version():
    pins = lock("dev")
    family = {n: pins[n].version for n in ("grpcio", "grpcio-tools", "grpcio-health-checking", "grpcio-reflection")}
    assert len(set(family.values())) == 1, family


def test_mismatches_catches_drift():
    """The check itself: an added, a dropped and a re-pinned requirement are each reported."""
    pins, build = lock("serve"), build_requirements()
    wanted = project_requirements({"serve"})
    assert mismatches(pins, wanted, build) == []
    assert "asks for ['requests']" in " ".join(mismatches(pins, wanted + [Requirement("requests>=2")], build))
    dropped = [r for r in wanted if canonicalize_name(r.name) != "pillow"]
    assert "no longer asked for: ['pillow']" in " ".join(mismatches(pins, dropped, build))
    repinned = [Requirement("grpcio==1.85.1") if r.name == "grpcio" else r for r in wanted]
    assert any("grpcio==" in m and "outside" in m for m in mismatches(pins, repinned, build))
    assert mismatches(pins, wanted, build[:-1]), "a dropped build requirement goes unnoticed"
