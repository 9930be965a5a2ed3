"""The layout rule: the runtime core, serving and the Triton models never import the offline training package."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
RUNTIME_DIRS = ("mnistgen", "serving", "model_repository")


def imported_modules(path: Path) -> set[str]:
    """Top-level package names a Python file imports (absolute imports, anywhere in the file)."""
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("top", RUNTIME_DIRS)
def test_runtime_code_does_not_import_training(top):
    files = sorted((REPO_ROOT / top).rglob("*.py"))
    assert files, f"no Python files under {top}/"
    offenders = [str(f.relative_to(REPO_ROOT)) for f in files if "training" in imported_modules(f)]
    assert offenders == [], f"these import the offline training package: {offenders}"


def test_the_grep_of_the_layout_issue_prints_nothing():
    r = subprocess.run(["grep", "-rn", "--include=*.py", r"from training\|import training", *RUNTIME_DIRS],
                       cwd=REPO_ROOT, capture_output=True, text=True)
    assert r.stdout == "", r.stdout


def test_importing_the_core_and_the_gateway_loads_no_torch():
    code = ("import sys, mnistgen, mnistgen.latent, mnistgen.files, mnistgen.cli, serving.gateway; "
            "bad = [m for m in ('torch', 'training', 'diffusers') if m in sys.modules]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
