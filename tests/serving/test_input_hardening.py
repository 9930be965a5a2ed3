"""Bounded parsing and bounded echoes (no servers): serving.validation.echo/clip, the HTTP JSON body parser
(serving.gateway.json_body.parse_json_body) and the gRPC lenient deserializer. The live campaign is
tests/reliability/test_bad_input.py."""
from __future__ import annotations

import json
import time

import pytest

from serving.gateway.json_body import MAX_JSON_DEPTH, MAX_JSON_ITEMS, json_shape, parse_json_body
from serving.gateway.service import MAX_STATUS_BYTES, Undecodable, lenient, status_message
from serving.generated.mnistgen.v1 import generation_pb2 as pb
from serving.validation import ECHO_CHARS, ValidationError, clip, echo, validate_generate


def test_echo_short_values_read_like_repr():
    assert echo("vae") == "'vae'" and echo(b"ab") == "b'ab'" and echo(7) == "7" and echo(None) == "None"


def test_echo_cuts_long_input_and_says_how_long():
    assert echo("a" * 10000) == "'" + "a" * ECHO_CHARS + "…' (10000 chars)"
    assert echo(b"\xff" * 100).endswith("…' (100 bytes)")
    assert len(echo("\U000e0001" * 1000)) < 6 * ECHO_CHARS  # non-printables escape to 10 characters each: capped


def test_echo_escapes_control_characters():
    for s in ("\x00", "a\nb", "\x1b[31m", "\u202e", "\ud800", "\r\n\t", "\x7f", "\u2028"):
        assert echo(s).isprintable() and echo(s * 100).isprintable(), s


def test_echo_of_hostile_containers_is_bounded():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    huge = {"k" * 1000: ["v" * 1000] * 10_000}
    for value in (deep, huge, list(range(100_000)), 10**4000 if False else 10**300):
        text = echo(value)
        assert len(text) <= 2 * ECHO_CHARS + 20 and text.isprintable(), text


def test_clip_bounds_free_text():
    assert clip("short") == "short"
    out = clip("x\n" * 1000, 100)
    assert out.isprintable() and len(out) < 130 and out.endswith("(2000 chars)")


def test_json_shape_counts_depth_and_values_outside_strings():
    assert json_shape(b'{"a": [1, 2, {"b": []}]}') == (4, 6)
    assert json_shape(b'{"a": "[[[[{{{{,,,,\\"]]"}') == (1, 1)  # brackets and commas inside a string count for nothing
    assert json_shape(b"[" * 50_000) == (50_000, 50_000)


@pytest.mark.parametrize("body", [b'"' + b'\\"' * 2_000_000, b'"' * 4_000_000, b'["\\' * 1_000_000])
def test_json_shape_is_linear_on_hostile_strings(body):
    t0 = time.perf_counter()
    json_shape(body)
    # linear: well under a second here; a backtracking regex took minutes on the first of these (a generous bound)
    assert time.perf_counter() - t0 < 30


def parse_fails(body: bytes, message_type=pb.GenerateRequest) -> ValidationError:
    with pytest.raises(ValidationError) as e:
        parse_json_body(body, message_type)
    err = e.value
    assert err.message.startswith(err.field) and err.message.isprintable() and len(err.message) < 1500, err.message
    return err


