"""The read models in SQL, the runner: the tables' layout and catch-up (exactly once).

Queries are in `flowstore.projections.queries`, verify/repair in `flowstore.projections.verify`,
rebuild/migrate in `flowstore.projections.rebuild`; `SqlProjections` puts them together over one
set of tables.

Exactly once: every batch of events is applied in one transaction that also moves the projection's
tracking row, and the tracking row is locked first (`SELECT ... FOR UPDATE` on PostgreSQL,
`BEGIN IMMEDIATE` on SQLite), so two processes catching up at once apply each event once between
them, and a crash between two batches leaves the tables exactly at the last committed position.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from datetime import datetime
from typing import Any, cast

import orjson
from sqlalchemy import (
    Connection,
    Engine,
    bindparam,
    delete,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

import flowstore.projections.tables as layouts
from flowstore.domain import DomainEvent
from flowstore.errors import ProjectionLayoutError
from flowstore.eventlog import UnreadableEvent, storage_errors
from flowstore.projections.batch import RowBatch, RowCache, StateKey, columns_of
from flowstore.projections.queries import Queries, percentile, row_dict
from flowstore.projections.rebuild import Rebuilds
from flowstore.projections.tables import (
    LAYOUT_ROW,
    QUARANTINE,
    TRACKING,
    UNREADABLE,
    ProjectionTables,
    define_tables,
    layout_of,
    tracking_name,
)
from flowstore.projections.verify import Difference, EventPage, Verification
from flowstore.projections.writes import PreparedWrites, RowWriter
from flowstore.storage import READ_ONLY, StorageConfig, make_engine, serialize_ddl

__all__ = [
    "Difference",
    "EventPage",
    "SqlProjections",
    "percentile",
]

PROJECTION = tracking_name(1)
"""The position's tracking row of layouts 1 and 2 (each later layout has its own: `tracking_name`)."""
_PAGE = 1000
_SQLITE_PAGE = 2000
"""SQLite's catch-up pages: a write transaction there costs less per event the more events it
holds. Each instance's state row (and its entries in five indexes) is rewritten once per
transaction however many of its events the page folds, and the commit writes each changed page
of the tables once: under a stream of batches (500 users' transitions each, the live projector
behind by a page or more), twice the page halves both per event (measured: ~4 CPU µs of the
projector's ~35 per transition). Readers wait no longer: a waiting reader is released when the
whole catch-up returns (`LiveProjector`), after as many pages as it takes to reach the log's end,
and a page only ends a catch-up sooner by coming back short. PostgreSQL keeps `_PAGE`: its live
pages go as one pipeline, and a page of more than `writes._COPY_FROM` rows would go by COPY."""


log = logging.getLogger(__name__)


def _json(value: Any) -> str:
    """JSON columns (payloads, metadata) written with orjson, like the events."""
    return orjson.dumps(value).decode()


