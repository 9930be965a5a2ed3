"""Property-based bad-input campaign against the running gateway: every answer is a 400/INVALID_ARGUMENT (413 for size).

Two halves: bad *values* (each field out of range, wrong PNGs, sizes around the limit), and hostile *structure*
(nesting, huge arrays and strings, duplicate keys, wrong JSON types at every level, encodings, gRPC wire-format
abuse, the HTTP envelope). >= MIN_INPUTS inputs per run; the answers are counted in out/reliability/bad_input.json.
"""
from __future__ import annotations

import base64
import io
import json
import struct
import time
import zlib
from pathlib import Path
from collections import Counter

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from serving.gateway.json_body import MAX_JSON_DEPTH, MAX_JSON_ITEMS
from serving.generated.mnistgen.v1 import generation_pb2 as pb
from mnistgen.catalog import DENOISER, GAN, GENERATORS as MODELS, MAX_STEPS, SAMPLERS

MAX_DENOISE_IMAGES = DENOISER.max_samples

from reliability_support import write_figures

pytestmark = pytest.mark.timeout(240)

DEADLINE_S = 10.0  # client deadline on every call: a hang fails the test instead of stalling it
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
FORMATS = (0, 1, 2, 3)  # ImageFormat enum numbers the gateway accepts
TRIED: Counter = Counter()  # inputs sent, per campaign (printed and written to out/reliability/bad_input.json)
TIMINGS: dict[str, float] = {}
# Budget: the value campaign is a few hundred inputs, the structure campaign ~1,600 (~1-2 min on 2 loaded cores).
FAST = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
FEW = settings(FAST, max_examples=60)


# ---- strategies: requests with at least one bad field, and the fields that may be blamed ----------------
def bad_text(valid) -> st.SearchStrategy[str]:
    return st.text(max_size=40).filter(lambda s: s and s not in valid)


@st.composite
def bad_generate(draw) -> tuple[pb.GenerateRequest, set[str]]:
    """A GenerateRequest with >= 1 invalid field (never a valid one: nothing reaches Triton) + the invalid fields."""
    model = draw(st.sampled_from([*MODELS, ""]))
    limit = MODELS[model or next(iter(MODELS))].max_samples
    kind = "gan" if MODELS[model or next(iter(MODELS))].kind == GAN else "ddpm"
    valid = {
        "model": model,
        "num_samples": draw(st.integers(0, limit)),
        "seed": draw(st.none() | st.integers(0, INT64[1])),
        "steps": draw(st.integers(0, MAX_STEPS)) if kind == "ddpm" else 0,
        "sampler": draw(st.sampled_from(["", *SAMPLERS])) if kind == "ddpm" else "",
        "format": draw(st.sampled_from(FORMATS)),
    }
    invalid = {
        "model": bad_text(MODELS),
        "num_samples": st.integers(INT32[0], -1) | st.integers(limit + 1, INT32[1]),
        "seed": st.integers(INT64[0], -1),
        "steps": (st.integers(INT32[0], -1) | st.integers(MAX_STEPS + 1, INT32[1])) if kind == "ddpm"
        else st.integers(*INT32).filter(bool),
        "sampler": bad_text(SAMPLERS) if kind == "ddpm" else st.text(min_size=1, max_size=20),
        "format": st.integers(*INT32).filter(lambda f: f not in FORMATS),
    }
    bad = draw(st.sets(st.sampled_from(sorted(invalid)), min_size=1, max_size=3))
    if "model" in bad:  # with an unknown model the other fields' limits are moot: only the model is blamed
        bad = {"model"}
    fields = valid | {f: draw(invalid[f]) for f in bad}
    req = pb.GenerateRequest(model=fields["model"], num_samples=fields["num_samples"], steps=fields["steps"],
                             sampler=fields["sampler"], format=fields["format"])
    if fields["seed"] is not None:
        req.seed = fields["seed"]
    return req, bad


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


GOOD_PNG = png_bytes(Image.fromarray(np.tile(np.arange(28, dtype=np.uint8) * 9, (28, 1)), mode="L"))
PNG_MODES = ("L", "LA", "RGB", "RGBA", "P", "1", "I;16")  # 1 to 4 channels, 1 to 16 bits


