"""The HTTP API's OpenAPI 3.1 document (GET /openapi.json), built from the protobuf descriptors the gateway parses
bodies with (serving/generated/) and the proto file's comments; error shapes are http_api.error_response's and the
error examples' messages come from the gateway's own validation. `python -m serving.gateway.openapi` writes the
committed copy, docs/openapi.json (tests/serving/test_openapi.py fails when it drifts)."""
from __future__ import annotations

import argparse
import base64
import functools
import json
import re
import sys
from pathlib import Path

import numpy as np
from google.protobuf.descriptor import FieldDescriptor as F

from mnistgen import catalog

from .. import images as imgs
from ..generated.mnistgen.v1 import generation_pb2 as pb
from ..validation import ValidationError, validate_denoise, validate_generate
from . import http_api, request_id
from .auth import OPEN_HTTP_PATHS, UNAUTHENTICATED_MESSAGE

PROTO = Path(__file__).resolve().parents[1] / "proto" / "mnistgen" / "v1" / "generation.proto"
COMMITTED = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"  # (in a checkout)
VERSION = "3.1.0"
SCALARS = {
    F.TYPE_DOUBLE: {"type": "number", "format": "double"}, F.TYPE_FLOAT: {"type": "number", "format": "float"},
    F.TYPE_INT32: {"type": "integer", "format": "int32"}, F.TYPE_BOOL: {"type": "boolean"},
    F.TYPE_STRING: {"type": "string"}, F.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
    # protobuf's JSON mapping: int64 is written as a string, read from a number or a string
    F.TYPE_INT64: {"type": ["string", "integer"], "format": "int64", "pattern": "^[0-9]+$"},
}
PNG = {"type": "string", "contentMediaType": "image/png"}
STATUS_TEXT = {  # docs/api.md "Errors"
    400: "INVALID_ARGUMENT: a bad field or malformed JSON (the message names the field and the allowed range)",
    401: "UNAUTHENTICATED: tokens are required and none valid was sent (WWW-Authenticate: Bearer)",
    413: "RESOURCE_EXHAUSTED: the body is over --max-request-bytes",
    429: "RESOURCE_EXHAUSTED: over the admission cost budget or the queue is full (Retry-After)",
    500: "INTERNAL: unexpected (logged with the request id)",
    503: "UNAVAILABLE: Triton down or the model not loaded (Retry-After)",
    504: "DEADLINE_EXCEEDED: the deadline (X-Request-Timeout, --request-timeout-s) passed",
}


def proto_comments(text: str) -> dict[str, str]:
    """'Message' / 'Message.field' / 'Enum.VALUE' -> its comment in the .proto (leading for messages and enums,
    trailing plus continuation lines for fields)."""
    out: dict[str, str] = {}
    block, pending, last = "", [], None
    for line in text.splitlines():
        s = line.strip()
        if m := re.match(r"(?:message|enum|service) (\w+) \{", s):
            block, last = m.group(1), None
            if pending:
                out[block] = " ".join(pending)
        elif s.startswith("//"):
            if last and len(line) - len(line.lstrip()) > 4:  # a field comment going on below it
                out[last] = f"{out.get(last, '')} {s[2:].strip()}".strip()
            else:
                pending.append(s[2:].strip())
            continue
        elif m := re.match(r"(?:optional |repeated )?(?:\w+ )?(\w+) = \d+;\s*(?://\s*(.*))?$", s):
            last = f"{block}.{m.group(1)}"
            if m.group(2):
                out[last] = m.group(2)
        elif s == "}":
            block, last = "", None
        pending = []
    return out


def schemas(comments: dict[str, str]) -> dict[str, dict]:
    """components/schemas: one per message and enum of generation.proto, plus the JSON error shape."""
    out: dict[str, dict] = {}
    for name, enum in pb.DESCRIPTOR.enum_types_by_name.items():
        out[name] = {"type": "string", "enum": [v.name for v in enum.values],
                     "description": comments.get(name, "") + " The number of a value is accepted too: " + ", ".join(
                         f"{v.name} = {v.number} ({comments.get(f'{name}.{v.name}', '')})" for v in enum.values)}
    for name, msg in pb.DESCRIPTOR.message_types_by_name.items():
        props = {}
        for f in msg.fields:
            kind = f.message_type or f.enum_type
            item = ref(kind.name) if kind else dict(SCALARS[f.type])
            item = {"type": "array", "items": item} if f.is_repeated else item
            props[f.name] = {**item, "description": comments.get(f"{name}.{f.name}", "")}
        out[name] = {"type": "object", "properties": props, "additionalProperties": False,
                     "description": comments.get(name, f"mnistgen.v1.{name}")
                     + " Proto field names (requests may use lowerCamelCase too); null means unset."}
    out["Error"] = {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["code", "http_status", "field", "message"], "properties": {
            "code": {"type": "string", "enum": list(http_api.HTTP_STATUS), "description": "gRPC status code name"},
            "http_status": {"type": "integer"},
            "field": {"type": ["string", "null"], "description": "the request field at fault; null when none"},
            "message": {"type": "string", "description": "what is wrong, naming the field and the allowed values"}}}}}
    return out


