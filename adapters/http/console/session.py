"""Console sign-in: the bearer token kept in a cookie, and CSRF tokens bound to it.

A browser signs in once with the same bearer token the API takes; the console keeps it in an
HttpOnly, SameSite=Strict cookie scoped to `/ui`, and verifies it on every console request (so an
expired or revoked-by-rotation token ends the session). The REST API never reads the cookie.

Because a cookie is sent by the browser on its own, every state-changing request must also carry a
CSRF token: an HMAC of the session token under a key of the running app (a hidden form field or the
`X-CSRF-Token` header), and, when the browser names one, an `Origin` equal to the console's own. The
sign-in form, before any session exists, is protected the same way with a random nonce cookie.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime

from starlette.requests import HTTPConnection
from starlette.responses import Response

from flowstore.adapters.http.auth import AuthenticationError, Principal, TokenVerifier
from flowstore.errors import AuthConfigError, CsrfError

__all__ = [
    "CONSOLE_KEY_ENV",
    "CSRF_FIELD",
    "CSRF_HEADER",
    "LOGIN_COOKIE",
    "SESSION_COOKIE",
    "ConsoleSessions",
    "CsrfError",
]

SESSION_COOKIE = "flowstore_console"
"""Holds the bearer token of a signed-in browser."""
LOGIN_COOKIE = "flowstore_console_login"
"""Holds the nonce the sign-in form's CSRF token is bound to."""
CSRF_FIELD = "csrf"
"""The form field carrying the CSRF token."""
CSRF_HEADER = "X-CSRF-Token"
"""The header carrying the CSRF token (the console's script sends it)."""

_LOGIN_FORM_SECONDS = 3600

CONSOLE_KEY_ENV = "FLOWSTORE_CONSOLE_KEY"
"""The key CSRF tokens are signed with, shared by every server of a fleet (at least 32 bytes)."""


def console_key(env: Mapping[str, str] | None = None) -> bytes | None:
    """The fleet's console key from `$FLOWSTORE_CONSOLE_KEY` (None: a random key per process).

    With several servers behind one address, a page rendered by one server posts to another:
    they must sign CSRF tokens with the same key, or every other form post is refused.
    """
    text = (os.environ if env is None else env).get(CONSOLE_KEY_ENV, "")
    if not text:
        return None
    key = text.encode()
    if len(key) < 32:
        raise AuthConfigError(f"${CONSOLE_KEY_ENV} must be at least 32 bytes (it has {len(key)})")
    return key


def _mac(key: bytes, purpose: str, value: str) -> str:
    digest = hmac.new(key, f"{purpose}\x1f{value}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _own_origin(connection: HTTPConnection) -> str:
    scheme = {"ws": "http", "wss": "https"}.get(connection.url.scheme, connection.url.scheme)
    return f"{scheme}://{connection.url.netloc}"


class ConsoleSessions:
    """Reads and writes the session cookie, and makes and checks CSRF tokens.

    `key` signs CSRF tokens; by default `$FLOWSTORE_CONSOLE_KEY` (so that every server of a fleet
    accepts the others' tokens), else a random one per app, so tokens in pages rendered before a
    restart are refused after it (the page is simply loaded again).
    """

    def __init__(self, verifier: TokenVerifier, *, path: str = "/ui", key: bytes | None = None):
        self._verifier = verifier
        self._key = key or console_key() or secrets.token_bytes(32)
        self.path = path

    # The session

    @staticmethod
    def token(connection: HTTPConnection) -> str | None:
        """The bearer token the browser's session cookie holds, if any."""
        return connection.cookies.get(SESSION_COOKIE) or None

    def principal(self, connection: HTTPConnection) -> Principal:
        """The signed-in caller; `AuthenticationError` without a session or with a bad token."""
        token = self.token(connection)
        if token is None:
            raise AuthenticationError("Sign in to use the console", reason="missing")
        return self._verifier.verify(token)

    def verify(self, token: str) -> Principal:
        """The caller a token names (the sign-in form and `?token=` check it with this)."""
        return self._verifier.verify(token)

    def start(self, response: Response, token: str, principal: Principal, *, secure: bool) -> None:
        """Keep `token` in the session cookie, until the token itself expires."""
        max_age = None
        if principal.expires_at is not None:
            max_age = max(0, int((principal.expires_at - datetime.now(UTC)).total_seconds()))
        response.set_cookie(
            SESSION_COOKIE,
            token,
            max_age=max_age,
            path=self.path,
            secure=secure,
            httponly=True,
            samesite="strict",
        )
        response.delete_cookie(LOGIN_COOKIE, path=self.path)

    def end(self, response: Response) -> None:
        """Forget the session."""
        response.delete_cookie(SESSION_COOKIE, path=self.path, httponly=True, samesite="strict")

    # CSRF

    def csrf_token(self, connection: HTTPConnection) -> str | None:
        """The CSRF token for the request's session (None without a session cookie)."""
        token = self.token(connection)
        return _mac(self._key, "csrf", token) if token is not None else None

    def check_csrf(self, connection: HTTPConnection, submitted: str | None) -> None:
        """Raise `CsrfError` unless `submitted` (or the header) is the session's token."""
        self.check_origin(connection)
        expected = self.csrf_token(connection)
        submitted = submitted or connection.headers.get(CSRF_HEADER)
        if expected is None or not submitted or not hmac.compare_digest(expected, submitted):
            raise CsrfError("missing or invalid CSRF token")

    def login_csrf(self, connection: HTTPConnection) -> tuple[str, str]:
        """(nonce, CSRF token) for a sign-in form: the browser's nonce, or a new one."""
        nonce = connection.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(24)
        return nonce, _mac(self._key, "login", nonce)

    def keep_login_nonce(self, connection: HTTPConnection, response: Response, nonce: str) -> None:
        """Set the cookie holding the sign-in form's nonce."""
        response.set_cookie(
            LOGIN_COOKIE,
            nonce,
            max_age=_LOGIN_FORM_SECONDS,
            path=self.path,
            secure=connection.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )

    def check_login_csrf(self, connection: HTTPConnection, submitted: str | None) -> None:
        """Raise `CsrfError` unless `submitted` belongs to the browser's sign-in nonce."""
        self.check_origin(connection)
        nonce = connection.cookies.get(LOGIN_COOKIE)
        expected = _mac(self._key, "login", nonce) if nonce else None
        if expected is None or not submitted or not hmac.compare_digest(expected, submitted):
            raise CsrfError("the sign-in form has expired; load it again")

    @staticmethod
    def check_origin(connection: HTTPConnection) -> None:
        """Raise `CsrfError` when the browser says the request comes from another origin."""
        origin = connection.headers.get("origin")
        if origin is not None and origin != _own_origin(connection):
            raise CsrfError(f"cross-origin request from {origin}")
