"""Durable followers: `FlowStore.follow(name, handler)` applies every event of the log exactly once.

A follower reads the log in order from its own position (a row of `flowstore_followers` in the
store's database) and, for each event, opens one transaction on that database, calls
`handler(event, connection)` and moves its position in the same transaction. The handler writes the
application's own rows through `connection`: the rows and the position commit together or not at
all, so after a crash (kill -9 included) the follower resumes at the first event whose effect did
not commit, and each event's effect lands exactly once. Effects outside the database (an email)
are at least once: make them idempotent by the event's id, or record them through `connection`.

One follower of a name is active at a time: a PostgreSQL advisory lock or a lock file beside the
SQLite database (`flowstore.leader`); another process following the same name waits as a standby.
A handler that raises rolls its transaction back; the follower logs it and tries the same event
again after a pause (a poisoned event holds the follower up rather than being skipped).
"""

from __future__ import annotations

import inspect
import logging
import re
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    DateTime,
    Engine,
    MetaData,
    String,
    Table,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from flowstore.domain import DomainEvent
from flowstore.errors import FollowerBusyError, InvalidArgumentError, StorageConfigError
from flowstore.leader import LeaderLock
from flowstore.storage import StorageConfig, make_engine

__all__ = ["FOLLOWERS", "FollowHandler", "Follower", "ReadLog"]

_log = logging.getLogger(__name__)

FollowHandler = Callable[[DomainEvent, Connection], object]
"""`handler(event, connection)`: apply one event; write through `connection` (no commit)."""

ReadLog = Callable[[int, int], list[tuple[int, DomainEvent]]]
"""`read(start, limit)`: a page of the log, as `FlowStore.read_events` gives it."""

_metadata = MetaData()
FOLLOWERS = Table(
    "flowstore_followers",
    _metadata,
    Column("name", String(128), primary_key=True),
    Column("position", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
"""One row per follower: the notification id of the last event whose effect committed."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_MAX_PAUSE = 5.0


def _engine(config: StorageConfig) -> Engine:
    if config.sqlalchemy_url is None:
        raise StorageConfigError(
            "A follower keeps its position in the database: use sqlite:/// or postgresql://, "
            "not memory://",
            url=config.display,
        )
    # An engine of its own, of one connection: the follower holds a transaction open while its
    # handler runs, which must not take a connection from the store's pool. `make_engine` gives
    # BEGIN IMMEDIATE on SQLite (reading the position, the handler's writes and moving the
    # position are one atomic step) and the URL's schema as PostgreSQL's search path.
    return make_engine(config, pool_size=1)


class Follower:
    """Applies the log's events to `handler` once each, in order, from its own durable position."""

    def __init__(
        self,
        config: StorageConfig,
        read: ReadLog,
        name: str,
        handler: FollowHandler,
        *,
        page: int = 100,
        interval: float = 0.2,
    ) -> None:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidArgumentError(
                "name", name, "1-128 letters, digits or . _ : - (starting with a letter or digit)"
            )
        if not callable(handler):
            raise InvalidArgumentError("handler", handler, "a callable (event, connection)")
        if inspect.iscoroutinefunction(handler):
            # Called here it would return a coroutine nobody awaits: the position would move on
            # with no effect written.
            raise InvalidArgumentError(
                "handler", handler, "a coroutine function: use AsyncFlowStore.follow"
            )
        self.name = name
        self.handler = handler
        self._read = read
        self._page = page
        self._interval = interval
        self._engine = _engine(config)
        schema = config.env.get("POSTGRES_SCHEMA", "")
        self.lock = LeaderLock(
            config, f"follow-{name}", advisory_name=f"flowstore.follower:{schema}:{name}"
        )
        """Held while this follower is the active one of its name."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        with self._engine.begin() as conn:
            _metadata.create_all(conn, checkfirst=True)

    # Position

    def position(self) -> int:
        """The notification id of the last event applied (0 before the first)."""
        with self._engine.connect() as conn:
            found = conn.execute(select(FOLLOWERS.c.position).where(FOLLOWERS.c.name == self.name))
            return int(found.scalar() or 0)

    def _ensure_row(self) -> None:
        try:
            with self._engine.begin() as conn:
                if conn.execute(
                    select(FOLLOWERS.c.name).where(FOLLOWERS.c.name == self.name)
                ).first():
                    return
                row = {"name": self.name, "position": 0, "updated_at": datetime.now(UTC)}
                conn.execute(insert(FOLLOWERS).values(**row))
        except IntegrityError:
            pass  # created meanwhile by another process

    # Applying events

    def _apply(self, position: int, event: DomainEvent, after: int) -> bool:
        """Apply one event in one transaction; False if the position moved since `after`."""
        mine = FOLLOWERS.c.name == self.name
        with self._engine.begin() as conn:
            current = conn.execute(select(FOLLOWERS.c.position).where(mine).with_for_update())
            if int(current.scalar() or 0) != after:
                return False  # another follower got here (the lock was lost): read again
            result = self.handler(event, conn)
            if inspect.isawaitable(result):  # an async handler in disguise (a partial, say)
                if inspect.iscoroutine(result):
                    result.close()
                raise TypeError(f"follower {self.name!r}: the handler returned an awaitable")
            moved = (
                update(FOLLOWERS)
                .where(mine)
                .values(position=position, updated_at=datetime.now(UTC))
            )
            conn.execute(moved)
        return True

    def catch_up(self) -> int:
        """Apply every event the log holds now; return how many (the lock must be free or ours)."""
        if not self.lock.try_acquire():
            raise FollowerBusyError(self.name)
        self._ensure_row()
        applied = 0
        while not self._stop.is_set():
            done = self.position()
            page = self._read(done + 1, self._page)
            if not page:
                return applied
            for position, change in page:
                if self._stop.is_set():
                    break
                if not self.lock.check():
                    raise FollowerBusyError(self.name)
                if not self._apply(position, change, done):
                    break
                done = position
                applied += 1
        return applied

    # Running

    def run(self) -> None:
        """Wait to be the active follower of the name, then follow the log until `stop()`."""
        if not self.lock.acquire(self._stop, poll=self._interval):
            return
        failures = 0
        try:
            while not self._stop.is_set():
                try:
                    applied = self.catch_up()
                except FollowerBusyError:
                    _log.warning("follower %r lost its lock; waiting for it again", self.name)
                    if not self.lock.acquire(self._stop, poll=self._interval):
                        return
                    continue
                except Exception:
                    failures += 1
                    _log.exception("follower %r failed; retrying the same event", self.name)
                    self._stop.wait(min(self._interval * 2**failures, _MAX_PAUSE))
                    continue
                failures = 0
                if not applied:
                    self._stop.wait(self._interval)
        finally:
            self.lock.release()

    def halt(self) -> None:
        """Ask `run()` or `catch_up()` to return after the event being applied (signal-safe)."""
        self._stop.set()

    def start(self) -> Follower:
        """Run in a background (daemon) thread; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self.run, name=f"flowstore-follow-{self.name}", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop after the event being applied (it commits or rolls back whole) and release."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self.lock.release()
        self._engine.dispose()

    def __enter__(self) -> Follower:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
