"""Leader election: one active holder of a named job per store, standbys take over when it dies.

A `LeaderLock` is a lock named after a job (`projections`, `expiry`, `kafka-<topic>`, ...) that
the operating system or the database releases when its holder dies, so a standby that keeps
trying (`acquire`) takes over within its poll interval:

- PostgreSQL: a session advisory lock (`pg_try_advisory_lock`) on a dedicated connection held
  as a lease: the holder pings it every quarter of the lease (`$FLOWSTORE_LEADER_LEASE`
  seconds, default 10) and the server ends the session when it has been idle for a whole lease
  (`idle_session_timeout`), which releases the lock. So the lock changes hands within about a
  lease when the holder dies (kill -9 closes its socket: at once), freezes (SIGSTOP), or the
  network between them goes silent, even where TCP cannot tell (a proxy or middlebox that
  acknowledges packets and forwards nothing); TCP keepalives and `tcp_user_timeout` on both
  ends are scaled to the lease too. The holder stops trusting its lock (`check()` is False)
  three quarters of a lease after its last answered ping, before the server can release it.
  The key hashes the database, the schema and the job's name: stores in two schemas of one
  database elect separately.
- SQLite: an OS file lock (`flock`) on `<database>.<name>.lock` beside the database file; the
  kernel releases it with the process, and only then: a frozen (SIGSTOP) holder keeps it. There
  is no network to lose on one machine, and a process frozen inside a transaction would hold
  SQLite's write lock anyway, so a takeover would not help there.
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
import select
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from flowstore.errors import StorageConfigError
from flowstore.storage import StorageConfig, connect_dedicated

__all__ = [
    "DEFAULT_LEASE",
    "LEASE_ENV",
    "LeaderLock",
    "advisory_key",
    "leader_lease",
    "run_elected",
]

log = logging.getLogger(__name__)

LEASE_ENV = "FLOWSTORE_LEADER_LEASE"
"""Seconds a PostgreSQL leader's lock outlives its last answered ping (see the module's notes)."""

DEFAULT_LEASE = 10.0
"""The lease when `$FLOWSTORE_LEADER_LEASE` is unset."""

_MIN_LEASE = 1.0  # a standby polls every 0.5 s on its own leased connection


def leader_lease() -> float:
    """The lease from `$FLOWSTORE_LEADER_LEASE` (default 10 s); `StorageConfigError` if unusable."""
    text = os.environ.get(LEASE_ENV, "").strip()
    if not text:
        return DEFAULT_LEASE
    try:
        lease = float(text)
    except ValueError:
        lease = float("nan")
    if not _MIN_LEASE <= lease <= 3600:  # False for nan too
        raise StorageConfigError(
            f"${LEASE_ENV} must be a number of seconds from {_MIN_LEASE:g} to 3600, not {text!r}",
            setting=LEASE_ENV,
        )
    return lease


def _lease_settings(lease: float, *, server_lease: bool = True) -> dict[str, Any]:
    """libpq parameters for a lock connection: keepalives and timeouts scaled to `lease`, on the
    client's socket (keepalives, tcp_user_timeout) and on the server's (`options`)."""
    idle, interval = max(1, round(lease / 2)), max(1, round(lease / 6))
    milliseconds = int(lease * 1000)
    server: dict[str, int] = {}
    if server_lease:  # the lease itself: no ping for this long, no lock (PostgreSQL 14+)
        server["idle_session_timeout"] = milliseconds
    server |= {
        "tcp_keepalives_idle": idle,
        "tcp_keepalives_interval": interval,
        "tcp_keepalives_count": 3,
        "tcp_user_timeout": milliseconds,
    }
    return {
        "keepalives": 1,
        "keepalives_idle": idle,
        "keepalives_interval": interval,
        "keepalives_count": 3,
        "tcp_user_timeout": milliseconds,
        "options": " ".join(f"-c {key}={value}" for key, value in server.items()),
    }


_server_lease = True
"""False once a server refused idle_session_timeout (PostgreSQL before 14)."""


class _LockConnectionError(Exception):
    """The lock's connection did not answer in time, or answered with an error."""


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
    must keep a key older releases used). `lease` (PostgreSQL) defaults to `leader_lease()`.
    """

    def __init__(
        self,
        config: StorageConfig,
        name: str,
        *,
        store_key: str = "",
        advisory_name: str | None = None,
        lease: float | None = None,
    ) -> None:
        self.config = config
        self.name = name
        database = config.env.get("POSTGRES_DBNAME", "")
        schema = config.env.get("POSTGRES_SCHEMA", "")
        self.advisory_name = advisory_name or f"flowstore.leader:{database}:{schema}:{name}"
        self.lease = lease if lease is not None else leader_lease()
        if not self.lease >= _MIN_LEASE:  # nan too
            raise StorageConfigError(f"a leader's lease must be {_MIN_LEASE:g} s or more")
        self._held = False
        self._connection: Any = None  # a psycopg connection, imported lazily
        self._file: IO[bytes] | None = None
        self._thread_lock: threading.Lock | None = None
        # The lease's heartbeat (PostgreSQL): when the last answered ping was sent, and whether
        # a ping failed since.
        self._confirmed = 0.0
        self._lost = False
        self._beating: threading.Event | None = None
        self._heartbeat: threading.Thread | None = None
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

    def _connect(self) -> Any:
        import psycopg

        global _server_lease
        try:
            return self._connect_with(_lease_settings(self.lease, server_lease=_server_lease))
        except psycopg.OperationalError as exc:
            if not _server_lease or "idle_session_timeout" not in str(exc):
                raise
        _server_lease = False  # before PostgreSQL 14: TCP keepalives alone, said once
        log.warning(
            "this PostgreSQL has no idle_session_timeout (version 14): a leader cut off behind "
            "a proxy that keeps its socket open keeps its locks until that socket closes"
        )
        return self._connect_with(_lease_settings(self.lease, server_lease=False))

    def _connect_with(self, settings: dict[str, Any]) -> Any:
        # Not the store's pool: the lock lives exactly as long as this one connection.
        return connect_dedicated(self.config, f"flowstore leader {self.name}", **settings)

    def _try_advisory(self) -> bool:
        import psycopg

        try:
            if self._connection is None:
                self._connection = self._connect()
            sent = time.monotonic()
            got = self._query(self._call("pg_try_advisory_lock"), self.lease)
        except (psycopg.Error, OSError, _LockConnectionError):
            self._drop_connection()  # the server went away: a new connection on the next try
            return False
        if got != "t":
            return False
        self._confirmed, self._lost = sent, False
        self._beating = threading.Event()
        self._heartbeat = threading.Thread(
            target=self._beat, args=(self._beating,), name=f"flowstore-lease-{self.name}"
        )
        self._heartbeat.daemon = True
        self._heartbeat.start()
        return True

    def _call(self, function: str) -> str:
        """`SELECT function(key)`: an advisory lock function called with this lock's key."""
        return f"SELECT {function}({advisory_key(self.advisory_name)})"

    def _query(self, query: str, timeout: float) -> str | None:
        """The one value `query` returns on the lock's connection, answered within `timeout` s.

        Through libpq's asynchronous calls: a blocking execute would wait forever for a peer
        that acknowledges the query and never answers.
        """
        from psycopg import pq

        pgconn = self._connection.pgconn
        deadline = time.monotonic() + timeout
        pgconn.send_query(query.encode())
        while pgconn.flush():
            _wait_for(pgconn.socket, deadline, write=True)
        pgconn.consume_input()
        while pgconn.is_busy():
            _wait_for(pgconn.socket, deadline, write=False)
            pgconn.consume_input()
        value: str | None = None
        while (result := pgconn.get_result()) is not None:
            if result.status != pq.ExecStatus.TUPLES_OK:
                message = result.error_message.decode(errors="replace").strip()
                raise _LockConnectionError(message or str(result.status))
            raw = result.get_value(0, 0) if result.ntuples else None
            value = raw.decode() if raw is not None else None
        return value

    def _beat(self, stopping: threading.Event) -> None:
        """Ping the lock's connection every quarter lease; note the first ping that fails."""
        import psycopg

        while not stopping.wait(self.lease / 4):
            sent = time.monotonic()
            try:
                # Any query keeps the session busy. It has until three quarters of a lease after
                # the last answered ping was sent, when `check` gives up anyway, a quarter lease
                # before the server may release the lock: from the last answer, not from this
                # ping, so that a heartbeat woken late (a busy process) still says "lost" in time.
                self._query("SELECT 1", max(0.0, self._confirmed + self.lease * 3 / 4 - sent))
            except (psycopg.Error, OSError, _LockConnectionError) as exc:
                if not stopping.is_set():
                    log.warning("lost the %s lock: its connection failed (%s)", self.name, exc)
                    self._lost = True
                return
            self._confirmed = sent

    def check(self) -> bool:
        """Whether the lock is still held (PostgreSQL: its lease was renewed in time)."""
        if not self._held:
            return False
        if self._connection is None:
            return True
        # The server keeps the lock at least a lease after the last ping it answered was sent;
        # a quarter lease of margin covers one late heartbeat.
        if self._lost or time.monotonic() - self._confirmed > self.lease * 3 / 4:
            if not self._lost:
                log.warning("lost the %s lock: its lease was not renewed in time", self.name)
            self._held = False
            self._stop_heartbeat()
            self._drop_connection()  # the server releases the lock (or has already)
            return False
        return True

    def release(self) -> None:
        """Give the lock up (safe to call when not held)."""
        import psycopg

        if self._thread_lock is not None and self._held:
            self._thread_lock.release()
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        self._stop_heartbeat()
        if self._connection is not None and self._held and not self._lost:
            # Bounded: closing the connection releases the lock anyway.
            with contextlib.suppress(psycopg.Error, OSError, _LockConnectionError):
                self._query(self._call("pg_advisory_unlock"), self.lease / 4)
        self._held = False
        self._drop_connection()

    def _stop_heartbeat(self) -> None:
        beating, heartbeat = self._beating, self._heartbeat
        self._beating = self._heartbeat = None
        if beating is not None:
            beating.set()
        if heartbeat is not None and heartbeat is not threading.current_thread():
            heartbeat.join()  # at most one ping's timeout: the connection is free afterwards

    def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()


def _wait_for(fileno: int, deadline: float, *, write: bool) -> None:
    """Wait until the socket is ready, or raise `_LockConnectionError` at `deadline`."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _LockConnectionError("no answer in time")
    poller = select.poll()
    poller.register(fileno, select.POLLOUT if write else select.POLLIN)
    if not poller.poll(remaining * 1000):
        raise _LockConnectionError("no answer in time")


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
            if not lock.try_acquire():
                log.info("waiting to lead %s", lock.name)  # a standby, for a reader of the log
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
