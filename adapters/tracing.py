"""OpenTelemetry spans from an HTTP request to the append and to the catch-up that projected it.

Needs the `otel` extra (`opentelemetry-api`, and `opentelemetry-sdk` or another SDK to export) and
is off until asked for: `trace_store(store)` (the CLI's `serve` and `worker` call it when
`$FLOWSTORE_TRACING` is 1; export is configured the usual way, e.g. by running them under
`opentelemetry-instrument` with the `OTEL_*` variables). An app created by `create_app` over a
traced store adds `TracingMiddleware`. The spans:

- `HTTP <method> <route template>` (server kind): `http.request.method`, `http.route`,
  `http.response.status_code`; a caller's `traceparent` makes it a child of the caller's span;
- `flowstore.command`: `flowstore.command.kind`, `flowstore.flow_id`,
  `flowstore.command.outcome` (see `flowstore.telemetry`), with children `flowstore.decide`
  (reading the instance and deciding) and `flowstore.append` (`flowstore.log.position`);
- `flowstore.project`: one per batch a catch-up of this process committed (the live projector's,
  or a worker's), `flowstore.log.first` / `flowstore.log.last` / `flowstore.events`, linked to
  the append spans of this process whose events it projected (a link, not a parent: one catch-up
  projects many commands' events; another process's appends cannot be linked).

No attribute holds a user id, a payload, a message or a raw URL (personal data): routes are
templates (`/api/admin/users/{userId}`), never paths.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.propagate import extract
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, Tracer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flowstore import FlowStore
from flowstore.telemetry import POSITION, StoreObserver

__all__ = ["TRACING_ENV", "TracingMiddleware", "TracingObserver", "trace_store", "traced"]

TRACING_ENV = "FLOWSTORE_TRACING"
"""Set to 1 to make `flowstore serve` and `flowstore worker` trace their store."""

_REMEMBERED = 10_000  # append spans kept for linking, newest first out of mind last

_traced: weakref.WeakKeyDictionary[FlowStore, TracingObserver] = weakref.WeakKeyDictionary()
_traced_lock = threading.Lock()


def _tracer(provider: Any | None) -> Tracer:
    import flowstore

    return trace.get_tracer("flowstore", flowstore.__version__, tracer_provider=provider)


class TracingObserver(StoreObserver):
    """Opens the store's spans on a tracer, and links each catch-up to the appends it projected."""

    def __init__(self, tracer_provider: Any | None = None) -> None:
        self.tracer = _tracer(tracer_provider)
        self._appends: OrderedDict[int, SpanContext] = OrderedDict()
        self._lock = threading.Lock()

    def span(self, name: str, attributes: dict[str, Any]) -> AbstractContextManager[Any]:
        """A span (child of the current one) whose attributes the store may add to."""
        return self._span(name, attributes)

    @contextmanager
    def _span(self, name: str, attributes: dict[str, Any]) -> Iterator[Any]:
        with self.tracer.start_as_current_span(name, attributes=attributes) as span:

            def set_attribute(key: str, value: Any) -> None:
                span.set_attribute(key, value)
                if key == POSITION and value:
                    self._remember(int(value), span.get_span_context())

            yield set_attribute

    def _remember(self, position: int, context: SpanContext) -> None:
        with self._lock:
            self._appends[position] = context
            while len(self._appends) > _REMEMBERED:
                self._appends.popitem(last=False)

    def projected(self, first: int, last: int, count: int, began_ns: int) -> None:
        """A `flowstore.project` span over the batch, linked to the appends it projected."""
        with self._lock:
            positions = [p for p in self._appends if first <= p <= last]
            links = [Link(self._appends.pop(p)) for p in positions]
        span = self.tracer.start_span(
            "flowstore.project",
            context=trace.set_span_in_context(trace.INVALID_SPAN),  # a root: not the caller's
            links=links,
            start_time=began_ns,
            attributes={
                "flowstore.log.first": first,
                "flowstore.log.last": last,
                "flowstore.events": count,
            },
        )
        span.end(end_time=max(began_ns, time.time_ns()))


def trace_store(store: FlowStore, tracer_provider: Any | None = None) -> TracingObserver:
    """Trace `store`'s commands and catch-ups (once per store; the global provider by default)."""
    with _traced_lock:
        observer = _traced.get(store)
        if observer is None:
            observer = _traced[store] = TracingObserver(tracer_provider)
            store.add_observer(observer)
        return observer


def traced(store: Any) -> TracingObserver | None:
    """The store's tracing observer, if `trace_store` was called on it."""
    with _traced_lock:
        return _traced.get(store)


class TracingMiddleware:
    """ASGI middleware: one server span per HTTP request, named by its route template."""

    def __init__(self, app: ASGIApp, tracer: Tracer) -> None:
        self.app = app
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        method = scope["method"]
        status = [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        with self.tracer.start_as_current_span(
            f"HTTP {method}",
            context=extract(headers),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method},
        ) as span:
            try:
                await self.app(scope, receive, send_status)
            finally:
                # The route template, known once routing has run; never the path (user ids).
                route = getattr(scope.get("route"), "path", None)
                if route:
                    span.update_name(f"HTTP {method} {route}")
                    span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status[0])
                if status[0] >= 500:
                    span.set_status(Status(StatusCode.ERROR))
