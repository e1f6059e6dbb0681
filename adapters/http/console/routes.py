"""The console's routes under `/ui`: the router of every page module, and `mount_console`.

Pages are by group: sign-in (`signin.py`), flows (`flow_pages.py`), users (`user_pages.py`),
operations (`operation_pages.py`); what they share is in `common.py`. Every POST checks a CSRF
token (`session.ConsoleSessions`). Store calls are synchronous, so page handlers are plain functions
that FastAPI runs in its thread pool. The live socket is in `live.py`.
"""

from __future__ import annotations

from urllib.parse import urlencode

from fastapi import APIRouter, FastAPI, Request, WebSocket
from starlette.responses import RedirectResponse, Response
from starlette.staticfiles import StaticFiles

from flowstore.adapters.http.console.common import (
    PREFIX,
    SECURITY_HEADERS,
    Console,
    NotAdminError,
    PageRoute,
    SignInRequiredError,
)
from flowstore.adapters.http.console.flow_pages import add_flow_pages
from flowstore.adapters.http.console.live import watch
from flowstore.adapters.http.console.operation_pages import add_operation_pages
from flowstore.adapters.http.console.session import ConsoleSessions
from flowstore.adapters.http.console.signin import add_signin_pages, forbidden
from flowstore.adapters.http.console.user_pages import add_user_pages

__all__ = ["mount_console"]


def _router() -> APIRouter:
    router = APIRouter(prefix=PREFIX, include_in_schema=False, route_class=PageRoute)
    # In this order: the first route that matches a path serves it.
    add_signin_pages(router)
    add_flow_pages(router)
    add_user_pages(router)
    add_operation_pages(router)
    return router


def mount_console(app: FastAPI) -> None:
    """Serve the web console at `/ui` of an app made by `create_app` (uses its store and pusher)."""
    sessions = ConsoleSessions(app.state.verifier, path=PREFIX)
    console = Console(app.state.store, sessions, app.state.pusher)
    app.state.console = console
    app.include_router(_router())

    async def live(websocket: WebSocket) -> None:
        await watch(websocket, sessions, app.state.pusher)

    app.add_api_websocket_route(PREFIX + "/ws", live)
    app.mount(
        PREFIX + "/static",
        StaticFiles(packages=[("flowstore.adapters.http.console", "static")]),
        name="console-static",
    )

    async def sign_in_required(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, SignInRequiredError)
        ui = Console.ui(request)
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if (
            exc.reason == "missing"
            and request.method == "GET"
            and request.headers.get("sec-fetch-site") == "cross-site"
        ):
            # A link from another site: the browser withheld the SameSite=Strict cookie. Going
            # on from a page of ours sends it, if there is one (else that request signs in).
            return console.render(request, "continue.html", target=here)
        query = {"next": here} if request.method == "GET" else {}
        if exc.reason != "missing":
            query["reason"] = exc.reason
        target = f"{ui}/login" + (f"?{urlencode(query)}" if query else "")
        return RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)

    async def not_admin(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, NotAdminError)
        return forbidden(request, console, exc.principal)

    app.add_exception_handler(SignInRequiredError, sign_in_required)
    app.add_exception_handler(NotAdminError, not_admin)
