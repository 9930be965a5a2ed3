"""JSON request bodies: bounded in depth, size and encoding before anything recurses, then typed field by field
before protobuf's ParseDict sees them, so hostile structure gets a 400 naming the field, never a 500."""
from __future__ import annotations

import codecs
import json
import logging
import re

import numpy as np
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor as FD

from ..generated.mnistgen.v1 import generation_pb2 as pb
from ..validation import ECHO_CHARS, ValidationError, check_format, clip, echo

log = logging.getLogger("mnistgen.gateway")

MAX_JSON_DEPTH = 8  # nesting of arrays/objects in a body (a valid request has 2: {"png_images": [...]})
MAX_JSON_ITEMS = 4096  # values in a body, counted as commas + arrays + objects (a valid Denoise has < 80)
JSON_THREAD_BYTES = 256 << 10  # bodies over this are parsed off the event loop (64 raw images are ~270 KB)
FLOAT_MAX = np.finfo(np.float64).max  # a JSON integer above this is no finite float
# a JSON string, possessive (no backtracking); an unterminated one runs to the end (no retry from each later quote,
# which made a body of '"\\"\\"\\"...' quadratic): linear in the body whatever it holds
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.?)*+(?:"|\Z)', re.DOTALL)
_NOT_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))
_OPEN = np.frombuffer(b"[{", np.uint8)


def json_shape(body: bytes) -> tuple[int, int]:
    """(deepest nesting, commas + arrays + objects) of a JSON text, from a linear scan of its bytes (a regex and
    numpy) before anything recurses: json.loads and ParseDict recurse once per level (100k `[` exhaust the stack) and
    4 million `1,` are 40 MB of objects. String contents count for nothing; the body must already be valid UTF-8."""
    skeleton = _JSON_STRING.sub(b"0", body)
    brackets = np.frombuffer(skeleton.translate(None, _NOT_BRACKET), np.uint8)
    opens = np.isin(brackets, _OPEN)
    depth = int(np.cumsum(np.where(opens, np.int8(1), np.int8(-1)), dtype=np.int32).max(initial=0))
    return depth, skeleton.count(b",") + int(opens.sum())


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json.loads object_pairs_hook: a key given twice is refused (which one wins differs between parsers)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise ValidationError("body", f"key {echo(key)} given twice in one JSON object")
            seen.add(key)
    return obj


def json_kind(value) -> str:
    """The JSON type of a parsed value, for messages: "an array", "a string", ..."""
    if value is None:
        return "null"
    for types, name in ((bool, "a boolean"), ((int, float), "a number"), (str, "a string"), (list, "an array"),
                        (dict, "an object")):
        if isinstance(value, types):
            return name
    return type(value).__name__


def json_expects(f) -> str:
    """What protobuf's JSON mapping takes for a (non-repeated) field, in words."""
    if f.type == FD.TYPE_BYTES:
        return "base64 bytes in a JSON string"
    if f.cpp_type == FD.CPPTYPE_STRING:
        return "a JSON string"
    if f.cpp_type == FD.CPPTYPE_ENUM:
        return f"one of {[v.name for v in f.enum_type.values]} or its number"
    if f.cpp_type in (FD.CPPTYPE_FLOAT, FD.CPPTYPE_DOUBLE):
        return 'a JSON number (or "NaN", "Infinity" as strings)'
    if f.cpp_type == FD.CPPTYPE_BOOL:
        return "true or false"
    return "an integer (a JSON number or a string of digits)"


def json_accepts(f, value) -> bool:
    """Whether a value has a JSON type protobuf's mapping can read into this (non-repeated) field."""
    if f.cpp_type == FD.CPPTYPE_STRING:
        return isinstance(value, str)
    if f.cpp_type == FD.CPPTYPE_BOOL:
        return isinstance(value, bool)
    if f.cpp_type == FD.CPPTYPE_MESSAGE:
        return isinstance(value, dict)
    return isinstance(value, (int, float, str)) and not isinstance(value, bool)  # numbers and enums


