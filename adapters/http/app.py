"""The HTTP API: `create_router(store, verifier)` holds every endpoint; `create_app` serves it alone.

`create_router` returns a `FlowRouter` (a FastAPI `APIRouter`) an application includes under any
prefix; its lifespan (merged by `include_router`, or entered as `router.running()`) follows the event
log so that WebSocket pushes run. `create_app(store, verifier)` is the app `flowstore serve` runs:
the router, the body-size cap for every path, the web console and the OpenAPI tweaks.

The endpoints live by concern: the caller's own flows (`instances.py`), administration (`admin.py`),
what they take (`params.py`) and depend on (`dependencies.py`: authentication, the admin role), the
router and its route class (`routing.py`), errors as problem+json (`handlers.py`, `problems.py`),
the WebSocket (`websocket.py`, `push.py`). Endpoints await an `AsyncFlowStore`.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, WebSocket
from fastapi.middleware.cors import CORSMiddleware
from starlette.responses import Response

import flowstore
from flowstore import FlowStore, StorageUnavailableError
from flowstore.adapters.http.admin import admin_routes
from flowstore.adapters.http.auth import TokenVerifier
from flowstore.adapters.http.console import mount_console
from flowstore.adapters.http.handlers import BodyLimit, install_error_handlers, problem_openapi
from flowstore.adapters.http.instances import user_routes
from flowstore.adapters.http.observe import RequestObserver
from flowstore.adapters.http.params import error_responses
from flowstore.adapters.http.routing import FlowRouter
from flowstore.adapters.http.schemas import Health, Readiness
from flowstore.aio import AsyncFlowStore

__all__ = [
    "CORS_ORIGINS_ENV",
    "DEFAULT_MAX_BODY_BYTES",
    "FlowRouter",
    "cors_origins_from_env",
    "create_app",
    "create_router",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 1024 * 1024
"""Request bodies above this are refused with 413 before they are parsed."""

CORS_ORIGINS_ENV = "FLOWSTORE_CORS_ORIGINS"
"""Comma-separated origins browsers may call the API from (`*` for any); unset: no CORS headers."""


def cors_origins_from_env() -> list[str]:
    """The origins `$FLOWSTORE_CORS_ORIGINS` allows (none when unset or empty)."""
    return [o.strip() for o in os.environ.get(CORS_ORIGINS_ENV, "").split(",") if o.strip()]


_DESCRIPTION = """\
Where every user stands in every flow, how they got there, and what happened on the way.

Authenticate with `Authorization: Bearer <JWT>` (`sub` = user id, `roles` may hold `admin`).
Errors are RFC 9457 problem details (`application/problem+json`) with a stable `code`.