class SqlProjections(Queries, Verification, Rebuilds):
    """The projection tables of one store, and everything that reads or writes them."""

    LAYOUT_CHECK_EVERY = 1.0
    """Seconds between two checks that the tables still have this code's layout."""

    def __init__(
        self,
        config: StorageConfig,
        engine: Engine | None = None,
        *,
        write_lock: AbstractContextManager[Any] | None = None,
        layout: int | None = None,
    ) -> None:
        self.tables = define_tables()
        self._env = config.env
        # Read at run time, not import time: a test stands for the next version by raising it.
        self.layout = layout if layout is not None else layouts.LAYOUT
        self.name = tracking_name(self.layout)
        self._found_layout: int | None = self.layout  # what the tables have, as last seen
        self._layout_checked_at = time.monotonic()
        self._lock = threading.RLock()
        # Taken only around our write transactions (the event log's, on SQLite: this process's
        # writers and the projector then take turns in Python rather than in SQLite's busy wait).
        self._write_lock: AbstractContextManager[Any] = write_lock or nullcontext()
        # The store's one engine (`flowstore.storage.make_engine`), or one of our own.
        self._owns_engine = engine is None
        self.engine = engine if engine is not None else make_engine(config)
        self._sqlite = self.engine.dialect.name == "sqlite"
        self._shared_connection = config.sqlalchemy_url is None
        self._insert = sqlite.insert if self._sqlite else postgresql.insert
        self._page = _SQLITE_PAGE if self._sqlite else _PAGE
        self._writer = RowWriter(self.engine.dialect)
        self._lookup_cache: dict[str, tuple[Any, Any]] = {}
        # Copies of the rows this process last wrote, valid while the tracking position is still
        # the one it set (then no other process has touched the tables): saves a read per event.
        self._rows = RowCache()
        self._owned_position: int | None = None
        # The lower bound each flow's old throughput rows were last deleted below (see _write).
        self._forgotten: dict[str, int] = {}
        self._rebuild_mutex = threading.Lock()
        mine = TRACKING.c.name == self.name
        self._read_position = select(TRACKING.c.position).where(mine)
        self._locking_position = self._read_position.with_for_update()
        self._move_position = update(TRACKING).where(mine).values(position=bindparam("position"))
        self._move_from = (
            update(TRACKING)
            .where(mine, TRACKING.c.position == bindparam("old"))
            .values(position=bindparam("new"))
        )
        self.create()

    def close(self) -> None:
        """Release connections (of an engine of our own; the store disposes of its engine)."""
        if self._owns_engine:
            self.engine.dispose()

    def abandon(self) -> None:
        """In a forked child: drop the parent's pooled connections without closing them (closing
        would end the parent's sessions too; SQLAlchemy's recipe for `fork`)."""
        if self._owns_engine:
            self.engine.dispose(close=False)

    @contextmanager
    def _read(self, *, check: bool = True) -> Iterator[Connection]:
        """A read-only connection; `check`: the tables must have this code's layout."""
        # A database that is down, or a pool with no connection free in time, is
        # StorageUnavailableError (HTTP 503), as it is for the log.
        with storage_errors(self._env, "reading the projection tables"):
            if self._shared_connection:
                with self._lock, self.engine.begin() as conn:
                    if check:
                        self._check_layout(conn)
                    yield conn
            else:
                # Readers never need the write lock: on SQLite their transactions begin deferred.
                with self.engine.connect().execution_options(**READ_ONLY) as conn:
                    if check:
                        self._check_layout(conn)
                    yield conn

    def _check_layout(self, conn: Connection) -> None:
        """Raise `ProjectionLayoutError` unless the tables have this code's layout.

        Looked up again at most every `LAYOUT_CHECK_EVERY` seconds while they had it (a
        migration by a newer version replaces them), and on every use while they did not
        (until someone migrates them).
        """
        now = time.monotonic()
        if self._found_layout == self.layout and now - self._layout_checked_at < (
            self.LAYOUT_CHECK_EVERY
        ):
            return
        self._found_layout = self._layout_in(conn)
        self._layout_checked_at = now
        if self._found_layout != self.layout:
            raise ProjectionLayoutError(self._found_layout, self.layout)

    def _layout_in(self, conn: Connection) -> int | None:
        """The tables' layout: 0 when incomplete, None when there are none this code knows of."""
        rows: dict[str, int] = dict(
            conn.execute(select(TRACKING.c.name, TRACKING.c.position)).all()
        )
        found: int | None = rows.get(LAYOUT_ROW)
        if found is None:  # before layouts were recorded
            positions = [layout for name in rows if (layout := layout_of(name)) is not None]
            found = max(positions, default=None)
        if found == self.layout and (self.name not in rows or self._incomplete(conn)):
            return 0
        return found

    def _incomplete(self, conn: Connection) -> bool:
        """Whether a table, column or index of this layout is missing."""
        found = inspect(conn)
        for table in self.tables.all:
            if not found.has_table(table.name):
                return True
            columns = {c["name"] for c in found.get_columns(table.name)}
            if not {c.name for c in table.columns} <= columns:
                return True
        return False

    def create(self) -> None:
        """Create the tables and their tracking rows where there are none; never drop any.

        Tables of another layout are left as they are, serving the processes that read it; this
        object then raises `ProjectionLayoutError` on every use until `migrate` replaces them.
        """
        with self._lock, self.engine.begin() as conn:
            serialize_ddl(conn)  # processes starting together on a new database
            TRACKING.metadata.create_all(conn)
            found = self._layout_in(conn)
            if found is None and not any(
                inspect(conn).has_table(table.name) for table in self.tables.all
            ):
                self.tables.metadata.create_all(conn)
                conn.execute(
                    self._insert(TRACKING)
                    .values(name=self.name, position=0)
                    .on_conflict_do_nothing(index_elements=["name"])
                )
                self._record_layout(conn)
                found = self.layout
            elif found is None:
                found = 0  # tables without a position row: older than layouts
            self._found_layout = found
            self._layout_checked_at = time.monotonic()
            if found != self.layout:
                log.warning("%s", ProjectionLayoutError(found, self.layout))

    def _record_layout(self, conn: Connection) -> None:
        conn.execute(
            self._insert(TRACKING)
            .values(name=LAYOUT_ROW, position=self.layout)
            .on_conflict_do_update(index_elements=["name"], set_={"position": self.layout})
        )

    # Catching up

    def position(self) -> int:
        """The notification id of the last event applied to the live tables."""
        with self._read() as conn:
            return self._position(conn, lock=False)

    def _position(self, conn: Connection, *, lock: bool) -> int:
        query = self._locking_position if lock and not self._sqlite else self._read_position
        position = conn.execute(query).scalar_one_or_none()
        if position is None:  # no row of ours: the tables have another layout
            self._found_layout = self._layout_in(conn)
            self._layout_checked_at = time.monotonic()
            raise ProjectionLayoutError(self._found_layout, self.layout)
        self._check_layout(conn)
        return int(position)

    @contextmanager
    def _locked(self) -> Iterator[tuple[Connection, int]]:
        """A transaction holding the tracking row: no other process moves the tables meanwhile."""
        with (
            storage_errors(self._env, "writing the projection tables"),
            self._lock,
            self._write_lock,
            self.engine.begin() as conn,
        ):
            yield conn, self._position(conn, lock=True)

    def catch_up(
        self,
        read: EventPage,
        *,
        page: int | None = None,
        projected: Callable[[int, int, int, int], None] | None = None,
        stop: threading.Event | None = None,
    ) -> int:
        """Apply every event after the tracking position, `page` events (by default
        `_SQLITE_PAGE` on SQLite, `_PAGE` elsewhere) a transaction; return the new position.
        Once `stop` is set, return after the batch in progress (a stopping worker with a long
        backlog ahead: the rest is for whoever leads next).

        Reading, decoding and folding a batch happen outside any write transaction (and outside
        the write lock): only writing the rows and moving the tracking row do. The write
        transaction moves the tracking row only from the position the batch was folded from
        (one conditional UPDATE, which also locks the row); if another catch-up moved it
        meanwhile, nothing is written, the fold is discarded and done again, so every event
        still counts exactly once. After a batch of its own, this process starts the next from
        where it left the tables without reading the position first: the conditional move
        catches any other writer. `projected(first, last, count, began_ns)` hears each committed
        batch (the store's observers: metrics, tracing).
        """
        if page is None:
            page = self._page
        while True:
            began = time.time_ns()
            with self._lock:
                position = self._owned_position
                if position is None:
                    with self._read() as conn:
                        position = self._position(conn, lock=False)
                    # Someone else may have moved the tables since our last batch: our copies
                    # of their rows may be stale.
                    self._rows.clear()
                events = read(position + 1, page)
                if not events:
                    if self._owned_position is not None:
                        return self.position()  # exact, even if another process moved further
                    return position
                with _LazyRead(self._read) as conn:
                    batch = self._fold(conn, self.tables, events, cache=self._rows)
                # The rows become statements' parameters before the write lock is taken: the
                # commands waiting for it then wait only while they are sent.
                prepared = self._prepare(self.tables, batch)
                new = events[-1][0]
                self._owned_position = None  # until the write transaction commits
                with self._writing() as conn:
                    moved = self._move(conn, position, new)
                    if moved:
                        self._write(conn, self.tables, batch, prepared)
                        self._name_unreadable(conn, cast(Sequence[tuple[int, object]], events))
                if not moved:
                    continue  # moved by another process (or the layout changed): read it again
                self._rows.keep(batch)
                self._owned_position = new
            if projected is not None:
                projected(events[0][0], new, len(events), began)
            if len(events) < page:  # the log's end: no need for another transaction to find it
                return new
            if stop is not None and stop.is_set():
                return new

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
        """A write transaction on the tables (this process's writers wait for the write lock)."""
        with (
            storage_errors(self._env, "writing the projection tables"),
            self._lock,
            self._write_lock,
            self.engine.begin() as conn,
        ):
            yield conn

    def _move(self, conn: Connection, old: int, new: int) -> bool:
        """Move the tracking row from `old` to `new` (locking it); False if it was not at `old`."""
        self._check_layout(conn)
        return bool(conn.execute(self._move_from, {"old": old, "new": new}).rowcount == 1)

    def _set_position(self, conn: Connection, position: int) -> None:
        conn.execute(self._move_position, {"position": position})

    def _apply(
        self,
        conn: Connection,
        tables: ProjectionTables,
        events: Sequence[tuple[int, DomainEvent]],
        cache: RowCache | None = None,
    ) -> RowBatch:
        batch = self._fold(conn, tables, events, cache)
        self._write(conn, tables, batch)
        self._name_unreadable(conn, cast(Sequence[tuple[int, object]], events))
        return batch

    def _fold(
        self,
        conn: Connection | _LazyRead,
        tables: ProjectionTables,
        events: Sequence[tuple[int, DomainEvent]],
        cache: RowCache | None = None,
    ) -> RowBatch:
        """The rows `events` change, folded from the rows `conn` reads (or `cache` holds)."""
        state_query, attempts_query = self._lookups(tables)

        def load_state(key: StateKey) -> dict[str, Any] | None:
            if cache is not None and (cache.complete or key in cache.states):
                return cache.states.get(key)
            found = conn.execute(state_query, {"user": key[0], "flow": key[1]}).first()
            return row_dict(found._mapping) if found else None

        def load_attempts(flow_id: str) -> int:
            if cache is not None and (cache.complete or flow_id in cache.attempts):
                return cache.attempts.get(flow_id, 0)
            return int(conn.execute(attempts_query, {"flow": flow_id}).scalar() or 0)

        return RowBatch(load_state, load_attempts).apply_all(event for _, event in events)

    def _name_unreadable(self, conn: Connection, events: Sequence[tuple[int, object]]) -> None:
        """Record the events of the batch that could not be read (contained reads mix them in)."""
        unreadable = [
            {
                "position": e.position,
                "originator_id": e.originator_id,
                "originator_version": e.originator_version,
                "detail": e.detail,
            }
            for _, e in events
            if isinstance(e, UnreadableEvent)
        ]
        if unreadable:  # skipped, so named: with the rows, in their transaction
            for row in unreadable:
                log.error(
                    "event %s (%s v%s) cannot be read; projections skip it: %s",
                    row["position"],
                    row["originator_id"],
                    row["originator_version"],
                    row["detail"],
                )
            conn.execute(self._insert(UNREADABLE).on_conflict_do_nothing(), unreadable)

    # Unreadable events

    def unreadable(self) -> list[dict[str, Any]]:
        """The events the projections skipped because they cannot be decoded, by position."""
        with self._read() as conn:
            rows = conn.execute(select(UNREADABLE).order_by(UNREADABLE.c.position))
            return [dict(r._mapping) for r in rows]

    def quarantine(self, position: int, reason: str, now: datetime) -> dict[str, Any] | None:
        """Move the event at `position` out of the log into `flowstore_quarantine`; None if absent.

        One transaction: the audit row (the stored bytes, why, when) and the delete commit
        together. Only the events table of this store's database is touched.
        """
        if self._shared_connection:
            return None  # memory:// has no events table here
        events, id_column = (
            ("stored_events", "rowid") if self._sqlite else ("flowstore_events", "notification_id")
        )
        with self._lock, self.engine.begin() as conn:
            found = conn.execute(
                text(
                    f"SELECT originator_id, originator_version, topic, state FROM {events} "
                    f"WHERE {id_column} = :position"
                ),
                {"position": position},
            ).first()
            if found is None:
                return None
            record = {
                "position": position,
                "originator_id": str(found.originator_id),
                "originator_version": found.originator_version,
                "topic": found.topic,
                "state": bytes(found.state),
                "reason": reason,
                "quarantined_at": now,
            }
            conn.execute(self._insert(QUARANTINE).on_conflict_do_nothing(), record)
            conn.execute(
                text(f"DELETE FROM {events} WHERE {id_column} = :position"), {"position": position}
            )
            conn.execute(delete(UNREADABLE).where(UNREADABLE.c.position == position))
        return record

    def _lookups(self, tables: ProjectionTables) -> tuple[Any, Any]:
        # Built once per table set: constructing SQLAlchemy expressions costs more than running them.
        name = tables.states.name
        if name not in self._lookup_cache:
            states, counters = tables.states, tables.counters
            self._lookup_cache[name] = (
                select(states).where(
                    states.c.user_id == bindparam("user"), states.c.flow_id == bindparam("flow")
                ),
                select(counters.c.attempts).where(counters.c.flow_id == bindparam("flow")),
            )
        return self._lookup_cache[name]

    def _prepare(self, t: ProjectionTables, batch: RowBatch) -> PreparedWrites:
        """The batch's rows as the writer sends them (no connection, no lock needed)."""
        return self._writer.prepare(list(batch.rows(t, changes=self._sqlite)))

    def _write(
        self,
        conn: Connection,
        t: ProjectionTables,
        batch: RowBatch,
        prepared: PreparedWrites | None = None,
    ) -> None:
        """Write `batch` (as `prepared` from it by `_prepare`, if it was)."""
        if batch.erased:  # first: rows of a new run after the erasure must stay
            erased = sorted(batch.erased)
            for table in t.all:
                if "instance_id" in table.c:
                    conn.execute(delete(table).where(table.c.instance_id.in_(erased)))
        if prepared is None:
            self._writer.write_all(conn, list(batch.rows(t, changes=self._sqlite)))
        else:
            self._writer.run(conn, prepared)
        for name, bounds in batch.forget_before.items():
            table = getattr(t, name)
            flow, second = (table.c[k] for k in columns_of(table)[0])
            oldest: dict[str, int] = {}
            for f, s in batch.sums[name]:
                oldest[f] = min(s, oldest.get(f, s))
            for flow_id, before in bounds.items():
                # Deleting is only needed when the bound moved (at most once an hour per flow) or
                # a late event wrote below it; otherwise the rows below it are already gone.
                key = f"{table.name}/{flow_id}"
                if self._forgotten.get(key) == before and oldest[flow_id] >= before:
                    continue
                conn.execute(delete(table).where(flow == flow_id, second < before))
                self._forgotten[key] = before


class _LazyRead:
    """A read connection opened on first use (a fold whose rows are all cached needs none)."""

    def __init__(self, connect: Callable[[], AbstractContextManager[Connection]]) -> None:
        self._connect = connect
        self._held = ExitStack()
        self._conn: Connection | None = None

    def __enter__(self) -> _LazyRead:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._held.__exit__(*exc)  # the read's own handling (storage errors) sees the exception

    def execute(self, statement: Any, parameters: Any = None) -> Any:
        """`Connection.execute` on the connection, opening it first if needed."""
        if self._conn is None:
            self._conn = self._held.enter_context(self._connect())
        return self._conn.execute(statement, parameters)
