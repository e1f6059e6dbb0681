"""Errors on the wire: RFC 9457 problem details carrying flowstore's stable error `code`.

Every error the API returns, REST or WebSocket, has one shape (`Problem`). The status comes from the
one mapping in `adapters/errors.py`; the errors below exist only at the HTTP boundary and are
FlowErrors so that the same mapping and the same exception handler cover them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import orjson
from pydantic import BaseModel, Field
from starlette.responses import Response

from flowstore import FlowError
from flowstore.adapters.errors import mapping_for
from flowstore.errors import RequestInvalidError

__all__ = [
    "PROBLEM_MEDIA_TYPE",
    "Problem",
    "RequestInvalidError",
    "http_status_code",
    "problem",
    "problem_for",
    "problem_response",
]

PROBLEM_MEDIA_TYPE = "application/problem+json"


class Problem(BaseModel):
    """An error as RFC 9457 problem details, with flowstore's stable `code` and its `details`."""

    type: str = Field(description="A URN naming the kind of problem (one per `code`).")
    title: str
    status: int
    detail: str
    code: str = Field(description="Stable error code, e.g. FLOW_NOT_FOUND, INVALID_TRANSITION.")
    details: dict[str, Any] = Field(
        default_factory=dict, description="The offending values, by name."
    )


def _plain(value: Any) -> Any:
    """JSON-ready data for any detail value: what orjson cannot encode as it is becomes text.

    Details echo offending input, which can be anything a client sent: an integer past 64 bits,
    a float that is not finite, an object in a message.
    """
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return str(value)


def problem(status: int, code: str, detail: str, details: Any = None) -> dict[str, Any]:
    """Problem details as a JSON-ready dict."""
    return {
        "type": f"urn:flowstore:problem:{code.lower().replace('_', '-')}",
        "title": code.replace("_", " ").capitalize(),
        "status": status,
        "detail": " ".join(detail.split()),
        "code": code,
        "details": _plain(dict(details or {})),
    }


def problem_for(error: FlowError) -> dict[str, Any]:
    """A FlowError's problem details; its status from `flowstore.adapters.errors.mapping_for`."""
    return problem(mapping_for(error).http_status, error.code, error.message, error.details)


def problem_response(body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    """A problem+json response for problem details made by `problem` or `problem_for`."""
    return Response(
        orjson.dumps(body),
        status_code=body["status"],
        headers=headers,
        media_type=PROBLEM_MEDIA_TYPE,
    )


def http_status_code(status: int) -> str:
    """The code for a status the framework decides (unknown route, wrong method): its name."""
    try:
        return HTTPStatus(status).name
    except ValueError:
        return "HTTP_ERROR"
