"""Checks of the inputs every command takes: ids, payloads, entity ids and messages.

Pure and cheap (every command's arguments pass here before anything is stored): a bad value raises
a typed `FlowError` and changes nothing. The JSON limits are shared with `flowstore.definitions`.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from flowstore.errors import InvalidArgumentError, PayloadTooLargeError, PayloadValidationError

__all__ = [
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "ERASED_USER_PREFIX",
    "MAX_JSON_DEPTH",
    "MAX_NAME_LENGTH",
    "check_entity",
    "check_message",
    "check_payload",
    "encode_json",
    "has_control_characters",
    "json_nesting",
    "require_id",
]

DEFAULT_MAX_PAYLOAD_BYTES = 64 * 1024

MAX_JSON_DEPTH = 100
"""Deepest nesting of objects and arrays accepted in a payload or a definition (the value itself is 1).

orjson refuses more than 254 levels; the event, the Kafka envelope and HTTP responses wrap the
value in a few more, so the limit leaves them room.
"""

MAX_NAME_LENGTH = 256
"""Longest flow id, step, service, module or transition name: the tables' columns are VARCHAR(256),
and every other call refuses longer ids."""

ERASED_USER_PREFIX = "erased:"
"""What an erased user's events carry as their user id: this prefix and the erased key's subject.
Reserved: no user id given to a command may start with it."""


def require_id(value: object, name: str) -> str:
    """`value` if it is a usable id (a non-blank string of printable characters), else
    `InvalidArgumentError` naming the argument."""
    if not isinstance(value, str):
        raise InvalidArgumentError(name, value, f"must be a string, not {type(value).__name__}")
    if not value.strip():
        raise InvalidArgumentError(name, value, "must not be empty")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidArgumentError(name, value[:40] + "...", f"longer than {MAX_NAME_LENGTH}")
    if has_control_characters(value):
        raise InvalidArgumentError(name, value, "contains a control character or lone surrogate")
    if name == "user_id" and value.startswith(ERASED_USER_PREFIX):
        raise InvalidArgumentError(name, value, f"{ERASED_USER_PREFIX!r} marks erased users")
    return value


_CONTROL_OR_SURROGATE = re.compile("[\x00-\x1f\ud800-\udfff]")


def has_control_characters(text: str) -> bool:
    """Control characters and lone surrogates: unstorable (NUL in PostgreSQL) or unencodable."""
    # A compiled character class: every id of every command passes here (a per-character
    # generator cost 10 µs an id).
    return _CONTROL_OR_SURROGATE.search(text) is not None


def check_payload(payload: Any, *, limit: int = DEFAULT_MAX_PAYLOAD_BYTES) -> dict[str, Any] | None:
    """Return a private copy of the payload if it is None or a JSON object within `limit` bytes;
    raise otherwise."""
    if payload is None:
        return None
    if not isinstance(payload, dict):
        raise PayloadValidationError(
            f"Payload must be a JSON object, not {type(payload).__name__}",
            type=type(payload).__name__,
        )
    try:
        encoded = encode_json(payload)
    except ValueError as exc:
        raise PayloadValidationError(f"Payload is not JSON: {exc}") from None
    if len(encoded) > limit:
        raise PayloadTooLargeError(len(encoded), limit)
    # orjson writes NaN as null, tuples as lists, datetimes as strings: anything that does not come
    # back equal is not plain JSON and would be stored as something other than what was sent.
    # The decoded copy is what is returned: the events then share no object with the caller, who
    # may change theirs after the call (this process's projector takes the events as they are).
    copy: dict[str, Any] = orjson.loads(encoded)
    if copy != payload:
        raise PayloadValidationError(
            "Payload is not plain JSON (NaN/Infinity, tuples, dates or non-string keys "
            "do not survive a JSON round trip)"
        )
    # Each level opens a bracket and closes it: in no more bytes than twice the limit, or with
    # no more brackets than the limit (in strings too, so never fewer than the depth), the
    # payload is within it, and the walk is not needed (nor the count, for a small payload).
    if (
        len(encoded) > 2 * MAX_JSON_DEPTH
        and encoded.count(b"{") + encoded.count(b"[") > MAX_JSON_DEPTH
        and (depth := json_nesting(payload)) > MAX_JSON_DEPTH
    ):
        raise PayloadValidationError(
            f"Payload is nested {depth} levels deep, over the limit of {MAX_JSON_DEPTH}"
        )
    if b"\\u0000" in encoded and _has_nul(payload):  # the byte test is the cheap filter
        # Valid JSON, but PostgreSQL text and jsonb cannot store NUL: refused on every backend so
        # that a store behaves the same wherever it runs.
        raise PayloadValidationError("Payload contains a NUL character (\\u0000)")
    return copy


def check_entity(value: object) -> str | None:
    """An entity id: None, `""` (the model's null) or a usable id."""
    if value is None:
        return None
    return "" if value == "" else require_id(value, "entity_id")


def check_message(value: object, limit: int) -> str | None:
    """A message: any text within `limit` bytes, without NUL or lone surrogates (unstorable)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidArgumentError(
            "message", value, f"must be a string, not {type(value).__name__}"
        )
    if "\x00" in value or any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise InvalidArgumentError("message", value[:40], "contains NUL or a lone surrogate")
    if len(value.encode("utf-8")) > limit:
        raise InvalidArgumentError("message", value[:40] + "...", f"longer than {limit} bytes")
    return value


def encode_json(value: Any) -> bytes:
    """`value` as orjson encodes it for storage; `ValueError` saying why it cannot be encoded."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError as exc:
        # orjson's messages are terse ("Integer exceeds 64-bit range", "Recursion limit reached",
        # "str is not valid UTF-8: surrogates not allowed"): name the limits they refer to.
        raise ValueError(
            f"{exc} (JSON here holds objects with string keys, arrays, text in valid UTF-8, "
            f"64-bit integers and at most {MAX_JSON_DEPTH} levels of nesting)"
        ) from None


def json_nesting(value: Any) -> int:
    """How deeply objects and arrays nest in `value` (0 for a scalar); iterative, not recursive."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children)
    return deepest


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False
