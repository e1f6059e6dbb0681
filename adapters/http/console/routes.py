"""The console's routes under `/ui`: server-rendered pages and the few JSON endpoints they call.

Pages need a signed-in admin (otherwise: a redirect to the sign-in form, or 403); the endpoints the
page script calls answer 401/403 problem+json instead. Every POST checks a CSRF token
(`session.ConsoleSessions`). Store calls are synchronous, so page handlers are plain functions that
FastAPI runs in its thread pool. The live socket is in `live.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Protocol, TypeVar
from urllib.parse import parse_qs, quote, urlencode

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, WebSocket
from fastapi.routing import APIRoute
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from starlette.requests import HTTPConnection
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles

from flowstore import FlowError, FlowNotFoundError, FlowStore
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
    activity,
)
from flowstore.adapters.http.console.jobs import ACTIONS, Operations
from flowstore.adapters.http.console.live import watch
from flowstore.adapters.http.console.render import (
    HEAT,
    activity_charts,
    duration,
    flow_diagram,
    heat_level,
    legend,
    percent,
    stuck_report,
)
from flowstore.adapters.http.console.session import CSRF_FIELD, ConsoleSessions
from flowstore.adapters.http.console.windows import WINDOWS, LogWindows, flow_summary
from flowstore.adapters.http.params import ID_RULES
from flowstore.adapters.http.problems import RequestInvalidError
from flowstore.adapters.http.push import LogPusher

__all__ = ["PREFIX", "Console", "mount_console"]

log = logging.getLogger(__name__)

PREFIX = "/ui"


class _HasKey(Protocol):
    @property
    def key(self) -> str: ...


_Keyed = TypeVar("_Keyed", bound=_HasKey)

_SECURITY_HEADERS = {
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


class _SignInRequiredError(Exception):
    """A console page was asked for without a valid session: answered by the sign-in form."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _NotAdminError(Exception):
    """A signed-in caller without the admin role asked for a console page: answered with 403."""

    def __init__(self, principal: Principal) -> None:
        super().__init__(principal.user_id)
        self.principal = principal


def _secure(connection: HTTPConnection) -> bool:
    return connection.url.scheme in ("https", "wss")


def _wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


def _safe_next(value: str | None, ui: str) -> str:
    """Where to go after signing in: a console path only (never another site)."""
    if value and value.startswith(ui + "/") and "\\" not in value:
        return value
    return ui + "/flows"


async def _form(request: Request) -> dict[str, str]:
    """A urlencoded form body as {name: first value} (the console posts nothing else)."""
    body = (await request.body()).decode("utf-8", errors="replace")
    return {name: values[0] for name, values in parse_qs(body, keep_blank_values=True).items()}


def _seg(value: Any) -> str:
    """A value as one URL path segment."""
    return quote(str(value), safe="")


def _when(value: datetime | None) -> str:
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
        self.templates.filters.update(percent=percent, duration=duration, seg=_seg, when=_when)
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
        return HTMLResponse(html, status_code=status, headers=_SECURITY_HEADERS)

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


def _choice(choices: Sequence[_Keyed], key: str, name: str) -> _Keyed:
    """The choice called `key`, or a 422 naming the ones there are."""
    found = next((c for c in choices if c.key == key), None)
    if found is None:
        keys = ", ".join(c.key for c in choices)
        raise RequestInvalidError(
            [{"loc": ["query", name], "msg": f"must be one of {keys}", "type": "enum"}]
        )
    return found


def _console(connection: HTTPConnection) -> Console:
    console: Console = connection.app.state.console
    return console


def _page_admin(request: Request) -> Principal:
    """The signed-in admin; otherwise the sign-in form (no or bad session) or 403 (not admin)."""
    try:
        principal = _console(request).sessions.principal(request)
    except AuthenticationError as err:
        raise _SignInRequiredError(err.reason) from None
    if not principal.is_admin:
        raise _NotAdminError(principal)
    return principal


