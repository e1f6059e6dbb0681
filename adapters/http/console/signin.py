"""The console's sign-in pages: `/ui?token=`, the sign-in form, signing in and out."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.responses import RedirectResponse, Response

from flowstore.adapters.http.auth import (
    AuthenticationError,
    Principal,
)
from flowstore.adapters.http.console.common import (
    SECURITY_HEADERS,
    Console,
    console_of,
    is_secure,
    read_form,
    safe_next,
)
from flowstore.adapters.http.console.session import CSRF_FIELD

__all__ = ["add_signin_pages", "forbidden"]


def add_signin_pages(router: APIRouter) -> None:
    """Add the pages that sign in and out to `router`."""

    @router.get("")
    def home(request: Request, token: Annotated[str | None, Query()] = None) -> Response:
        console, ui = console_of(request), Console.ui(request)
        if token is None:
            return RedirectResponse(ui + "/flows", status_code=303, headers=SECURITY_HEADERS)
        return _sign_in(request, console, token, ui + "/flows", bounce=True)

    @router.get("/login")
    def login_form(
        request: Request,
        next_url: Annotated[str | None, Query(alias="next")] = None,
        reason: Annotated[str | None, Query()] = None,
    ) -> Response:
        console = console_of(request)
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
        console, ui = console_of(request), Console.ui(request)
        form = await read_form(request)
        console.sessions.check_login_csrf(request, form.get(CSRF_FIELD))
        token = "".join(form.get("token", "").split())
        if token.lower().startswith("bearer"):
            token = token[len("bearer") :]
        return _sign_in(request, console, token, safe_next(form.get("next"), ui))

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        console, ui = console_of(request), Console.ui(request)
        form = await read_form(request)
        target = ui + "/login?reason=signed-out"
        if console.sessions.token(request) is not None:
            console.sessions.check_csrf(request, form.get(CSRF_FIELD))
        response = RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)
        console.sessions.end(response)
        return response


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
        next_url=safe_next(next_url, ui),
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
        return forbidden(request, console, principal)
    response: Response
    if bounce:
        response = console.render(request, "signed_in.html", target=target, who=principal.user_id)
    else:
        response = RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)
    console.sessions.start(response, token, principal, secure=is_secure(request))
    return response


def forbidden(request: Request, console: Console, principal: Principal) -> Response:
    """The 403 page for a signed-in caller who is not an admin (their session ends)."""
    # Signed in or not, a non-admin gets no session: the page offers to sign in as someone else.
    response = console.render(request, "forbidden.html", status=403, who=principal.user_id)
    console.sessions.end(response)
    return response
