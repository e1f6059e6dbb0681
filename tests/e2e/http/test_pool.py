"""A held pool: `/healthz` still answers, and calls that need a connection get 503, never 500."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import anyio.to_thread
import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Connection

from flowstore import FlowStore
from flowstore.adapters.http import JwtVerifier, create_app
from flowstore.storage import POOL_TIMEOUT_ENV
from tests.e2e.http.conftest import SECRET, LiveServer, User
from tests.e2e.http.test_api import assert_problem
from tests.flows import linear
from tests.integration.test_encryption import new_key

pytestmark = pytest.mark.timeout(120)


@contextlib.contextmanager
def held_pool(store: FlowStore) -> Iterator[list[Connection]]:
    """Every connection the store's pool will give (its size plus its overflow), held."""
    pool = store.engine.pool
    held = [store.engine.connect() for _ in range(pool.size() + pool._max_overflow)]  # type: ignore[attr-defined]
    try:
        yield held
    finally:
        for conn in held:
            conn.close()


def test_pool_exhausted_is_503_storage_unavailable_never_500(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(POOL_TIMEOUT_ENV, "0.2")
    alice = User.new("alice")
    # Encrypted: a transition needs the user's key, read through the same pool.
    with FlowStore(store_url, pool_size=1, cipher_key=new_key()) as store:
        store.create_flow(linear("f"))
        store.execute_transition(alice.id, "f", "next")
        app = create_app(store, JwtVerifier(SECRET))
        with LiveServer(app) as live, httpx.Client(base_url=live.url) as client:
            with held_pool(store):
                # A new user: a key to make; the tables: reads wait for the projector.
                bob = User.new("bob")
                for response in (
                    client.post("/api/flow/f/transition/next", headers=bob.headers),
                    client.get("/api/flows/mine", headers=alice.headers),
                    client.get("/api/flow/f/history", headers=alice.headers),
                ):
                    assert_problem(response, 503, "STORAGE_UNAVAILABLE")
            # The pool came back: so does the service.
            assert client.get("/api/flows/mine", headers=alice.headers).status_code == 200


def test_healthz_answers_while_every_worker_thread_waits_for_the_pool(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(POOL_TIMEOUT_ENV, "60")
    alice = User.new("alice")
    with FlowStore(store_url, pool_size=1) as store:
        store.create_flow(linear("f"))
        store.execute_transition(alice.id, "f", "next")
        app = create_app(store, JwtVerifier(SECRET))
        with TestClient(app) as client:
            with held_pool(store):
                # One worker thread for the app's sync endpoints: one blocked request takes it.
                def limit() -> None:
                    anyio.to_thread.current_default_thread_limiter().total_tokens = 1

                client.portal.call(limit)  # type: ignore[union-attr]
                blocked = threading.Thread(
                    target=client.get,
                    args=("/api/flows/mine",),
                    kwargs={"headers": alice.headers},
                )
                blocked.start()
                response = client.get("/healthz")
                assert response.status_code == 200
                assert blocked.is_alive()  # answered while the other request still waits
            blocked.join()  # the pool is free again
