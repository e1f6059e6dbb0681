"""A real uvicorn server on 127.0.0.1, a store behind it, clients and tokens.

One server per backend serves the whole session (SQLite file, and a PostgreSQL database of the
session's `pg_server`): starting one per test would cost more than the tests. Tests stay independent
by working with users and flows of their own (`user`, `line` fixtures: unique ids per test).

The server runs in a thread on a socket bound to a free port before it starts; it is used once
`/healthz` answers.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI

from flowstore import FlowStore
from flowstore.adapters.http import JwtVerifier, create_app
from tests.flows import linear, onboarding
from tests.pgserver import PostgresServer

SECRET = "tests-only-hs256-secret-" + "0123456789abcdef" * 3  # >= 64 bytes, enough for HS512
ONBOARDING = "user-onboarding"
MAX_BODY_BYTES = 256 * 1024

_ids = itertools.count(1)


def mint(
    user: str | None,
    *,
    roles: Sequence[str] = (),
    ttl: float = 86_400,  # a day: tokens minted when tests are collected must outlive a slow run
    key: Any = SECRET,
    algorithm: str = "HS256",
    **claims: Any,
) -> str:
    """A JWT for `user` (`sub`), valid for `ttl` seconds (negative: already expired)."""
    body: dict[str, Any] = {"roles": list(roles), "exp": int(time.time() + ttl), **claims}
    if user is not None:
        body["sub"] = user
    return jwt.encode(body, key, algorithm=algorithm)


def bearer(token: str) -> dict[str, str]:
    """The Authorization header for a token."""
    return {"Authorization": f"Bearer {token}"}


@dataclass(frozen=True)
class User:
    """A caller: user id, token and the headers that carry it."""

    id: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        """The Authorization header."""
        return bearer(self.token)

    @classmethod
    def new(cls, prefix: str, roles: Sequence[str] = ()) -> User:
        """A user no other test uses."""
        user_id = f"{prefix}-{next(_ids)}"
        return cls(user_id, mint(user_id, roles=roles))


class LiveServer:
    """uvicorn serving an app in a background thread on 127.0.0.1."""

    def __init__(self, app: FastAPI) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit this. uvicorn serving a socket it was handed leaves Nagle
        # on, and Nagle with delayed ACKs costs ~40 ms a request.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.bind(("127.0.0.1", 0))
        port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> LiveServer:
        self.thread.start()
        wait_until_healthy(self.url, alive=self.thread.is_alive)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


def wait_until_healthy(
    url: str, *, alive: Callable[[], bool] = lambda: True, timeout: float = 30.0
) -> None:
    """Poll `/healthz` until it answers 200 (fail if the server died or `timeout` passed)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=1.0) as client:
        while time.monotonic() < deadline:
            if not alive():
                raise RuntimeError("the server stopped before it was ready")
            try:
                if client.get(f"{url}/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.02)  # the pace of the polling loop; the loop checks the condition
    raise TimeoutError(f"{url} not healthy within {timeout}s")


@pytest.fixture(scope="session", params=["sqlite", "postgres"], ids=["sqlite", "postgres"])
def backend_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The database the session's server uses: a SQLite file, or a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('http') / 'flowstore.db'}"
    server: PostgresServer = request.getfixturevalue("pg_server")
    return server.create_database()


@pytest.fixture(scope="session")
def store(backend_url: str) -> Iterator[FlowStore]:
    """The store behind the session's server, with the seed's onboarding flow."""
    with FlowStore(backend_url) as store:
        store.create_flow(onboarding())
        yield store


def api_app(store: FlowStore) -> FastAPI:
    """The app the tests serve: the API and console over `store`, HS256 tokens signed with SECRET."""
    return create_app(store, JwtVerifier(SECRET), poll_interval=0.05, max_body_bytes=MAX_BODY_BYTES)


@pytest.fixture(scope="session")
def server(store: FlowStore) -> Iterator[LiveServer]:
    """The API over `store` on a free port (`api_app`)."""
    with LiveServer(api_app(store)) as live:
        yield live


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    """An HTTP client for the session's server, without credentials."""
    with httpx.Client(base_url=server.url, timeout=10.0) as client:
        yield client


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite database, for tests that need a store (and server) of their own."""
    return f"sqlite:///{tmp_path / 'own.db'}"


@pytest.fixture
def alice() -> User:
    """An ordinary user of this test only."""
    return User.new("alice")


@pytest.fixture
def bob() -> User:
    """Another ordinary user of this test only."""
    return User.new("bob")


@pytest.fixture
def admin() -> User:
    """A user holding the admin role."""
    return User.new("root", roles=["admin"])


@pytest.fixture
def line(store: FlowStore) -> str:
    """A flow of this test only: s0 -next-> s1 -next-> s2 (terminal)."""
    return store.create_flow(linear(f"line-{next(_ids)}", 3))


@pytest.fixture(scope="session")
def rsa_keys() -> tuple[bytes, str]:
    """An RSA private key (PEM bytes, to sign RS256 tokens) and its public key (PEM text)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public.decode()
