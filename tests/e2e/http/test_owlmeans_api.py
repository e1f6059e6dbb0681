"""The OwlMeans model over HTTP and WebSocket: ok/message, transitions on offer, back, next, tokens."""

from __future__ import annotations

import itertools

import httpx
import pytest

from flowstore import FlowStore, decode_state_token
from tests.e2e.http.conftest import LiveServer, User
from tests.e2e.http.test_api import assert_problem
from tests.e2e.http.test_websocket import answer, send, signed_in
from tests.owlmeans import owl_flow

_ids = itertools.count()


def owl_copy(store: FlowStore, name: str) -> str:
    """A copy of one of the model's standard flows under a flow id of this test only."""
    return store.create_flow({**owl_flow(name), "flow": f"{name}-{next(_ids)}"})


@pytest.fixture
def oa(store: FlowStore) -> str:
    return owl_copy(store, "_oa")


def test_transition_with_ok_and_message_then_back(
    oa: str, client: httpx.Client, alice: User
) -> None:
    response = client.post(
        f"/api/flow/{oa}/reset",
        json={"service": "portal", "entityId": "org-1"},
        headers=alice.headers,
    )
    assert response.status_code == 200, response.text
    response = client.post(
        f"/api/flow/{oa}/transition/signup",
        json={"payload": {"email": "a@x"}, "ok": False, "message": "try again"},
        headers=alice.headers,
    )
    assert response.status_code == 200, response.text
    state = response.json()
    assert (state["step"], state["previous"], state["ok"], state["message"]) == (
        "signup",
        "choice",
        False,
        "try again",
    )
    assert (state["service"], state["entityId"]) == ("portal", "org-1")
    history = client.get(f"/api/flow/{oa}/history", headers=alice.headers).json()
    assert (history[-1]["ok"], history[-1]["message"]) == (False, "try again")
    back = client.post(f"/api/flow/{oa}/back", headers=alice.headers)
    assert back.status_code == 200, back.text
    assert (back.json()["step"], back.json()["previous"]) == ("choice", None)
    assert_problem(
        client.post(f"/api/flow/{oa}/back", headers=alice.headers), 422, "INVALID_TRANSITION"
    )


def test_transitions_on_offer_and_next(
    store: FlowStore, oa: str, client: httpx.Client, alice: User
) -> None:
    client.post(f"/api/flow/{oa}/reset", headers=alice.headers)
    offered = client.get(f"/api/flow/{oa}/transitions", headers=alice.headers).json()
    assert [t["step"] for t in offered] == ["signup", "signin"]
    assert offered[0] == {
        "transition": "signup",
        "step": "signup",
        "explicit": True,
        "reversible": True,
    }
    none = client.get(f"/api/flow/{oa}/transitions?explicit=false", headers=alice.headers)
    assert none.json() == []
    assert_problem(
        client.post(f"/api/flow/{oa}/next", headers=alice.headers), 422, "INVALID_TRANSITION"
    )
    oidc = owl_copy(store, "_oidc")
    client.post(f"/api/flow/{oidc}/reset", headers=alice.headers)
    response = client.post(
        f"/api/flow/{oidc}/next", json={"payload": {"simplified": True}}, headers=alice.headers
    )
    assert response.status_code == 200, response.text
    assert response.json()["step"] == "authen"


def test_token_and_handoff(store: FlowStore, oa: str, client: httpx.Client, alice: User) -> None:
    bob = User.new("bob")
    client.post(f"/api/flow/{oa}/transition/signup", headers=alice.headers)
    token = client.get(f"/api/flow/{oa}/token", headers=alice.headers).json()["token"]
    assert decode_state_token(token, store.get_flow(oa)).step == "signup"
    response = client.post(
        f"/api/flow/{oa}/handoff", json={"token": token, "sender": "idp"}, headers=bob.headers
    )
    assert response.status_code == 200, response.text
    assert (response.json()["step"], response.json()["previous"]) == ("signup", "choice")
    history = client.get(f"/api/flow/{oa}/history", headers=bob.headers).json()
    assert (history[-1]["kind"], history[-1]["metadata"]["sender"]) == ("handoff", "idp")
    other = owl_copy(store, "_oa")
    assert_problem(
        client.post(f"/api/flow/{other}/handoff", json={"token": token}, headers=bob.headers),
        422,
        "STATE_TOKEN_UNKNOWN_FLOW",
    )
    assert_problem(
        client.post(f"/api/flow/{oa}/handoff", json={"token": "%%%"}, headers=bob.headers),
        422,
        "STATE_TOKEN_MALFORMED",
    )


def test_websocket_transition_takes_ok_and_message(
    store: FlowStore, server: LiveServer, alice: User
) -> None:
    oa = owl_copy(store, "_oa")
    with signed_in(server, alice) as ws:
        send(
            ws,
            {
                "type": "flow-transition",
                "flowId": oa,
                "transition": "signin",
                "ok": False,
                "message": "locked",
                "requestId": 7,
            },
        )
        reply = answer(ws)
    assert reply["type"] == "flow-transition-result", reply
    assert (reply["state"]["ok"], reply["state"]["message"]) == (False, "locked")
