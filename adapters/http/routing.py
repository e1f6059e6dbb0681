"""The router the API is served by: `FlowRouter`, and the route class its endpoints share."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, ClassVar

import anyio
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute, APIRouter
from starlette.exceptions import HTTPException
from starlette.responses import Response

from flowstore import FlowError, FlowStore
from flowstore.adapters.http.auth import TokenVerifier
from flowstore.adapters.http.handlers import flow_error, http_error, invalid_request, too_large
from flowstore.adapters.http.push import LogPusher
from flowstore.adapters.http.websocket import FlowSocket

__all__ = ["FlowRoute", "FlowRouter"]


class FlowRoute(APIRoute):
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
                    return too_large(int(declared), limit)
                chunks, size = [], 0
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        return too_large(size, limit)
                    chunks.append(chunk)
                # Starlette's documented way to hand a body already read to the endpoint.
                request._body = b"".join(chunks)
                return await handler(request)
            except FlowError as exc:
                return await flow_error(request, exc)
            except RequestValidationError as exc:
                return await invalid_request(request, exc)
            except HTTPException as exc:
                return await http_error(request, exc)

        return handle


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
            (FlowRoute,),
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
