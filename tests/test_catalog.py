"""The model table (mnistgen.catalog): its one limits check, its JSON extension, and that nothing else names models."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mnistgen import catalog
from mnistgen.catalog import LimitError, check_request
from mnistgen.models import ARCHITECTURES

REPO = Path(__file__).resolve().parents[1]


def test_entries_are_consistent():
    assert len({m.triton for m in catalog.MODELS}) == len(catalog.MODELS)
    assert catalog.DEFAULT_MODEL in catalog.GENERATORS and catalog.DENOISER.kind == catalog.DDPM
    for m in catalog.MODELS:
        assert (REPO / "checkpoints" / m.checkpoint).is_file(), m
        assert (REPO / "model_repository" / m.triton / "config.pbtxt").is_file(), m
        if m.kind != catalog.GAN and m.rpc != catalog.INTERNAL:
            assert m.sampler in catalog.SAMPLERS and m.default_steps(m.sampler) == m.steps
    with pytest.raises(KeyError, match="expected one of"):
        catalog.generator("nope")


@pytest.mark.parametrize("model, kwargs, field, fragment", [
    ("dcgan-baseline", dict(samples=1025), "num_samples", "1..1024"),
    ("dcgan-baseline", dict(samples=1, seed=-1), "seed", "0..9223372036854775807"),
    ("ddpm", dict(samples=65, steps=20, sampler="ddpm"), "num_samples", "1..64"),
    ("ddpm", dict(samples=1, steps=1001, sampler="ddpm"), "steps", "1..1000"),
    ("ddpm", dict(samples=1, steps=20, sampler="euler"), "sampler", "dpm-solver++"),
    ("ddpm-cond", dict(samples=1, steps=20, sampler="ddpm", digit=10), "digit", "0..9"),
    ("ddpm-cond", dict(samples=1, steps=20, sampler="ddpm", guidance=float("nan")), "guidance", "0..10"),
])
def test_check_request_names_the_field_and_range(model, kwargs, field, fragment):
    with pytest.raises(LimitError) as e:
        check_request(catalog.GENERATORS[model], **kwargs)
    assert e.value.field == field and fragment in e.value.message


def test_check_request_accepts_the_edges():
    check_request(catalog.GENERATORS["dcgan-baseline"], 1024, seed=catalog.MAX_SEED)
    check_request(catalog.DENOISER, 64, steps=1000, sampler="ddim", sigma=1.0)
    with pytest.raises(LimitError, match="sigma"):
        check_request(catalog.DENOISER, 1, steps=20, sampler="ddim", sigma=0.0)


def test_cost_is_evaluations_times_samples():
    assert catalog.GENERATORS["dcgan-baseline"].cost(64, 100) == 64
    assert catalog.GENERATORS["ddpm"].cost(4, 100) == 400
    assert catalog.GENERATORS["ddpm-cond"].cost(4, 100, guided=True) == 800


def test_extra_entries_from_json(tmp_path):
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps([{"name": "tiny-gan", "triton": "tiny_generator", "kind": "gan",
                                  "checkpoint": "tiny.safetensors", "max_samples": 8}]))
    code = "from mnistgen import catalog; m = catalog.GENERATORS['tiny-gan']; print(m.triton, m.max_samples)"
    env = dict(os.environ, MNISTGEN_CATALOG=str(extra))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    assert out.stdout.split() == ["tiny_generator", "8"], out.stderr
    extra.write_text(json.dumps([{"name": "x", "triton": "dcgan_generator", "kind": "gan", "checkpoint": "c",
                                  "max_samples": 1}]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    assert out.returncode != 0 and "share a Triton model name" in out.stderr
    extra.write_text(json.dumps([{"name": "x", "kind": "vae"}]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    assert out.returncode != 0 and "expected a list of objects with the keys" in out.stderr


@pytest.mark.parametrize("doc", ["docs/api.md", "README.md"])
def test_docs_show_the_catalog(doc):
    text = (REPO / doc).read_text()
    start, end = text.index("<!-- catalog -->\n"), text.index("<!-- /catalog -->")
    assert text[start + len("<!-- catalog -->\n"):end] == catalog.markdown(), "run python -m mnistgen.catalog"


def non_test_python() -> dict[str, str]:
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True).stdout.split()
    return {f: (REPO / f).read_text() for f in files
            if not f.startswith(("tests/", "serving/generated/")) and (REPO / f).exists()}


def test_models_are_named_in_the_catalog_only():
    """A model is named in the catalog; other code iterates it (issue: one home per concept)."""
    sources = non_test_python()
    for m in catalog.MODELS:
        if m.kind != catalog.GAN:
            continue
        with_triton = sorted(f for f, text in sources.items() if m.triton in text)
        with_name = sorted(f for f, text in sources.items() if f'"{m.name}"' in text)
        assert with_triton == ["mnistgen/catalog.py"], (m.triton, with_triton)
        if m.name not in ARCHITECTURES:  # "mlp" is also the architecture's name (mnistgen.models)
            assert len(with_name) <= 2 and "mnistgen/catalog.py" in with_name, (m.name, with_name)
