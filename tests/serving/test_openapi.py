"""The OpenAPI document (serving/gateway/openapi.py): valid OpenAPI 3, equal to the committed docs/openapi.json, served
at /openapi.json, and every example answers as documented by a real gateway in front of a real Triton."""
from __future__ import annotations

import json

import jsonschema
import pytest
from openapi_spec_validator import validate

from serving.gateway import openapi
from serving.gateway.auth import OPEN_HTTP_PATHS

EXAMPLE_PATHS = {"generate": "/v1/generate", "denoise": "/v1/denoise"}


def test_document_is_valid_openapi():
    doc = openapi.document()
    validate(doc)
    assert doc["openapi"].startswith("3.")
    assert {"/v1/generate", "/v1/denoise", "/v1/models", "/healthz", "/readyz", "/metrics"} <= set(doc["paths"])


def test_committed_copy_is_current():
    assert openapi.COMMITTED.read_text() == openapi.dumps(), \
        "docs/openapi.json drifted from the code: run `python -m serving.gateway.openapi` and commit it"


def test_schemas_cover_every_proto_field():
    from serving.generated.mnistgen.v1 import generation_pb2 as pb

    schemas = openapi.document()["components"]["schemas"]
    for name, msg in pb.DESCRIPTOR.message_types_by_name.items():
        assert set(schemas[name]["properties"]) == {f.name for f in msg.fields}, name
    commented = [f"{n}.{f}" for n in ("GenerateRequest", "DenoiseRequest") for f in schemas[n]["properties"]]
    assert all(schemas[k.split(".")[0]]["properties"][k.split(".")[1]]["description"] for k in commented)


def schema_validator(schema_name: str):
    doc = openapi.document()
    return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{schema_name}",
                                            "components": doc["components"]})


def assert_contains(actual, expected, where: str = "body"):
    """Every field of the documented example is in the real answer with the same value."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: {actual!r}"
        for k, v in expected.items():
            assert k in actual, f"{where}.{k} missing from {sorted(actual)}"
            assert_contains(actual[k], v, f"{where}.{k}")
    else:
        assert actual == expected, f"{where}: documented {expected!r}, answered {actual!r}"


def test_served_document_and_examples_answer_as_documented(ready_gateway):
    r = ready_gateway.http("GET", "/openapi.json")
    assert r.status == 200 and r.headers["Content-Type"].startswith("application/json")
    doc = r.json()
    assert doc == json.loads(openapi.dumps())
    checked = 0
    for key, path in EXAMPLE_PATHS.items():
        op = doc["paths"][path]["post"]
        requests = op["requestBody"]["content"]["application/json"]["examples"]
        answers = {name: (int(status), ex["value"]) for status, resp in op["responses"].items()
                   for name, ex in resp["content"].get("application/json", {}).get("examples", {}).items()}
        assert set(requests) <= set(answers), f"{path}: request examples without a documented answer"
        for name, ex in requests.items():
            status, expected = answers[name]
            r = ready_gateway.http("POST", path, ex["value"])
            assert r.status == status, f"{path} example {name!r}: {r.status} {r.body[:300]!r}"
            body = r.json()
            schema = "Error" if status != 200 else op["responses"]["200"]["content"]["application/json"]["schema"][
                "$ref"].rsplit("/", 1)[1]
            schema_validator(schema).validate(body)
            assert_contains(body, expected, f"{path} {name}")
            checked += 1
            if status == 200:  # the image/png variant answers the same example with a PNG and the documented headers
                r = ready_gateway.http("POST", path, ex["value"], headers={"Accept": "image/png"})
                assert r.status == 200 and r.headers["Content-Type"] == "image/png" and r.body[:4] == b"\x89PNG"
                assert set(op["responses"]["200"]["headers"]) <= set(r.headers)
                assert r.headers["X-Mnistgen-Seed"] == expected["seed"]
    assert checked == sum(len(v) for v in openapi.examples().values())


def test_models_answer_matches_schema(ready_gateway):
    r = ready_gateway.http("GET", "/v1/models")
    assert r.status == 200
    schema_validator("ListModelsResponse").validate(r.json())


def test_open_paths_and_the_401_example_with_tokens_on(make_gateway):
    token = "openapi-test-token"
    gw = make_gateway(env={"MNISTGEN_API_TOKENS": token})
    doc = openapi.document()
    for path in sorted(OPEN_HTTP_PATHS):
        assert gw.http("GET", path).status == 200, f"{path} should be reachable without a token"
        if path in doc["paths"]:
            assert doc["paths"][path]["get"]["security"] == []
    gen = doc["paths"]["/v1/generate"]["post"]
    request = gen["requestBody"]["content"]["application/json"]["examples"]["grid"]["value"]
    expected = gen["responses"]["401"]["content"]["application/json"]["examples"]["no-token"]["value"]
    r = gw.http("POST", "/v1/generate", request)
    assert (r.status, r.json()) == (401, expected)
    r = gw.http("POST", "/v1/generate", request, headers={"Authorization": f"Bearer {token}"})
    assert r.status == 200


@pytest.mark.parametrize("path", ["/", "/static/app.js", "/static/style.css"])
def test_page_files_are_served(ready_gateway, path):
    r = ready_gateway.http("GET", path)
    assert r.status == 200 and r.body
