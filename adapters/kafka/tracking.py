"""Where a publisher stands, and the lock that keeps one publisher per topic and store.

The position (the notification id of the last event the broker acknowledged) lives in the table
`kafka_publisher_tracking` of the store's own database, one row per topic. It only moves forward
(`UPDATE ... WHERE position < new`), so a publisher that lost its lock without knowing it cannot
move it back.

The lock depends on the backend:

- PostgreSQL: a session advisory lock (`pg_try_advisory_lock`) on a connection held for the
  publisher's lifetime; the server releases it when that connection or its process dies.
- SQLite: an OS file lock (`flock`) on `<database>.kafka-<topic>.lock` beside the database file.
  A lock row held under `BEGIN IMMEDIATE` would do the same job but would block every writer of the
  store for as long as the publisher runs; the kernel releases a file lock when the process dies.
- memory://: a lock in this process (the store exists only here).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import threading
import weakref
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    DateTime,
    Engine,
    MetaData,
    String,
    Table,
    create_engine,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.pool import StaticPool

from flowstore.sqlitelog import secure_sqlite
from flowstore.storage import READ_ONLY, StorageConfig

__all__ = ["TRACKING_TABLE", "PublisherLock", "PublisherTracking"]

_metadata = MetaData()

TRACKING_TABLE = Table(
    "kafka_publisher_tracking",
    _metadata,
    Column("topic", String(255), primary_key=True),
    Column("position", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
"""One row per topic: the notification id of the last event the broker acknowledged."""


def _engine(config: StorageConfig) -> Engine:
    if config.sqlalchemy_url is None:
        # memory:// has no database to share: the position lives (and dies) with this process.
        return create_engine(
            "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
        )
    if config.backend == "sqlite":
        engine = create_engine(config.sqlalchemy_url, connect_args={"timeout": 60})
        secure_sqlite(engine)  # every connection to a store's file overwrites what it deletes
        return engine
    return create_engine(config.sqlalchemy_url, pool_pre_ping=True, pool_size=1)


class PublisherTracking:
    """The publisher's position per topic, in the store's database."""

    def __init__(self, config: StorageConfig, engine: Engine | None = None) -> None:
        # The store's one engine (`FlowStore.engine`), or one of our own; always our own for
        # memory://, whose engine is one shared connection that only the projections may use.
        if config.sqlalchemy_url is None:
            engine = None
        self._owns_engine = engine is None
        self.engine = engine if engine is not None else _engine(config)
        with self.engine.begin() as conn:
            _metadata.create_all(conn)

    def close(self) -> None:
        """Release connections (of an engine of our own)."""
        if self._owns_engine:
            self.engine.dispose()

    def position(self, topic: str) -> int:
        """The notification id of the last event published to `topic` (0 before the first)."""
        with self.engine.connect().execution_options(**READ_ONLY) as conn:
            return self._position(conn, topic)

    def known(self, topic: str) -> bool:
        """Whether a publisher has ever recorded a position for `topic`."""
        with self.engine.connect().execution_options(**READ_ONLY) as conn:
            query = select(TRACKING_TABLE.c.position).where(TRACKING_TABLE.c.topic == topic)
            return conn.execute(query).first() is not None

    @staticmethod
    def _position(conn: Connection, topic: str) -> int:
        query = select(TRACKING_TABLE.c.position).where(TRACKING_TABLE.c.topic == topic)
        return int(conn.execute(query).scalar() or 0)

    def advance(self, topic: str, position: int) -> None:
        """Record that every event up to `position` is on the broker (never moves backwards)."""
        now = datetime.now(UTC)
        with self.engine.begin() as conn:
            moved = conn.execute(
                update(TRACKING_TABLE)
                .where(TRACKING_TABLE.c.topic == topic, TRACKING_TABLE.c.position < position)
                .values(position=position, updated_at=now)
            ).rowcount
            if moved or self._has_row(conn, topic):
                return
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(TRACKING_TABLE).values(topic=topic, position=position, updated_at=now)
                )
        except IntegrityError:  # another publisher inserted the row first: move it instead
            self.advance(topic, position)

    @staticmethod
    def _has_row(conn: Connection, topic: str) -> bool:
        query = select(TRACKING_TABLE.c.topic).where(TRACKING_TABLE.c.topic == topic)
        return conn.execute(query).first() is not None

    def reset(self, topic: str, position: int = 0) -> None:
        """Set the position, backwards too (to publish the log again to a fresh topic)."""
        with self.engine.begin() as conn:
            conn.execute(
                update(TRACKING_TABLE)
                .where(TRACKING_TABLE.c.topic == topic)
                .values(position=position, updated_at=datetime.now(UTC))
            )


def _advisory_key(name: str) -> int:
    # pg advisory locks take a signed 64-bit key: the first 8 bytes of a hash of the name.
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


_memory_locks: weakref.WeakValueDictionary[tuple[str, str], threading.Lock] = (
    weakref.WeakValueDictionary()
)
_memory_locks_guard = threading.Lock()


class PublisherLock:
    """Held by the one active publisher of a topic and store; `acquire` waits for it.

    `store_key` tells stores apart where the backend cannot (memory://: one lock per store object).
    """

    def __init__(self, config: StorageConfig, topic: str, *, store_key: str = "") -> None:
        self.config = config
        self.topic = topic
        self.name = f"flowstore.kafka_publisher:{config.env.get('POSTGRES_SCHEMA', '')}:{topic}"
        self._held = False
        self._connection: Connection | None = None
        self._engine: Engine | None = None
        self._file: IO[bytes] | None = None
        self._thread_lock: threading.Lock | None = None
        if config.backend == "memory":
            with _memory_locks_guard:
                key = (store_key, topic)
                lock = _memory_locks.get(key)
                if lock is None:
                    lock = _memory_locks[key] = threading.Lock()
                self._thread_lock = lock

    @property
    def path(self) -> Path | None:
        """The lock file (SQLite stores only)."""
        if self.config.backend != "sqlite" or self.config.sqlalchemy_url is None:
            return None
        database = self.config.sqlalchemy_url.removeprefix("sqlite:///")
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", self.topic)
        return Path(f"{database}.kafka-{safe}.lock")

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._held

    def acquire(self, stop: threading.Event | None = None, *, poll: float = 0.2) -> bool:
        """Wait until the lock is ours (True), or until `stop` is set (False)."""
        while not self.try_acquire():
            if stop is None:
                threading.Event().wait(poll)
            elif stop.wait(poll):
                return False
        return True

    def try_acquire(self) -> bool:
        """Take the lock if it is free; True when this object holds it."""
        if self._held:
            return True
        if self._thread_lock is not None:
            self._held = self._thread_lock.acquire(blocking=False)
        elif self.path is not None:
            self._held = self._try_file()
        else:
            self._held = self._try_advisory()
        return self._held

    def _try_file(self) -> bool:
        assert self.path is not None
        handle = self.path.open("ab")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n".encode())
        handle.flush()
        self._file = handle
        return True

    def _try_advisory(self) -> bool:
        assert self.config.sqlalchemy_url is not None
        if self._engine is None:
            self._engine = create_engine(self.config.sqlalchemy_url, pool_size=1, max_overflow=0)
        try:
            if self._connection is None:
                # Autocommit: the session lock must outlive any transaction on this connection.
                self._connection = self._engine.connect().execution_options(
                    isolation_level="AUTOCOMMIT"
                )
            got = self._connection.execute(
                text("SELECT pg_try_advisory_lock(:key)"), {"key": _advisory_key(self.name)}
            ).scalar()
        except DBAPIError:  # the server went away: a new connection on the next try
            self._drop_connection()
            return False
        return bool(got)

    def check(self) -> bool:
        """Whether the lock is still held (PostgreSQL: its connection is alive)."""
        if not self._held:
            return False
        if self._connection is None:
            return True
        try:
            self._connection.execute(text("SELECT 1"))
        except Exception:  # the connection died, and the server dropped the lock with it
            self._held = False
            self._drop_connection()
            return False
        return True

    def release(self) -> None:
        """Give the lock up (safe to call when not held)."""
        if self._thread_lock is not None and self._held:
            self._thread_lock.release()
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        if self._connection is not None and self._held:
            # A dead connection has released it already.
            with contextlib.suppress(Exception):
                self._connection.execute(
                    text("SELECT pg_advisory_unlock(:key)"), {"key": _advisory_key(self.name)}
                )
        self._held = False
        self._drop_connection()

    def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
