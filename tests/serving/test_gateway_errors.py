"""Every bad input over gRPC and HTTP: INVALID_ARGUMENT / 400 naming the field, size limits, the queue bound, deadlines."""
from __future__ import annotations

import base64
import concurrent.futures

import grpc
import numpy as np
import pytest

from serving import images as imgs
from serving.generated.mnistgen.v1 import generation_pb2 as pb
from serving.process import wait_until

PNG = imgs.encode_png(np.where(np.arange(784).reshape(28, 28) % 28 < 14, 0, 255).astype(np.uint8))
BIG_PNG = imgs.encode_png(np.zeros((32, 30), np.uint8))  # 30 wide, 32 high
B64 = base64.b64encode(PNG).decode()
NAN_RAW = np.full(784, np.nan, "<f4").tobytes()

# (name, rpc, gRPC request, HTTP JSON body, field the error must name, fragment of the message)
CASES = [
    ("unknown model", "Generate", pb.GenerateRequest(model="vae"), {"model": "vae"}, "model", "dcgan-baseline"),
    ("too many samples", "Generate", pb.GenerateRequest(num_samples=1025), {"num_samples": 1025}, "num_samples",
     "1..1024"),
    ("negative samples", "Generate", pb.GenerateRequest(num_samples=-1), {"num_samples": -1}, "num_samples", "1..1024"),
    ("ddpm sample limit", "Generate", pb.GenerateRequest(model="ddpm", num_samples=65),
     {"model": "ddpm", "num_samples": 65}, "num_samples", "1..64"),
    ("steps too many", "Generate", pb.GenerateRequest(model="ddpm", steps=1001), {"model": "ddpm", "steps": 1001},
     "steps", "1..1000"),
    ("steps for a GAN", "Generate", pb.GenerateRequest(steps=5), {"steps": 5}, "steps", "only the ddpm models"),
    ("unknown sampler", "Generate", pb.GenerateRequest(model="ddpm", sampler="euler"),
     {"model": "ddpm", "sampler": "euler"}, "sampler", "dpm-solver++"),
    ("negative seed", "Generate", pb.GenerateRequest(seed=-5), {"seed": -5}, "seed", "0..9223372036854775807"),
    ("unknown format", "Generate", pb.GenerateRequest(format=9), {"format": 9}, "format", "PNG_GRID"),
    ("no images", "Denoise", pb.DenoiseRequest(sigma=0.5), {"sigma": 0.5}, "images", "1..64"),
    ("both inputs", "Denoise", pb.DenoiseRequest(png_images=[PNG], raw_images=b"\0" * 3136, sigma=0.5),
     {"png_images": [B64], "raw_images": base64.b64encode(b"\0" * 3136).decode(), "sigma": 0.5}, "images", "not both"),
    ("sigma missing", "Denoise", pb.DenoiseRequest(png_images=[PNG]), {"png_images": [B64]}, "sigma", "0 < sigma <= 1"),
    ("sigma too big", "Denoise", pb.DenoiseRequest(png_images=[PNG], sigma=1.5), {"png_images": [B64], "sigma": 1.5},
     "sigma", "0 < sigma <= 1"),
    ("sigma NaN", "Denoise", pb.DenoiseRequest(png_images=[PNG], sigma=float("nan")),
     {"png_images": [B64], "sigma": "NaN"}, "sigma", "0 < sigma <= 1"),
    ("bad png", "Denoise", pb.DenoiseRequest(png_images=[b"GIF89a..."], sigma=0.5),
     {"png_images": [base64.b64encode(b"GIF89a...").decode()], "sigma": 0.5}, "png_images[0]", "not a decodable PNG"),
    ("wrong size", "Denoise", pb.DenoiseRequest(png_images=[PNG, BIG_PNG], sigma=0.5),
     {"png_images": [B64, base64.b64encode(BIG_PNG).decode()], "sigma": 0.5}, "png_images[1]",
     "30x32, expected 28x28"),
    ("too many images", "Denoise", pb.DenoiseRequest(png_images=[PNG] * 65, sigma=0.5),
     {"png_images": [B64] * 65, "sigma": 0.5}, "png_images", "1..64"),
    ("raw length", "Denoise", pb.DenoiseRequest(raw_images=b"\0" * 3000, sigma=0.5),
     {"raw_images": base64.b64encode(b"\0" * 3000).decode(), "sigma": 0.5}, "raw_images", "multiple of 3136"),
    ("raw NaN", "Denoise", pb.DenoiseRequest(raw_images=NAN_RAW, sigma=0.5),
     {"raw_images": base64.b64encode(NAN_RAW).decode(), "sigma": 0.5}, "raw_images", "NaN/Inf"),
    ("raw range", "Denoise", pb.DenoiseRequest(raw_images=np.full(784, 3.0, "<f4").tobytes(), sigma=0.5),
     {"raw_images": base64.b64encode(np.full(784, 3.0, "<f4").tobytes()).decode(), "sigma": 0.5}, "raw_images",
     "[-1, 1]"),
    ("denoise steps", "Denoise", pb.DenoiseRequest(png_images=[PNG], sigma=0.5, steps=0 - 2),
     {"png_images": [B64], "sigma": 0.5, "steps": -2}, "steps", "1..1000"),
    ("denoise sampler", "Denoise", pb.DenoiseRequest(png_images=[PNG], sigma=0.5, sampler="pndm"),
     {"png_images": [B64], "sigma": 0.5, "sampler": "pndm"}, "sampler", "ddim"),
]


