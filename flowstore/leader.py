"""Leader election: one active holder of a named job per store, standbys take over when it dies.

A `LeaderLock` is a lock named after a job (`projections`, `expiry`, `kafka-<topic>`, ...) that
the operating system or the database releases when its holder dies, so a standby that keeps
trying (`acquire`) takes over within its poll interval:

- PostgreSQL: a session advisory lock (`pg_try_advisory_lock`) on a dedicated connection with
  TCP keepalives, so the server drops the lock within seconds of the holder's process dying
  (kill -9 closes its socket at once) or of the network between them going silent (the
  keepalives fail). The key hashes the database, the schema and the job's name: stores in two
  schemas of one database elect separately.
- SQLite: an OS file lock (`flock`) on `<database>.<name>.lock` beside the database file; the
  kernel releases it with the process.
- memory://: a lock in this process (the store exists only here).

The Kafka publisher (one per topic) and followers (`FlowStore.follow`, one per name) hold one
too, under the names and keys their earlier releases used (`advisory_name`).

`run_elected` runs a job's step on an interval while this process leads, and waits as standby
otherwise. The lock alone never guards data: the projections' tracking row and the publisher's
forward-only position keep a leader that lost its lock without knowing it from doing harm.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import IO

from flowstore.storage import StorageConfig, connect_dedicated

__all__ = ["LeaderLock", "advisory_key", "run_elected"]

log = logging.getLogger(__name__)


def advisory_key(name: str) -> int:
    """A PostgreSQL advisory lock key for `name` (the first 8 bytes of its SHA-256, signed)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


_memory_locks: weakref.WeakValueDictionary[tuple[str, str], threading.Lock] = (
    weakref.WeakValueDictionary()
)
_memory_locks_guard = threading.Lock()


class LeaderLock:
    """A named lock held by one process (per store) at a time, released when its holder dies.

    `store_key` tells stores apart where the backend cannot (memory://: one lock per store
    object). `advisory_name` overrides the name PostgreSQL's key is hashed from (for locks that
    must keep a key older releases used).
    """

    def __init__(
        self,
        config: StorageConfig,
        name: str,
        *,
        store_key: str = "",
        advisory_name: str | None = None,
    ) -> None:
        self.config = config
        self.name = name
        database = config.env.get("POSTGRES_DBNAME", "")
        schema = config.env.get("POSTGRES_SCHEMA", "")
        self.advisory_name = advisory_name or f"flowstore.leader:{database}:{schema}:{name}"
        self._held = False
        self._connection: object | None = None  # a psycopg connection, imported lazily
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
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", self.name)
        return Path(f"{database}.{safe}.lock")

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._held

    def acquire(self, stop: threading.Event | None = None, *, poll: float = 0.5) -> bool:
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
        handle.write(f"{os.getpid()}\n".encode())  # who leads, for people looking
        handle.flush()
        self._file = handle
        return True

    def _connect(self) -> object:
        # Not the store's pool: the lock lives exactly as long as this one connection.
        return connect_dedicated(self.config, f"flowstore leader {self.name}")

    def _try_advisory(self) -> bool:
        import psycopg

        try:
            if self._connection is None:
                self._connection = self._connect()
            got = self._execute("SELECT pg_try_advisory_lock(%s)")
        except psycopg.Error:  # the server went away: a new connection on the next try
            self._drop_connection()
            return False
        return bool(got)

    def _execute(self, sql: str) -> object:
        connection = self._connection
        assert connection is not None
        row = connection.execute(sql, (advisory_key(self.advisory_name),)).fetchone()  # type: ignore[attr-defined]
        return row[0] if row else None

    def check(self) -> bool:
        """Whether the lock is still held (PostgreSQL: its connection is alive)."""
        if not self._held:
            return False
        if self._connection is None:
            return True
        try:
            self._connection.execute("SELECT 1")  # type: ignore[attr-defined]
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
            with contextlib.suppress(Exception):  # a dead connection has released it already
                self._execute("SELECT pg_advisory_unlock(%s)")
        self._held = False
        self._drop_connection()

    def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()  # type: ignore[attr-defined]


def run_elected(
    lock: LeaderLock,
    step: Callable[[], object],
    stop: threading.Event,
    *,
    interval: float,
    poll: float = 0.5,
    on_change: Callable[[bool], None] | None = None,
    pause: Callable[[float], object] | None = None,
) -> None:
    """Until `stop` is set: wait to lead, then call `step` every `interval` seconds while leading.

    A failing step is logged and tried again on the next round (the database may come back);
    losing the lock (its connection died) sends this process back to standby. `on_change` is
    told when this process starts (True) and stops (False) leading. `pause(interval)` waits
    between two steps instead of sleeping `interval` (to wake early, on a notification).
    """
    try:
        while not stop.is_set():
            if not lock.acquire(stop, poll=poll):
                return
            if on_change:
                on_change(True)
            log.info("leading %s", lock.name)  # after on_change: a reader of the log sees both
            try:
                while not stop.is_set() and lock.check():
                    try:
                        step()
                    except Exception as exc:
                        log.warning("%s failed (%s); trying again", lock.name, _first_line(exc))
                    if pause is not None and not stop.is_set():
                        pause(interval)
                    else:
                        stop.wait(interval)
            finally:
                lock.release()
                log.info("no longer leading %s", lock.name)
                if on_change:
                    on_change(False)
    finally:
        lock.release()


def _first_line(exc: BaseException) -> str:
    return str(getattr(exc, "orig", None) or exc).split("\n", 1)[0]
