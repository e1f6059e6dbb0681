"""Errors as problem+json: the app's exception handlers, the body cap, the OpenAPI media type.

`install_error_handlers` serves a whole app; a `FlowRoute` (adapters/http/routing.py) answers its own
endpoint's errors with the same functions, wherever its router is mounted.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flowstore import FlowError, PayloadTooLargeError
from flowstore.adapters.http.auth import AuthenticationError
from flowstore.adapters.http.problems import (
    PROBLEM_MEDIA_TYPE,
    RequestInvalidError,
    http_status_code,
    problem,
    problem_for,
    problem_response,
)

__all__ = [
    "BodyLimit",
    "flow_error",
    "http_error",
    "install_error_handlers",
    "invalid_request",
    "problem_openapi",
    "too_large",
]


class BodyLimit:
    """Refuses request bodies over `limit` bytes with 413 before anything parses them.

    The body is read here (at most `limit` bytes are held) and replayed to the app, so a chunked body
    without Content-Length is capped as well as a declared one.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(int(declared), scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client disconnected before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._refuse(size, scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, size: int, scope: Scope, receive: Receive, send: Send) -> None:
        await too_large(size, self.limit)(scope, receive, send)


def too_large(size: int, limit: int) -> Response:
    """413 PAYLOAD_TOO_LARGE for a body of `size` bytes over `limit`."""
    # The client may still be sending; closing after the answer spares reading the rest.
    return problem_response(problem_for(PayloadTooLargeError(size, limit)), {"Connection": "close"})


_HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def _allowed_methods(request: Request) -> list[str]:
    """Every method the API serves at the request's path, read from its OpenAPI paths.

    Starlette's 405 names only the methods of the first route matching the path; `/api/flows`,
    for one, has a GET route and a POST route.
    """
    paths: dict[str, dict[str, Any]] = request.app.openapi()["paths"]
    # OpenAPI matches a concrete path before templated ones (/api/flows/mine, /api/flows/{flowId}).
    matching = [paths[request.url.path]] if request.url.path in paths else []
    for template, operations in paths.items():
        pattern = "[^/]+".join(re.escape(part) for part in re.split(r"\{[^}]+\}", template))
        if not matching and re.fullmatch(pattern, request.url.path):
            matching.append(operations)
    return sorted({m.upper() for operations in matching for m in operations if m in _HTTP_METHODS})


async def flow_error(request: Request, exc: Exception) -> Response:
    """A FlowError as problem+json (401s with their WWW-Authenticate challenge)."""
    assert isinstance(exc, FlowError)
    headers = None
    if isinstance(exc, AuthenticationError):
        error = "invalid_token" if exc.reason != "missing" else None
        headers = {"WWW-Authenticate": f'Bearer error="{error}"' if error else "Bearer"}
    return problem_response(problem_for(exc), headers)


async def invalid_request(request: Request, exc: Exception) -> Response:
    """FastAPI's request validation errors as one 422 REQUEST_INVALID."""
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    return problem_response(problem_for(RequestInvalidError(errors)))


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's HTTP errors (404, 405, undecodable bodies) as problem+json."""
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 400:
        # FastAPI's answer to a body it cannot decode (not UTF-8, nested too deep): invalid
        # input like any other, so the same 422 as a body that is not JSON.
        errors = [{"loc": ["body"], "msg": "cannot be decoded as JSON", "type": "json_invalid"}]
        return problem_response(problem_for(RequestInvalidError(errors)))
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(_allowed_methods(request))
    code = http_status_code(exc.status_code)
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    return problem_response(problem(exc.status_code, code, detail), headers)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error the app raises as problem+json (a 500 tells nothing of the internals)."""

    async def unexpected(request: Request, exc: Exception) -> Response:
        # Logged by the server with its traceback; the client learns nothing about the internals.
        return problem_response(problem(500, "INTERNAL_ERROR", "Internal server error"))

    app.add_exception_handler(FlowError, flow_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def problem_openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """The OpenAPI document, with error responses declared as problem+json (as they are sent)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    for status, response in operation.get("responses", {}).items():
                        content = response.get("content", {})
                        if int(status) >= 400 and "application/json" in content:
                            content[PROBLEM_MEDIA_TYPE] = content.pop("application/json")
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi
