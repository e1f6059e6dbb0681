"""Erasure leaves nothing recoverable on disk: a live `flowstore serve`, an erasure over HTTP, then
every file of the store (database, -wal, -shm) searched byte-wise for the user."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from flowstore import FlowStore
from flowstore.storage import parse_url
from tests.e2e.http.conftest import SECRET, bearer, mint, wait_until_healthy
from tests.e2e.http.test_serve import environment, free_port
from tests.flows import linear
from tests.integration.test_encryption import new_key
from tests.pgserver import PostgresServer

USER = "erasable-user-7f3a"
PAYLOAD = "payload-secret-91bc"


@contextmanager
def serving(db: Path, log: Path, **env: str) -> Iterator[httpx.Client]:
    """`flowstore serve` on the SQLite file, and a client for it; SIGTERM afterwards."""
    port = free_port()
    command = [sys.executable, "-m", "flowstore.adapters.cli", "--url", f"sqlite:///{db}"]
    with log.open("w") as out:
        server = subprocess.Popen(
            [*command, "serve", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=environment(FLOWSTORE_JWT_SECRET=SECRET, **env),
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, alive=lambda: server.poll() is None)
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def raw_key_rows(db: Path) -> list[bytes]:
    """Every stored key (wrapped or not) in the key table, read directly."""
    with sqlite3.connect(db) as conn:
        return [bytes(row[0]) for row in conn.execute("SELECT key FROM flowstore_user_keys")]


def files_holding(folder: Path, needle: bytes) -> list[str]:
    """The names of the files in `folder` whose bytes contain `needle`."""
    return sorted(p.name for p in folder.iterdir() if p.is_file() and needle in p.read_bytes())


@pytest.mark.parametrize("cipher", [False, True], ids=["plain-keys", "cipher-key"])
def test_an_erasure_over_http_leaves_no_trace_in_any_file_of_the_store(
    tmp_path: Path, cipher: bool
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    db = data / "serve.db"
    env = {"FLOWSTORE_CIPHER_KEY": new_key()} if cipher else {}
    with FlowStore(f"sqlite:///{db}", cipher_key=env.get("FLOWSTORE_CIPHER_KEY")) as store:
        store.create_flow(linear("line", 4))
    user, other, admin = (
        bearer(mint(USER)),
        bearer(mint("other-user")),
        bearer(mint("root", roles=["admin"])),
    )
    with serving(db, tmp_path / "server.log", **env) as client:
        for number in range(20):  # enough writes that the WAL holds many frames of the user
            body = {"payload": {"note": f"{PAYLOAD}-{number}", "who": USER}}
            client.post("/api/flow/line/transition/next", json=body, headers=user)
            client.post(
                "/api/flow/line/transition/next", json={"payload": {"n": number}}, headers=other
            )
            if number % 3 == 2:
                client.post("/api/flow/line/reset", json={}, headers=user)
        assert client.get("/api/flow/line/history", headers=user).json()
        keys_before = raw_key_rows(db)
        assert len(keys_before) == 2
        assert files_holding(data, USER.encode()), "the test must see the user before erasing"
        erased = client.delete(f"/api/admin/users/{USER}", headers=admin)
        assert erased.status_code == 200, erased.text
        # Still serving (a live server), and the other user is untouched.
        assert client.get("/api/flow/line/state", headers=other).status_code == 200
        remaining = raw_key_rows(db)
        assert len(remaining) == 1
        (gone,) = set(keys_before) - set(remaining)
        assert files_holding(data, USER.encode()) == []
        assert files_holding(data, PAYLOAD.encode()) == []
        assert files_holding(data, gone) == []


@pytest.mark.parametrize("position", [0, 2, 5], ids=["first", "middle", "last"])
def test_on_postgresql_the_erased_key_is_gone_from_the_key_tables_heap(
    pg_server: PostgresServer, position: int
) -> None:
    url = pg_server.create_database()
    with FlowStore(url) as store:
        store.create_flow(linear("line", 3))
        # Where the key lands in its heap page (rows fill a page from its end) should not matter.
        for number in range(6):
            who = USER if number == position else f"other-{number}"
            store.execute_transition(who, "line", "next", {"n": number})
        engine = create_engine(parse_url(url).sqlalchemy_url or "")
        with engine.connect() as conn:
            keys_before = {
                bytes(k)
                for k in conn.execute(text("SELECT key FROM flowstore_user_keys")).scalars()
            }
            before = conn.execute(
                text("SELECT pg_relation_filepath('flowstore_user_keys')")
            ).scalar_one()
        store.erase_user(USER)
        with engine.connect() as conn:
            path = conn.execute(
                text("SELECT pg_relation_filepath('flowstore_user_keys')")
            ).scalar_one()
            remaining = {
                bytes(k)
                for k in conn.execute(text("SELECT key FROM flowstore_user_keys")).scalars()
            }
            conn.execute(text("CHECKPOINT"))  # the heap pages on disk as the server holds them
        engine.dispose()
    (gone,) = keys_before - remaining
    heap = (pg_server.data_dir / path).read_bytes()
    assert all(key in heap for key in remaining)  # the file read is the right one
    assert gone not in heap
    if (
        pg_server.data_dir / before
    ).exists():  # a rewrite unlinks the old file at the next checkpoint
        assert gone not in (pg_server.data_dir / before).read_bytes()