WebSocket `/api/flow/ws` (token as the `token` query parameter or in a first message
`{"type": "authenticate", "token": ...}`) pushes `flow-state-updated` whenever one of the caller's
flows changes, and runs `{"type": "flow-transition", "flowId", "transition", "payload"}`.
"""


def create_router(
    store: FlowStore | AsyncFlowStore,
    verifier: TokenVerifier,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    poll_interval: float = 0.15,
) -> FlowRouter:
    """Every HTTP and WebSocket endpoint over `store` as a router, authenticating with `verifier`.

    The endpoints await an `AsyncFlowStore`: `store` itself when it is one, else one over `store`
    (never blocking the event loop; its threads are sized to the store's pool). `max_body_bytes`
    caps request bodies (413 above it; payloads are also held to the store's own
    `max_payload_bytes`); `poll_interval` is how often the WebSocket pusher reads the event log.
    """
    # The endpoints await the async store: its own bounded threads, sized to the store's pool,
    # rather than FastAPI's 40-thread pool, which no store pool is sized for.
    astore = store if isinstance(store, AsyncFlowStore) else AsyncFlowStore.wrap(store)
    store = astore.store
    router = FlowRouter(store, verifier, max_body_bytes=max_body_bytes, poll_interval=poll_interval)
    # The caller's own endpoints come first: /api/flows/mine before the administrative routes.
    router.include_router(user_routes(astore, router.route_class))
    router.include_router(admin_routes(astore, router.route_class))

    # Probes (no authentication: load balancers and orchestrators call them)

    @router.get("/healthz", response_model=Health, tags=["probes"])
    async def healthz() -> Health:
        """The process is up (answered on the event loop: no worker thread, no connection)."""
        return Health()

    @router.get(
        "/readyz", response_model=Readiness, tags=["probes"], responses=error_responses(503)
    )
    def readyz() -> Readiness:
        """The database answers (503 STORAGE_UNAVAILABLE when it does not)."""
        try:
            store.log_position()  # a read that needs the database; its answer stays private
            return Readiness()
        except Exception as exc:
            log.warning("readiness check failed", exc_info=True)
            raise StorageUnavailableError(
                "The database", "the readiness check", type(exc).__name__
            ) from None

    @router.websocket("/api/flow/ws")
    async def flow_socket(websocket: WebSocket) -> None:
        await router.sockets.serve(websocket)

    return router


def create_app(
    store: FlowStore,
    verifier: TokenVerifier,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    poll_interval: float = 0.15,
    cors_origins: Sequence[str] | None = None,
) -> FastAPI:
    """The HTTP and WebSocket API over `store` as an app of its own (`create_router`'s endpoints).

    Adds what belongs to a whole app: the body cap on every path, CORS, problem+json for unknown
    paths and methods, the OpenAPI document and the web console at /ui. `cors_origins` are the
    browser origins allowed to call (default: `$FLOWSTORE_CORS_ORIGINS`, else none: without CORS
    headers, browsers keep other sites' pages from reading answers); the other arguments are
    `create_router`'s.
    """
    router = create_router(
        store, verifier, max_body_bytes=max_body_bytes, poll_interval=poll_interval
    )
    app = FastAPI(
        title="flowstore",
        version=flowstore.__version__,
        description=_DESCRIPTION,
        **_NATIVE_TELEMETRY_OFF,
    )
    app.include_router(router)  # merges the router's lifespan (the log follower) into the app's
    app.state.store = store
    app.state.verifier = verifier
    app.state.pusher = router.pusher
    app.state.router = router
    app.add_middleware(BodyLimit, limit=max(max_body_bytes, 0))
    metrics = _metrics(store)
    app.add_middleware(RequestObserver, metrics=metrics)  # times everything inside CORS
    tracing = _tracing(store)
    if tracing is not None:  # outside the request id and metrics: the span covers them too
        from flowstore.adapters.tracing import TracingMiddleware

        app.add_middleware(TracingMiddleware, tracer=tracing.tracer)
    if metrics is not None:

        @app.get("/metrics", include_in_schema=False)
        def prometheus_metrics() -> Response:
            """Prometheus metrics (the `metrics` extra)."""
            return Response(metrics.exposition(), media_type=METRICS_CONTENT_TYPE)

    origins = cors_origins_from_env() if cors_origins is None else list(cors_origins)
    if origins:
        # Added last, so outermost: a preflight is answered before the body limit or any route.
        # Credentials stay off: callers send a bearer token, which is not a cookie; the console's
        # cookie must never be usable from another origin.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Accept"],
            max_age=600,
        )
    install_error_handlers(app)
    app.openapi = problem_openapi(app)  # type: ignore[method-assign]
    mount_console(app)  # the web console at /ui (adapters/http/console)
    return app


METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""Prometheus' text exposition format."""


_NATIVE_TELEMETRY_OFF: dict[str, Any] = (
    {"telemetry": {"tracing": False, "logs": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters
    else {}
)
"""FastAPI's own OpenTelemetry (0.165 and later) traces each request into the global provider with
its raw path (`url.path`: user ids in admin paths) and logs failures with their messages (which
name users): both off. `flowstore.adapters.tracing` traces by route template when asked."""


def _tracing(store: FlowStore) -> Any:
    """The store's tracing observer when `trace_store` was called on it (the `otel` extra)."""
    try:
        from flowstore.adapters.tracing import traced
    except ImportError:
        return None
    return traced(store)


def _metrics(store: FlowStore) -> Any:
    """The app's metrics (`flowstore.adapters.metrics.FleetMetrics`), or None without the extra."""
    try:
        from flowstore.adapters.metrics import FleetMetrics
    except ImportError:
        return None
    return FleetMetrics(store)
