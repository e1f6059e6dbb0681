"""State tokens: a user's flow state as the OwlMeans model hands it from one service to another.

`encode_state_token` writes exactly the string `serializeState` of `@owlmeans/flow` writes for the
same state, and `decode_state_token` reads one back as `unserializeState` does: base64url without
padding of the UTF-8 JSON text of an object with, in this order,

    f  "<flow>:<index of the step>[:<index of previous>]"   (the steps' `index` fields)
    s  the service                                         (left out when the state has none)
    o  1 when ok, else 0
    e  the entity id, when the state has one (the model's null is written, and read, as "")
    m  the message, when there is one
    p  the payload values the current step's `payloadMap` lists, each at its position, joined
       with ","  (when the step has a payloadMap and the state a payload)

The JSON is written as JavaScript's `JSON.stringify` writes it (no spaces, non-ASCII kept as UTF-8)
and payload values as JavaScript's `String(value)` would (`true`, `1.5`, `1e+21`, "" for null). The
token keeps only what those fields hold: payload values come back as strings, keys the step does not
map are dropped, and a value holding a comma shifts the values after it (as in the model).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from flowstore.definitions import FlowDefinition, FlowStep
from flowstore.errors import (
    InvalidStepError,
    StateTokenFlowError,
    StateTokenFormatError,
    StateTokenStepError,
)
from flowstore.models import FlowState

__all__ = [
    "decode_state_token",
    "encode_state_token",
    "token_flow_id",
]

FLOW_SEP = ":"
PAYLOAD_SEP = ","


# Encoding


def encode_state_token(definition: FlowDefinition, state: FlowState) -> str:
    """The token `serializeState(definition, state)` gives: byte for byte the model's string."""
    step = _step_of(definition, state.step)
    block = [state.flow, str(step.index)]
    if state.previous is not None:
        block.append(str(_step_of(definition, state.previous).index))
    serialized: dict[str, Any] = {"f": FLOW_SEP.join(block)}
    if state.service is not None:  # JSON.stringify drops an undefined service
        serialized["s"] = state.service
    serialized["o"] = 1 if state.ok else 0
    if state.entity_id is not None:
        serialized["e"] = state.entity_id
    if state.message is not None:
        serialized["m"] = state.message
    if state.payload is not None and step.payload_map is not None:
        serialized["p"] = _payload_slots(step.payload_map, state.payload)
    text = json.dumps(serialized, ensure_ascii=False, separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode("utf-8")).rstrip(b"=").decode("ascii")


def _step_of(definition: FlowDefinition, name: str) -> FlowStep:
    step = definition.step(name)
    if step is None:
        raise InvalidStepError(
            name, flow_id=definition.flow, definition_version=definition.version or 0
        )
    return step


def _payload_slots(payload_map: Mapping[str, int], payload: Mapping[str, Any]) -> str:
    """The `p` field: each mapped value at its position, "" in unfilled slots, joined with ","."""
    entries = _js_entries(payload_map)
    slots: list[str] = [""] * len(entries)
    for key, index in entries:
        if index < 0:  # a negative index is a property of the JS array, not an element
            continue
        if index >= len(slots):
            slots.extend([""] * (index + 1 - len(slots)))
        slots[index] = _js_string(payload.get(key))
    return PAYLOAD_SEP.join(slots)


_ARRAY_INDEX = re.compile(r"0|[1-9][0-9]*")


def _js_entries(mapping: Mapping[str, int]) -> list[tuple[str, int]]:
    """`Object.entries` order: integer-like keys first (ascending), then the others as inserted."""
    integer = sorted(
        (k for k in mapping if _ARRAY_INDEX.fullmatch(k) and int(k) < 2**32 - 1), key=int
    )
    rest = [k for k in mapping if k not in set(integer)]
    return [(k, mapping[k]) for k in (*integer, *rest)]


