"""The HTTP API where the seed is exact: reading definitions, the WebSocket's `error`, and CORS."""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi.testclient import TestClient
from websockets.sync.client import connect

from flowstore import FlowStore
from flowstore.adapters.http import JwtVerifier, create_app
from flowstore.adapters.http.app import CORS_ORIGINS_ENV
from tests.e2e.http.conftest import ONBOARDING, SECRET, LiveServer, User


def test_any_authenticated_caller_reads_a_definition_and_only_admins_change_it(
    client: httpx.Client, line: str, alice: User, admin: User
) -> None:
    read = client.get(f"/api/flows/{line}", headers=alice.headers)
    assert read.status_code == 200
    assert read.json()["flow"] == line
    assert client.get(f"/api/flows/{line}?version=1", headers=alice.headers).status_code == 200
    assert client.get(f"/api/flows/{line}").status_code == 401
    changed = client.patch(f"/api/flows/{line}", json={"ttl": 60}, headers=alice.headers)
    assert (changed.status_code, changed.json()["code"]) == (403, "FORBIDDEN")
    assert client.delete(f"/api/flows/{line}", headers=alice.headers).status_code == 403
    assert client.get("/api/flows", headers=alice.headers).status_code == 403  # the catalogue
    assert client.patch(f"/api/flows/{line}", json={"ttl": 60}, headers=admin.headers).is_success


def test_a_websocket_flow_error_carries_the_message_as_error(
    server: LiveServer, alice: User
) -> None:
    url = server.url.replace("http://", "ws://") + f"/api/flow/ws?token={alice.token}"
    with connect(url) as ws:
        assert '"authenticated"' in str(ws.recv(timeout=10))
        ws.send(
            json.dumps({"type": "flow-transition", "flowId": ONBOARDING, "transition": "complete"})
        )
        # The rejected attempt is pushed too (the state's `ok` changes), before or after the answer.
        while (answer := json.loads(ws.recv(timeout=10)))["type"] == "flow-state-updated":
            pass
    assert answer["type"] == "flow-error"
    assert answer["code"] == "INVALID_TRANSITION"
    assert answer["error"] == answer["problem"]["detail"]
    assert "complete" in answer["error"]


def _app(store: FlowStore, **options: object) -> TestClient:
    return TestClient(create_app(store, JwtVerifier(SECRET), **options))  # type: ignore[arg-type]


PREFLIGHT = {
    "Origin": "https://app.example",
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type",
}


