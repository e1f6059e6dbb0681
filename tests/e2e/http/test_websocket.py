"""The WebSocket session: authentication, transitions, and pushes driven by the event log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import jwt
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from flowstore import FlowStore
from flowstore.adapters.http.websocket import CLOSE_UNAUTHENTICATED
from tests.e2e.http.conftest import ONBOARDING, SECRET, LiveServer, User, mint
from tests.e2e.http.security import bad_ws_tokens

TIMEOUT = 10.0


@contextmanager
def session(server: LiveServer, token: str | None = None) -> Iterator[ClientConnection]:
    """A WebSocket connection to `/api/flow/ws`, with the token in the query if given."""
    url = f"{server.ws_url}/api/flow/ws" + (f"?token={token}" if token is not None else "")
    with connect(url, proxy=None, open_timeout=TIMEOUT) as ws:
        yield ws


def receive(ws: ClientConnection) -> dict[str, Any]:
    """The next message (waiting at most TIMEOUT seconds)."""
    message: dict[str, Any] = json.loads(ws.recv(timeout=TIMEOUT))
    return message


@contextmanager
def signed_in(server: LiveServer, user: User) -> Iterator[ClientConnection]:
    """A session of `user`, once the server has said it is authenticated."""
    with session(server, user.token) as ws:
        assert receive(ws) == {"type": "authenticated", "userId": user.id, "roles": []}
        yield ws


def answer(ws: ClientConnection) -> dict[str, Any]:
    """The next message that is not a push (rejected transitions are pushed too: `ok` changes)."""
    while (message := receive(ws))["type"] == "flow-state-updated":
        pass
    return message


def send(ws: ClientConnection, message: dict[str, Any]) -> None:
    """Send a JSON message."""
    ws.send(json.dumps(message))


def assert_closed_unauthenticated(ws: ClientConnection, reason: str) -> None:
    """The server says why (a flow-error) and closes with 4401."""
    error = receive(ws)
    assert error["type"] == "flow-error"
    assert error["code"] == "UNAUTHENTICATED"
    assert error["problem"]["status"] == 401
    assert error["problem"]["details"]["reason"] == reason
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=TIMEOUT)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == CLOSE_UNAUTHENTICATED


def test_a_transition_is_answered_and_its_change_pushed(server: LiveServer, alice: User) -> None:
    with signed_in(server, alice) as ws:
        send(
            ws,
            {
                "type": "flow-transition",
                "flowId": ONBOARDING,
                "transition": "start",
                "payload": {"via": "ws"},
                "requestId": 7,
            },
        )
        # The answer comes from the session, the push from the log: either may arrive first.
        messages = {m["type"]: m for m in (receive(ws), receive(ws))}
    answer, push = messages["flow-transition-result"], messages["flow-state-updated"]
    assert answer["requestId"] == 7
    assert answer["state"]["step"] == "profile-setup"
    assert answer["state"]["payload"] == {"via": "ws"}
    assert push["flowId"] == ONBOARDING
    assert push["state"] == answer["state"]
    assert push["position"] > 0


def test_the_token_may_come_in_the_first_message(server: LiveServer, alice: User) -> None:
    with session(server) as ws:
        send(ws, {"type": "authenticate", "token": alice.token})
        assert receive(ws)["userId"] == alice.id


@pytest.mark.parametrize(("token", "reason"), bad_ws_tokens("alice"))
@pytest.mark.parametrize("where", ["query", "message"])
def test_bad_tokens_are_refused_with_4401(
    server: LiveServer, token: str, reason: str, where: str
) -> None:
    with session(server, token if where == "query" else None) as ws:
        if where == "message":
            send(ws, {"type": "authenticate", "token": token})
        assert_closed_unauthenticated(ws, reason)


def test_a_first_message_that_is_not_authentication_is_refused(server: LiveServer) -> None:
    with session(server) as ws:
        send(ws, {"type": "flow-transition", "flowId": ONBOARDING, "transition": "start"})
        assert_closed_unauthenticated(ws, "missing")


def test_the_session_closes_when_the_token_expires(server: LiveServer) -> None:
    user = User("short-lived", mint("short-lived", ttl=2))
    with signed_in(server, user) as ws:
        assert_closed_unauthenticated(ws, "expired")


def test_errors_carry_the_same_problem_as_rest(
    server: LiveServer, client: httpx.Client, alice: User
) -> None:
    rest = client.post(f"/api/flow/{ONBOARDING}/transition/complete", headers=alice.headers)
    with signed_in(server, alice) as ws:
        asks: list[dict[str, Any]] = [
            {"flowId": ONBOARDING, "transition": "complete"},
            {"flowId": "nope", "transition": "start"},
            {"flowId": ONBOARDING, "transition": "start", "payload": {"x": "y" * 70_000}},
            {"flowId": ONBOARDING},  # no transition
            {"flowId": ONBOARDING, "transition": "start", "payload": [1]},
            {"flowId": ONBOARDING, "transition": "start", "payload": {"a": "\x00"}},
        ]
        answers = []
        for number, ask in enumerate(asks):
            send(ws, {"type": "flow-transition", "requestId": f"r{number}", **ask})
            answers.append(answer(ws))
        ws.send("not json")
        answers.append(answer(ws))
    assert [a["type"] for a in answers] == ["flow-error"] * 7
    assert [a["requestId"] for a in answers] == ["r0", "r1", "r2", "r3", "r4", "r5", None]
    assert [(a["code"], a["problem"]["status"]) for a in answers] == [
        ("INVALID_TRANSITION", 422),
        ("FLOW_NOT_FOUND", 404),
        ("PAYLOAD_TOO_LARGE", 413),
        ("REQUEST_INVALID", 422),
        ("REQUEST_INVALID", 422),
        ("REQUEST_INVALID", 422),
        ("REQUEST_INVALID", 422),
    ]
    assert answers[0]["problem"] == rest.json()


def test_writes_over_rest_are_pushed_including_overrides_and_clears(
    server: LiveServer, client: httpx.Client, alice: User, admin: User
) -> None:
    with signed_in(server, alice) as ws:
        client.post(f"/api/flow/{ONBOARDING}/transition/start", headers=alice.headers)
        assert receive(ws)["state"]["step"] == "profile-setup"
        client.put(
            f"/api/admin/users/{alice.id}/flows/{ONBOARDING}/state",
            json={"step": "verification"},
            headers=admin.headers,
        )
        assert receive(ws)["state"]["step"] == "verification"
        client.delete(f"/api/flow/{ONBOARDING}/state", headers=alice.headers)
        cleared = receive(ws)
        assert (cleared["type"], cleared["flowId"], cleared["state"]) == (
            "flow-state-updated",
            ONBOARDING,
            None,
        )


def test_pushes_reach_every_session_of_the_owner_and_no_one_else(
    server: LiveServer, store: FlowStore, alice: User, bob: User
) -> None:
    with (
        signed_in(server, alice) as first,
        signed_in(server, alice) as second,
        signed_in(server, bob) as other,
    ):
        store.execute_transition(alice.id, ONBOARDING, "start")
        store.execute_transition(bob.id, ONBOARDING, "start")
        assert receive(first)["state"]["userId"] == alice.id
        assert receive(second)["state"]["userId"] == alice.id
        # The log is pushed in order: had Bob been sent Alice's change, it would come first.
        assert receive(other)["state"]["userId"] == bob.id


def test_a_write_from_another_process_is_pushed(
    server: LiveServer, backend_url: str, alice: User
) -> None:
    with signed_in(server, alice) as ws:
        written = subprocess.run(
            [
                *(sys.executable, "-m", "flowstore.adapters.cli", "--url", backend_url, "--json"),
                *("transition", alice.id, ONBOARDING, "start", "--payload", '{"from": "cli"}'),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "200"},
            check=False,
        )
        assert written.returncode == 0, written.stderr
        push = receive(ws)
    assert push["type"] == "flow-state-updated"
    assert push["state"]["step"] == "profile-setup"
    assert push["state"]["payload"] == {"from": "cli"}
    assert push["state"] == json.loads(written.stdout)


@pytest.mark.parametrize("depth", [300, 1000, 5000])
def test_a_deeply_nested_message_is_a_request_error_not_an_internal_one(
    server: LiveServer, alice: User, depth: int
) -> None:
    nested = "[" * depth + "]" * depth
    with signed_in(server, alice) as ws:
        head = {"type": "flow-transition", "requestId": "deep", "flowId": ONBOARDING}
        ws.send(
            json.dumps(head)[:-1] + ', "transition": "start", "payload": {"x": ' + nested + "}}"
        )
        reply = answer(ws)
        assert reply["type"] == "flow-error"
        assert reply["code"] in ("REQUEST_INVALID", "PAYLOAD_INVALID")
        assert reply["problem"]["status"] == 422
        # The session still works.
        send(
            ws,
            {
                "type": "flow-transition",
                "requestId": "ok",
                "flowId": ONBOARDING,
                "transition": "nope",
            },
        )
        assert answer(ws)["requestId"] == "ok"


def test_a_token_expiring_past_year_9999_is_closed_with_4401(server: LiveServer) -> None:
    token = jwt.encode({"sub": "u-far", "exp": 253402300800}, SECRET, algorithm="HS256")
    with session(server, token) as ws:
        assert_closed_unauthenticated(ws, "invalid")