def _js_string(value: Any) -> str:
    """`value.toString()` as JavaScript writes it ("" for null and missing values)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _js_number(value)
    if isinstance(value, list):
        return ",".join(_js_string(item) for item in value)
    if isinstance(value, dict):
        return "[object Object]"
    return str(value)


def _js_number(value: float) -> str:
    """`Number#toString()`: shortest round-trip digits, exponent only below 1e-6 or from 1e21."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    if value == 0:
        return "0"
    sign = "-" if value < 0 else ""
    mantissa, _, exponent = repr(abs(value)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = (whole + fraction).lstrip("0")
    # Python's repr gives the same shortest digits as JavaScript; only the layout differs.
    point = len(whole) + int(exponent or 0) - (len(whole + fraction) - len(digits))
    digits = digits.rstrip("0") or "0"
    k, n = len(digits), point
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        text = "0." + "0" * -n + digits
    else:
        e = n - 1
        text = (
            digits[0] + ("." + digits[1:] if k > 1 else "") + f"e{'+' if e >= 0 else '-'}{abs(e)}"
        )
    return sign + text


# Decoding

_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")


def _token_object(token: str) -> dict[str, Any]:
    """The token's JSON object, read as strictly as `@scure/base` and `JSON.parse` read it."""
    if not isinstance(token, str):
        raise StateTokenFormatError(f"a token is a string, not {type(token).__name__}")
    if not _BASE64URL.fullmatch(token):
        bad = next(c for c in token if not _BASE64URL.fullmatch(c))
        raise StateTokenFormatError(f"not base64url: character {bad!r}")
    if len(token) % 4 == 1:
        raise StateTokenFormatError("not base64url: impossible length")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError) as exc:
        raise StateTokenFormatError(f"not base64url: {exc}") from None
    # Non-zero bits after the last byte: another string decodes to the same bytes; refused.
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != token:
        raise StateTokenFormatError("not base64url: non-zero padding bits")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise StateTokenFormatError("not UTF-8") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise StateTokenFormatError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise StateTokenFormatError(f"the JSON is a {_json_type(data)}, not an object")
    if not isinstance(data.get("f"), str):
        raise StateTokenFormatError("no flow and step (`f` must be a string)")
    for name in ("s", "e", "m", "p"):
        if data.get(name) is not None and not isinstance(data[name], str):
            raise StateTokenFormatError(f"`{name}` must be a string, not {_json_type(data[name])}")
    return data


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def token_flow_id(token: str) -> str:
    """The flow a token is for (its `f` up to the first ":"); `StateTokenFormatError` if unreadable."""
    flow: str = _token_object(token)["f"].split(FLOW_SEP)[0]
    return flow


def decode_state_token(
    token: str, definition: FlowDefinition | Callable[[str], FlowDefinition]
) -> FlowState:
    """The state `unserializeState` reads from a token, given its flow's definition (or a provider).

    Raises a `StateTokenError`: `StateTokenFormatError` when the token is not base64url JSON,
    `StateTokenFlowError` when it is for another flow, `StateTokenStepError` when its step index
    is not a step of the flow. An unknown previous index reads as no previous, as in the model.
    """
    data = _token_object(token)
    parts = data["f"].split(FLOW_SEP)[:3]  # JavaScript's split(sep, 3): the rest is dropped
    alias = parts[0]
    if isinstance(definition, FlowDefinition):
        if alias != definition.flow:
            raise StateTokenFlowError(alias, definition.flow)
        flow = definition
    else:
        flow = definition(alias)
    step = _step_at(flow, parts[1] if len(parts) > 1 else None)
    if step is None:
        raise StateTokenStepError(alias, parts[1] if len(parts) > 1 else None)
    previous = _step_at(flow, parts[2]) if len(parts) > 2 else None
    o = data.get("o")
    payload: dict[str, Any] | None = None
    if data.get("p") is not None and step.payload_map is not None:
        values = data["p"].split(PAYLOAD_SEP)
        payload = {
            key: values[index] if 0 <= index < len(values) else None
            for key, index in _js_entries(step.payload_map)
        }
    return FlowState(
        flow=flow.flow,
        step=step.step,
        previous=previous.step if previous is not None else None,
        service=data.get("s"),
        ok=type(o) in (int, float) and o == 1,  # `o === 1`: true and "1" are not 1
        message=data.get("m"),
        entity_id=data.get("e"),
        payload=payload,
        definition_version=flow.version,
    )


def _step_at(flow: FlowDefinition, index: str | None) -> FlowStep | None:
    """The first step whose `index` is `parseInt(index)` (None when it is NaN or no step has it)."""
    number = _parse_int(index) if index is not None else None
    if number is None:
        return None
    return next((step for step in flow.steps.values() if step.index == number), None)


_JS_SPACE = " \t\n\v\f\r\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
_JS_SPACE += "\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
_INT_PREFIX = re.compile(r"([+-]?)(?:0[xX]([0-9a-fA-F]+)|([0-9]+))")


def _parse_int(text: str) -> int | None:
    """JavaScript's `parseInt(text)`: leading digits (or 0x hex), None for NaN."""
    text = text.lstrip(_JS_SPACE)
    found = _INT_PREFIX.match(text)
    if found is None or (re.match(r"[+-]?0[xX]", text) and found.group(2) is None):
        return None
    sign, hexa, decimal = found.groups()
    value = int(hexa, 16) if hexa is not None else int(decimal)
    return -value if sign == "-" else value
