"""One active worker per job and store: a lock held for as long as the worker runs.

- PostgreSQL: a session advisory lock (`pg_try_advisory_lock`) on a connection held for the
  worker's lifetime; the server releases it when that connection or its process dies.
- SQLite: an OS file lock (`flock`) on `<database>.<tag>.lock` beside the database file. A lock row
  held under `BEGIN IMMEDIATE` would do the same job but would block every writer of the store for
  as long as the worker runs; the kernel releases a file lock when the process dies.
- memory://: a lock in this process (the store exists only here).

Used by the Kafka publisher (one per topic) and by followers (`FlowStore.follow`, one per name).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import threading
import weakref
from pathlib import Path
from typing import IO

from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.exc import DBAPIError

from flowstore.storage import StorageConfig

__all__ = ["WorkerLock"]


def _advisory_key(name: str) -> int:
    # pg advisory locks take a signed 64-bit key: the first 8 bytes of a hash of the name.
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


_memory_locks: weakref.WeakValueDictionary[tuple[str, str], threading.Lock] = (
    weakref.WeakValueDictionary()
)
_memory_locks_guard = threading.Lock()


class WorkerLock:
    """Held by the one active worker of a job (`name`) on a store; `acquire` waits for it.

    `tag` names the SQLite lock file (`<database>.<tag>.lock`, made safe for a file name);
    `store_key` tells stores apart where the backend cannot (memory://: one lock per store object).
    """

    def __init__(self, config: StorageConfig, name: str, *, tag: str, store_key: str = "") -> None:
        self.config = config
        self.name = name
        self.tag = re.sub(r"[^A-Za-z0-9._-]", "_", tag)
        self._held = False
        self._connection: Connection | None = None
        self._engine: Engine | None = None
        self._file: IO[bytes] | None = None
        self._thread_lock: threading.Lock | None = None
        if config.backend == "memory":
            with _memory_locks_guard:
                key = (store_key, name)
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
        return Path(f"{database}.{self.tag}.lock")

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
