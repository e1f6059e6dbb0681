"""What an erasure leaves on disk, and how long it takes, on SQLite and PostgreSQL.

    python -m benchmarks.erasure_residue [OTHER_USERS]    (default 2000)

Fills a store with OTHER_USERS users plus one to erase (five payloads, five resets), erases that
user, then counts the user id and the payload in every file of the SQLite store and in the
PostgreSQL relation files (after a CHECKPOINT; again after a plain VACUUM) and WAL segments.
The figures behind README "Erasure" and RELIABILITY.md's erasure section.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import create_engine, text

from flowstore import FlowStore
from flowstore.storage import parse_url
from tests.flows import linear
from tests.pgserver import PostgresServer

USER, PAYLOAD = "measure-user-77aa", "measure-payload-99bb"


def _fill(store: FlowStore, others: int) -> None:
    store.create_flow(linear("line", 4))
    for number in range(others):
        store.execute_transition(f"u{number}", "line", "next", {"n": number})
    for _ in range(5):
        store.execute_transition(USER, "line", "next", {"p": PAYLOAD})
        store.reset_flow(USER, "line")


def _counts(data: bytes) -> str:
    return f"user id {data.count(USER.encode())}, payload {data.count(PAYLOAD.encode())}"


def main(argv: list[str]) -> None:
    """Print the measurements."""
    others = int(argv[0]) if argv else 2000
    with (
        tempfile.TemporaryDirectory() as folder,
        FlowStore(f"sqlite:///{folder}/m.db") as store,
    ):
        _fill(store, others)
        began = time.perf_counter()
        store.erase_user(USER)
        print(
            f"sqlite, {others} other users: erase_user {(time.perf_counter() - began) * 1000:.0f} ms"
        )
        for path in sorted(Path(folder).iterdir()):  # while the store is open: -wal, -shm too
            data = path.read_bytes()
            print(f"  {path.name}: {len(data)} bytes, {_counts(data)}")
    with PostgresServer.start() as server:
        url = server.create_database()
        engine = create_engine(parse_url(url).sqlalchemy_url or "")
        with FlowStore(url) as store:
            _fill(store, others)
            began = time.perf_counter()
            store.erase_user(USER)
            print(
                f"postgres, {others} other users: erase_user {(time.perf_counter() - began) * 1000:.0f} ms"
            )
        names = ("flowstore_user_keys", "flow_states", "flow_history", "flowstore_events")
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("CHECKPOINT"))
            files = {
                name: conn.execute(text(f"SELECT pg_relation_filepath('{name}')")).scalar_one()
                for name in names
            }
            for name, relative in files.items():
                data = (server.data_dir / relative).read_bytes()
                print(f"  {name}: {len(data)} bytes, {_counts(data)}")
            conn.execute(text("VACUUM flow_states, flow_history"))
            conn.execute(text("CHECKPOINT"))
            for name in ("flow_states", "flow_history"):
                print(
                    f"  {name} after VACUUM: {_counts((server.data_dir / files[name]).read_bytes())}"
                )
            wal = b"".join(p.read_bytes() for p in sorted((server.data_dir / "pg_wal").glob("0*")))
            print(f"  pg_wal: {len(wal)} bytes, {_counts(wal)}")
        engine.dispose()


if __name__ == "__main__":
    main(sys.argv[1:])
