"""The read models in SQL: catch-up (exactly once), rebuild with a swap, verify, repair, queries.

Exactly once: every batch of events is applied in one transaction that also moves the projection's
tracking row, and the tracking row is locked first (`SELECT ... FOR UPDATE` on PostgreSQL,
`BEGIN IMMEDIATE` on SQLite), so two processes catching up at once apply each event once between
them, and a crash between two batches leaves the tables exactly at the last committed position.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import (
    Connection,
    Engine,
    Table,
    and_,
    bindparam,
    create_engine,
    delete,
    distinct,
    event,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.pool import StaticPool

from flowstore.domain import DomainEvent
from flowstore.models import (
    FlowStateHistory,
    FlowStatistics,
    FlowStatus,
    FunnelStep,
    PerformanceMetrics,
    StepCount,
)
from flowstore.projections.batch import RowBatch, StateKey
from flowstore.projections.ops import ACTIVITY_COLUMNS
from flowstore.projections.tables import (
    LAYOUT,
    REBUILD_SUFFIX,
    TRACKING,
    ProjectionTables,
    define_tables,
)
from flowstore.storage import StorageConfig

__all__ = [
    "Difference",
    "EventPage",
    "SqlProjections",
    "percentile",
]

PROJECTION = "flowstore"
_LAYOUT_ROW = "flowstore.layout"
"""The tracking row whose `position` holds the tables' `LAYOUT` (not a log position)."""
_PAGE = 1000

EventPage = Callable[[int, int], Sequence[tuple[int, DomainEvent]]]
"""Reads up to `limit` events with notification ids >= `start`: (start, limit) -> [(id, event)]."""

log = logging.getLogger(__name__)


def percentile(samples: Sequence[float], q: float) -> float:
    """The nearest-rank q-th percentile (0 < q <= 100) of the samples; 0.0 when there are none."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


@dataclass(frozen=True)
class Difference:
    """One row where the tables disagree with the log."""

    table: str
    key: tuple[Any, ...]
    key_names: tuple[str, ...]
    problem: str
    """"missing row", "extra row" or "wrong <field>"."""
    expected: Any = None
    actual: Any = None

    def describe(self) -> str:
        """One readable line naming the row (user id and flow id where the table has them)."""
        where = ", ".join(f"{n}={k!r}" for n, k in zip(self.key_names, self.key, strict=True))
        text_ = f"{self.table} ({where}): {self.problem}"
        if self.problem.startswith("wrong"):
            text_ += f" (log says {self.expected!r}, table has {self.actual!r})"
        return text_


def _json(value: Any) -> str:
    """JSON columns (payloads, metadata) written with orjson, like the events."""
    return orjson.dumps(value).decode()


def _utc(value: Any) -> Any:
    # SQLite keeps no time zone: everything stored is UTC, so naive values read back are UTC.
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _row(mapping: Any) -> dict[str, Any]:
    return {k: _utc(v) for k, v in dict(mapping).items()}


class SqlProjections:
    """The projection tables of one store, and everything that reads or writes them."""

    def __init__(self, config: StorageConfig) -> None:
        self.tables = define_tables()
        self._lock = threading.RLock()
        if config.sqlalchemy_url is None:
            # memory:// keeps its tables in an in-process SQLite database on one shared connection.
            self.engine = create_engine(
                "sqlite://",
                poolclass=StaticPool,
                connect_args={"check_same_thread": False},
            )
        elif config.backend == "sqlite":
            self.engine = create_engine(
                config.sqlalchemy_url, connect_args={"timeout": 60}, json_serializer=_json
            )
        else:
            self.engine = create_engine(
                config.sqlalchemy_url, pool_pre_ping=True, json_serializer=_json
            )
        self._sqlite = self.engine.dialect.name == "sqlite"
        self._shared_connection = config.sqlalchemy_url is None
        # Readers never need the write lock: on a SQLite file they get an engine of their own.
        self._reader = (
            create_engine(self.engine.url, connect_args={"timeout": 60})
            if self._sqlite and not self._shared_connection
            else self.engine
        )
        if self._sqlite:
            _immediate_transactions(self.engine)
        self._insert = sqlite.insert if self._sqlite else postgresql.insert
        self._upserts: dict[tuple[str, bool], Any] = {}
        self._lookup_cache: dict[str, tuple[Any, Any]] = {}
        # Copies of the rows this process last wrote, valid while the tracking position is still
        # the one it set (then no other process has touched the tables): saves a read per event.
        self._rows = _RowCache()
        self._owned_position: int | None = None
        # The lower bound each flow's old throughput rows were last deleted below (see _write).
        self._forgotten: dict[str, int] = {}
        mine = TRACKING.c.name == PROJECTION
        self._read_position = select(TRACKING.c.position).where(mine)
        self._locking_position = self._read_position.with_for_update()
        self._move_position = update(TRACKING).where(mine).values(position=bindparam("position"))
        self.create()

    def close(self) -> None:
        """Release connections."""
        self._reader.dispose()
        self.engine.dispose()

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        if self._shared_connection:
            with self._lock, self.engine.begin() as conn:
                yield conn
        else:
            with self._reader.connect() as conn:
                yield conn

    def create(self) -> None:
        """Create the live tables and the tracking row if they are missing.

        Tables of an older layout (a table or column missing, or an older `LAYOUT` recorded) are
        dropped and the tracking position reset: the next catch-up rebuilds them from the log,
        which is what makes them disposable.
        """
        with self._lock, self.engine.begin() as conn:
            if self._outdated(conn):
                log.warning("projection tables have an older layout: rebuilding them from the log")
                self.tables.metadata.drop_all(conn)
                conn.execute(delete(TRACKING).where(TRACKING.c.name == PROJECTION))
            self.tables.metadata.create_all(conn)
            for table in self.tables.all:  # create_all adds no index to a table that exists
                for index in table.indexes:
                    index.create(conn, checkfirst=True)
            TRACKING.metadata.create_all(conn)
            conn.execute(
                self._insert(TRACKING)
                .values(name=PROJECTION, position=0)
                .on_conflict_do_nothing(index_elements=["name"])
            )
            conn.execute(
                self._insert(TRACKING)
                .values(name=_LAYOUT_ROW, position=LAYOUT)
                .on_conflict_do_update(index_elements=["name"], set_={"position": LAYOUT})
            )

    def _outdated(self, conn: Connection) -> bool:
        found = inspect(conn)
        existing = [table for table in self.tables.all if found.has_table(table.name)]
        if not existing:
            return False  # a new database
        if len(existing) < len(self.tables.all):
            return True
        for table in existing:
            columns = {c["name"] for c in found.get_columns(table.name)}
            if not {c.name for c in table.columns} <= columns:
                return True
        layout = None
        if found.has_table(TRACKING.name):
            query = select(TRACKING.c.position).where(TRACKING.c.name == _LAYOUT_ROW)
            layout = conn.execute(query).scalar()
        # Only older: a newer layout (written by a newer flowstore) is left alone, not fought over.
        return layout is None or layout < LAYOUT

    # Catching up

    def position(self) -> int:
        """The notification id of the last event applied to the live tables."""
        with self._read() as conn:
            return self._position(conn, lock=False)

    def _position(self, conn: Connection, *, lock: bool) -> int:
        query = self._locking_position if lock and not self._sqlite else self._read_position
        return int(conn.execute(query).scalar_one())

    @contextmanager
    def _locked(self) -> Iterator[tuple[Connection, int]]:
        """A transaction holding the tracking row: no other process moves the tables meanwhile."""
        with self._lock, self.engine.begin() as conn:
            yield conn, self._position(conn, lock=True)

    def catch_up(self, read: EventPage, *, page: int = _PAGE) -> int:
        """Apply every event after the tracking position; return the new position."""
        while True:
            with self._locked() as (conn, position):
                events = read(position + 1, page)
                if not events:
                    return position
                if position != self._owned_position:
                    # Someone else moved the tables since our last batch: our copies may be stale.
                    self._rows.clear()
                self._owned_position = None  # until this transaction commits
                batch = self._apply(conn, self.tables, events, cache=self._rows)
                self._set_position(conn, events[-1][0])
            self._rows.keep(batch)
            self._owned_position = events[-1][0]
            if len(events) < page:  # the log's end: no need for another transaction to find it
                return events[-1][0]

    def _set_position(self, conn: Connection, position: int) -> None:
        conn.execute(self._move_position, {"position": position})

    def _apply(
        self,
        conn: Connection,
        tables: ProjectionTables,
        events: Sequence[tuple[int, DomainEvent]],
        cache: _RowCache | None = None,
    ) -> RowBatch:
        state_query, attempts_query = self._lookups(tables)

        def load_state(key: StateKey) -> dict[str, Any] | None:
            if cache is not None and key in cache.states:
                return cache.states[key]
            found = conn.execute(state_query, {"user": key[0], "flow": key[1]}).first()
            return _row(found._mapping) if found else None

        def load_attempts(flow_id: str) -> int:
            if cache is not None and flow_id in cache.attempts:
                return cache.attempts[flow_id]
            return int(conn.execute(attempts_query, {"flow": flow_id}).scalar() or 0)

        batch = RowBatch(load_state, load_attempts).apply_all(event for _, event in events)
        self._write(conn, tables, batch)
        return batch

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

    def _upsert(self, table: Table, keys: list[str], *, add: bool) -> Any:
        cache_key = (table.name, add)
        if cache_key not in self._upserts:  # building the statement costs more than running it
            self._upserts[cache_key] = self._build_upsert(table, keys, add=add)
        return self._upserts[cache_key]

    def _build_upsert(self, table: Table, keys: list[str], *, add: bool) -> Any:
        stmt = self._insert(table)
        columns = [c.name for c in table.columns if c.name not in keys]
        values = {c: (table.c[c] + stmt.excluded[c]) if add else stmt.excluded[c] for c in columns}
        return stmt.on_conflict_do_update(index_elements=keys, set_=values)

    def _write(self, conn: Connection, t: ProjectionTables, batch: RowBatch) -> None:
        if batch.erased:  # first: rows of a new run after the erasure must stay
            erased = sorted(batch.erased)
            for table in (t.states, t.history):
                conn.execute(delete(table).where(table.c.instance_id.in_(erased)))
        states = [row for key in batch.dirty if (row := batch.states[key]) is not None]
        if states:
            conn.execute(self._upsert(t.states, ["user_id", "flow_id"], add=False), states)
        if batch.history:
            conn.execute(t.history.insert(), batch.history)
        rows: list[dict[str, Any]]
        if batch.counters:
            counters = [c.name for c in t.counters.columns if c.name != "flow_id"]
            rows = [
                {"flow_id": f, **{c: deltas.get(c, 0) for c in counters}}
                for f, deltas in batch.counters.items()
            ]
            conn.execute(self._upsert(t.counters, ["flow_id"], add=True), rows)
        if batch.steps:
            rows = [
                {
                    "flow_id": f,
                    "step": s,
                    **{c: d.get(c, 0) for c in ("entered", "moved_on", "dropped")},
                }
                for (f, s), d in batch.steps.items()
            ]
            conn.execute(self._upsert(t.steps, ["flow_id", "step"], add=True), rows)
        if batch.samples:
            rows = [
                {"flow_id": f, "slot": slot, "elapsed_ms": ms, "second": second}
                for (f, slot), (ms, second) in batch.samples.items()
            ]
            conn.execute(self._upsert(t.samples, ["flow_id", "slot"], add=False), rows)
        if batch.activity:
            rows = [
                {"flow_id": f, "minute": m, "step": s, **{c: d.get(c, 0) for c in ACTIVITY_COLUMNS}}
                for (f, m, s), d in batch.activity.items()
            ]
            conn.execute(self._upsert(t.activity, ["flow_id", "minute", "step"], add=True), rows)
        if batch.throughput:
            rows = [
                {"flow_id": f, "second": s, "attempts": n} for (f, s), n in batch.throughput.items()
            ]
            conn.execute(self._upsert(t.throughput, ["flow_id", "second"], add=True), rows)
            oldest = {f: min(s for g, s in batch.throughput if g == f) for f in batch.forget_before}
            for flow_id, before in batch.forget_before.items():
                # Deleting is only needed when the bound moved (at most once an hour per flow) or
                # a late event wrote below it; otherwise the rows below it are already gone.
                key = f"{t.throughput.name}/{flow_id}"
                if self._forgotten.get(key) == before and oldest[flow_id] >= before:
                    continue
                conn.execute(
                    delete(t.throughput).where(
                        t.throughput.c.flow_id == flow_id, t.throughput.c.second < before
                    )
                )
                self._forgotten[key] = before

    # Rebuild

    def rebuild(
        self,
        read: EventPage,
        *,
        page: int = 5000,
        progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Replay the whole log into fresh tables, then swap them in; return the events replayed.

        Memory stays bounded: each page is applied and committed before the next is read, and the
        copies of recent state rows kept between pages (only this rebuild writes the new tables, so
        they cannot go stale) are capped. Readers keep the old tables until the swap commits.
        """
        shadow = define_tables(REBUILD_SUFFIX)
        rows = _RowCache()
        with self._lock, self.engine.begin() as conn:
            shadow.metadata.drop_all(conn)
            shadow.metadata.create_all(conn)
        position, replayed = 0, 0
        while True:  # stream without holding the tracking lock: live writers carry on
            with self._lock, self.engine.begin() as conn:
                events = read(position + 1, page)
                if not events:
                    break
                rows.keep(self._apply(conn, shadow, events, cache=rows))
            position, replayed = events[-1][0], replayed + len(events)
            if progress:
                progress(replayed, position)
        with self._locked() as (conn, _):
            while events := read(position + 1, page):  # what arrived meanwhile
                rows.keep(self._apply(conn, shadow, events, cache=rows))
                position, replayed = events[-1][0], replayed + len(events)
            self._swap(conn, shadow)
            self._set_position(conn, position)
            self._owned_position = None
        if progress:
            progress(replayed, position)
        return replayed

    def _swap(self, conn: Connection, shadow: ProjectionTables) -> None:
        for live, new in zip(self.tables.all, shadow.all, strict=True):
            for index in new.indexes:
                conn.execute(text(f'DROP INDEX IF EXISTS "{index.name}"'))
            conn.execute(text(f'DROP TABLE IF EXISTS "{live.name}"'))
            conn.execute(text(f'ALTER TABLE "{new.name}" RENAME TO "{live.name}"'))
            for index in live.indexes:
                index.create(conn)

    # Verify and repair

    def expected(self, read: EventPage, up_to: int) -> RowBatch:
        """The tables as the log up to `up_to` says they should be (replayed in memory)."""
        batch = RowBatch()
        start = 1
        while events := read(start, _PAGE):
            batch.apply_all(e for n, e in events if n <= up_to)
            if events[-1][0] >= up_to:
                break
            start = events[-1][0] + 1
        batch.forget_old_throughput()
        return batch

    def _expected_rows(self, batch: RowBatch) -> dict[str, dict[tuple[Any, ...], dict[str, Any]]]:
        t = self.tables
        counters = [c.name for c in t.counters.columns if c.name != "flow_id"]
        return {
            t.states.name: {k: r for k, r in batch.states.items() if r is not None},
            t.history.name: {(r["user_id"], r["flow_id"], r["version"]): r for r in batch.history},
            t.counters.name: {
                (f,): {"flow_id": f, **{c: d.get(c, 0) for c in counters}}
                for f, d in batch.counters.items()
            },
            t.steps.name: {
                (f, s): {
                    "flow_id": f,
                    "step": s,
                    **{c: d.get(c, 0) for c in ("entered", "moved_on", "dropped")},
                }
                for (f, s), d in batch.steps.items()
            },
            t.samples.name: {
                (f, slot): {"flow_id": f, "slot": slot, "elapsed_ms": ms, "second": second}
                for (f, slot), (ms, second) in batch.samples.items()
            },
            t.activity.name: {
                (f, m, s): {
                    "flow_id": f,
                    "minute": m,
                    "step": s,
                    **{c: d.get(c, 0) for c in ACTIVITY_COLUMNS},
                }
                for (f, m, s), d in batch.activity.items()
            },
            t.throughput.name: {
                (f, s): {"flow_id": f, "second": s, "attempts": n}
                for (f, s), n in batch.throughput.items()
            },
        }

    def snapshot(self) -> dict[str, dict[tuple[Any, ...], dict[str, Any]]]:
        """Every row of every live table, keyed by table name and primary key."""
        with self._read() as conn:
            return self._actual_rows(conn)

    def _actual_rows(self, conn: Connection) -> dict[str, dict[tuple[Any, ...], dict[str, Any]]]:
        actual: dict[str, dict[tuple[Any, ...], dict[str, Any]]] = {}
        for table in self.tables.all:
            keys = [c.name for c in table.primary_key.columns]
            rows = (_row(r._mapping) for r in conn.execute(select(table)))
            actual[table.name] = {tuple(r[k] for k in keys): r for r in rows}
        return actual

    def _compare(
        self,
        expected: dict[str, dict[tuple[Any, ...], dict[str, Any]]],
        actual: dict[str, dict[tuple[Any, ...], dict[str, Any]]],
    ) -> list[Difference]:
        found: list[Difference] = []
        names = {t.name: tuple(c.name for c in t.primary_key.columns) for t in self.tables.all}
        for table, rows in expected.items():
            have = actual.get(table, {})
            keys = names[table]
            for key, row in rows.items():
                if key not in have:
                    found.append(Difference(table, key, keys, "missing row", row))
                    continue
                for column, value in row.items():
                    if not _same(value, have[key].get(column)):
                        found.append(
                            Difference(
                                table, key, keys, f"wrong {column}", value, have[key].get(column)
                            )
                        )
            found.extend(
                Difference(table, key, keys, "extra row", None, have[key])
                for key in have.keys() - rows.keys()
            )
        return found

    def verify(self, read: EventPage) -> list[Difference]:
        """Every difference between the tables and a replay of the log up to the tracking position."""
        with self._locked() as (conn, position):
            return self._compare(
                self._expected_rows(self.expected(read, position)), self._actual_rows(conn)
            )

    def repair(
        self, read: EventPage, *, user_id: str | None = None, flow_id: str | None = None
    ) -> list[Difference]:
        """Rewrite exactly the rows that differ (optionally only one user's / one flow's)."""
        with self._locked() as (conn, position):
            expected = self._expected_rows(self.expected(read, position))
            differences = [
                d
                for d in self._compare(expected, self._actual_rows(conn))
                if _concerns(d, user_id, flow_id)
            ]
            self._owned_position = None
            by_name = {t.name: t for t in self.tables.all}
            for difference in differences:
                table = by_name[difference.table]
                keys = [c.name for c in table.primary_key.columns]
                match = and_(*(table.c[k] == v for k, v in zip(keys, difference.key, strict=True)))
                conn.execute(delete(table).where(match))
                row = expected[difference.table].get(difference.key)
                if row is not None:
                    conn.execute(table.insert(), [row])
            return _dedupe(differences)

    def recover(
        self, key: StateKey, read_instance: Callable[[], Sequence[DomainEvent]], read: EventPage
    ) -> None:
        """Rewrite one instance's state and history rows from its own events.

        Under the tracking lock: catch up, read the instance's events, and make sure nothing new
        reached the log in between (else catch up again), so the rows written match the position.
        """
        t = self.tables
        with self._locked() as (conn, position):
            while True:
                while more := read(position + 1, _PAGE):
                    self._apply(conn, t, more)
                    position = more[-1][0]
                events = read_instance()
                if not read(position + 1, 1):
                    break
            self._set_position(conn, position)
            self._owned_position = None
            batch = RowBatch().apply_all(events)
            user, flow = key
            conn.execute(
                delete(t.states).where(t.states.c.user_id == user, t.states.c.flow_id == flow)
            )
            conn.execute(
                delete(t.history).where(t.history.c.user_id == user, t.history.c.flow_id == flow)
            )
            row = batch.states.get(key)
            if row is not None:
                conn.execute(t.states.insert(), [row])
            if batch.history:
                conn.execute(t.history.insert(), batch.history)

    # Queries

    def user_flows(self, user_id: str) -> list[dict[str, Any]]:
        """The user's live state rows (active or completed), oldest run first."""
        s = self.tables.states
        query = (
            select(s)
            .where(
                s.c.user_id == user_id, s.c.status.in_([FlowStatus.ACTIVE, FlowStatus.COMPLETED])
            )
            .order_by(s.c.started_at, s.c.flow_id)
        )
        with self._read() as conn:
            return [_row(r._mapping) for r in conn.execute(query)]

    def history(self, user_id: str, flow_id: str) -> list[FlowStateHistory]:
        """The instance's history rows, oldest first."""
        h = self.tables.history
        query = (
            select(h).where(h.c.user_id == user_id, h.c.flow_id == flow_id).order_by(h.c.version)
        )
        with self._read() as conn:
            rows = [_row(r._mapping) for r in conn.execute(query)]
        return [
            FlowStateHistory.model_validate(
                {k: v for k, v in r.items() if k not in ("version", "meta")}
                | {"metadata": r["meta"]}
            )
            for r in rows
        ]

    def expired(self, now: datetime) -> list[StateKey]:
        """(user_id, flow_id) of active instances whose expiry has passed."""
        s = self.tables.states
        query = select(s.c.user_id, s.c.flow_id).where(
            s.c.status == FlowStatus.ACTIVE, s.c.expires_at <= now
        )
        with self._read() as conn:
            return [(r.user_id, r.flow_id) for r in conn.execute(query)]

    def statistics(self, flow_id: str | None, *, now: datetime, window: float) -> FlowStatistics:
        """The seed's statistics, read from the counter tables (no history scan)."""
        t = self.tables

        def only(table: Table) -> Any:
            return table.c.flow_id == flow_id if flow_id is not None else True

        c = t.counters.c
        sums = select(
            *(
                func.coalesce(func.sum(col), 0)
                for col in (
                    c.started,
                    c.completed,
                    c.attempts,
                    c.rejections,
                    c.completed_duration_ms,
                    c.response_ms_total,
                )
            )
        ).where(only(t.counters))
        active = select(func.count(distinct(t.states.c.user_id))).where(
            t.states.c.status == FlowStatus.ACTIVE, only(t.states)
        )
        popular = (
            select(t.steps.c.step, func.sum(t.steps.c.entered).label("n"))
            .where(only(t.steps))
            .group_by(t.steps.c.step)
            .order_by(func.sum(t.steps.c.entered).desc(), t.steps.c.step)
        )
        now_second = int(now.timestamp())
        recent = select(func.coalesce(func.sum(t.throughput.c.attempts), 0)).where(
            only(t.throughput),
            t.throughput.c.second > now_second - window,
            t.throughput.c.second <= now_second,
        )
        with self._read() as conn:
            started, completed, attempts, rejections, duration, response = conn.execute(sums).one()
            steps = [StepCount(step=r.step, count=int(r.n)) for r in conn.execute(popular) if r.n]
            samples = list(
                conn.execute(select(t.samples.c.elapsed_ms).where(only(t.samples))).scalars()
            )
            return FlowStatistics(
                total_flows=int(started),
                active_users=int(conn.execute(active).scalar_one()),
                completion_rate=completed / started if started else 0.0,
                average_flow_duration=duration / completed if completed else 0.0,
                popular_steps=steps,
                error_rate=rejections / attempts if attempts else 0.0,
                performance_metrics=PerformanceMetrics(
                    average_response_time=response / attempts if attempts else 0.0,
                    p95_response_time=percentile(samples, 95),
                    throughput_per_second=int(conn.execute(recent).scalar_one()) / window,
                ),
            )

    def funnel(self, flow_id: str) -> list[FunnelStep]:
        """Per step: entered, moved on, dropped, and active now."""
        t = self.tables
        current = (
            select(t.states.c.step, func.count().label("n"))
            .where(t.states.c.flow_id == flow_id, t.states.c.status == FlowStatus.ACTIVE)
            .group_by(t.states.c.step)
        )
        counts = select(t.steps).where(t.steps.c.flow_id == flow_id)
        with self._read() as conn:
            now_at = {r.step: int(r.n) for r in conn.execute(current)}
            return [
                FunnelStep(
                    step=r.step,
                    entered=r.entered,
                    moved_on=r.moved_on,
                    dropped=r.dropped,
                    current=now_at.get(r.step, 0),
                )
                for r in conn.execute(counts)
            ]

    def table_names(self) -> list[str]:
        """Names of the tables that exist in the database (for tests and the console)."""
        return inspect(self.engine).get_table_names()

    def instances(self, flow_id: str, status: FlowStatus) -> list[dict[str, Any]]:
        """The flow's state rows with `status` (user_id, step, definition_version), by user id."""
        s = self.tables.states
        query = (
            select(s.c.user_id, s.c.step, s.c.definition_version)
            .where(s.c.flow_id == flow_id, s.c.status == status)
            .order_by(s.c.user_id)
        )
        with self._read() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def transition_counts(self, flow_id: str) -> dict[tuple[str, str], int]:
        """Accepted transitions of the flow so far, per (from_step, transition), all versions."""
        h = self.tables.history
        query = (
            select(h.c.from_step, h.c.transition, func.count().label("n"))
            .where(h.c.flow_id == flow_id, h.c.kind == "transition", h.c.success.is_(True))
            .group_by(h.c.from_step, h.c.transition)
        )
        with self._read() as conn:
            return {(r.from_step, r.transition): int(r.n) for r in conn.execute(query)}


