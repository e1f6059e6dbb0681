"""The API as a router inside an application of the user's own, under a prefix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from websockets.sync.client import connect

from flowstore import AsyncFlowStore, FlowStore
from flowstore.adapters.http import FlowRouter, JwtVerifier, create_router
from tests.e2e.http.conftest import SECRET, LiveServer, User
from tests.flows import linear

ROOT = Path(__file__).resolve().parents[3]
TIMEOUT = 10.0


def _own_app(router: FlowRouter, *, enter_running: bool) -> FastAPI:
    """An app of the user's: its own routes and lifespan, the flowstore router under /flows."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if enter_running:  # as an app would whose lifespan does not merge the router's
            async with router.running():
                yield
        else:
            yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"app": "mine"}

    app.include_router(router, prefix="/flows")
    return app


@pytest.fixture(params=[False, True], ids=["merged-lifespan", "entered-running"])
def own_server(request: pytest.FixtureRequest, store_url: str) -> Iterator[tuple[LiveServer, str]]:
    """The user's app over a store on a fresh database (both backends), served by uvicorn."""
    with FlowStore(store_url) as store:
        store.create_flow(linear("line"))
        served = AsyncFlowStore.wrap(store) if request.param else store  # either is taken
        router = create_router(served, JwtVerifier(SECRET), poll_interval=0.05)
        with LiveServer(_own_app(router, enter_running=request.param)) as live:
            yield live, store_url


def test_a_push_caused_by_another_process_reaches_a_socket_under_the_prefix(
    own_server: tuple[LiveServer, str],
) -> None:
    server, url = own_server
    alice = User.new("alice")
    with connect(f"{server.ws_url}/flows/api/flow/ws?token={alice.token}", proxy=None) as ws:
        assert json.loads(ws.recv(timeout=TIMEOUT))["type"] == "authenticated"
        other = subprocess.run(
            [
                *(sys.executable, "-m", "flowstore.adapters.cli", "--url", url, "--json"),
                *("transition", alice.id, "line", "next"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            check=False,
        )
        assert other.returncode == 0, other.stderr
        push = json.loads(ws.recv(timeout=TIMEOUT))
    assert push["type"] == "flow-state-updated"
    assert push["flowId"] == "line"
    assert push["state"]["step"] == "s1"


def test_endpoints_answer_under_the_prefix_with_their_own_problems(
    own_server: tuple[LiveServer, str],
) -> None:
    server, _ = own_server
    alice = User.new("alice")
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        assert client.get("/healthz").json() == {"app": "mine"}  # the app's own route
        unauthenticated = client.get("/flows/api/flow/line/state")
        assert unauthenticated.status_code == 401
        assert unauthenticated.headers["content-type"] == "application/problem+json"
        assert unauthenticated.json()["code"] == "UNAUTHENTICATED"
        moved = client.post("/flows/api/flow/line/transition/next", headers=alice.headers)
        assert moved.status_code == 200
        assert moved.json()["step"] == "s1"
        refused = client.post("/flows/api/flow/line/transition/back", headers=alice.headers)
        assert refused.status_code == 422
        assert refused.json()["code"] == "INVALID_TRANSITION"
        invalid = client.post(
            "/flows/api/flow/line/transition/next", headers=alice.headers, content=b"{"
        )
        assert invalid.status_code == 422
        assert invalid.json()["code"] == "REQUEST_INVALID"
        too_big = client.post(
            "/flows/api/flow/line/transition/next",
            headers=alice.headers,
            content=b"x" * (2 * 1024 * 1024),
        )
        assert too_big.status_code == 413
        assert too_big.json()["code"] == "PAYLOAD_TOO_LARGE"
        assert client.get("/flows/readyz").status_code == 200


def test_the_endpoints_run_the_store_on_the_async_stores_threads_not_the_event_loops_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading

    from fastapi.testclient import TestClient

    from tests.e2e.http.conftest import bearer, mint

    with FlowStore("memory://", kafka=False) as store:
        store.create_flow(linear("f"))
        seen: list[str] = []
        real = store.execute_transition

        def recording(*args: object, **kwargs: object) -> object:
            seen.append(threading.current_thread().name)
            return real(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(store, "execute_transition", recording)
        app = FastAPI()
        app.include_router(create_router(store, JwtVerifier(SECRET)))
        with TestClient(app) as client:
            answer = client.post(
                "/api/flow/f/transition/next", json={}, headers=bearer(mint("ann"))
            )
        assert answer.status_code == 200, answer.text
        assert answer.json()["step"] == "s1"
        # FastAPI runs sync endpoints on anyio's worker threads; ours await AsyncFlowStore's.
        assert [name.startswith("flowstore-aio") for name in seen] == [True]