def bomb_png(w: int, h: int) -> bytes:
    """A valid all-black 8-bit grayscale PNG declaring w x h pixels: tiny on the wire, huge once decoded."""
    z = zlib.compressobj(9)
    row = b"\0" * (w + 1)
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@st.composite
def bad_png(draw) -> bytes:
    """Bytes that are not an acceptable 28x28 PNG: random, truncated, corrupted, or the wrong size in any mode."""
    kind = draw(st.sampled_from(["random", "signature", "truncated", "flipped", "size"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "signature":
        return b"\x89PNG\r\n\x1a\n" + draw(st.binary(max_size=200))
    if kind == "truncated":
        return GOOD_PNG[: draw(st.integers(0, len(GOOD_PNG) - 13))]  # at least the IEND chunk missing
    if kind == "flipped":  # one byte of the signature or IHDR changed: PIL checks IHDR's CRC (not IDAT's, and a
        i = draw(st.integers(0, 32))  # flipped pixel byte may still inflate to a valid 28x28 image: accepted then)
        return GOOD_PNG[:i] + bytes([GOOD_PNG[i] ^ draw(st.integers(1, 255))]) + GOOD_PNG[i + 1:]
    mode = draw(st.sampled_from(PNG_MODES))
    w, h = draw(st.tuples(st.integers(1, 80), st.integers(1, 80)).filter(lambda s: s != (28, 28)))
    pixels = draw(st.integers(0, 255))
    img = Image.new("L", (w, h), pixels).convert(mode) if mode != "I;16" else Image.new("I;16", (w, h), pixels * 257)
    return png_bytes(img)


def raw_with(values: np.ndarray) -> bytes:
    return np.ascontiguousarray(values, "<f4").tobytes()


@st.composite
def bad_raw(draw) -> bytes:
    """raw_images that are wrong: a length not a multiple of 3136, NaN/Inf pixels, or values outside [-1, 1]."""
    kind = draw(st.sampled_from(["length", "nonfinite", "range"]))
    if kind == "length":
        return draw(st.binary(min_size=1, max_size=6000).filter(lambda b: len(b) % 3136))
    k = draw(st.integers(1, 3))
    x = np.zeros((k, 784), np.float32)
    i, j = draw(st.integers(0, k - 1)), draw(st.integers(0, 783))
    if kind == "nonfinite":
        x[i, j] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    else:
        x[i, j] = draw(st.floats(1.01, 1e30) | st.floats(-1e30, -1.01))
    return raw_with(x)


@st.composite
def bad_denoise(draw) -> tuple[pb.DenoiseRequest, set[str]]:
    """A DenoiseRequest with >= 1 invalid field + the fields that may be blamed (png_images[i] counts as png_images)."""
    valid = {"sigma": draw(st.floats(1e-3, 1.0)), "steps": draw(st.integers(0, MAX_STEPS)),
             "sampler": draw(st.sampled_from(["", *SAMPLERS])), "seed": draw(st.none() | st.integers(0, INT64[1])),
             "format": draw(st.sampled_from(FORMATS))}
    invalid = {
        "sigma": st.sampled_from([0.0, -0.0, float("nan"), float("inf"), -float("inf")])
        | st.floats(max_value=0.0) | st.floats(min_value=1.001),  # (sigma is a float32: 1 + 1e-16 would be 1)
        "steps": st.integers(INT32[0], -1) | st.integers(MAX_STEPS + 1, INT32[1]),
        "sampler": bad_text(SAMPLERS),
        "seed": st.integers(INT64[0], -1),
        "format": st.integers(*INT32).filter(lambda f: f not in FORMATS),
    }
    images = draw(st.sampled_from(["good_png", "good_raw", "bad_png", "bad_raw", "none", "both", "too_many"]))
    bad = set(draw(st.sets(st.sampled_from(sorted(invalid)), min_size=0 if images.startswith("bad") else 1,
                           max_size=3)))
    if images in ("none", "both", "too_many"):
        bad.add("images")
    req = pb.DenoiseRequest()
    if images == "good_png":
        req.png_images.extend([GOOD_PNG] * draw(st.integers(1, 3)))
    elif images == "good_raw":
        req.raw_images = raw_with(np.zeros((draw(st.integers(1, 3)), 784), np.float32))
    elif images == "bad_png":  # the bad one somewhere among good ones
        pos, n = draw(st.integers(0, 2)), draw(st.integers(1, 3))
        pngs = [GOOD_PNG] * n
        pngs.insert(min(pos, n), draw(bad_png()))
        req.png_images.extend(pngs)
        bad.add("png_images")
    elif images == "bad_raw":
        req.raw_images = draw(bad_raw())
        bad.add("raw_images")
    elif images == "both":
        req.png_images.append(GOOD_PNG)
        req.raw_images = raw_with(np.zeros((1, 784), np.float32))
    elif images == "too_many":
        if draw(st.booleans()):
            req.png_images.extend([GOOD_PNG] * draw(st.integers(MAX_DENOISE_IMAGES + 1, MAX_DENOISE_IMAGES + 20)))
            bad.add("png_images")
        else:
            req.raw_images = raw_with(np.zeros((draw(st.integers(MAX_DENOISE_IMAGES + 1, 100)), 784), np.float32))
            bad.add("raw_images")
    fields = valid | {f: draw(invalid[f]) for f in bad if f in invalid}
    req.sigma, req.steps, req.sampler, req.format = fields["sigma"], fields["steps"], fields["sampler"], fields["format"]
    if fields["seed"] is not None:
        req.seed = fields["seed"]
    return req, bad


# ---- checks ---------------------------------------------------------------------------------------------
def blamed(field: str | None) -> str:
    """png_images[3] -> png_images."""
    return (field or "").split("[", 1)[0]


def check_grpc(gateway, rpc: str, req, bad: set[str], campaign: str) -> None:
    TRIED[campaign] += 1
    with pytest.raises(grpc.RpcError) as e:  # (INVALID_ARGUMENT, not DEADLINE_EXCEEDED: answered, no hang)
        getattr(gateway.stub, rpc)(req, timeout=DEADLINE_S)
    code, details = e.value.code(), e.value.details() or ""
    assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{rpc} {req!r:.300}: {code} {details}"
    field = details.split(":", 1)[0]
    assert blamed(field) in bad, f"{rpc}: error names {field!r}, expected one of {bad}: {details}"


def check_http(gateway, path: str, body: bytes, headers: dict, allowed: set[str] | None, campaign: str,
               status: int = 400) -> dict:
    """POST body; the answer must be `status` with a JSON error naming a field (one of `allowed` when given)."""
    TRIED[campaign] += 1
    r = gateway.http("POST", path, body, headers=headers, timeout=DEADLINE_S)
    assert r.status == status, f"{path} {body[:200]!r} {headers}: {r.status} {r.body[:300]!r}"
    err = r.json()["error"]
    assert err["http_status"] == status and err["field"] and err["message"].startswith(err["field"]), err
    if allowed is not None:
        assert blamed(err["field"]) in allowed, f"error names {err['field']!r}, expected one of {allowed}: {err}"
    return err


def as_json(req) -> bytes:
    return json.dumps(json_format.MessageToDict(req, preserving_proto_field_name=True)).encode()


JSON_CT = {"Content-Type": "application/json"}


# ---- the campaign ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def campaign_clock(gateway) -> None:
    """Start of the campaign (after Triton and the gateway are up), for its wall time in the figures."""
    TIMINGS["_t0"] = time.monotonic()


@FAST
@given(case=bad_generate())
def test_generate_grpc(gateway, case):
    check_grpc(gateway, "Generate", *case, campaign="generate-grpc")


@FAST
@given(case=bad_denoise())
def test_denoise_grpc(gateway, case):
    check_grpc(gateway, "Denoise", *case, campaign="denoise-grpc")


@FEW
@given(case=bad_generate())
def test_generate_http(gateway, case):
    req, bad = case
    check_http(gateway, "/v1/generate", as_json(req), JSON_CT, bad, "generate-http")


@FEW
@given(case=bad_denoise())
def test_denoise_http(gateway, case):
    req, bad = case
    check_http(gateway, "/v1/denoise", as_json(req), JSON_CT, bad, "denoise-http")


GENERATE_FIELDS = ("model", "num_samples", "seed", "steps", "sampler", "format")
DENOISE_FIELDS = ("png_images", "raw_images", "sigma", "steps", "sampler", "seed", "format")
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)


def wrong_type(field: str) -> st.SearchStrategy:
    """JSON values protobuf's JSON mapping refuses for this field (null would mean "unset", so never null)."""
    if field in ("model", "sampler"):
        return st.integers() | st.booleans() | st.lists(st.integers(), min_size=1, max_size=3) | st.just({"a": 1})
    if field in ("png_images",):
        return st.integers() | st.text(max_size=10) | st.lists(st.integers(), min_size=1, max_size=2)
    if field == "raw_images":
        return st.integers() | st.booleans() | st.lists(st.integers(), min_size=1, max_size=2)
    if field == "sigma":
        return st.text(alphabet="abcxyz", min_size=1, max_size=8) | st.lists(st.floats(0, 1), min_size=1, max_size=2)
    if field == "format":
        return st.text(alphabet="ABCXYZ_", min_size=1, max_size=8) | st.booleans() | st.just([1])
    # integer fields
    return (st.text(alphabet="abcxyz", min_size=1, max_size=8) | st.booleans()
            | st.floats(allow_nan=False, allow_infinity=False).filter(lambda v: v != int(v))
            | st.integers(min_value=2**64) | st.lists(st.integers(0, 3), min_size=1, max_size=2))


@st.composite
def malformed_body(draw) -> tuple[str, bytes, dict, set[str] | None]:
    """(path, body, headers, fields that may be blamed): broken JSON, non-objects, unknown or wrongly typed fields."""
    path = draw(st.sampled_from(["/v1/generate", "/v1/denoise"]))
    fields = GENERATE_FIELDS if path == "/v1/generate" else DENOISE_FIELDS
    ct = draw(st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                               "application/octet-stream", "multipart/form-data; boundary=x", ""]))
    headers = {"Content-Type": ct} if ct else {}
    kind = draw(st.sampled_from(["bytes", "truncated", "non-object", "unknown-field", "wrong-type"]))
    if kind == "bytes":  # random bytes that are not JSON (whitespace-only would be the empty, valid request)
        body = draw(st.binary(min_size=1, max_size=200).filter(lambda b: b.strip() and not is_json(b)))
        return path, body, headers, {"body"}
    if kind == "truncated":
        text = json.dumps({"model": "ddpm", "num_samples": 2, "seed": 3, "sigma": 0.5, "png_images": ["AAAA"]})
        return path, text[: draw(st.integers(1, len(text) - 1))].encode(), headers, {"body"}
    if kind == "non-object":
        value = draw(json_values.filter(lambda v: not isinstance(v, dict)))
        return path, json.dumps(value).encode(), headers, {"body"}
    if kind == "unknown-field":
        key = draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in fields and camel(k) not in fields))
        return path, json.dumps({key: draw(json_values)}).encode(), headers, None  # protobuf names it
    field = draw(st.sampled_from(fields))
    return path, json.dumps({field: draw(wrong_type(field))}).encode(), headers, {field}


