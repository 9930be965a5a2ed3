"""Request ids: chosen (the client's or a new one), echoed over HTTP and gRPC, on error answers too, and sent on to
Triton as the inference request's id (the real gateway and the real Triton)."""
from __future__ import annotations

import asyncio
import re

import grpc
import numpy as np
import pytest

from serving.gateway import request_id
from serving.gateway.triton_client import LATENT, TritonClient, infer_request, tensor
from serving.generated.mnistgen.v1 import generation_pb2 as pb

NEW_ID = re.compile(r"[0-9a-f]{16}")


@pytest.mark.parametrize("given", ["abc-123", "0f8c3d9e-6a1b-4c2d-9e8f-7a6b5c4d3e2f", "trace:1/span=2+x_y.z",
                                   "x" * request_id.MAX_CHARS])
def test_a_usable_client_id_is_kept(given):
    assert request_id.choose(given) == given


@pytest.mark.parametrize("given", [None, "", "has space", "new\nline", "x" * (request_id.MAX_CHARS + 1), "é", "a;b",
                                   '"quoted"'])
def test_an_unusable_or_missing_id_is_replaced_never_refused(given):
    assert NEW_ID.fullmatch(request_id.choose(given))


def test_grpc_metadata_lookup():
    assert request_id.from_grpc_metadata((("authorization", "Bearer x"), ("x-request-id", "r-1"))) == "r-1"
    assert NEW_ID.fullmatch(request_id.from_grpc_metadata((("x-request-id", "bad id"),)))
    assert NEW_ID.fullmatch(request_id.from_grpc_metadata(None))
    assert request_id.new_id() != request_id.new_id()


def test_infer_request_carries_the_id():
    req = infer_request("m", [tensor(LATENT, np.zeros((1, 4), np.float32), "FP32")], ["image"], "r-7")
    assert req.id == "r-7"
    assert infer_request("m", [], ["image"]).id == ""


def test_http_answers_carry_the_id(ready_gateway):
    gw = ready_gateway
    r = gw.http("POST", "/v1/generate", {"num_samples": 1, "seed": 1}, headers={"X-Request-Id": "client-id-1"})
    assert r.status == 200 and r.headers["X-Request-Id"] == "client-id-1"
    r = gw.http("POST", "/v1/generate", {"num_samples": 5000}, headers={"X-Request-Id": "client-id-2"})
    assert r.status == 400 and r.headers["X-Request-Id"] == "client-id-2"  # an error answer too
    r = gw.http("GET", "/v1/no-such-route", headers={"X-Request-Id": "client-id-3"})
    assert r.status == 404 and r.headers["X-Request-Id"] == "client-id-3"  # aiohttp's own answer too
    ids = {gw.http("GET", "/healthz", headers={"X-Request-Id": "bad id"}).headers["X-Request-Id"] for _ in range(2)}
    assert len(ids) == 2 and all(NEW_ID.fullmatch(i) for i in ids)  # replaced, and each call its own


def test_grpc_answers_carry_the_id_in_trailing_metadata(ready_gateway):
    stub = ready_gateway.stub
    resp, call = stub.Generate.with_call(pb.GenerateRequest(num_samples=1, seed=1), timeout=30,
                                         metadata=(("x-request-id", "grpc-id-1"),))
    assert resp.images.count == 1 and dict(call.trailing_metadata())["x-request-id"] == "grpc-id-1"
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(pb.GenerateRequest(num_samples=5000), timeout=30, metadata=(("x-request-id", "grpc-id-2"),))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(e.value.trailing_metadata())["x-request-id"] == "grpc-id-2"
    _, call = stub.ListModels.with_call(pb.ListModelsRequest(), timeout=30)
    assert NEW_ID.fullmatch(dict(call.trailing_metadata())["x-request-id"])


def test_triton_receives_the_id(triton):
    """The gateway's Triton client sends the id of the call it serves; Triton echoes it in its response."""
    async def call() -> str:
        client = TritonClient(triton.grpc_url, 64 << 20)
        try:
            request_id.current.set("triton-id-1")
            info = await client.model_info("dcgan_generator", 30)
            z = np.zeros((1, info.latent_dim), np.float32)
            r = await client.infer("dcgan_generator", [tensor(LATENT, z, "FP32")], ["image"], 30)
            return r.get_response().id
        finally:
            await client.close()

    assert asyncio.run(call()) == "triton-id-1"


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_client_errors_carry_the_gateway_request_id(ready_gateway, transport, capsys):
    from serving import client

    assert (client.REQUEST_ID_HEADER, client.REQUEST_ID_KEY) == (request_id.HTTP_HEADER, request_id.GRPC_KEY)
    target = ready_gateway.grpc_target if transport == "grpc" else ready_gateway.http_target
    with pytest.raises(client.ClientError) as e:
        client.GatewayClient(transport=transport, target=target).generate(num_samples=5000)
    assert e.value.code == "INVALID_ARGUMENT" and NEW_ID.fullmatch(e.value.request_id)
    assert client.main(["generate", "--transport", transport, "--target", target, "--n", "5000"]) == 2
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT: num_samples" in err and re.search(r"\(request id [0-9a-f]{16}\)$", err.strip())


def test_access_log_has_one_json_line_per_call(make_gateway, tmp_path):
    import json

    path = tmp_path / "access.log"
    gw = make_gateway("--access-log", str(path))
    gw.stub.Generate(pb.GenerateRequest(num_samples=2, seed=1), timeout=30, metadata=(("x-request-id", "acc-1"),))
    gw.http("POST", "/v1/generate", {"num_samples": 5000}, headers={"X-Request-Id": "acc-2"})
    gw.http("GET", "/healthz")  # not an API call: not logged
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["request_id"], r["rpc"], r["transport"], r["model"], r["code"], r["samples"]) for r in lines] == [
        ("acc-1", "Generate", "grpc", "dcgan-baseline", "OK", 2),
        ("acc-2", "Generate", "http", "dcgan-baseline", "INVALID_ARGUMENT", 0)]  # (no model given: the default)
    assert lines[0]["ms"] > 0 and lines[0]["triton_ms"] > 0 and lines[0]["ts"].endswith("+00:00")


def test_access_log_off_by_default_and_a_bad_path_refused_at_start(gateway, triton, tmp_path):
    from serving.gateway.app import access_logger
    from serving.gateway.auth import ConfigError

    assert access_logger("") is None
    with pytest.raises(ConfigError, match="--access-log"):
        access_logger(str(tmp_path / "no-such-dir" / "access.log"))