def check_json_fields(obj: dict, descriptor) -> None:
    """Every key a field of the message (by proto or JSON name, once), every value of a JSON type that field takes:
    what ParseDict would choke on or misread is refused, echoing at most ECHO_CHARS. null means "unset"."""
    fields = {}
    for f in descriptor.fields:
        fields[f.name] = fields[f.json_name] = f
    given: dict[str, str] = {}
    for key, value in obj.items():
        f = fields.get(key)
        if f is None:
            raise ValidationError(clip(key, ECHO_CHARS), f"{descriptor.full_name} has no field named {echo(key)}; "
                                                         f"its fields: {[f.name for f in descriptor.fields]} "
                                                         f"(see {descriptor.name} in docs/api.md)")
        if f.name in given:
            raise ValidationError(f.name, f"given twice, as {echo(given[f.name])} and {echo(key)}")
        given[f.name] = key
        if value is None:
            continue
        if f.is_repeated:
            if not isinstance(value, list):
                raise ValidationError(f.name, f"must be a JSON array of {json_expects(f)}, got {json_kind(value)} "
                                              f"{echo(value)}")
            for i, v in enumerate(value):
                if not json_accepts(f, v):
                    raise ValidationError(f"{f.name}[{i}]", f"must be {json_expects(f)}, got {json_kind(v)} {echo(v)}")
        elif not json_accepts(f, value):
            raise ValidationError(f.name, f"must be {json_expects(f)}, got {json_kind(value)} {echo(value)}")
        elif f.cpp_type in (FD.CPPTYPE_FLOAT, FD.CPPTYPE_DOUBLE) and isinstance(value, int) and abs(value) > FLOAT_MAX:
            raise ValidationError(f.name, f"must be a finite number, got {echo(value)}")  # (float() would overflow)


def parse_error(e: json_format.ParseError, obj: dict, descriptor) -> ValidationError:
    """protobuf's JSON parse errors -> ValidationError naming the field. protobuf repeats the offending value in
    full (or Python's 200 characters of it); the message says what the field takes and echoes the value short."""
    text, message_name = str(e), descriptor.name
    m = (re.search(r"Failed to parse (\w+) field", text) or re.search(r'no field named "?(\w+)"?', text)
         or re.search(r" at \w+\.(\w+)", text))
    key = m.group(1) if m else None
    f = next((f for f in descriptor.fields if key in (f.name, f.json_name)), None)
    if f is None or key not in obj:
        return ValidationError(f.name if f is not None else key or "body",
                               f"{clip(text)} (see {message_name} in docs/api.md)")
    reason = text.split(" field: ", 1)[-1].split(": ", 1)[0]  # "Couldn't parse integer", "Value out of range"...
    reason = re.sub(r" at \w+(\.\w+)*\.?$", "", reason).rstrip(".")
    value = obj[key]
    return ValidationError(f.name, f"must be {json_expects(f)}, got {json_kind(value)} {echo(value)} "
                                   f"({clip(reason, 80)}; see {message_name} in docs/api.md)")


def parse_json_body(body: bytes, message_type):
    """An HTTP body -> a request message; every way it can be wrong is a ValidationError (HTTP 400) naming `body`
    or the field, never a 500: UTF-8 (RFC 8259), depth and size bounded, then keys and JSON types checked."""
    name = message_type.DESCRIPTOR.name
    body = body.removeprefix(codecs.BOM_UTF8)
    if not body.strip():
        return message_type()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValidationError("body", f"not UTF-8 (byte {e.start} is {echo(body[e.start:e.start + 1])}); send a "
                                      f"{name} as JSON in UTF-8") from None
    depth, items = json_shape(body)
    if depth > MAX_JSON_DEPTH:
        raise ValidationError("body", f"JSON nested {depth} levels deep, over the limit of {MAX_JSON_DEPTH} "
                                      f"(a {name} needs 2)")
    if items > MAX_JSON_ITEMS:
        raise ValidationError("body", f"JSON with {items} values, over the limit of {MAX_JSON_ITEMS} "
                                      f"(a {name} needs fewer than 100)")
    try:
        obj = json.loads(text, object_pairs_hook=unique_keys)
    except (ValueError, RecursionError) as e:  # (unique_keys raises ValidationError, not a ValueError)
        raise ValidationError("body", f"not valid JSON ({clip(e)}); send a {name} as JSON") from None
    if not isinstance(obj, dict):
        raise ValidationError("body", f"must be a JSON object ({name}), got {json_kind(obj)} {echo(obj)}")
    check_json_fields(obj, message_type.DESCRIPTOR)
    fmt = obj.get("format")
    if isinstance(fmt, float) and fmt.is_integer():
        obj["format"] = fmt = int(fmt)
    if isinstance(fmt, str):
        obj["format"] = fmt = fmt.upper() if fmt.isascii() else fmt
        if fmt not in pb.ImageFormat.keys():  # upb would read "PNG\u0000junk" as PNG (a C string)
            check_format(fmt)  # raises
    elif isinstance(fmt, (int, float)):
        check_format(fmt)  # raises unless 0..3: protobuf reads 1.5 as 1 and drops numbers beyond int32 silently
    try:
        return json_format.ParseDict(obj, message_type())
    except json_format.ParseError as e:
        raise parse_error(e, obj, message_type.DESCRIPTOR) from None
    except Exception as e:  # protobuf choking on something check_json_fields let through: still the body's fault
        log.warning("ParseDict(%s) raised %s: %s", name, type(e).__name__, clip(e))
        raise ValidationError("body", f"cannot be read as a {name} ({type(e).__name__}: {clip(e)})") from None
