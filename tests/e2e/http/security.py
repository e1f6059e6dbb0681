"""The HTTP security cases in one place: `tests/e2e/http` checks them one at a time, and
`tests/reliability/test_http_under_load.py` checks them all again against a server under load.

A case says what to send and what must come back. The cross-user probes say it as a list of
problems (empty when the answer is right), so that a caller can assert on it or count it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect
from websockets.typing import Origin

from flowstore.adapters.http.console.session import SESSION_COOKIE
from tests.e2e.http.conftest import ONBOARDING, SECRET, bearer, mint
from tests.flows import linear

__all__ = [
    "ADMIN_ROUTES",
    "CROSS_USER_PROBES",
    "JSON",
    "USER_ROUTES",
    "Probe",
    "bad_credentials",
    "bad_ws_tokens",
    "call",
    "console_socket_refusal",
    "csrf_forgeries",
    "escalation_tokens",
]

FORGED_KEY = "forged-forged-forged-forged-forged-0000"
JSON = {"Accept": "application/json"}

# Every route, with and without the admin role

USER_ROUTES = [
    ("GET", "/api/flow/{flow}/state"),
    ("POST", "/api/flow/{flow}/transition/start"),
    ("POST", "/api/flow/{flow}/reset"),
    ("DELETE", "/api/flow/{flow}/state"),
    ("GET", "/api/flow/{flow}/history"),
    ("GET", "/api/flows/mine"),
    ("GET", "/api/flows/{flow}"),
]
ADMIN_ROUTES = [
    ("GET", "/api/flows"),
    ("POST", "/api/flows"),
    ("PATCH", "/api/flows/{flow}"),
    ("DELETE", "/api/flows/{flow}"),
    ("GET", "/api/flows/{flow}/statistics"),
    ("GET", "/api/statistics"),
    ("GET", "/api/flows/{flow}/funnel"),
    ("GET", "/api/flows/{flow}/instances"),
    ("POST", "/api/admin/purge-expired"),
    ("PUT", "/api/admin/users/someone/flows/{flow}/state"),
]


def call(
    client: httpx.Client,
    method: str,
    route: str,
    headers: dict[str, str],
    flow: str = ONBOARDING,
) -> httpx.Response:
    """One request to `route` (with `{flow}` filled in), with a body where the route takes one."""
    body: dict[str, Any] | None = {"step": "welcome"} if method == "PUT" else None
    if method in ("POST", "PATCH") and route.startswith("/api/flows"):
        body = {"ttl": 5} if method == "PATCH" else linear("never-created")
    return client.request(method, route.format(flow=flow), json=body, headers=headers)


# Credentials that must get 401


def bad_credentials(user: str) -> list[Any]:
    """Authorization headers naming `user` that must be refused: (headers, reason) cases."""
    return [
        pytest.param(bearer(mint(user, ttl=-120)), "expired", id="expired"),
        pytest.param(bearer(mint(user, key=FORGED_KEY)), "invalid", id="forged"),
        pytest.param(
            bearer(mint(user, roles=["admin"], key=FORGED_KEY)), "invalid", id="forged-admin"
        ),
        pytest.param(bearer(mint(user, algorithm="HS512")), "invalid", id="other-alg"),
        pytest.param(
            bearer(jwt.encode({"sub": user, "exp": time.time() + 86_400}, "", algorithm="none")),
            "invalid",
            id="alg-none",
        ),
        pytest.param(
            bearer(
                jwt.encode({"sub": user, "exp": time.time() + 86_400, "roles": "admin"}, SECRET)
            ),
            "invalid",
            id="roles-not-list",
        ),
        pytest.param(bearer("garbage"), "invalid", id="garbage"),
        pytest.param({"Authorization": "Basic YWxpY2U6c2VjcmV0"}, "missing", id="basic"),
    ]


def bad_ws_tokens(user: str) -> list[Any]:
    """Tokens naming `user` that the WebSocket session must close with 4401: (token, reason)."""
    return [
        pytest.param(mint(user, ttl=-120), "expired", id="expired"),
        pytest.param(mint(user, key=FORGED_KEY), "invalid", id="forged"),
        pytest.param("garbage", "invalid", id="garbage"),
    ]


def escalation_tokens(user: str) -> list[Any]:
    """Validly signed tokens of an ordinary `user` that claim admin rights other than `roles`."""
    return [
        pytest.param(mint(user, role="admin"), id="role-claim"),
        pytest.param(mint(user, admin=True, is_admin=True), id="admin-flags"),
        pytest.param(mint(user, scope="admin", groups=["admin"]), id="scope-and-groups"),
        pytest.param(mint(user, roles=["Admin", "ADMIN", " admin"]), id="admin-lookalikes"),
    ]


# One user probing another's data


@dataclass(frozen=True)
class Probe:
    """A request an ordinary user (the intruder) makes that would touch another user's (the
    victim's) data if the server took the user from anywhere but the token.

    `path`, header values and the JSON body may name `{flow}`, `{victim}` and `{intruder}`.
    `console` sends the intruder's token as the console's session cookie instead of a bearer.
    """

    name: str
    method: str
    path: str
    status: int
    body: Any = None
    """The JSON body that must come back (None: any)."""
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    console: bool = False

    def send(
        self, client: httpx.Client, *, intruder: tuple[str, str], victim: str, flow: str
    ) -> httpx.Response:
        """Send it as the intruder (user id, token)."""
        user, token = intruder
        names = {"flow": flow, "victim": victim, "intruder": user}
        headers = {key: value.format(**names) for key, value in self.headers.items()}
        if self.console:
            headers["Cookie"] = f"{SESSION_COOKIE}={token}"
        else:
            headers.update(bearer(token))
        return client.request(
            self.method,
            self.path.format(**names),
            json=_fill(self.json, names),
            headers=headers,
        )

    def problems(self, response: httpx.Response, *, victim: str, secrets: list[str]) -> list[str]:
        """What is wrong with the answer: status, body, or the victim's data in it."""
        found: list[str] = []
        if response.status_code != self.status:
            found.append(f"{self.name}: {response.status_code} (expected {self.status})")
        elif self.body is not None and response.json() != self.body:
            found.append(f"{self.name}: answered {response.text[:200]}")
        text = response.text
        named = victim in self.path or any(victim in v for v in self.headers.values())
        leaked = [s for s in secrets if s in text] + ([victim] if victim in text else [])
        if leaked and not (named and leaked == [victim] and response.status_code >= 400):
            found.append(f"{self.name}: the answer holds the victim's {leaked}")
        return found


