"""The HTTP API: `create_router(store, verifier)` holds every endpoint; `create_app` serves it alone.

`create_router` returns a `FlowRouter` (a FastAPI `APIRouter`) an application includes under any
prefix; its lifespan (merged by `include_router`, or entered as `router.running()`) follows the event
log so that WebSocket pushes run. `create_app(store, verifier)` is the app `flowstore serve` runs:
the router, the body-size cap for every path, the web console and the OpenAPI tweaks.

Users act on their own flows only: every `/api/flow/...` endpoint takes the user id from the token,
never from the request. Administrative endpoints (flow definitions, statistics, overrides) need the
`admin` role. Errors are problem+json with a stable `code` (`adapters/http/problems.py`).

Endpoints are plain functions: FastAPI runs them in its thread pool, because FlowStore is synchronous.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime
from http import HTTPStatus
from importlib import resources
from typing import Annotated, Any, ClassVar

import anyio
import orjson
from fastapi import Body, Depends, FastAPI, Path, Query, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute, APIRouter
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import WithJsonSchema
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import flowstore
from flowstore import (
    FlowDefinition,
    FlowError,
    FlowState,
    FlowStateHistory,
    FlowStatistics,
    FlowStore,
    FlowTransition,
    FunnelStep,
    HistoryKind,
    InvalidArgumentError,
    PayloadTooLargeError,
    StateTokenFlowError,
    StorageUnavailableError,
)
from flowstore.adapters.http.auth import (
    ADMIN_ROLE,
    AuthenticationError,
    PermissionDeniedError,
    Principal,
    TokenVerifier,
)
from flowstore.adapters.http.console import mount_console
from flowstore.adapters.http.observe import RequestObserver
from flowstore.adapters.http.problems import (
    PROBLEM_MEDIA_TYPE,
    Problem,
    RequestInvalidError,
    http_status_code,
    problem,
    problem_for,
    problem_response,
)
from flowstore.adapters.http.push import LogPusher
from flowstore.adapters.http.schemas import (
    ErasureResult,
    HandoffRequest,
    Health,
    NextRequest,
    PurgeResult,
    Readiness,
    ResetRequest,
    StateOverride,
    StateToken,
    TransitionRequest,
    nul_errors,
)
from flowstore.adapters.http.websocket import FlowSocket
from flowstore.aio import AsyncFlowStore
from flowstore.models import FlowStatus, InstancePage
from flowstore.paging import MAX_PAGE
from flowstore.tokens import token_flow_id

__all__ = [
    "CORS_ORIGINS_ENV",
    "DEFAULT_MAX_BODY_BYTES",
    "FlowRouter",
    "cors_origins_from_env",
    "create_app",
    "create_router",
]

log = logging.getLogger(__name__)


def _row_bytes(row: FlowStateHistory) -> int:
    # As the store counts it (projections/queries.py): the payload's JSON and the error text.
    return len(orjson.dumps(row.payload)) + len(row.error or "")

MAX_HISTORY_RESPONSE_BYTES = 4 * 1024 * 1024
"""Most payload and error bytes one history response holds (1,500 rows of 60 KB grew the server by
333 MB); the oldest rows that fit are sent, with `X-History-Truncated: true`."""

class _ErasableUserConvertor(Convertor[str]):
    """A user id of any characters, slashes included, that does not end like the state route.

    `DELETE /api/admin/users/{userId}` takes the rest of the path as the user id; without this, a
    DELETE sent to `/api/admin/users/ann/flows/f/state` (a route that has no DELETE) would erase a
    user called "ann/flows/f/state" instead of answering 405.
    """

    regex = r"(?!.*/flows/[^/]+/state$).+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("flowstore_erasable_user", _ErasableUserConvertor())

DEFAULT_MAX_BODY_BYTES = 1024 * 1024
"""Request bodies above this are refused with 413 before they are parsed."""

CORS_ORIGINS_ENV = "FLOWSTORE_CORS_ORIGINS"
"""Comma-separated origins browsers may call the API from (`*` for any); unset: no CORS headers."""


def cors_origins_from_env() -> list[str]:
    """The origins `$FLOWSTORE_CORS_ORIGINS` allows (none when unset or empty)."""
    return [o.strip() for o in os.environ.get(CORS_ORIGINS_ENV, "").split(",") if o.strip()]


# Ids in paths: what the store accepts (non-empty, at most 256 characters), without control
# characters, which no real id has and PostgreSQL text columns refuse (NUL).
_ID = {"min_length": 1, "max_length": 256, "pattern": r"^[^\x00-\x1f\x7f]+$"}
FlowId = Annotated[str, Path(alias="flowId", examples=["user-onboarding"], **_ID)]
UserId = Annotated[str, Path(alias="userId", examples=["user-1"], **_ID)]
TransitionName = Annotated[str, Path(alias="transition", examples=["start"], **_ID)]

_ONBOARDING = json.loads(
    resources.files("flowstore").joinpath("data/user-onboarding.json").read_text(encoding="utf-8")
)

# Taken as a plain object so that every problem comes back as one DEFINITION_INVALID (as from the
# library and the CLI); the spec still says what a definition looks like.
DefinitionBody = Annotated[
    dict[str, Any],
    WithJsonSchema({"$ref": "#/components/schemas/FlowDefinition"}),
    Body(
        description="A flow definition in the seed's JSON shape.",
        openapi_examples={"onboarding": {"value": _ONBOARDING}},
    ),
]

_DESCRIPTION = """\
Where every user stands in every flow, how they got there, and what happened on the way.

