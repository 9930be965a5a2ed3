"""Protobuf JSON for the HTTP API's image-carrying messages, fast both ways: each large raw image block is one base64
call spliced into (or cut out of) the JSON text, where json and protobuf's parser would walk it character by character.

`dumps(msg)` is byte for byte `json.dumps(message_json(msg))` (protobuf's own mapping: proto field names, fields
without presence printed, bytes as standard base64), and `loads(body, T)` equals `json_format.Parse(body, T(),
ignore_unknown_fields=True)`.
"""
from __future__ import annotations

import base64
import binascii
import json
import secrets

from google.protobuf import json_format

from .generated.mnistgen.v1 import generation_pb2 as pb

IMAGES = pb.Images.DESCRIPTOR
SPLICE_BYTES = 4096  # raw blocks shorter than this go through json.dumps / json_format like everything else


def message_json(msg) -> dict:
    """protobuf's JSON mapping of a message as a dict (proto field names; fields without presence printed)."""
    return json_format.MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def image_fields(msg) -> list[str]:
    """Names of msg's set pb.Images fields whose raw block is worth splicing."""
    return [f.name for f, v in msg.ListFields()
            if f.message_type is IMAGES and not f.is_repeated and len(v.raw) >= SPLICE_BYTES]


def dumps(msg) -> bytes:
    """UTF-8 JSON of msg, equal to json.dumps(message_json(msg)).encode(); each large pb.Images.raw is base64-encoded
    in one call and joined in as bytes (json.dumps never sees it)."""
    names = image_fields(msg)
    if not names:
        return json.dumps(message_json(msg)).encode()
    raws = [getattr(msg, n).raw for n in names]
    token = f"raw-{secrets.token_hex(16)}"  # stands in for each block in the text json.dumps writes
    try:
        for n in names:
            getattr(msg, n).raw = b""
        d = message_json(msg)
    finally:
        for n, raw in zip(names, raws):
            getattr(msg, n).raw = raw
    for i, n in enumerate(names):
        d[n]["raw"] = f"{token}-{i}"
    text = json.dumps(d)  # ASCII (ensure_ascii)
    out, rest = [], text
    for i, raw in enumerate(raws):
        head, sep, rest = rest.partition(f'"{token}-{i}"')
        if not sep:  # (cannot happen: the token is random and json.dumps keeps it as is) the plain way then
            return json.dumps(message_json(msg)).encode()
        out += [head.encode(), b'"', base64.b64encode(raw), b'"']
    out.append(rest.encode())
    return b"".join(out)


def loads(body: bytes | str, message_type):
    """A message of message_type from its JSON, as json_format.Parse(body, message_type(), ignore_unknown_fields=True)
    would read it (raises json_format.ParseError likewise); large standard-base64 `raw` strings of pb.Images fields
    are decoded in one call. A block that is not plain base64 (URL-safe, unpadded) is left to protobuf's parser."""
    try:
        obj = json.loads(body)
    except ValueError as e:
        raise json_format.ParseError(f"Failed to load JSON: {e}") from None
    if not isinstance(obj, dict):
        return json_format.ParseDict(obj, message_type(), ignore_unknown_fields=True)  # (raises its own error)
    by_key = {}
    for f in message_type.DESCRIPTOR.fields:
        if f.message_type is IMAGES and not f.is_repeated:
            by_key[f.name] = by_key[f.json_name] = f.name
    blocks: dict[str, bytes] = {}
    for key, value in obj.items():
        raw = value.get("raw") if key in by_key and isinstance(value, dict) else None
        if isinstance(raw, str) and len(raw) >= SPLICE_BYTES:
            try:
                blocks[by_key[key]] = base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError):
                continue
            value["raw"] = ""
    msg = json_format.ParseDict(obj, message_type(), ignore_unknown_fields=True)
    for name, raw in blocks.items():
        getattr(msg, name).raw = raw
    return msg