def camel(name: str) -> str:
    """protobuf's JSON names accept lowerCamelCase too: numSamples is num_samples."""
    import re

    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), name)


def is_json(b: bytes) -> bool:
    try:
        json.loads(b)
        return True
    except ValueError:
        return False


@FAST
@given(case=malformed_body())
def test_malformed_http_bodies(gateway, case):
    path, body, headers, allowed = case
    err = check_http(gateway, path, body, headers, allowed, "malformed-http")
    assert err["code"] == "INVALID_ARGUMENT"


@FEW
@given(body=bad_png(), query=st.dictionaries(st.sampled_from(["sigma", "steps", "seed"]),
                                              st.text(alphabet="abc-.e", max_size=5), max_size=2))
def test_png_body_http(gateway, body, query):
    """Content-Type: image/png with bytes that are not a 28x28 PNG, and bad query values."""
    from urllib.parse import urlencode

    qs = {"sigma": "0.5"} | query
    path = "/v1/denoise?" + urlencode(qs)
    check_http(gateway, path, body, {"Content-Type": "image/png"}, {"png_images", "sigma", "steps", "seed"},
               "png-http")


@pytest.fixture(scope="module")
def small_gateway(triton, tmp_path_factory):
    """A gateway with a 64 KiB request limit: sizes around the limit are cheap to try."""
    from serving.run import start_gateway

    gw = start_gateway(triton.grpc_url, tmp_path_factory.mktemp("small") / "gateway.log", "--max-request-bytes", "65536")
    gw.wait_ready(60)
    yield gw
    gw.stop()


LIMIT = 65536


@FEW
@given(size=st.integers(LIMIT - 1024, LIMIT - 64) | st.integers(LIMIT + 64, 4 * LIMIT), transport=st.sampled_from(
    ["grpc", "http"]))
def test_size_limit(small_gateway, size, transport):
    """Below the limit: a normal INVALID_ARGUMENT for the NaN pixels; above: RESOURCE_EXHAUSTED / 413 naming the body."""
    raw = b"\xff" * size  # NaN floats: never a valid image whatever the length
    if transport == "grpc":
        TRIED["size-grpc"] += 1
        with pytest.raises(grpc.RpcError) as e:
            small_gateway.stub.Denoise(pb.DenoiseRequest(raw_images=raw, sigma=0.5), timeout=DEADLINE_S)
        expected = grpc.StatusCode.RESOURCE_EXHAUSTED if size > LIMIT else grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.code() == expected, (size, e.value.code(), e.value.details())
        if size > LIMIT:
            assert str(LIMIT) in (e.value.details() or ""), e.value.details()
    else:
        status = 413 if size > LIMIT else 400
        err = check_http(small_gateway, "/v1/denoise", raw, {"Content-Type": "application/json"}, None, "size-http",
                         status=status)
        if size > LIMIT:
            assert err["code"] == "RESOURCE_EXHAUSTED" and err["field"] == "body" and str(LIMIT) in err["message"]