def test_cors_is_off_by_default(
    store: FlowStore, alice: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(CORS_ORIGINS_ENV, raising=False)
    with _app(store) as http:
        answer = http.get(
            f"/api/flow/{ONBOARDING}/state",
            headers={**alice.headers, "Origin": "https://app.example"},
        )
        assert answer.status_code == 200
        assert "access-control-allow-origin" not in answer.headers
        preflight = http.options(f"/api/flow/{ONBOARDING}/transition/start", headers=PREFLIGHT)
        assert "access-control-allow-origin" not in preflight.headers


def test_cors_origins_from_the_environment_get_preflights_answered(
    store: FlowStore, alice: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CORS_ORIGINS_ENV, "https://app.example, https://admin.example")
    with _app(store) as http:
        preflight = http.options(f"/api/flow/{ONBOARDING}/transition/start", headers=PREFLIGHT)
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in preflight.headers["access-control-allow-methods"]
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        assert "access-control-allow-credentials" not in preflight.headers
        answer = http.get(
            f"/api/flow/{ONBOARDING}/state",
            headers={**alice.headers, "Origin": "https://app.example"},
        )
        assert answer.headers["access-control-allow-origin"] == "https://app.example"
        stranger = http.options(
            f"/api/flow/{ONBOARDING}/transition/start",
            headers={**PREFLIGHT, "Origin": "https://evil.example"},
        )
        assert stranger.status_code == 400
        assert "access-control-allow-origin" not in stranger.headers


def test_cors_origins_passed_to_create_app_win_over_the_environment(
    store: FlowStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CORS_ORIGINS_ENV, "https://app.example")
    with _app(store, cors_origins=[]) as http:
        preflight = http.options(f"/api/flow/{ONBOARDING}/transition/start", headers=PREFLIGHT)
        assert "access-control-allow-origin" not in preflight.headers


def test_history_pages_carry_a_next_link(
    client: httpx.Client, store: FlowStore, line: str, alice: User
) -> None:
    store.execute_transition(alice.id, line, "next")
    store.reset_flow(alice.id, line)
    store.execute_transition(alice.id, line, "next")
    store.execute_transition(alice.id, line, "next")  # 5 rows: start, next, reset, next, next
    everything = client.get(f"/api/flow/{line}/history", headers=alice.headers)
    assert "link" not in everything.headers
    rows, url = [], f"/api/flow/{line}/history?limit=2"
    while url:
        page = client.get(url, headers=alice.headers)
        assert page.status_code == 200
        assert len(page.json()) <= 2
        rows += page.json()
        link = page.headers.get("link")
        url = link[1 : link.index(">")] if link else ""
    assert rows == everything.json()
    assert len(rows) == 5
    kinds = client.get(f"/api/flow/{line}/history?kind=reset", headers=alice.headers).json()
    assert [r["kind"] for r in kinds] == ["reset"]
    too_many = client.get(f"/api/flow/{line}/history?limit=1001", headers=alice.headers)
    assert (too_many.status_code, too_many.json()["code"]) == (422, "REQUEST_INVALID")
    bad = client.get(f"/api/flow/{line}/history?cursor=nope", headers=alice.headers)
    assert (bad.status_code, bad.json()["code"]) == (422, "INVALID_ARGUMENT")


def test_admins_list_a_flows_instances_by_step_and_idle_time(
    client: httpx.Client, store: FlowStore, line: str, alice: User, bob: User, admin: User
) -> None:
    for user in (alice, bob):
        store.execute_transition(user.id, line, "next")
    path = f"/api/flows/{line}/instances"
    assert client.get(path, headers=alice.headers).status_code == 403
    first = client.get(f"{path}?step=s1&limit=1", headers=admin.headers)
    assert first.status_code == 200
    body = first.json()
    assert [s["userId"] for s in body["instances"]] == [min(alice.id, bob.id)]
    assert body["nextCursor"]
    link = first.headers["link"]
    second = client.get(link[1 : link.index(">")], headers=admin.headers).json()
    assert [s["userId"] for s in second["instances"]] == [max(alice.id, bob.id)]
    assert second["nextCursor"] is None
    idle = client.get(f"{path}?idleFor=86400", headers=admin.headers).json()
    assert idle["instances"] == []
    bad = client.get(f"{path}?status=cleared", headers=admin.headers)
    assert bad.status_code == 422


def test_statistics_and_funnel_take_a_window(
    client: httpx.Client, store: FlowStore, line: str, alice: User, admin: User
) -> None:
    store.execute_transition(alice.id, line, "next")
    since = "2000-01-01T00:00:00Z"
    stats = client.get(f"/api/flows/{line}/statistics?since={since}", headers=admin.headers)
    assert stats.json()["totalFlows"] == 1
    future = client.get(
        f"/api/flows/{line}/funnel?since=2999-01-01T00:00:00Z&until=2999-01-02T00:00:00Z",
        headers=admin.headers,
    ).json()
    assert {s["step"]: s["entered"] for s in future} == {"s0": 0, "s1": 0, "s2": 0}
    naive = client.get("/api/statistics?since=2000-01-01T00:00:00", headers=admin.headers)
    assert (naive.status_code, naive.json()["code"]) == (422, "REQUEST_INVALID")
    impossible = client.get("/api/statistics?since=2000-02-31T00:00:00Z", headers=admin.headers)
    assert (impossible.status_code, impossible.json()["code"]) == (422, "INVALID_ARGUMENT")
    unix = client.get("/api/statistics?since=0.5", headers=admin.headers)
    assert unix.status_code == 422