@pytest.mark.parametrize("name, rpc, request_pb, body, field, fragment", CASES, ids=[c[0] for c in CASES])
def test_invalid_argument_grpc_and_http(gateway, name, rpc, request_pb, body, field, fragment):
    with pytest.raises(grpc.RpcError) as e:
        getattr(gateway.stub, rpc)(request_pb, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(field + ":") and fragment in e.value.details(), e.value.details()
    r = gateway.http("POST", f"/v1/{rpc.lower()}", body)
    assert r.status == 400, r.body
    err = r.json()["error"]
    assert (err["code"], err["field"]) == ("INVALID_ARGUMENT", field) and fragment in err["message"], err


@pytest.mark.parametrize("body, field, fragment", [
    (b"{not json", "body", "not valid JSON"),
    (b"[1, 2]", "body", "must be a JSON object"),
    (b'{"num_samples": "many"}', "num_samples", "num_samples"),
    (b'{"nmu_samples": 3}', "nmu_samples", "has no field named"),
    (b'{"seed": 1.5}', "seed", "seed"),
])
def test_http_malformed_json(gateway, body, field, fragment):
    r = gateway.http("POST", "/v1/generate", body, headers={"Content-Type": "application/json"})
    assert r.status == 400
    err = r.json()["error"]
    assert err["field"] == field and fragment in err["message"], err


def test_http_query_and_header_errors(gateway):
    r = gateway.http("POST", "/v1/denoise?sigma=lots", PNG, headers={"Content-Type": "image/png"})
    assert r.status == 400 and r.json()["error"]["field"] == "sigma"
    r = gateway.http("POST", "/v1/denoise?sigma=0.5&view=sideways", PNG,
                     headers={"Content-Type": "image/png", "Accept": "image/png"})
    assert r.status == 400 and "strip" in r.json()["error"]["message"]
    r = gateway.http("POST", "/v1/generate", {}, headers={"X-Request-Timeout": "-1"})
    assert r.status == 400 and r.json()["error"]["field"] == "X-Request-Timeout"
    r = gateway.http("POST", "/v1/denoise", b"\x89PNG garbage", headers={"Content-Type": "image/png"})
    assert r.status == 400 and r.json()["error"]["field"] == "png_images[0]"


def test_oversized_messages(gateway):
    big = b"\0" * (9 << 20)  # over the 8 MiB default limit
    with pytest.raises(grpc.RpcError) as e:
        gateway.stub.Denoise(pb.DenoiseRequest(raw_images=big, sigma=0.5), timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    r = gateway.http("POST", "/v1/denoise", big, headers={"Content-Type": "application/json"})
    assert r.status == 413


def test_still_serving_after_bad_input(ready_gateway, triton):
    triton.require("dcgan_generator")
    for _ in range(3):
        ready_gateway.http("POST", "/v1/generate", b"\xff\xfe garbage", headers={"Content-Type": "application/json"})
        with pytest.raises(grpc.RpcError):
            ready_gateway.stub.Generate(pb.GenerateRequest(model="nope"), timeout=10)
    r = ready_gateway.stub.Generate(pb.GenerateRequest(num_samples=2, seed=1), timeout=30)
    assert r.images.count == 2


def test_queue_bound_and_deadline(make_gateway, triton):
    triton.require("ddpm_generate")
    tight_gateway = make_gateway("--max-concurrency", "1", "--max-queue", "0")  # one at a time, no queue
    slow = pb.GenerateRequest(model="ddpm", sampler="ddpm", num_samples=2, steps=1000, seed=1)  # seconds of work on CPU
    with pytest.raises(grpc.RpcError) as e:
        tight_gateway.stub.Generate(slow, timeout=0.3)  # client deadline -> Triton client_timeout
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # the gateway gives the slot back (the work stopped): nothing in flight before the next round
    wait_until(lambda: "mnistgen_gateway_in_flight_requests 0.0" in tight_gateway.metrics(), 30,
               "the expired request's slot given back", proc=tight_gateway.proc, interval_s=0.01)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(tight_gateway.stub.Generate, slow, timeout=120)
        wait_until(lambda: "mnistgen_gateway_in_flight_requests 1.0" in tight_gateway.metrics(), 30,
                   "the first request in flight", proc=tight_gateway.proc, interval_s=0.01)
        with pytest.raises(grpc.RpcError) as e:  # the ddpm pool is full (a GAN request has a pool of its own)
            tight_gateway.stub.Generate(pb.GenerateRequest(model="ddpm", num_samples=1), timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "busy" in e.value.details()
        r = tight_gateway.http("POST", "/v1/generate", {"model": "ddpm", "num_samples": 1})
        assert r.status == 429 and r.json()["error"]["code"] == "RESOURCE_EXHAUSTED"
        assert first.result().images.count == 2
    assert tight_gateway.stub.Generate(pb.GenerateRequest(num_samples=1), timeout=30).images.count == 1