def _fill(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, str):
        return value.format(**names)
    if isinstance(value, dict):
        return {k: _fill(v, names) for k, v in value.items()}
    return value


CROSS_USER_PROBES = [
    # The intruder's own instance (it has none): the user comes from the token only.
    Probe("state", "GET", "/api/flow/{flow}/state", 200),  # null: no state (the seed's answer)
    Probe("history", "GET", "/api/flow/{flow}/history", 200, []),
    Probe("my-flows", "GET", "/api/flows/mine", 200, []),
    Probe("clear", "DELETE", "/api/flow/{flow}/state", 404),
    # The victim named in the query or in headers: ignored.
    Probe("state-for-victim", "GET", "/api/flow/{flow}/state?userId={victim}&user={victim}", 200),
    Probe("history-for-victim", "GET", "/api/flow/{flow}/history?userId={victim}", 200, []),
    Probe(
        "my-flows-as-victim",
        "GET",
        "/api/flows/mine",
        200,
        [],
        headers={"X-User-Id": "{victim}", "X-Forwarded-User": "{victim}"},
    ),
    Probe("clear-for-victim", "DELETE", "/api/flow/{flow}/state?userId={victim}", 404),
    # The routes that do name a user are the admin's.
    Probe(
        "override-victim",
        "PUT",
        "/api/admin/users/{victim}/flows/{flow}/state",
        403,
        json={"step": "x", "payload": {"by": "{intruder}"}},
    ),
    Probe("console-user-page", "GET", "/ui/users?user={victim}", 403, console=True),
    Probe(
        "console-flow-card",
        "GET",
        "/ui/users/{victim}/flows/{flow}",
        403,
        headers=JSON,
        console=True,
    ),
    # Last, as it starts the intruder's own run: a transition the initial step does not offer.
    Probe(
        "transition",
        "POST",
        "/api/flow/{flow}/transition/continue",
        422,
        json={"payload": {"by": "{intruder}", "userId": "{victim}"}},
        headers={"X-User-Id": "{victim}"},
    ),
]
"""Every probe as an intruder without state in the flow; in this order."""


# The console


def csrf_forgeries(csrf: str) -> list[Any]:
    """Ways to post a console operation without the session's CSRF token: httpx.post kwargs.

    `csrf` is the session's real token (a cross-site page may learn it, but not send it from
    here). Each must be refused with 403.
    """
    return [
        pytest.param({"headers": JSON}, id="missing"),
        pytest.param({"data": {"csrf": csrf + "x"}}, id="wrong"),
        pytest.param(
            {"headers": {**JSON, "X-CSRF-Token": csrf, "Origin": "https://evil.example"}},
            id="cross-site",
        ),
    ]


def console_socket_refusal(
    ws_url: str, watched: str, *, token: str | None = None, origin: str | None = None
) -> str:
    """How `/ui/ws?user=watched` treats a session cookie holding `token`: "close <code>",
    "handshake <status>" (refused before accepting) or "accepted"."""
    headers = {"Cookie": f"{SESSION_COOKIE}={token}"} if token is not None else {}
    url = f"{ws_url}/ui/ws?user={watched}"
    try:
        with connect(
            url, proxy=None, additional_headers=headers, origin=Origin(origin) if origin else None
        ) as ws:
            try:
                ws.recv(timeout=10)
            except ConnectionClosed as closed:
                return f"close {closed.rcvd.code if closed.rcvd else None}"
            return "accepted"
    except InvalidStatus as refused:
        return f"handshake {refused.response.status_code}"
