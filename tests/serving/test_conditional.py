"""Class-conditional generation end to end ("give me sixteen 7s"): model ddpm-cond through the real gateway and
Triton over gRPC and HTTP, the digit checked by the committed classifier; bad digits and guidance refused."""
from __future__ import annotations

import base64
import concurrent.futures as cf
import re

import grpc
import numpy as np
import pytest
import torch

from mnistgen.catalog import GENERATORS, MAX_GUIDANCE
from serving.generated.mnistgen.v1 import generation_pb2 as pb

MODEL, TRITON_MODEL = "ddpm-cond", "ddpm_cond_generate"
DEFAULT_GUIDANCE = GENERATORS[MODEL].guidance


def raw(images: pb.Images) -> np.ndarray:
    return np.frombuffer(images.raw, "<f4").reshape(-1, 1, 28, 28)


def read_digits(x: np.ndarray) -> list[int]:
    """The committed classifier's reading of (N, 1, 28, 28) images in [-1, 1]."""
    from training.classifier import load_classifier, predict

    with torch.inference_mode():
        return predict(load_classifier(), torch.from_numpy(x.copy())).argmax(1).tolist()


@pytest.fixture
def cond(ready_gateway, triton, checkpoint_dir):
    triton.require_checkpoint(TRITON_MODEL, checkpoint_dir / "ddpm-cond.safetensors")
    return ready_gateway


def test_sixteen_sevens_grpc_http_and_same_seed(cond):
    req = pb.GenerateRequest(model=MODEL, digit=7, num_samples=16, seed=1)  # served defaults: dpm-solver++ 20
    a = cond.stub.Generate(req, timeout=120)
    assert (a.model, a.digit, a.seed, a.sampler, a.steps) == (MODEL, 7, 1, "dpm-solver++", 20)
    assert a.HasField("digit") and a.guidance == pytest.approx(DEFAULT_GUIDANCE)
    x = raw(a.images)
    assert x.shape == (16, 1, 28, 28) and x.min() >= -1 and x.max() <= 1
    assert read_digits(x) == [7] * 16
    b = cond.stub.Generate(req, timeout=120)  # same seed, same images
    np.testing.assert_allclose(raw(b.images), x, atol=1e-5)
    h = cond.http("POST", "/v1/generate", {"model": MODEL, "digit": 7, "num_samples": 16, "seed": 1})
    assert h.status == 200, h.body
    body = h.json()
    assert body["digit"] == 7 and body["model"] == MODEL
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(body["images"]["raw"]), "<f4").reshape(x.shape), x,
                               atol=1e-5)


def test_digits_mixed_in_one_batch_keep_their_own_images(cond):
    """Concurrent requests for different digits (Triton may batch them into one guided loop) get exactly what
    each gets alone, and each reads as its digit."""
    reqs = [pb.GenerateRequest(model=MODEL, digit=d, num_samples=2, seed=100 + d, steps=8) for d in (0, 3, 8)]
    alone = [raw(cond.stub.Generate(r, timeout=120).images) for r in reqs]
    with cf.ThreadPoolExecutor(len(reqs)) as pool:
        together = list(pool.map(lambda r: raw(cond.stub.Generate(r, timeout=120).images), reqs))
    for d, a, t in zip((0, 3, 8), alone, together):
        np.testing.assert_allclose(t, a, atol=1e-4)
    any_digit = cond.stub.Generate(pb.GenerateRequest(model=MODEL, num_samples=2, seed=5, steps=8), timeout=120)
    assert not any_digit.HasField("digit") and raw(any_digit.images).shape == (2, 1, 28, 28)


@pytest.mark.parametrize("fields, field, words", [
    (dict(model=MODEL, digit=10), "digit", ["0..9", "10"]),
    (dict(model=MODEL, digit=-1), "digit", ["0..9", "-1"]),
    (dict(model="dcgan-baseline", digit=7), "digit", ["unconditional", "ddpm-cond"]),
    (dict(model="ddpm", digit=3), "digit", ["unconditional", "ddpm-cond"]),
    (dict(model=MODEL, digit=7, guidance=MAX_GUIDANCE + 1), "guidance", [f"0..{MAX_GUIDANCE:g}"]),
    (dict(model=MODEL, digit=7, guidance=float("nan")), "guidance", [f"0..{MAX_GUIDANCE:g}"]),
    (dict(model="ddpm", guidance=2.0), "guidance", ["unconditional"]),
])
def test_bad_digit_and_guidance_are_invalid_argument(ready_gateway, fields, field, words):
    with pytest.raises(grpc.RpcError) as e:
        ready_gateway.stub.Generate(pb.GenerateRequest(**fields), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(f"{field}:") and all(w in e.value.details() for w in words), e.value.details()
    if "guidance" in fields and np.isnan(fields["guidance"]):
        return  # NaN has no JSON spelling
    h = ready_gateway.http("POST", "/v1/generate", fields)
    assert h.status == 400 and h.json()["error"]["field"] == field, h.body


def test_list_models_says_who_takes_a_digit_and_metrics_count_digits(cond):
    models = {m.name: m for m in cond.stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
    assert [n for n, m in models.items() if m.accepts_digit] == [MODEL]
    assert models[MODEL].default_guidance == pytest.approx(DEFAULT_GUIDANCE)
    assert models[MODEL].ready
    before = digit_count(cond.metrics(), "4")
    cond.stub.Generate(pb.GenerateRequest(model=MODEL, digit=4, num_samples=1, seed=0, steps=2), timeout=60)
    assert digit_count(cond.metrics(), "4") == before + 1


def digit_count(text: str, digit: str) -> float:
    m = re.search(r'^mnistgen_gateway_generate_digits_total\{digit="%s",model="ddpm-cond"\} (\S+)$' % digit, text, re.M)
    return float(m.group(1)) if m else 0.0
