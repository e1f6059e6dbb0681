"""What every console page module shares: the `Console`, the admin dependencies, the page route
class and small helpers.

Pages need a signed-in admin (otherwise: a redirect to the sign-in form, or 403); the endpoints the
page script calls answer 401/403 problem+json instead.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Protocol, TypeVar
from urllib.parse import parse_qs, quote

from fastapi import Depends, Path, Request
from fastapi.routing import APIRoute
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from starlette.requests import HTTPConnection
from starlette.responses import HTMLResponse, Response

from flowstore import FlowError, FlowStore
from flowstore.adapters.errors import mapping_for
from flowstore.adapters.http.auth import (
    ADMIN_ROLE,
    AuthenticationError,
    PermissionDeniedError,
    Principal,
)
from flowstore.adapters.http.console.insights import (
    ACTIVITY_WINDOWS,
    DWELL_SAMPLE,
    IDLE_CHOICES,
)
from flowstore.adapters.http.console.jobs import Operations
from flowstore.adapters.http.console.render import (
    HEAT,
    duration,
    heat_level,
    percent,
)
from flowstore.adapters.http.console.session import ConsoleSessions
from flowstore.adapters.http.console.windows import WINDOWS, LogWindows
from flowstore.adapters.http.params import ID_RULES
from flowstore.adapters.http.problems import RequestInvalidError
from flowstore.adapters.http.push import LogPusher

__all__ = [
    "PREFIX",
    "SECURITY_HEADERS",
    "ApiAdmin",
    "Console",
    "FlowId",
    "NotAdminError",
    "PageAdmin",
    "PageRoute",
    "SignInRequiredError",
    "UserId",
    "api_admin",
    "choice",
    "console_of",
    "is_secure",
    "page_admin",
    "read_form",
    "safe_next",
    "seg",
    "wants_json",
    "when",
]

PREFIX = "/ui"
"""Where the console is mounted in the app."""


class _HasKey(Protocol):
    @property
    def key(self) -> str: ...


_Keyed = TypeVar("_Keyed", bound=_HasKey)

SECURITY_HEADERS = {
    # Scripts and everything else come from the console itself; styles may also be inline
    # (bar widths), which cannot run code.
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
        "form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # same-origin, not no-referrer: with no-referrer Chromium sends `Origin: null` on form posts.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
"""Headers of every console page and redirect."""


class SignInRequiredError(Exception):
    """A console page was asked for without a valid session: answered by the sign-in form."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotAdminError(Exception):
    """A signed-in caller without the admin role asked for a console page: answered with 403."""

    def __init__(self, principal: Principal) -> None:
        super().__init__(principal.user_id)
        self.principal = principal


def is_secure(connection: HTTPConnection) -> bool:
    """Whether the request came over TLS (the session cookie is then `Secure`)."""
    return connection.url.scheme in ("https", "wss")


def wants_json(request: Request) -> bool:
    """Whether the caller (the page script) asked for JSON rather than a page."""
    return "application/json" in request.headers.get("accept", "")


def safe_next(value: str | None, ui: str) -> str:
    """Where to go after signing in: a console path only (never another site)."""
    if value and value.startswith(ui + "/") and "\\" not in value:
        return value
    return ui + "/flows"


async def read_form(request: Request) -> dict[str, str]:
    """A urlencoded form body as {name: first value} (the console posts nothing else)."""
    body = (await request.body()).decode("utf-8", errors="replace")
    return {name: values[0] for name, values in parse_qs(body, keep_blank_values=True).items()}


def seg(value: Any) -> str:
    """A value as one URL path segment."""
    return quote(str(value), safe="")


