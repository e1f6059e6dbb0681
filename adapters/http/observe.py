"""Request ids and Prometheus metrics for the API (`/metrics` with the `metrics` extra).

Every HTTP request gets an id: the caller's `X-Request-ID` when it sends a sane one, else a new
one; it is sent back in `X-Request-ID` and attached to every log record made while the request is
served (`request_id`, which `--log-format json` writes out).
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flowstore.adapters.logs import request_id as request_id_var

__all__ = ["REQUEST_ID_HEADER", "RequestObserver", "current_request_id"]

REQUEST_ID_HEADER = "X-Request-ID"
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_request_id = request_id_var


def current_request_id() -> str | None:
    """The id of the request being served in this context (None outside one)."""
    return _request_id.get()


class RequestObserver:
    """ASGI middleware: a request id for each HTTP request, and metrics when `metrics` is given."""

    def __init__(self, app: ASGIApp, metrics: Any | None = None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope["headers"]).get(REQUEST_ID_HEADER.lower().encode(), b"").decode("latin-1")
        request_id = sent if _SANE_ID.match(sent) else uuid.uuid4().hex
        token = _request_id.set(request_id)
        status = [500]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER.lower().encode(), request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            if self.metrics is None or scope.get("path") == "/metrics":
                await self.app(scope, receive, send_with_id)
                return
            began = time.perf_counter()
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                # The route template (the command's kind), known once routing has run.
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                self.metrics.observe(
                    scope["method"], route, str(status[0]), time.perf_counter() - began
                )
        finally:
            _request_id.reset(token)