def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def error_message(check, *args) -> dict:
    """The error body the gateway answers for a request its validation refuses (computed by that validation)."""
    try:
        check(*args)
    except ValidationError as e:
        return {"error": {"code": e.code, "http_status": 400, "field": e.field, "message": e.message}}
    raise AssertionError(f"{check.__name__}{args} passed: not an error example")


def sample_png() -> bytes:
    """A 28x28 PNG of a '1' (a stroke drawn here: no dataset file) for the Denoise examples."""
    x = np.full((1, 1, imgs.SIDE, imgs.SIDE), -1.0, np.float32)
    x[0, 0, 5:23, 13:16] = 1.0
    return imgs.encode_pngs(x)[0]


def examples() -> dict[str, dict]:
    """Request examples and what each answers; a response example shares its request example's name, and lists
    only the fields that do not vary between runs (no image bytes, times or versions)."""
    png = base64.b64encode(sample_png()).decode()
    g, d = catalog.DEFAULT_MODEL, catalog.DENOISER
    return {
        "generate": {
            "grid": ({"model": g, "num_samples": 4, "seed": 7, "format": "PNG_GRID"}, 200, {
                "model": g, "seed": "7", "steps": 0, "sampler": "",
                "images": {"format": "PNG_GRID", "count": 4, "shape": [4, 1, 28, 28]}}),
            "too-many": ({"model": g, "num_samples": catalog.generator(g).max_samples + 1}, 400,
                         error_message(validate_generate, g, catalog.generator(g).max_samples + 1, 7, 0, "", 0)),
        },
        "denoise": {
            "one-digit": ({"png_images": [png], "sigma": 0.5, "steps": 4, "seed": 3, "format": "PNG"}, 200, {
                "model": d.name, "seed": "3", "sigma": 0.5, "steps": 4, "sampler": d.sampler,
                "noisy": {"format": "PNG", "count": 1, "shape": [1, 1, 28, 28]},
                "denoised": {"format": "PNG", "count": 1, "shape": [1, 1, 28, 28]}}),
            "no-sigma": ({"png_images": [png]}, 400,
                         error_message(validate_denoise, [sample_png()], b"", 0.0, 0, "", 3, 0)),
        },
    }


def json_body(schema: str, examples: dict | None = None) -> dict:
    body = {"schema": ref(schema)}
    if examples:
        body["examples"] = {k: {"value": v} for k, v in examples.items()}
    return body


def responses(ok: dict, cases: dict, errors: tuple[int, ...]) -> dict:
    """200 (`ok` content) plus the JSON error statuses, with the examples of `cases` under the status each answers."""
    rid = {request_id.HTTP_HEADER: {"description": "the request id (the client's when usable, else a new one)",
                                    "schema": {"type": "string"}}}
    png = {h: {"description": "on image/png answers (the JSON answer has it in its body)",
               "schema": {"type": "string"}} for h in http_api.png_headers(pb.GenerateResponse())}
    out = {"200": {"description": "OK", "headers": rid | (png if "image/png" in ok else {}), "content": ok}}
    for status in errors:
        ex = {name: body for name, (_, st, body) in cases.items() if st == status}
        if status == 401:
            ex["no-token"] = {"error": {"code": "UNAUTHENTICATED", "http_status": 401, "field": None,
                                        "message": UNAUTHENTICATED_MESSAGE}}
        out[str(status)] = {"description": STATUS_TEXT[status], "headers": rid, "content": {
            "application/json": json_body("Error", ex)}}
    for name, (_, status, body) in cases.items():
        if status == 200:
            out["200"]["content"]["application/json"].setdefault("examples", {})[name] = {"value": body}
    return out


def png_response(schema: str, what: str) -> dict:
    return {"application/json": json_body(schema),
            "image/png": {"schema": {**PNG, "description": f"{what}, for a request sent with Accept: image/png"}}}


def param(where: str, name: str, description: str, schema: dict) -> dict:
    return {"name": name, "in": where, "required": False, "description": description, "schema": schema}