Authenticate with `Authorization: Bearer <JWT>` (`sub` = user id, `roles` may hold `admin`).
Errors are RFC 9457 problem details (`application/problem+json`) with a stable `code`.

WebSocket `/api/flow/ws` (token as the `token` query parameter or in a first message
`{"type": "authenticate", "token": ...}`) pushes `flow-state-updated` whenever one of the caller's
flows changes, and runs `{"type": "flow-transition", "flowId", "transition", "payload"}`.
"""


# ISO 8601 with a zone, and nothing else: pydantic would also take a number as a Unix time,
# which the spec (format date-time) does not allow.
_MOMENT = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:\d{2})$"
Since = Annotated[
    str | None,
    Query(
        description="Window start (ISO 8601 with a time zone), inclusive",
        pattern=_MOMENT,
        json_schema_extra={"format": "date-time"},
    ),
]
Until = Annotated[
    str | None,
    Query(
        description="Window end (ISO 8601 with a time zone), exclusive",
        pattern=_MOMENT,
        json_schema_extra={"format": "date-time"},
    ),
]


def _moment(value: str | None, name: str) -> datetime | None:
    """A `Since`/`Until` parameter as a datetime (the pattern has made sure it is one)."""
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:  # right shape, impossible date (2026-02-31)
        raise InvalidArgumentError(name, value, "must be an ISO 8601 time") from None


def _link_next(request: Request, response: Response, cursor: str) -> None:
    """Point the `Link` header at the next page: the same request with `cursor` moved on."""
    url = request.url.include_query_params(cursor=cursor)
    response.headers["Link"] = f'<{url.path}?{url.query}>; rel="next"'


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the problem responses an operation can return."""
    return {
        status: {"model": Problem, "description": HTTPStatus(status).phrase} for status in statuses
    }


_bearer = HTTPBearer(auto_error=False, description="A JWT: `sub` = user id, `roles` may hold admin")