class _RowCache:
    """The state rows and attempt counts as this process's last catch-up left them (bounded)."""

    LIMIT = 50_000

    def __init__(self) -> None:
        self.states: dict[StateKey, dict[str, Any] | None] = {}
        self.attempts: dict[str, int] = {}

    def clear(self) -> None:
        self.states.clear()
        self.attempts.clear()

    def keep(self, batch: RowBatch) -> None:
        if len(self.states) + len(batch.states) > self.LIMIT:
            self.states.clear()
        if batch.erased:  # copies of an erased instance's row under another user id are gone too
            for key, row in list(self.states.items()):
                if row is not None and row["instance_id"] in batch.erased:
                    self.states[key] = None
        self.states.update(batch.states)
        self.attempts.update(batch.attempts)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        # Sums added in different batch groupings differ in the last bits.
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return bool(a == b)


def _concerns(difference: Difference, user_id: str | None, flow_id: str | None) -> bool:
    key = difference.key
    if difference.table.startswith(("flow_states", "flow_history")):
        return (user_id is None or key[0] == user_id) and (flow_id is None or key[1] == flow_id)
    return user_id is None and (flow_id is None or key[0] == flow_id)


def _dedupe(differences: list[Difference]) -> list[Difference]:
    seen: set[tuple[str, tuple[Any, ...]]] = set()
    unique = []
    for d in differences:
        if (d.table, d.key) not in seen:
            seen.add((d.table, d.key))
            unique.append(d)
    return unique


def _immediate_transactions(engine: Engine) -> None:
    """Make SQLAlchemy's SQLite transactions real, and writers take the lock at BEGIN.

    pysqlite's own transaction handling starts transactions late and never for SELECT; SQLAlchemy's
    documented recipe hands control back to us. BEGIN IMMEDIATE takes the write lock up front, which
    is what makes reading the tracking row and moving it one atomic step.
    """

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _: Any) -> None:
        dbapi_connection.isolation_level = None
        # The tables are disposable and their tracking row commits with them: after a power cut
        # they can only be behind the log, never inconsistent, and the next catch-up fills the
        # gap. So these commits need WAL's atomicity but not an fsync each (the events keep FULL).
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