BOMB_SIDE = 12000  # 144 megapixels: under PIL's own bomb limit (179 MP), ~0.4 s and 144 MB to decode here


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return bomb_png(BOMB_SIDE, BOMB_SIDE)  # ~140 KB


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_decompression_bomb_rejected_fast(gateway, bomb, transport):
    """A tiny PNG declaring 12000x12000 pixels is refused from its header, without decoding it: the gateway's peak
    memory does not grow by the decoded image's size (its time goes to the report, not into an assertion)."""
    hwm0 = peak_rss(gateway.proc.pid)
    t0 = time.monotonic()
    if transport == "grpc":
        check_grpc(gateway, "Denoise", pb.DenoiseRequest(png_images=[bomb], sigma=0.5), {"png_images"}, "bomb")
    else:
        err = check_http(gateway, "/v1/denoise?sigma=0.5", bomb, {"Content-Type": "image/png"}, {"png_images"},
                         "bomb")
        assert f"{BOMB_SIDE}x{BOMB_SIDE}" in err["message"]
    took = time.monotonic() - t0
    TIMINGS[f"bomb_{transport}_ms"] = round(took * 1e3, 1)
    grew = peak_rss(gateway.proc.pid) - hwm0
    assert grew < BOMB_SIDE * BOMB_SIDE // 2, f"gateway peak memory grew {grew >> 20} MiB: the PNG was decoded?"


def peak_rss(pid: int) -> int:
    """A process's peak resident memory in bytes (VmHWM)."""
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


# ---- structure campaign: hostile shapes over both transports; the answer is a 4xx / INVALID_ARGUMENT (or OK) -------
# Every input below is invalid by construction ("poisoned": a field no request may carry, e.g. steps -1), so nothing
# reaches Triton except the few gRPC inputs that decode to a default (cheap) Generate or a ListModels: those may be OK.
# Never acceptable: 5xx, INTERNAL, UNKNOWN, a dropped stream (client-side RESOURCE_EXHAUSTED), or an error message
# that repeats the input at length or carries control characters.
ANSWERS: Counter = Counter()  # "http 400", "grpc INVALID_ARGUMENT", ... over every input of the campaign
MAX_MESSAGE_CHARS = 1500  # echoed input is cut to 64 characters (escapes may lengthen it): messages stay small
STRUCTURE = settings(FAST, max_examples=700)
GRPC_STRUCTURE = settings(FAST, max_examples=650)
ENVELOPE = settings(FAST, max_examples=250)
POISON = {"/v1/generate": (("steps", -1), ("num_samples", -1), ("seed", -1)),
          "/v1/denoise": (("sigma", -1.0), ("steps", -1), ("seed", -1))}
FIELDS = {"/v1/generate": GENERATE_FIELDS, "/v1/denoise": DENOISE_FIELDS}


def check_message(text: str, where: str) -> None:
    assert len(text) <= MAX_MESSAGE_CHARS, f"{where}: a {len(text)}-character message: {text[:300]!r}"
    assert text.isprintable(), f"{where}: control characters in the message: {text[:300]!r}"


def check_structure_reply(r, where: str, allowed: set[int]) -> None:
    ANSWERS[f"http {r.status}"] += 1
    assert r.status in allowed, f"{where}: HTTP {r.status} {r.body[:300]!r}"
    if r.headers.get("Content-Type", "").startswith("application/json") and r.status >= 400:
        err = json.loads(r.body)["error"]
        check_message(err["message"], where)
        assert err["field"] is None or (err["field"].isprintable() and len(err["field"]) <= 200), err["field"]


def poisoned(path: str, obj: dict) -> dict:
    """obj plus one field no valid request has (the first of POISON[path] obj does not set already)."""
    for key, value in POISON[path]:
        if key not in obj:
            return obj | {key: value}
    return obj


def dump(obj) -> bytes:
    return json.dumps(obj).encode()


def nest(depth: int, kind: str, inner: bytes = b"1") -> bytes:
    """`depth` levels of arrays / objects / both alternating around `inner`, built as bytes (no recursion)."""
    opens = {"list": [b"["], "dict": [b'{"a":'], "mixed": [b"[", b'{"a":']}[kind]
    closes = {b"[": b"]", b'{"a":': b"}"}
    seq = [opens[i % len(opens)] for i in range(depth)]
    return b"".join(seq) + inner + b"".join(closes[o] for o in reversed(seq))


HUGE_CHARS = ["a", "\x00", "\n", "\x1b", "\u202e", "\ud800", "é", "\U0001f600", '"', "\\", "\u0301", "\ufeff"]


@st.composite
def huge_text(draw) -> str:
    """A long string (65 .. 120k characters) of one hostile character, or a mix."""
    n = draw(st.integers(65, 4000) | st.sampled_from([10_000, 120_000]))
    chars = draw(st.lists(st.sampled_from(HUGE_CHARS), min_size=1, max_size=3))
    return "".join(chars) * (n // len(chars) + 1)


def wrong_json(field: str) -> st.SearchStrategy:
    """A non-null value of a JSON type the field does not take, nested up to a few levels."""
    nested = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)
    containers = st.lists(nested, max_size=3) | st.dictionaries(st.text(max_size=4), nested, min_size=1, max_size=3)
    if field in ("model", "sampler", "raw_images"):
        return st.booleans() | st.integers() | st.floats() | containers
    if field == "png_images":  # wrong element types inside the repeated field, among good ones
        bad = st.none() | st.booleans() | st.integers() | st.floats() | containers
        return st.tuples(st.integers(0, 3), bad).map(
            lambda t: [base64.b64encode(GOOD_PNG).decode()] * t[0] + [t[1]]) | st.booleans() | st.integers()
    if field == "format":
        return (st.booleans() | containers | st.floats().filter(lambda v: not float(v).is_integer())
                | st.integers().filter(lambda v: v not in FORMATS)
                | st.sampled_from(["png_grıd", "PNG\x00", "PNG\x00junk", "ＰＮＧ", "pnG ", "", "IMAGE_FORMAT_X"]))
    if field == "sigma":
        return st.booleans() | containers
    return st.booleans() | containers | st.floats().filter(lambda v: not float(v).is_integer())  # integer fields


