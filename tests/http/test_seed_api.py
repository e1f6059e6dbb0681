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
from tests.http.conftest import ONBOARDING, SECRET, LiveServer, User


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
        answer = json.loads(ws.recv(timeout=10))
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