def when(value: datetime | None) -> str:
    """A moment as UTC text to the second."""
    if value is None:
        return "—"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class Console:
    """What the console's routes share: the store, sessions, templates, jobs and windows."""

    def __init__(self, store: FlowStore, sessions: ConsoleSessions, pusher: LogPusher) -> None:
        self.store = store
        self.sessions = sessions
        self.pusher = pusher
        self.operations = Operations(store)
        self.windows = LogWindows(store)
        self.templates = Environment(
            loader=PackageLoader("flowstore.adapters.http.console", "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.filters.update(percent=percent, duration=duration, seg=seg, when=when)
        self.templates.globals.update(
            heat=HEAT,
            heat_level=heat_level,
            windows=WINDOWS,
            activity_windows=ACTIVITY_WINDOWS,
            idle_choices=IDLE_CHOICES,
            dwell_sample=DWELL_SAMPLE,
        )

    @staticmethod
    def ui(connection: HTTPConnection) -> str:
        """The console's base path (under the app's root path, if it is mounted under one)."""
        return str(connection.scope.get("root_path", "")) + PREFIX

    def render(
        self,
        request: Request,
        template: str,
        *,
        principal: Principal | None = None,
        status: int = 200,
        section: str | None = None,
        **context: Any,
    ) -> HTMLResponse:
        """A page (or fragment) rendered with the context every page has."""
        ui = self.ui(request)
        html = self.templates.get_template(template).render(
            ui=ui,
            static=ui + "/static",
            principal=principal,
            csrf=self.sessions.csrf_token(request) if principal is not None else None,
            section=section,
            **context,
        )
        return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)

    def positions(self) -> dict[str, Any]:
        """Where the log, the projections, the WebSocket pusher and a Kafka publisher stand."""
        log_position = self.store.log_position()
        projection = self.store.projection_position()
        return {
            "log": log_position,
            "projection": projection,
            "lag": max(0, log_position - projection),
            "pusher": self.pusher.position,
            "publisher": _publisher_status(self.store),
        }


def _publisher_status(store: FlowStore) -> dict[str, Any] | None:
    """The embedded Kafka publisher's status, when this process's store runs one."""
    status = getattr(store.publisher, "status", None)
    if not callable(status):
        return None  # none, or a publisher handed to the store that reports no status
    current = status()
    return {
        "topic": current.topic,
        "state": current.state,
        "position": current.position,
        "lag": current.lag,
        "lastError": current.last_error,
    }


def choice(choices: Sequence[_Keyed], key: str, name: str) -> _Keyed:
    """The choice called `key`, or a 422 naming the ones there are."""
    found = next((c for c in choices if c.key == key), None)
    if found is None:
        keys = ", ".join(c.key for c in choices)
        raise RequestInvalidError(
            [{"loc": ["query", name], "msg": f"must be one of {keys}", "type": "enum"}]
        )
    return found


def console_of(connection: HTTPConnection) -> Console:
    """The app's `Console` (set by `mount_console`)."""
    console: Console = connection.app.state.console
    return console


def page_admin(request: Request) -> Principal:
    """The signed-in admin; otherwise the sign-in form (no or bad session) or 403 (not admin)."""
    try:
        principal = console_of(request).sessions.principal(request)
    except AuthenticationError as err:
        raise SignInRequiredError(err.reason) from None
    if not principal.is_admin:
        raise NotAdminError(principal)
    return principal


def api_admin(request: Request) -> Principal:
    """The signed-in admin; otherwise 401 or 403 problem+json (for the page script)."""
    principal = console_of(request).sessions.principal(request)
    if not principal.is_admin:
        raise PermissionDeniedError(ADMIN_ROLE)
    return principal


PageAdmin = Annotated[Principal, Depends(page_admin)]
ApiAdmin = Annotated[Principal, Depends(api_admin)]
# Ids as the API takes them.
FlowId = Annotated[str, Path(alias="flowId", **ID_RULES)]
UserId = Annotated[str, Path(alias="userId", **ID_RULES)]


class PageRoute(APIRoute):
    """A console route: flowstore errors become an HTML error page, unless JSON was asked for."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except FlowError as err:
                if wants_json(request) or isinstance(err, AuthenticationError):
                    raise
                console = console_of(request)
                try:
                    principal: Principal | None = console.sessions.principal(request)
                except AuthenticationError:
                    principal = None
                return console.render(
                    request,
                    "error.html",
                    principal=principal,
                    status=mapping_for(err).http_status,
                    error=err,
                )

        return run