NUMBER_TEXTS = ["1e400", "-1e400", "1e-400", "-0", "0.0", "1.0e0", "NaN", "Infinity", "-Infinity", "9" * 4400,
                "9" * 400, "-" + "9" * 30, '"0x10"', '"1_000"', '" 1"', '"١٢"', '"1e3"', '"-0"', '"+5"', '"NaN"',
                '"Infinity"', "1E+2", "0.0000001", "123456789012345678901234567890.5"]


@st.composite
def hostile_json(draw) -> tuple[str, bytes, dict]:
    """(path, body, headers): JSON hostile in structure, never a valid request."""
    path = draw(st.sampled_from(["/v1/generate", "/v1/denoise"]))
    fields = FIELDS[path]
    headers = {"Content-Type": draw(st.sampled_from(["application/json", "application/json; charset=utf-8", "",
                                                     "text/plain", "application/x-www-form-urlencoded"]))}
    kind = draw(st.sampled_from(["deep", "nested", "huge-array", "huge-string", "duplicate", "wrong-type",
                                 "unicode", "numbers", "base64", "many-keys"]))
    if kind == "deep":  # deeper than MAX_JSON_DEPTH, at the top or as a field's value, closed or not
        depth = draw(st.integers(MAX_JSON_DEPTH + 1, 3000) | st.sampled_from([20_000, 100_000]))
        inner = nest(depth, draw(st.sampled_from(["list", "dict", "mixed"])))
        if not draw(st.booleans()):
            inner = inner[: len(inner) // 2 + 1]  # unclosed
        where = draw(st.sampled_from(["top", *fields, "zz"]))
        body = inner if where == "top" else b'{"' + where.encode() + b'":' + inner + b"}"
    elif kind == "nested":  # within the depth limit, where a scalar or a list of strings goes
        depth = draw(st.integers(1, MAX_JSON_DEPTH - 1))
        field = draw(st.sampled_from(fields))
        body = b'{"' + field.encode() + b'":' + nest(depth, draw(st.sampled_from(["list", "dict", "mixed"]))) + b"}"
    elif kind == "huge-array":
        n = draw(st.integers(65, 3000) | st.sampled_from([MAX_JSON_ITEMS, MAX_JSON_ITEMS + 1, 50_000]))
        item = draw(json_scalars | st.just(base64.b64encode(GOOD_PNG).decode()))
        where = draw(st.sampled_from(["top", *fields, "zz"]))
        value = [item] * n
        body = dump(value) if where == "top" else dump(poisoned(path, {where: value}))
    elif kind == "huge-string":
        text = draw(huge_text())
        where = draw(st.sampled_from(["key", *fields]))
        obj = {text: 1} if where == "key" else {where: [text] if where == "png_images" else text}
        ascii_only = draw(st.booleans())
        body = json.dumps(poisoned(path, obj), ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    elif kind == "duplicate":
        a, b = draw(st.sampled_from([("model", "model"), ("num_samples", "numSamples"), ("png_images", "pngImages"),
                                     ("raw_images", "rawImages"), ("sigma", "sigma"), ("seed", "seed"),
                                     ("zz", "zz"), ("format", "format")]))
        v1, v2 = draw(json_scalars), draw(json_scalars)
        if draw(st.booleans()):  # the duplicate one level down, inside a field's value
            body = b'{"' + a.encode() + b'": {"k": ' + dump(v1) + b', "k": ' + dump(v2) + b"}}"
        else:
            body = b'{"' + a.encode() + b'": ' + dump(v1) + b', "' + b.encode() + b'": ' + dump(v2) + b"}"
    elif kind == "wrong-type":
        field = draw(st.sampled_from(fields))
        body = dump(poisoned(path, {field: draw(wrong_json(field))}))
    elif kind == "unicode":  # encodings, escapes, NUL and surrogates in keys, values and the body itself
        text = draw(st.text(max_size=12)) + draw(st.sampled_from(["\x00", "\ud800", "\udfff\ud800", "\u202e",
                                                                 "\ufeff", "\U0010ffff", "\x7f", "\u2028"]))
        where = draw(st.sampled_from(["key", "model", "sampler", "format", "png_images", "raw_images"]))
        obj = poisoned(path, {text: 1} if where == "key" else {where: [text] if where == "png_images" else text})
        encoding = draw(st.sampled_from(["ascii-escapes", "utf-8", "utf-8-bom", "utf-16", "utf-16-be", "utf-32",
                                         "latin-1", "overlong", "cesu"]))
        raw = json.dumps(obj, ensure_ascii=encoding == "ascii-escapes")
        if encoding in ("ascii-escapes", "utf-8", "cesu"):
            body = raw.encode("utf-8", "surrogatepass")
        elif encoding == "utf-8-bom":
            body = b"\xef\xbb\xbf" + raw.encode("utf-8", "surrogatepass")
        elif encoding == "overlong":  # "/" as the overlong C0 AF
            body = raw.encode("utf-8", "surrogatepass").replace(b'":', b'\xc0\xaf":', 1)
        else:
            body = raw.encode(encoding, "replace")
    elif kind == "numbers":
        field = draw(st.sampled_from([f for f in fields if f not in ("png_images", "raw_images", "model", "sampler")]))
        obj = poisoned(path, {field: 0})
        body = dump(obj).replace(b'"' + field.encode() + b'": 0', b'"' + field.encode() + b'": '
                                 + draw(st.sampled_from(NUMBER_TEXTS)).encode(), 1)
    elif kind == "base64":
        field = "png_images" if path == "/v1/denoise" and draw(st.booleans()) else "raw_images"
        payload = draw(st.sampled_from([GOOD_PNG, b"", bomb_png(30000, 1)[:200], raw_with(np.zeros((1, 784))),
                                        b"\x00" * 3135])) if draw(st.booleans()) else draw(bad_png())
        enc = draw(st.sampled_from(["std", "urlsafe", "no-padding", "extra-padding", "whitespace", "garbage",
                                    "alphabet"]))
        b64 = (base64.urlsafe_b64encode(payload) if enc == "urlsafe" else base64.b64encode(payload)).decode()
        if enc == "no-padding":
            b64 = b64.rstrip("=")
        elif enc == "extra-padding":
            b64 += "=" * draw(st.integers(1, 5))
        elif enc == "whitespace":
            b64 = "\n ".join(b64[i:i + 4] for i in range(0, len(b64), 4))
        elif enc == "garbage":
            b64 = draw(st.text(alphabet="ABC+/=-_!*. \t", min_size=1, max_size=40))
        elif enc == "alphabet":
            b64 = b64[:len(b64) // 2] + draw(st.sampled_from(["\x00", "é", "\\", "%", "~"])) + b64[len(b64) // 2:]
        value = [b64] * draw(st.integers(1, 3)) if field == "png_images" else b64
        path = "/v1/denoise" if field == "png_images" else path
        body = dump(poisoned(path, {field: value}))
    else:  # many-keys: an object with many unknown keys, or many known ones under both spellings
        n = draw(st.integers(2, 2000))
        body = dump({f"k{i}": i for i in range(n)} if draw(st.booleans()) else
                    {**{f: None for f in fields}, "numSamples": None, "zz": 1})
    return path, body, headers


@STRUCTURE
@given(case=hostile_json())
def test_json_structure_http(gateway, case):
    """Nesting, huge arrays/strings, duplicate keys, wrong types at every level, unicode, numbers, base64: a 400."""
    path, body, headers = case
    TRIED["structure-http"] += 1
    r = gateway.http("POST", path, body, headers=headers, timeout=DEADLINE_S)
    check_structure_reply(r, f"POST {path} {body[:120]!r}", {400})
    assert json.loads(r.body)["error"]["code"] == "INVALID_ARGUMENT"


# -- gRPC: hand-made wire bytes --
def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def tag(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def length_delimited(number: int, payload: bytes) -> bytes:
    return tag(number, 2) + varint(len(payload)) + payload


KNOWN_WIRE = {"Generate": {1: 2, 2: 0, 3: 0, 4: 0, 5: 2, 6: 0},
              "Denoise": {1: 2, 2: 2, 3: 5, 4: 0, 5: 2, 6: 0, 7: 0}, "ListModels": {}}


@st.composite
def unknown_field(draw, rpc: str) -> bytes:
    """One field the message does not have (or a known number with a wire type it does not use): any wire type."""
    known = KNOWN_WIRE[rpc]
    if known and draw(st.booleans()):
        number = draw(st.sampled_from(sorted(known)))
        wire = draw(st.sampled_from([w for w in (0, 1, 2, 5) if w != known[number]]))
    else:
        number = draw(st.integers(1, 2**29 - 1).filter(lambda n: n not in known))
        wire = draw(st.sampled_from([0, 1, 2, 5, 3]))
    if wire == 0:
        v = varint(draw(st.integers(0, 2**64 - 1)))
        return tag(number, 0) + (v if draw(st.booleans()) else bytes(b | 0x80 for b in v) + b"\x00")  # overlong
    if wire == 1:
        return tag(number, 1) + draw(st.binary(min_size=8, max_size=8))
    if wire == 5:
        return tag(number, 5) + draw(st.binary(min_size=4, max_size=4))
    if wire == 3:  # a group: start, nested fields, the matching end
        depth = draw(st.integers(1, 5))
        return tag(number, 3) * depth + tag(1, 0) + b"\x01" + tag(number, 4) * depth
    size = draw(st.integers(0, 64) | st.sampled_from([1000, 100_000, 1 << 20]))
    return length_delimited(number, draw(st.binary(max_size=min(size, 64))) * (size // 64 + 1) if size > 64
                            else draw(st.binary(min_size=size, max_size=size)))


def poisoned_base(rpc: str, draw) -> bytes:
    """A serialized request that is invalid in its first field (so cutting it short never leaves a costly valid one)."""
    if rpc == "Generate":
        return pb.GenerateRequest(model=draw(bad_text(MODELS)), num_samples=draw(st.integers(0, 4)),
                                  seed=draw(st.integers(0, 9))).SerializeToString()
    if rpc == "Denoise":
        return pb.DenoiseRequest(raw_images=raw_with(np.full((1, 784), np.nan, np.float32)), sigma=0.5,
                                 steps=draw(st.integers(0, 5))).SerializeToString()
    return b""


@st.composite
def hostile_grpc(draw) -> tuple[str, bytes, bool]:
    """(rpc, request bytes, whether OK is an acceptable answer): wire-format abuse of the three RPCs."""
    rpc = draw(st.sampled_from(["Generate", "Denoise", "Denoise", "Generate", "ListModels"]))
    kind = draw(st.sampled_from(["unknown-fields", "unknown-fields", "invalid-utf8", "truncated", "huge-repeated",
                                 "huge-string", "garbage", "length-lies", "deep-groups"]))
    if rpc == "ListModels":
        kind = draw(st.sampled_from(["unknown-fields", "garbage", "deep-groups", "length-lies"]))
    if kind in ("unknown-fields", "huge-string") or rpc == "ListModels":
        if rpc == "Generate":
            base = draw(bad_generate())[0].SerializeToString()
        elif rpc == "Denoise":
            base = draw(bad_denoise())[0].SerializeToString()
        else:
            base = b""
    else:
        base = poisoned_base(rpc, draw)
    ok = rpc == "ListModels"
    if kind == "unknown-fields":  # before, after, or both: protobuf merges concatenated messages
        extra = draw(st.lists(unknown_field(rpc), min_size=1, max_size=12))
        cut = draw(st.integers(0, len(extra)))
        data = b"".join(extra[:cut]) + base + b"".join(extra[cut:])
    elif kind == "invalid-utf8":  # proto3 strings must be UTF-8
        bad = draw(st.sampled_from([b"\xff", b"\xed\xa0\x80", b"\xc0\xaf", b"\xe2\x82", b"ok\xfe",
                                    b"\xf8\x88\x80\x80\x80"]))
        number = 1 if rpc == "Generate" and draw(st.booleans()) else 5
        data = base + length_delimited(number, bad)
    elif kind == "truncated":
        extra = draw(st.lists(unknown_field(rpc), max_size=3))
        whole = base + b"".join(extra)
        data = whole[: draw(st.integers(0, max(len(whole) - 1, 0)))]
        ok = rpc == "Generate"  # an empty message is a valid default Generate (1 dcgan sample)
    elif kind == "huge-repeated":
        if rpc == "Denoise":
            count = draw(st.integers(MAX_DENOISE_IMAGES + 1, 5000) | st.sampled_from([100_000]))
            item = draw(st.binary(max_size=16))
            if draw(st.booleans()):
                data = base + length_delimited(1, item) * count  # png_images and raw_images both: refused
            else:
                data = pb.DenoiseRequest(png_images=[item] * count, sigma=0.5).SerializeToString()
        else:  # Generate has no repeated field: the same field thousands of times (last one wins)
            count = draw(st.integers(2, 5000))
            data = (tag(2, 0) + varint(draw(st.integers(0, 2**32)))) * count + base
    elif kind == "huge-string":
        text = draw(huge_text()).encode("utf-8", "surrogatepass")
        number = draw(st.sampled_from([1, 5] if rpc == "Generate" else [5, 1, 2]))
        data = base + length_delimited(number, text)  # (a lone surrogate in a string field: not UTF-8)
    elif kind == "garbage":
        data = draw(st.binary(max_size=300))
        ok = rpc in ("Generate", "ListModels")  # random bytes can decode to a valid default Generate
    elif kind == "length-lies":  # a length prefix longer than the message, overlong or 64-bit varints
        number = draw(st.integers(1, 40))
        length = draw(st.sampled_from([1 << 31, (1 << 63) + 5, 2**64 - 1, 1 << 20, 7]))
        data = base + tag(number, 2) + varint(length) + draw(st.binary(max_size=8))
        if draw(st.booleans()):
            data = base + tag(number, 0) + b"\xff" * draw(st.integers(10, 20)) + b"\x01"
    else:  # deep-groups: start-group tags nested past the parser's recursion limit (closed or not)
        depth = draw(st.integers(50, 5000))
        number = draw(st.integers(8, 100))
        data = base + tag(number, 3) * depth + (tag(number, 4) * depth if draw(st.booleans()) else b"")
    return rpc, data, ok


@GRPC_STRUCTURE
@given(case=hostile_grpc(), metadata=st.sampled_from([(), (("x-junk", "a" * 2000),), (("x-bin-bin", b"\x00" * 64),)]))
def test_grpc_structure(gateway, case, metadata):
    """Unknown fields of every wire type, wrong wire types, invalid UTF-8, truncation, huge repeated fields and
    strings, lying lengths, deep groups: INVALID_ARGUMENT (OK where the bytes decode to a valid cheap request)."""
    rpc, data, ok = case
    TRIED["structure-grpc"] += 1
    call = gateway.channel.unary_unary(f"/mnistgen.v1.GenerationService/{rpc}")  # bytes in, bytes out
    try:
        call(data, timeout=DEADLINE_S, metadata=metadata)
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
    ANSWERS[f"grpc {code.name}"] += 1
    allowed = {grpc.StatusCode.INVALID_ARGUMENT} | ({grpc.StatusCode.OK} if ok else set())
    assert code in allowed, f"{rpc} {data[:80]!r} ({len(data)} bytes): {code} {details[:300]}"
    check_message(details, f"{rpc} {data[:80]!r}")


# -- HTTP envelope: methods, paths, headers, content types, encodings, chunked bodies --
METHODS = ["POST", "POST", "GET", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "post", "PROPFIND"]
PATHS = ["/v1/generate", "/v1/denoise", "/v1/generate/", "/V1/generate", "/v1//generate", "/v1/generate%00",
         "/v1/denoise?sigma=0.5&view=%00%1b", "/v1/denoise?sigma=x&steps=99999999999&seed=-1&sampler=%ED%A0%80",
         "/v1/denoise?sigma=0.5&steps=" + "9" * 5000, "/v1/generate?" + "a=1&" * 500, "/nope", "/v1/models",
         "/healthz", "/metrics", "/v1/denoise?sigma=0.5&sigma=0.7&view=sideways&view=strip"]
GET_OK = {"/v1/models", "/healthz", "/metrics"}  # GET/HEAD answer 200 there
CONTENT_TYPES = ["application/json", "image/png", "IMAGE/PNG", "image/png; x=y", "text/plain", "",
                 "multipart/form-data; boundary=zz", "application/json; charset=latin-1", "*/*", "application/json;;;",
                 "image/png, application/json"]
ACCEPTS = [None, "image/png", "*/*", "image/png;q=0", "application/json, image/png", "image/*", "x" * 3000]
TIMEOUTS = [None, "0", "-1", "nan", "inf", "1e999", "abc", "9" * 5000, " 5 ", "0x10", "1_0", "\t"]
ENCODINGS = [None, "identity", "gzip", "gzip-garbage", "deflate-garbage", "br-garbage", "x-unknown", "gzip, gzip"]


@st.composite
def envelope(draw) -> tuple[str, str, bytes | None, dict, list[int] | None, set[int]]:
    """(method, path, body, headers, chunk sizes or None, statuses allowed): the HTTP envelope, poisoned bodies."""
    import gzip

    method, path = draw(st.sampled_from(METHODS)), draw(st.sampled_from(PATHS))
    api = path.split("?")[0] in ("/v1/generate", "/v1/denoise")
    kind = draw(st.sampled_from(["json", "png", "junk", "empty"]))
    if kind == "json":
        body = dump(poisoned(path.split("?")[0] if api else "/v1/generate", {"model": draw(st.text(max_size=8))}))
    elif kind == "png":
        body = draw(bad_png())
    elif kind == "junk":
        body = draw(st.binary(min_size=1, max_size=200))
    else:
        body = b""
    headers = {}
    ct = draw(st.sampled_from(CONTENT_TYPES))
    if ct:
        headers["Content-Type"] = ct
    for name, choices in (("Accept", ACCEPTS), ("X-Request-Timeout", TIMEOUTS)):
        value = draw(st.sampled_from(choices))
        if value is not None and not (name == "X-Request-Timeout" and not api):  # GET /v1/models honours it
            headers[name] = value
    enc = draw(st.sampled_from(ENCODINGS))
    if enc is not None:
        headers["Content-Encoding"] = enc.split("-")[0] if enc.endswith("garbage") else enc
        if enc == "gzip":
            body = gzip.compress(body)
        elif enc.endswith("garbage"):
            body = b"\x1f\x8b garbage" + body
    chunks = draw(st.lists(st.integers(1, 64), max_size=4)) if draw(st.booleans()) else None
    if method in ("GET", "HEAD", "OPTIONS", "TRACE") and draw(st.booleans()):
        body, chunks = None, None
    # a route that exists for another method: 405; a path that does not: 404; a method token aiohttp refuses: 400
    allowed = {400, 404, 405, 413}
    if path in GET_OK and method in ("GET", "HEAD"):
        allowed.add(200)
    return method, path, body, headers, chunks, allowed


@ENVELOPE
@given(case=envelope())
def test_http_envelope(gateway, case):
    """Methods, paths, Content-Type/Accept/X-Request-Timeout/Content-Encoding values, chunked bodies: 4xx (200 for
    the GET routes), a JSON error with a short printable message where the gateway answers."""
    from reliability_support import http_exchange

    method, path, body, headers, chunks, allowed = case
    TRIED["envelope-http"] += 1
    r = http_exchange(gateway.http_target, method, path, body, headers, chunks, timeout=DEADLINE_S)
    check_structure_reply(r, f"{method} {path[:80]} {headers} {body[:80] if body else body!r}", allowed)


RAW_REQUESTS = [  # what http.client will not send: aiohttp's parser answers 400 itself
    b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    b"zz\r\nabc\r\n0\r\n\r\n",
    b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    b"ffffffffffffffffff\r\nabc\r\n0\r\n\r\n",
    b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n",
    b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    b"POST /v1/denoise HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Type: application/json\r\n"
    b"Content-Length: 2\r\n\r\n{}",
    b"POST /v1/generate HTTP/9.9\r\nHost: x\r\n\r\n",
    b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nX-Request-Timeout: \x01\x02\r\nContent-Length: 0\r\n\r\n",
    b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nX-Request-Timeout: " + b"9" * 9000 + b"\r\nContent-Length: 0\r\n\r\n",
    b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nBadHeader\r\n\r\n",
    b"POST /v1/generate HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(500)) + b"\r\n",
    b"POST /v1/gen\x00erate HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    b"FOO BAR BAZ QUX\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n",  # a TLS ClientHello on plain HTTP
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # an HTTP/2 preface
    b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
    b"Connection: close\r\n\r\n5\r\n{\"a\":\r\n2\r\n1}\r\n0\r\n\r\n",  # well-formed chunks, an unknown field: 400
]


@pytest.mark.parametrize("data", RAW_REQUESTS, ids=range(len(RAW_REQUESTS)))
def test_raw_http_protocol_abuse(gateway, data):
    """Malformed HTTP/1.1 framing (chunk sizes, Content-Length, duplicate headers, control characters, TLS/HTTP/2
    prefaces): a 4xx response line, never a 5xx; the gateway keeps serving."""
    from reliability_support import raw_http

    TRIED["raw-http"] += 1
    status, out = raw_http(gateway.http_target, data, timeout=5)
    ANSWERS[f"http {status}"] += 1
    assert status is not None and 400 <= status < 500, (data[:100], out[:300])


MIN_INPUTS = 2000  # inputs per full run of this module (every campaign above): the floor


def test_still_ready_and_serving_after_campaign(ready_gateway, triton):
    """After everything above: /readyz 200, a valid Generate over both transports, no 5xx counted in the metrics."""
    triton.require("dcgan_generator")
    gw = ready_gateway
    assert gw.http("GET", "/readyz").status == 200
    r = gw.stub.Generate(pb.GenerateRequest(num_samples=4, seed=11), timeout=DEADLINE_S)
    assert r.images.count == 4 and len(r.images.raw) == 4 * 784 * 4
    h = gw.http("POST", "/v1/generate", {"num_samples": 2, "seed": 11}, timeout=DEADLINE_S)
    assert h.status == 200
    x = np.frombuffer(base64.b64decode(h.json()["images"]["raw"]), "<f4").reshape(-1, 784)
    np.testing.assert_array_equal(x, np.frombuffer(r.images.raw, "<f4").reshape(-1, 784)[:2])
    metrics = gw.metrics()
    internal = [line for line in metrics.splitlines()
                if line.startswith("mnistgen_gateway_requests_total") and 'code="INTERNAL"' in line
                and not line.rstrip().endswith(" 0.0")]
    assert not internal, internal
    assert gw.proc.poll() is None
    # no control characters from any input reached the gateway's log (user input is escaped where it is logged)
    raw_log = gw.log_path.read_bytes().decode("utf-8", "replace")
    unprintable = [line for line in raw_log.splitlines() if not line.isprintable()]
    assert not unprintable, unprintable[:5]
    total = sum(TRIED.values())
    t0 = TIMINGS.pop("_t0")
    write_figures("bad_input", {"inputs_tried": total, "per_campaign": dict(TRIED), "structure_answers": dict(ANSWERS),
                                **TIMINGS, "campaign_s": round(time.monotonic() - t0, 1)})
    assert total > 0
    full_run = {"generate-grpc", "denoise-grpc", "malformed-http", "structure-http", "structure-grpc",
                "envelope-http", "raw-http"} <= set(TRIED)
    if full_run:  # (a -k selection of a few tests runs fewer)
        assert total >= MIN_INPUTS, f"only {total} inputs tried: {dict(TRIED)}"
