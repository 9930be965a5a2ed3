"""serving.pb_json: the HTTP API's JSON is protobuf's own mapping, byte for byte, whichever way the raw images go."""
from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from google.protobuf import json_format

from serving import pb_json
from serving.gateway.service import fill_images
from serving.generated.mnistgen.v1 import generation_pb2 as pb


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, 1, 28, 28)).astype(np.float32)  # (n, 1, 28, 28)


def generate_response(n: int, fmt: str = "RAW_FLOAT32") -> pb.GenerateResponse:
    r = pb.GenerateResponse(model="dcgan-baseline", model_version="1", seed=2**40 + 3)
    fill_images(r.images, images(n), fmt)
    r.timing.server_ms, r.timing.per_sample_ms = 5.25, 5.25 / n
    return r


def denoise_response(n: int) -> pb.DenoiseResponse:
    r = pb.DenoiseResponse(model_version="1", seed=7, sigma=0.3, steps=20, sampler="dpm-solver++")
    fill_images(r.noisy, images(n, 1), "RAW_FLOAT32")
    fill_images(r.denoised, images(n, 2), "RAW_FLOAT32")
    return r


CASES = [generate_response(1), generate_response(64), generate_response(3, "PNG"), denoise_response(16),
         denoise_response(1), pb.GenerateResponse(), pb.ListModelsResponse(models=[pb.ModelInfo(name="m")])]


@pytest.mark.parametrize("msg", CASES, ids=lambda m: f"{type(m).__name__}-{m.ByteSize()}")
def test_dumps_is_protobufs_json_byte_for_byte_and_loads_reads_it_back(msg):
    body = pb_json.dumps(msg)
    assert body == json.dumps(pb_json.message_json(msg)).encode()
    back = pb_json.loads(body, type(msg))
    assert back == msg
    assert back == json_format.Parse(body, type(msg)(), ignore_unknown_fields=True)


def test_dumps_leaves_the_message_as_it_was():
    msg = denoise_response(16)
    before = msg.SerializeToString()
    pb_json.dumps(msg)
    assert msg.SerializeToString() == before


def test_large_blocks_are_spliced_small_ones_are_not():
    assert pb_json.image_fields(generate_response(64)) == ["images"]
    assert pb_json.image_fields(denoise_response(16)) == ["noisy", "denoised"]
    assert pb_json.image_fields(generate_response(1)) == []  # 3,136 bytes: below SPLICE_BYTES
    assert pb_json.image_fields(generate_response(2, "PNG")) == []


def test_loads_reads_what_protobuf_reads_urlsafe_unpadded_camel_case_unknown_fields():
    msg = generate_response(64)
    obj = json.loads(pb_json.dumps(msg))
    raw = base64.urlsafe_b64encode(msg.images.raw).rstrip(b"=").decode()
    assert "-" in raw or "_" in raw  # (the data has some: the fast decoder refuses them, protobuf's takes them)
    obj["images"]["raw"] = raw
    obj["modelVersion"] = obj.pop("model_version")
    obj["unknown_field"] = {"x": 1}
    body = json.dumps(obj).encode()
    assert pb_json.loads(body, pb.GenerateResponse) == msg
    assert json_format.Parse(body, pb.GenerateResponse(), ignore_unknown_fields=True) == msg


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'{"images": {"raw": 5}}', b'{"seed": "x"}'])
def test_loads_raises_protobufs_parse_error(body):
    with pytest.raises(json_format.ParseError):
        pb_json.loads(body, pb.GenerateResponse)