def _api_admin(request: Request) -> Principal:
    """The signed-in admin; otherwise 401 or 403 problem+json (for the page script)."""
    principal = _console(request).sessions.principal(request)
    if not principal.is_admin:
        raise PermissionDeniedError(ADMIN_ROLE)
    return principal


PageAdmin = Annotated[Principal, Depends(_page_admin)]
ApiAdmin = Annotated[Principal, Depends(_api_admin)]
# Ids as the API takes them.
FlowId = Annotated[str, Path(alias="flowId", **ID_RULES)]
UserId = Annotated[str, Path(alias="userId", **ID_RULES)]


class _PageRoute(APIRoute):
    """A console route: flowstore errors become an HTML error page, unless JSON was asked for."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except FlowError as err:
                if _wants_json(request) or isinstance(err, AuthenticationError):
                    raise
                console = _console(request)
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


def _router() -> APIRouter:
    router = APIRouter(prefix=PREFIX, include_in_schema=False, route_class=_PageRoute)

    # Signing in and out

    @router.get("")
    def home(request: Request, token: Annotated[str | None, Query()] = None) -> Response:
        console, ui = _console(request), Console.ui(request)
        if token is None:
            return RedirectResponse(ui + "/flows", status_code=303, headers=_SECURITY_HEADERS)
        return _sign_in(request, console, token, ui + "/flows", bounce=True)

    @router.get("/login")
    def login_form(
        request: Request,
        next_url: Annotated[str | None, Query(alias="next")] = None,
        reason: Annotated[str | None, Query()] = None,
    ) -> Response:
        console = _console(request)
        messages = {
            "expired": "Your token has expired: sign in with a new one.",
            "invalid": "Your session is no longer valid: sign in again.",
            "signed-out": "You have signed out.",
        }
        return _login_page(
            request, console, next_url=next_url, notice=messages.get(reason or ""), status=200
        )

    @router.post("/login")
    async def login(request: Request) -> Response:
        console, ui = _console(request), Console.ui(request)
        form = await _form(request)
        console.sessions.check_login_csrf(request, form.get(CSRF_FIELD))
        token = "".join(form.get("token", "").split())
        if token.lower().startswith("bearer"):
            token = token[len("bearer") :]
        return _sign_in(request, console, token, _safe_next(form.get("next"), ui))

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        console, ui = _console(request), Console.ui(request)
        form = await _form(request)
        target = ui + "/login?reason=signed-out"
        if console.sessions.token(request) is not None:
            console.sessions.check_csrf(request, form.get(CSRF_FIELD))
        response = RedirectResponse(target, status_code=303, headers=_SECURITY_HEADERS)
        console.sessions.end(response)
        return response

    # Flows

    @router.get("/flows")
    def flows(request: Request, principal: PageAdmin) -> Response:
        console = _console(request)
        rows = []
        for definition in console.store.list_flows():
            stats = console.store.get_flow_statistics(definition.flow)
            rows.append({"definition": definition, "stats": stats})
        return console.render(
            request, "flows.html", principal=principal, section="flows", rows=rows
        )

    @router.get("/flows/{flowId}")
    def flow(
        request: Request,
        principal: PageAdmin,
        flow_id: FlowId,
        version: Annotated[int | None, Query(ge=1)] = None,
    ) -> Response:
        console = _console(request)
        latest = console.store.get_flow(flow_id)
        definition = console.store.get_flow(flow_id, version)
        funnel = console.store.get_flow_funnel(flow_id)
        current = {step.step: step.current for step in funnel}
        most = max(current.values(), default=0)
        diagram = flow_diagram(console.store, flow_id, version, current)
        steps = sorted(definition.steps.values(), key=lambda step: (step.index, step.step))
        return console.render(
            request,
            "flow.html",
            principal=principal,
            section="flows",
            definition=definition,
            latest=latest,
            diagram=diagram,
            steps=steps,
            current=current,
            most=most,
            legend=legend(most),
            stats=console.store.get_flow_statistics(flow_id),
        )

    @router.get("/flows/{flowId}/funnel")
    def funnel(
        request: Request,
        principal: PageAdmin,
        flow_id: FlowId,
        window: Annotated[str, Query()] = "all",
    ) -> Response:
        console = _console(request)
        chosen = next((w for w in WINDOWS if w.key == window), None)
        if chosen is None:
            keys = ", ".join(w.key for w in WINDOWS)
            error = {"loc": ["query", "window"], "msg": f"must be one of {keys}", "type": "enum"}
            raise RequestInvalidError([error])
        definition = console.store.get_flow(flow_id)
        summary = flow_summary(console.store, console.windows, flow_id, chosen)
        scale = max((s.entered for s in summary.steps), default=0)
        return console.render(
            request,
            "funnel.html",
            principal=principal,
            section="flows",
            definition=definition,
            summary=summary,
            scale=scale,
        )

    @router.get("/flows/{flowId}/activity")
    def activity_page(
        request: Request,
        principal: PageAdmin,
        flow_id: FlowId,
        window: Annotated[str, Query()] = ACTIVITY_WINDOWS[0].key,
    ) -> Response:
        console = _console(request)
        chosen = _choice(ACTIVITY_WINDOWS, window, "window")
        definition = console.store.get_flow(flow_id)
        figures = activity(console.store, flow_id, chosen)
        return console.render(
            request,
            "activity.html",
            principal=principal,
            section="flows",
            definition=definition,
            activity=figures,
            charts=activity_charts(figures),
        )

    @router.get("/flows/{flowId}/stuck")
    def stuck_page(
        request: Request,
        principal: PageAdmin,
        flow_id: FlowId,
        idle: Annotated[str, Query()] = "1h",
        step: Annotated[str | None, Query(max_length=256)] = None,
        cursor: Annotated[str | None, Query(max_length=1024)] = None,
    ) -> Response:
        console = _console(request)
        chosen = _choice(IDLE_CHOICES, idle, "idle")
        report = stuck_report(console.store, flow_id, chosen, step=step, cursor=cursor)
        return console.render(
            request, "stuck.html", principal=principal, section="flows", report=report
        )

    # Users

    @router.get("/users")
    def users(
        request: Request,
        principal: PageAdmin,
        user: Annotated[str | None, Query(max_length=256)] = None,
    ) -> Response:
        console = _console(request)
        user = (user or "").strip() or None
        cards = _user_cards(console.store, user) if user else []
        return console.render(
            request,
            "users.html",
            principal=principal,
            section="users",
            user=user,
            cards=cards,
            position=console.store.projection_position(),
        )

    @router.get("/users/{userId:path}/flows/{flowId}")
    def user_flow_card(
        request: Request, principal: ApiAdmin, user_id: UserId, flow_id: FlowId
    ) -> Response:
        console = _console(request)
        # Read first, so the history below reflects at least this position.
        position = console.store.projection_position()
        card = _card(console.store, user_id, flow_id)
        response = console.render(request, "_flow_card.html", principal=principal, card=card)
        response.headers["X-Projection-Position"] = str(position)
        return response

    # Operations

    @router.get("/operations")
    def operations(
        request: Request,
        principal: PageAdmin,
        job: Annotated[str | None, Query()] = None,
    ) -> Response:
        console = _console(request)
        return console.render(
            request,
            "operations.html",
            principal=principal,
            section="operations",
            positions=console.positions(),
            actions=ACTIONS,
            jobs=console.operations.recent(),
            highlighted=job,
        )

    @router.post("/operations/{action}")
    async def start_operation(request: Request, action: Annotated[str, Path()]) -> Response:
        console, ui = _console(request), Console.ui(request)
        form = await _form(request)
        principal = _api_admin(request) if _wants_json(request) else _page_admin(request)
        console.sessions.check_csrf(request, form.get(CSRF_FIELD))
        if action not in ACTIONS:
            raise FlowNotFoundError(action, f"No operation called {action!r}")
        job = console.operations.start(action, principal.user_id)
        location = f"{ui}/api/jobs/{_seg(job.id)}"
        if _wants_json(request):
            return JSONResponse(job.to_dict(), status_code=202, headers={"Location": location})
        return RedirectResponse(
            f"{ui}/operations?job={_seg(job.id)}#job-{_seg(job.id)}",
            status_code=303,
            headers=_SECURITY_HEADERS,
        )

    @router.get("/api/jobs/{jobId}")
    def job_status(
        request: Request, principal: ApiAdmin, job_id: Annotated[str, Path(alias="jobId")]
    ) -> Response:
        job = _console(request).operations.get(job_id)
        if job is None:
            raise FlowNotFoundError(job_id, f"No job {job_id!r} (the console keeps the last 20)")
        return JSONResponse(job.to_dict(), headers={"Cache-Control": "no-store"})

    @router.get("/api/positions")
    def positions(request: Request, principal: ApiAdmin) -> Response:
        return JSONResponse(_console(request).positions(), headers={"Cache-Control": "no-store"})

    return router


def _login_page(
    request: Request,
    console: Console,
    *,
    next_url: str | None,
    status: int,
    notice: str | None = None,
    error: str | None = None,
) -> Response:
    ui = Console.ui(request)
    nonce, login_csrf = console.sessions.login_csrf(request)
    response = console.render(
        request,
        "login.html",
        status=status,
        next_url=_safe_next(next_url, ui),
        notice=notice,
        error=error,
        login_csrf=login_csrf,
    )
    console.sessions.keep_login_nonce(request, response, nonce)
    return response


def _sign_in(
    request: Request, console: Console, token: str, target: str, *, bounce: bool = False
) -> Response:
    """Check a token; start a session and go to `target`, or show why not.

    With `bounce` (a `/ui?token=` link, which may have been followed from another site), the
    browser goes on by a page of ours rather than a redirect: a SameSite=Strict cookie is not sent
    along a redirect chain that another site started, so the first console page would not see it.
    """
    try:
        principal = console.sessions.verify(token)
    except AuthenticationError as err:
        message = {
            "expired": "That token has expired.",
            "missing": "Paste a token to sign in.",
        }.get(err.reason, "That token is not valid here.")
        return _login_page(request, console, next_url=target, status=401, error=message)
    if not principal.is_admin:
        return _forbidden(request, console, principal)
    response: Response
    if bounce:
        response = console.render(request, "signed_in.html", target=target, who=principal.user_id)
    else:
        response = RedirectResponse(target, status_code=303, headers=_SECURITY_HEADERS)
    console.sessions.start(response, token, principal, secure=_secure(request))
    return response


def _forbidden(request: Request, console: Console, principal: Principal) -> Response:
    # Signed in or not, a non-admin gets no session: the page offers to sign in as someone else.
    response = console.render(request, "forbidden.html", status=403, who=principal.user_id)
    console.sessions.end(response)
    return response


def _card(store: FlowStore, user_id: str, flow_id: str) -> dict[str, Any]:
    history = store.get_flow_history(user_id, flow_id)
    return {
        "user_id": user_id,
        "flow_id": flow_id,
        "state": store.get_flow_state(user_id, flow_id),
        "history": list(reversed(history)),  # newest first
    }


def _user_cards(store: FlowStore, user_id: str) -> list[dict[str, Any]]:
    """One card per flow the user has state or history in, active ones first."""
    flow_ids = [state.flow for state in store.get_user_flows(user_id)]
    for definition in store.list_flows():
        if definition.flow not in flow_ids and store.get_flow_history(user_id, definition.flow):
            flow_ids.append(definition.flow)
    return [_card(store, user_id, flow_id) for flow_id in flow_ids]


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
        assert isinstance(exc, _SignInRequiredError)
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
        return RedirectResponse(target, status_code=303, headers=_SECURITY_HEADERS)

    async def not_admin(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, _NotAdminError)
        return _forbidden(request, console, exc.principal)

    app.add_exception_handler(_SignInRequiredError, sign_in_required)
    app.add_exception_handler(_NotAdminError, not_admin)