def _caller(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The authenticated caller, by the app's verifier (401 UNAUTHENTICATED otherwise)."""
    if credentials is None:
        raise AuthenticationError("A bearer token is required", reason="missing")
    # The route knows its router's verifier; `request.app` may be an application of the user's.
    route = request.scope.get("route")
    if not isinstance(route, _FlowRoute):
        raise RuntimeError("flowstore endpoints are served by a FlowRouter (create_router)")
    return route.verifier.verify(credentials.credentials)


Caller = Annotated[Principal, Depends(_caller)]


async def _no_nul(request: Request, principal: Caller) -> None:
    """Refuses JSON bodies with a NUL character in any string (see `nul_errors`); after auth."""
    body = await request.body()
    if b"\\u0000" not in body:  # JSON can carry NUL only as this escape
        return
    try:
        data = json.loads(body)
    except ValueError:
        return  # not JSON: the body's own validation says so
    errors = nul_errors(data)
    if errors:
        raise RequestInvalidError(errors)


def _admin(principal: Caller) -> Principal:
    """The caller, if they hold the admin role (403 FORBIDDEN otherwise)."""
    if not principal.is_admin:
        raise PermissionDeniedError(ADMIN_ROLE)
    return principal


class _BodyLimit:
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
        body = problem_for(PayloadTooLargeError(size, self.limit))
        # The client may still be sending; closing after the answer spares reading the rest.
        await problem_response(body, {"Connection": "close"})(scope, receive, send)


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


async def _flow_error(request: Request, exc: Exception) -> Response:
    """A FlowError as problem+json (401s with their WWW-Authenticate challenge)."""
    assert isinstance(exc, FlowError)
    headers = None
    if isinstance(exc, AuthenticationError):
        error = "invalid_token" if exc.reason != "missing" else None
        headers = {"WWW-Authenticate": f'Bearer error="{error}"' if error else "Bearer"}
    return problem_response(problem_for(exc), headers)


async def _invalid_request(request: Request, exc: Exception) -> Response:
    """FastAPI's request validation errors as one 422 REQUEST_INVALID."""
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    return problem_response(problem_for(RequestInvalidError(errors)))


async def _http_error(request: Request, exc: Exception) -> Response:
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


def _install_error_handlers(app: FastAPI) -> None:
    async def unexpected(request: Request, exc: Exception) -> Response:
        # Logged by the server with its traceback; the client learns nothing about the internals.
        return problem_response(problem(500, "INTERNAL_ERROR", "Internal server error"))

    app.add_exception_handler(FlowError, _flow_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, unexpected)


class _FlowRoute(APIRoute):
    """An endpoint of a FlowRouter: its own problem+json errors and body cap, wherever it is mounted.

    An `APIRouter` cannot bring exception handlers or middleware into the application that includes
    it, so the route does both: each `FlowRouter` makes a subclass that carries its verifier and cap.
    """

    verifier: ClassVar[TokenVerifier]
    max_body_bytes: ClassVar[int]

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """The endpoint's handler, refusing oversized bodies and answering errors as problems."""
        handler = super().get_route_handler()
        limit = self.max_body_bytes

        async def handle(request: Request) -> Response:
            try:
                declared = request.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > limit:
                    return _too_large(int(declared), limit)
                chunks, size = [], 0
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        return _too_large(size, limit)
                    chunks.append(chunk)
                # Starlette's documented way to hand a body already read to the endpoint.
                request._body = b"".join(chunks)
                return await handler(request)
            except FlowError as exc:
                return await _flow_error(request, exc)
            except RequestValidationError as exc:
                return await _invalid_request(request, exc)
            except HTTPException as exc:
                return await _http_error(request, exc)

        return handle


def _too_large(size: int, limit: int) -> Response:
    # The client may still be sending; closing after the answer spares reading the rest.
    return problem_response(problem_for(PayloadTooLargeError(size, limit)), {"Connection": "close"})


def _problem_media_type(app: FastAPI) -> Callable[[], dict[str, Any]]:
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


class FlowRouter(APIRouter):
    """Every endpoint of the flowstore API as one router, with the log follower WebSocket pushes need.

    Include it in any FastAPI app, under any prefix: `app.include_router(router, prefix="/flows")`
    merges its lifespan into the app's. An app that cannot take the merged lifespan (a sub-app that is
    mounted, whose lifespan Starlette never runs) enters `router.running()` in its own lifespan.
    """

    def __init__(
        self,
        store: FlowStore,
        verifier: TokenVerifier,
        *,
        max_body_bytes: int,
        poll_interval: float,
    ) -> None:
        route_class = type(
            "FlowRoute",
            (_FlowRoute,),
            {"verifier": verifier, "max_body_bytes": max(max_body_bytes, 0)},
        )
        super().__init__(route_class=route_class, lifespan=self._lifespan)
        self.store = store
        """The store the endpoints serve."""
        self.verifier = verifier
        """How callers are authenticated."""
        self.pusher = LogPusher(store, interval=poll_interval)
        """Follows the event log for the WebSocket sessions."""
        self.sockets = FlowSocket(store, verifier, pusher=self.pusher)
        """Runs the WebSocket sessions."""
        self._entered = 0

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Follow the event log (WebSocket pushes) while the context is open; nesting is harmless."""
        self._entered += 1
        try:
            if self._entered > 1:  # the app's merged lifespan and the user's own, say
                yield
                return
            async with anyio.create_task_group() as tasks:
                await tasks.start(self.pusher.run)  # serve once the pusher knows where it starts
                yield
                tasks.cancel_scope.cancel()
        finally:
            self._entered -= 1

    def _lifespan(self, app: Any) -> AbstractAsyncContextManager[None]:
        return self.running()


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
    sockets = router.sockets
    route_class = router.route_class

    users = APIRouter(
        prefix="/api",
        tags=["flow state (the caller's own)"],
        dependencies=[Depends(_no_nul)],
        route_class=route_class,
    )
    admins = APIRouter(
        prefix="/api",
        tags=["administration"],
        dependencies=[Depends(_admin), Depends(_no_nul)],
        route_class=route_class,
    )

    # The caller's own flows

    @users.get(
        "/flow/{flowId}/state", response_model=FlowState | None, responses=_errors(401, 404, 422)
    )
    async def get_state(flow_id: FlowId, principal: Caller) -> FlowState | None:
        """The caller's state in the flow, or null when they have none (as the seed's module)."""
        state = await astore.get_flow_state(principal.user_id, flow_id)
        if state is None:
            await astore.get_flow(flow_id)  # an unknown flow is 404 FLOW_NOT_FOUND rather than null
        return state

    @users.post(
        "/flow/{flowId}/transition/{transition}",
        response_model=FlowState,
        responses=_errors(401, 404, 409, 413, 422),
    )
    async def execute_transition(
        flow_id: FlowId,
        transition: TransitionName,
        principal: Caller,
        body: Annotated[TransitionRequest | None, Body()] = None,
    ) -> FlowState:
        """Take the transition from the caller's current step (starting the flow if needed).

        The payload merges into the state's; `ok: false` with a `message` records that the step was
        reached but its work failed.
        """
        body = body or TransitionRequest()
        return await astore.execute_transition(
            principal.user_id, flow_id, transition, body.payload, ok=body.ok, message=body.message
        )

    @users.get(
        "/flow/{flowId}/transitions",
        response_model=list[FlowTransition],
        response_model_exclude_none=True,
        responses=_errors(401, 404, 422),
    )
    async def transitions(
        flow_id: FlowId,
        principal: Caller,
        explicit: Annotated[
            bool | None,
            Query(description="true: only those the user chooses; false: only the others"),
        ] = None,
    ) -> list[FlowTransition]:
        """The transitions the caller's current step offers."""
        return await astore.get_available_transitions(principal.user_id, flow_id, explicit=explicit)

    @users.post(
        "/flow/{flowId}/back", response_model=FlowState, responses=_errors(401, 404, 409, 422)
    )
    async def back(flow_id: FlowId, principal: Caller) -> FlowState:
        """Return to the previous step (left by a reversible transition); 422 without one."""
        return await astore.go_back(principal.user_id, flow_id)

    @users.post(
        "/flow/{flowId}/next", response_model=FlowState, responses=_errors(401, 404, 409, 413, 422)
    )
    async def next_step(
        flow_id: FlowId,
        principal: Caller,
        body: Annotated[NextRequest | None, Body()] = None,
    ) -> FlowState:
        """Take the current step's first transition that is not explicit (the model's next())."""
        return await astore.advance(principal.user_id, flow_id, body.payload if body else None)

    @users.get("/flow/{flowId}/token", response_model=StateToken, responses=_errors(401, 404, 422))
    async def state_token(flow_id: FlowId, principal: Caller) -> StateToken:
        """The caller's state as an OwlMeans state token, to hand the flow to another service."""
        return StateToken(token=await astore.state_token(principal.user_id, flow_id))

    @users.post(
        "/flow/{flowId}/handoff",
        response_model=FlowState,
        responses=_errors(401, 404, 409, 413, 422),
    )
    async def handoff(flow_id: FlowId, principal: Caller, body: HandoffRequest) -> FlowState:
        """Take over the caller's flow from a state token another service handed over."""
        named = token_flow_id(body.token)
        if named != flow_id:
            raise StateTokenFlowError(named, flow_id)
        return await astore.adopt_state_token(principal.user_id, body.token, sender=body.sender)

    @users.post(
        "/flow/{flowId}/reset", response_model=FlowState, responses=_errors(401, 404, 409, 422)
    )
    async def reset(
        flow_id: FlowId,
        principal: Caller,
        body: Annotated[ResetRequest | None, Body()] = None,
    ) -> FlowState:
        """Start the caller's run again on the latest version, at `step` or the initial step.

        `service` makes it the run's target service; `entityId` names the entity it is about.
        """
        body = body or ResetRequest()
        return await astore.reset_flow(
            principal.user_id, flow_id, body.step, service=body.service, entity_id=body.entity_id
        )

    @users.delete("/flow/{flowId}/state", status_code=204, responses=_errors(401, 404, 409, 422))
    async def clear_state(flow_id: FlowId, principal: Caller) -> Response:
        """Forget where the caller stands in the flow; the history stays."""
        await astore.clear_flow_state(principal.user_id, flow_id)
        return Response(status_code=204)

    @users.get(
        "/flow/{flowId}/history",
        response_model=list[FlowStateHistory],
        responses=_errors(401, 404, 422),
    )
    async def history(
        flow_id: FlowId,
        principal: Caller,
        request: Request,
        response: Response,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Rows per page")] = MAX_PAGE,
        cursor: Annotated[
            str | None, Query(max_length=200, description="The `next` link's cursor")
        ] = None,
        kind: Annotated[list[HistoryKind] | None, Query(description="Only these kinds")] = None,
    ) -> list[FlowStateHistory]:
        """The commands on the caller's flow, oldest first, a page at a time: at most 1,000 rows
        and `MAX_HISTORY_RESPONSE_BYTES` of payloads (`X-History-Truncated` when that cut the
        page short); a `Link: <...>; rel="next"` header points at the next page while there is one."""
        rows = await astore.get_flow_history(
            principal.user_id,
            flow_id,
            limit=limit + 1,  # one more: is there a next page?
            after=cursor,
            kinds=kind,
            max_bytes=MAX_HISTORY_RESPONSE_BYTES,
        )
        more = len(rows) > limit
        if len(rows) > 1 and sum(_row_bytes(row) for row in rows) > MAX_HISTORY_RESPONSE_BYTES:
            rows.pop()  # the row that crossed the cap: it starts the next page
            response.headers["X-History-Truncated"] = "true"
            more = True
        page = rows[:limit]
        if more and page:
            _link_next(request, response, page[-1].id)
        return page

    # Registered before /flows/{flowId} so that "mine" is not taken for a flow id.
    @users.get("/flows/mine", response_model=list[FlowState], responses=_errors(401))
    async def my_flows(principal: Caller) -> list[FlowState]:
        """Every flow the caller has state in (active or completed)."""
        return await astore.get_user_flows(principal.user_id)

    @users.api_route(
        "/flows/mine", methods=["POST", "PUT", "PATCH", "DELETE"], include_in_schema=False
    )
    async def mine_is_read_only() -> None:
        # A concrete path owns all its methods (OpenAPI's rule): PATCH /api/flows/mine must not
        # fall through to /api/flows/{flowId} and change a flow called "mine".
        raise HTTPException(405)

    # Any caller may read a definition; changing one is administration.
    @users.get(
        "/flows/{flowId}",
        response_model=FlowDefinition,
        response_model_exclude_none=True,
        responses=_errors(401, 404, 422),
    )
    async def get_flow(
        flow_id: FlowId,
        version: Annotated[int | None, Query(ge=1, description="A past version")] = None,
    ) -> FlowDefinition:
        """A flow's definition: the latest version or `version` (any authenticated caller, as the
        seed's module; changing it needs the admin role)."""
        return await astore.get_flow(flow_id, version)

    # Administration

    @admins.get(
        "/flows",
        response_model=list[FlowDefinition],
        response_model_exclude_none=True,  # definitions in the seed's shape, as POST takes them
        responses=_errors(401, 403),
    )
    async def list_flows() -> list[FlowDefinition]:
        """The latest version of every flow."""
        return await astore.list_flows()

    @admins.post(
        "/flows",
        status_code=201,
        response_model=FlowDefinition,
        response_model_exclude_none=True,
        responses=_errors(401, 403, 409, 413, 422),
    )
    async def create_flow(definition: DefinitionBody) -> FlowDefinition:
        """Define a new flow (version 1); 422 DEFINITION_INVALID lists every problem."""
        # `version` is set by the store and ignored on input (so a fetched definition can be posted
        # back), but the spec says it is an integer: hold the request to that.
        version = definition.get("version")
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
            error = {"loc": ["body", "version"], "msg": "must be an integer", "type": "int_type"}
            raise RequestInvalidError([error])
        return await astore.get_flow(await astore.create_flow(definition))

    @admins.patch(
        "/flows/{flowId}",
        response_model=FlowDefinition,
        response_model_exclude_none=True,
        responses=_errors(401, 403, 404, 409, 413, 422),
    )
    async def update_flow(
        flow_id: FlowId,
        changes: Annotated[
            dict[str, Any],
            Body(description="Top-level definition keys; each replaces the old one whole."),
        ],
    ) -> FlowDefinition:
        """Make a new version of the flow."""
        return await astore.update_flow(flow_id, changes)

    @admins.delete("/flows/{flowId}", status_code=204, responses=_errors(401, 403, 404, 409, 422))
    async def delete_flow(flow_id: FlowId) -> Response:
        """Delete the flow: later transitions and resets on it are FLOW_NOT_FOUND."""
        await astore.delete_flow(flow_id)
        return Response(status_code=204)

    @admins.get(
        "/flows/{flowId}/statistics",
        response_model=FlowStatistics,
        responses=_errors(401, 403, 404, 422),
    )
    async def flow_statistics(
        flow_id: FlowId, since: Since = None, until: Until = None
    ) -> FlowStatistics:
        """Usage and performance of one flow (over [since, until) when given)."""
        window = {"since": _moment(since, "since"), "until": _moment(until, "until")}
        return await astore.get_flow_statistics(flow_id, **window)

    @admins.get("/statistics", response_model=FlowStatistics, responses=_errors(401, 403, 422))
    async def statistics(since: Since = None, until: Until = None) -> FlowStatistics:
        """Usage and performance of all flows (over [since, until) when given)."""
        return await astore.get_flow_statistics(
            since=_moment(since, "since"), until=_moment(until, "until")
        )

    @admins.get(
        "/flows/{flowId}/instances",
        response_model=InstancePage,
        responses=_errors(401, 403, 404, 422),
    )
    async def instances(
        flow_id: FlowId,
        request: Request,
        response: Response,
        step: Annotated[str | None, Query(description="Only those at this step", **_ID)] = None,
        status: Annotated[FlowStatus, Query(description="active or completed")] = (
            FlowStatus.ACTIVE
        ),
        idle_for: Annotated[
            float | None,
            Query(alias="idleFor", ge=0, le=1e10, description="Untouched for this many seconds"),
        ] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
        cursor: Annotated[str | None, Query(max_length=1400)] = None,
    ) -> InstancePage:
        """The flow's instances by user id, a page at a time ("who is stuck at verification for
        more than a day": `?step=verification&idleFor=86400`)."""
        page = await astore.list_instances(
            flow_id, step=step, status=status, idle_for=idle_for, limit=limit, cursor=cursor
        )
        if page.next_cursor is not None:
            _link_next(request, response, page.next_cursor)
        return page

    @admins.get(
        "/flows/{flowId}/funnel",
        response_model=list[FunnelStep],
        responses=_errors(401, 403, 404, 422),
    )
    async def funnel(flow_id: FlowId, since: Since = None, until: Until = None) -> list[FunnelStep]:
        """Per step: how many entered, moved on, dropped (in [since, until) when given), and are
        there now."""
        window = {"since": _moment(since, "since"), "until": _moment(until, "until")}
        return await astore.get_flow_funnel(flow_id, **window)

    @admins.post(
        "/admin/purge-expired", response_model=PurgeResult, responses=_errors(401, 403, 409)
    )
    async def purge_expired() -> PurgeResult:
        """Expire every instance idle past its flow's ttl."""
        return PurgeResult(purged=await astore.purge_expired_flows())

    @admins.put(
        "/admin/users/{userId:path}/flows/{flowId}/state",
        response_model=FlowState,
        responses=_errors(401, 403, 404, 409, 413, 422),
    )
    async def override_state(user_id: UserId, flow_id: FlowId, body: StateOverride) -> FlowState:
        """Put a user at a step (administrative override, recorded as an event)."""
        state = FlowState(
            flow=flow_id,
            step=body.step,
            service=body.service,
            ok=body.ok,
            payload=body.payload,
            definition_version=body.definition_version,
            previous=body.previous,
            entity_id=body.entity_id,
            message=body.message,
        )
        return await astore.set_flow_state(user_id, state)

    @admins.delete(
        "/admin/users/{userId:flowstore_erasable_user}",
        response_model=ErasureResult,
        responses=_errors(401, 403, 409, 422),
    )
    async def erase_user(user_id: UserId) -> ErasureResult:
        """Erase the user for good (crypto-shredding): state, history and payloads, every flow."""
        return ErasureResult(user_id=user_id, erased_instances=await astore.erase_user(user_id))

    router.include_router(users)
    router.include_router(admins)

    # Probes (no authentication: load balancers and orchestrators call them)

    @router.get("/healthz", response_model=Health, tags=["probes"])
    async def healthz() -> Health:
        """The process is up (answered on the event loop: no worker thread, no connection)."""
        return Health()

    @router.get("/readyz", response_model=Readiness, tags=["probes"], responses=_errors(503))
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
        await sockets.serve(websocket)

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
    app = FastAPI(title="flowstore", version=flowstore.__version__, description=_DESCRIPTION)
    app.include_router(router)  # merges the router's lifespan (the log follower) into the app's
    app.state.store = store
    app.state.verifier = verifier
    app.state.pusher = router.pusher
    app.state.router = router
    app.add_middleware(_BodyLimit, limit=max(max_body_bytes, 0))
    metrics = _metrics(store)
    app.add_middleware(RequestObserver, metrics=metrics)  # times everything inside CORS
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
    _install_error_handlers(app)
    app.openapi = _problem_media_type(app)  # type: ignore[method-assign]
    mount_console(app)  # the web console at /ui (adapters/http/console)
    return app


METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""Prometheus' text exposition format."""


def _metrics(store: FlowStore) -> Any:
    """The app's metrics (`flowstore.adapters.metrics.FleetMetrics`), or None without the extra."""
    try:
        from flowstore.adapters.metrics import FleetMetrics
    except ImportError:
        return None
    return FleetMetrics(store)