@pytest.mark.parametrize("body, field, fragment", [
    (b"[" * 100_000 + b"]" * 100_000, "body", f"over the limit of {MAX_JSON_DEPTH}"),
    (b'{"model":' + b'{"a":' * 3000 + b"1" + b"}" * 3001, "body", "nested 3001 levels"),
    (b'{"zz":[' + b",".join([b"1"] * (MAX_JSON_ITEMS + 10)) + b"]}", "body", f"over the limit of {MAX_JSON_ITEMS}"),
    (b'{"model": "mlp", "model": [1]}', "body", "key 'model' given twice"),
    (b'{"model": {"a": 1, "a": 2}}', "body", "key 'a' given twice"),
    (b'{"num_samples": 1, "numSamples": 2}', "num_samples", "given twice"),
    (b'{"\\ud800": 1}', "\\ud800", "has no field named"),
    (b'{"model": "\xff"}', "body", "not UTF-8"),
    ('{"model": "mlp"}'.encode("utf-16"), "body", "not UTF-8"),
    (b'{"model": ["mlp"]}', "model", "must be a JSON string, got an array"),
    (b'{"model": {"a": 1}}', "model", "got an object"),
    (b'{"num_samples": true}', "num_samples", "must be an integer"),
    (b'{"num_samples": [1]}', "num_samples", "got an array"),
    (b'{"num_samples": 1.5}', "num_samples", "Couldn't parse integer"),
    (b'{"num_samples": ' + b"9" * 500 + b"}", "num_samples", "Value out of range"),
    (b'{"format": "PNG\\u0000junk"}', "format", "unknown image format"),
    (b'{"format": "png_gr\xc4\xb1d"}', "format", "unknown image format"),  # dotless i: upper() would make it PNG_GRID
    (b'{"format": 1.5}', "format", "unknown image format 1.5"),
    (b'{"format": 1099511627776}', "format", "unknown image format"),
    (b'{"format": true}', "format", "got a boolean"),
    (b'{"k' + b"k" * 100_000 + b'": 1}', "k" * ECHO_CHARS + "… (100001 chars)", "has no field named"),
])
def test_parse_json_body_refusals(body, field, fragment):
    err = parse_fails(body)
    assert err.field == field and fragment in err.message, err.message


@pytest.mark.parametrize("body, field, fragment", [
    (b'{"png_images": [null]}', "png_images[0]", "got null"),
    (b'{"png_images": ["AAAA", [1]]}', "png_images[1]", "got an array"),
    (b'{"png_images": "AAAA"}', "png_images", "must be a JSON array"),
    (b'{"sigma": 1' + b"0" * 400 + b"}", "sigma", "finite"),
    (b'{"sigma": {"x": 1}}', "sigma", "got an object"),
    (b'{"raw_images": 5}', "raw_images", "base64 bytes"),
    (b'{"seed": "' + b"x" * 10_000 + b'"}', "seed", "xxx…' (10000 chars)"),
])
def test_parse_json_body_refusals_denoise(body, field, fragment):
    err = parse_fails(body, pb.DenoiseRequest)
    assert err.field == field and fragment in err.message, err.message


@pytest.mark.parametrize("body, expected", [
    (b"", pb.GenerateRequest()),
    (b"\xef\xbb\xbf{}", pb.GenerateRequest()),
    (b'{"numSamples": 3, "format": "png"}', pb.GenerateRequest(num_samples=3, format=pb.PNG)),
    (b'{"format": "IMAGE_FORMAT_UNSPECIFIED", "seed": "12", "model": null}', pb.GenerateRequest(seed=12)),
    (b'{"format": 2.0, "model": "ddpm", "sampler": "ddim"}', pb.GenerateRequest(model="ddpm", sampler="ddim",
                                                                                  format=pb.PNG)),
])
def test_parse_json_body_accepts_the_mapping(body, expected):
    assert parse_json_body(body, pb.GenerateRequest) == expected


def test_long_echo_in_validation_messages():
    with pytest.raises(ValidationError) as e:
        validate_generate("m" * 100_000, 1, None, 0, "", 0)
    assert len(e.value.message) < 300 and "(100000 chars)" in e.value.message


def test_lenient_grpc_deserializer():
    good = pb.GenerateRequest(model="mlp", num_samples=2).SerializeToString()
    assert lenient(pb.GenerateRequest)(good) == pb.GenerateRequest(model="mlp", num_samples=2)
    for bad in (b"\xff\xff\xff", b"\x0a\x05ab", b"\x0a\x01\xff", b"\x43" * 500):
        got = lenient(pb.GenerateRequest)(bad)
        assert isinstance(got, Undecodable) and got.size == len(bad)


def test_status_message_stays_under_the_metadata_limit():
    assert status_message("short") == "short"
    long = "é" * 50_000
    assert len(status_message(long).encode()) <= MAX_STATUS_BYTES


def test_json_error_bodies_are_ascii_json():
    from serving.gateway.http_api import error_response

    err = parse_fails(b'{"\\u202e\\u0000": 1}')
    body = json.loads(error_response(err).body)
    assert body["error"]["field"] == "\\u202e\\x00" and body["error"]["http_status"] == 400
