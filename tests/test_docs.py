"""The README and docs state facts that can drift: the make targets, modules and repository paths they name exist."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
GENERATED = ("out/", "runs/", "bench/", "model_repository_gpu/", "model_repository/my_gan", "checkpoints/<")


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-zA-Z][\w-]*):", (REPO / "Makefile").read_text(), re.M))


@pytest.mark.parametrize("doc", DOCS)
def test_named_make_targets_exist(doc):
    named = set(re.findall(r"`make ([a-z][\w-]*)", (REPO / doc).read_text()))
    assert named <= make_targets(), f"{doc} names make targets the Makefile lacks: {sorted(named - make_targets())}"


@pytest.mark.parametrize("doc", DOCS)
def test_named_modules_exist(doc):
    modules = set(re.findall(r"python -m ((?:mnistgen|serving|training|loadtest)[\w.]*)", (REPO / doc).read_text()))
    missing = sorted(m for m in modules if importlib.util.find_spec(m) is None)
    assert not missing, f"{doc} runs modules that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS)
def test_named_paths_exist(doc):
    text = (REPO / doc).read_text()
    paths = set(re.findall(r"`((?:mnistgen|serving|training|loadtest|model_repository|k8s|prometheus|reports|docs|"
                           r"checkpoints|data|tests)/[\w./-]*)`", text))
    missing = sorted(p for p in paths if not p.startswith(GENERATED) and not (REPO / p).exists()
                     and not (doc.startswith("docs/") and (REPO / "docs" / p).exists()))
    assert not missing, f"{doc} names paths that do not exist: {missing}"