@functools.cache
def document() -> dict:
    """The OpenAPI document (built once; the same for every gateway of this code)."""
    comments = proto_comments(PROTO.read_text())
    ex = examples()
    errors = tuple(STATUS_TEXT)
    common = [param("header", http_api.TIMEOUT_HEADER, "seconds the client will wait (at most --request-timeout-s); "
                    "passed on to Triton", {"type": "number", "exclusiveMinimum": 0}),
              param("header", request_id.HTTP_HEADER, "a request id to use (1-128 of A-Z a-z 0-9 . _ : / + = -)",
                    {"type": "string"})]
    sampler = {"type": "string", "enum": ["", *catalog.SAMPLERS]}
    d = catalog.DENOISER
    plain = {"application/json": {"schema": {"type": "object"}}}
    paths = {
        "/v1/generate": {"post": {
            "operationId": "Generate", "summary": "Generate digits (GenerationService.Generate)",
            "description": "Models and their limits: GET /v1/models. With Accept: image/png the answer is the PNG "
                           "grid itself.",
            "parameters": common,
            "requestBody": {"required": True, "content": {"application/json": json_body(
                "GenerateRequest", {k: v[0] for k, v in ex["generate"].items()})}},
            "responses": responses(png_response("GenerateResponse", "the PNG grid"), ex["generate"], errors)}},
        "/v1/denoise": {"post": {
            "operationId": "Denoise", "summary": f"Add noise at sigma, then denoise with {d.name} "
                                                 "(GenerationService.Denoise)",
            "description": "A JSON DenoiseRequest, or one PNG as the body (Content-Type: image/png) with the other "
                           "fields in the query string. With Accept: image/png the answer is a PNG (query `view`).",
            "parameters": common + [
                param("query", "sigma", "image/png body: noise std, 0 < sigma <= 1", {"type": "number"}),
                param("query", "steps", f"image/png body: 1..{catalog.MAX_STEPS}, 0 = default", {"type": "integer"}),
                param("query", "sampler", "image/png body: the sampler ('' = default)", sampler),
                param("query", "seed", "image/png body: the noise seed", {"type": "integer", "minimum": 0}),
                param("query", "view", "Accept: image/png: denoised, noisy or strip (clean | noisy | denoised)",
                      {"type": "string", "enum": list(http_api.PNG_VIEWS), "default": "denoised"})],
            "requestBody": {"required": True, "content": {
                "application/json": json_body("DenoiseRequest", {k: v[0] for k, v in ex["denoise"].items()}),
                "image/png": {"schema": PNG}}},
            "responses": responses(png_response("DenoiseResponse", "the view's PNG"), ex["denoise"], errors)}},
        "/v1/models": {"get": {
            "operationId": "ListModels", "summary": "The models, their limits and readiness "
                                                    "(GenerationService.ListModels)", "parameters": common,
            "responses": responses({"application/json": json_body("ListModelsResponse")}, {},
                                   (401, 500, 503))}},
        "/healthz": {"get": {"operationId": "Healthz", "summary": "Liveness: 200 while the process runs",
                             "responses": {"200": {"description": "alive", "content": {"application/json": {
                                 "schema": {"type": "object", "properties": {"status": {"const": "ok"}}},
                                 "example": {"status": "ok"}}}}}}},
        "/readyz": {"get": {"operationId": "Readyz", "summary": "Readiness: Triton serves one of the models and the "
                                                                "gateway is not draining",
                            "responses": {"200": {"description": "ready", "content": plain},
                                          "503": {"description": "not ready (Retry-After)", "content": plain}}}},
        "/metrics": {"get": {"operationId": "Metrics", "summary": "Prometheus metrics of the gateway",
                             "responses": {"200": {"description": "text exposition format",
                                                   "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/openapi.json": {"get": {"operationId": "OpenApi", "summary": "This document",
                                  "responses": {"200": {"description": "OpenAPI 3.1", "content": plain}}}},
        "/": {"get": {"operationId": "WebPage", "summary": "A page to try the API in a browser (serving/web/)",
                      "responses": {"200": {"description": "HTML", "content": {"text/html": {
                          "schema": {"type": "string"}}}}}}},
    }
    for path, ops in paths.items():
        if path in OPEN_HTTP_PATHS:
            for op in ops.values():
                op["security"] = []  # open even when tokens are required
    return {
        "openapi": VERSION,
        "info": {"title": "mnistgen-serve HTTP API", "version": pb.DESCRIPTOR.package,
                 "description": "HTTP/JSON transcoding of the gRPC service mnistgen.v1.GenerationService "
                                f"({pb.DESCRIPTOR.name}): protobuf's JSON mapping. See docs/api.md."},
        "paths": paths,
        "components": {"schemas": schemas(comments), "securitySchemes": {"bearer": {
            "type": "http", "scheme": "bearer", "description": "only when the gateway has tokens (MNISTGEN_API_TOKENS "
                                                               "or --api-token-file)"}}},
        "security": [{}, {"bearer": []}],
    }


def dumps() -> str:
    return json.dumps(document(), indent=1) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=COMMITTED, help="where to write it (default %(default)s)")
    args = p.parse_args(argv)
    args.out.write_text(dumps())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
