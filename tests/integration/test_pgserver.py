"""The throwaway PostgreSQL server used by the test suite and the benchmarks."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from tests.pgserver import PostgresServer

REPO_ROOT = Path(__file__).resolve().parents[2]


def _tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchall()
    return {row[0] for row in rows}


def test_create_database_write_and_read_back(pg_server: PostgresServer) -> None:
    url = pg_server.create_database()
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE flows (id integer PRIMARY KEY, name text NOT NULL)")
        conn.execute("INSERT INTO flows (id, name) VALUES (%s, %s), (%s, %s)", (1, "a", 2, "b"))
        conn.commit()
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT id, name FROM flows ORDER BY id").fetchall()
    assert rows == [(1, "a"), (2, "b")]


def test_created_databases_are_independent(pg_server: PostgresServer) -> None:
    first, second = pg_server.create_database(), pg_server.create_database()
    assert first != second
    with psycopg.connect(first) as conn:
        conn.execute("CREATE TABLE only_here (x integer)")
        conn.execute("INSERT INTO only_here VALUES (1)")
    assert _tables(first) == {"only_here"}
    assert _tables(second) == set()
    with psycopg.connect(second) as conn:  # the same name is free in the other database
        conn.execute("CREATE TABLE only_here (x integer)")
        assert conn.execute("SELECT count(*) FROM only_here").fetchone() == (0,)


def test_url_has_the_documented_form(pg_server: PostgresServer) -> None:
    parts = urlsplit(pg_server.create_database())
    assert parts.scheme == "postgresql"
    assert parts.hostname == "127.0.0.1" == pg_server.host
    assert parts.port == pg_server.port
    assert parts.username == pg_server.user
    assert parts.password == pg_server.password
    assert parts.path.startswith("/flowstore_")


def test_password_is_required(pg_server: PostgresServer) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(
            host=pg_server.host,
            port=pg_server.port,
            user=pg_server.user,
            password="wrong",
            dbname="postgres",
        )


def test_server_keeps_durability_defaults(pg_server: PostgresServer) -> None:
    with psycopg.connect(pg_server.url()) as conn:

        def show(name: str) -> str:
            row = conn.execute(f"SHOW {name}").fetchone()
            assert row is not None
            return str(row[0])

        assert show("fsync") == "on"
        assert show("synchronous_commit") == "on"
        assert show("full_page_writes") == "on"
        assert show("listen_addresses") == "127.0.0.1"
        assert show("max_connections") == "200"
        assert int(show("server_version_num")) // 10000 == 15


def test_store_url_is_a_fresh_empty_database(store_url: str) -> None:
    if store_url.startswith("sqlite:///"):
        path = Path(store_url.removeprefix("sqlite:///"))
        assert path.is_absolute()
        assert path.name == "flowstore.db"
        assert path.parent.is_dir()
        assert not path.exists()
    else:
        assert store_url.startswith("postgresql://")
        assert _tables(store_url) == set()


def test_start_and_stop_without_pytest() -> None:
    with PostgresServer.start() as server:
        url = server.create_database()
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert server.data_dir.is_dir()
    assert not server.base_dir.exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=5)
    server.stop()  # a second stop is harmless


def test_a_server_that_exited_by_itself_stops_cleanly() -> None:
    """A WAL write on a full disk is a PANIC, and the failed recovery ends the postmaster (it
    removes its PID file): stopping such a server must clean up, not fail the teardown."""
    server = PostgresServer.start()
    try:
        pid_file = server.data_dir / "postmaster.pid"
        assert pid_file.exists()
        server._run(  # the postmaster ends, as after a PANIC whose recovery failed
            [server._bin("pg_ctl"), "stop", "-D", str(server.data_dir), "-m", "immediate", "-w"],
            timeout=90,
        )
        assert not pid_file.exists()
    finally:
        server.stop()
    assert not server.base_dir.exists()


def test_failed_start_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[PostgresServer] = []
    original = PostgresServer._start_on_free_port

    def start_then_fail(self: PostgresServer) -> None:
        original(self)
        started.append(self)
        raise RuntimeError("boom after the server came up")

    monkeypatch.setattr(PostgresServer, "_start_on_free_port", start_then_fail)
    with pytest.raises(RuntimeError, match="boom"):
        PostgresServer.start()
    [server] = started
    assert not server.base_dir.exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(server.url(), connect_timeout=5)


_OWNER_CODE = """
import json, sys
from tests.pgserver import PostgresServer
server = PostgresServer.start()
print(json.dumps({"url": server.url(), "base_dir": str(server.base_dir),
                  "watchdog_pid": server.watchdog_pid}), flush=True)
sys.stdin.read()  # block until killed
"""


@pytest.mark.slow
def test_server_is_cleaned_up_when_its_owner_is_killed() -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER_CODE],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None
        info = json.loads(owner.stdout.readline())
        with psycopg.connect(info["url"]) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        # The watchdog is not our child, so wait for its exit through a pidfd, not a poll loop.
        watchdog = os.pidfd_open(info["watchdog_pid"])
        try:
            owner.send_signal(signal.SIGKILL)
            owner.wait(timeout=30)
            readable, _, _ = select.select([watchdog], [], [], 60)
            assert readable, "watchdog did not finish within 60 s"
        finally:
            os.close(watchdog)
    finally:
        if owner.poll() is None:
            owner.kill()
        owner.wait()
    assert not Path(info["base_dir"]).exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(info["url"], connect_timeout=5)
