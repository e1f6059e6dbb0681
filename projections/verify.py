"""Checking the read-model tables against the log, and rewriting exactly the rows that differ."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, delete, select

from flowstore.domain import DomainEvent
from flowstore.projections.batch import RowBatch, StateKey, columns_of
from flowstore.projections.queries import row_dict
from flowstore.projections.tables import ProjectionTables

__all__ = ["Difference", "EventPage", "Snapshot", "Verification"]

PAGE = 1000
"""Events read per page when replaying the log in memory."""

EventPage = Callable[[int, int], Sequence[tuple[int, DomainEvent]]]
"""Reads up to `limit` events with notification ids >= `start`: (start, limit) -> [(id, event)]."""

Snapshot = dict[str, dict[tuple[Any, ...], dict[str, Any]]]
"""Every row of every table: by table name, then by primary key (`Verification.snapshot`)."""


@dataclass(frozen=True)
class Difference:
    """One row where the tables disagree with the log (or, from `compare`, with the expected
    snapshot)."""

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


class Verification:
    """Verify, repair and recover for `SqlProjections` (a mixin: the runner provides the writes)."""

    tables: ProjectionTables
    _owned_position: int | None

    def _read(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError  # the runner's

    def _locked(self) -> AbstractContextManager[tuple[Connection, int]]:
        raise NotImplementedError  # the runner's: a transaction holding the tracking row

    def _apply(
        self, conn: Connection, tables: ProjectionTables, events: Sequence[tuple[int, DomainEvent]]
    ) -> RowBatch:
        raise NotImplementedError  # the runner's

    def _set_position(self, conn: Connection, position: int) -> None:
        raise NotImplementedError  # the runner's

    def expected(self, read: EventPage, up_to: int) -> RowBatch:
        """The tables as the log up to `up_to` says they should be (replayed in memory)."""
        batch = RowBatch()
        start = 1
        while events := read(start, PAGE):
            batch.apply_all(e for n, e in events if n <= up_to)
            if events[-1][0] >= up_to:
                break
            start = events[-1][0] + 1
        batch.forget_old()
        return batch

    def _expected_rows(self, batch: RowBatch) -> Snapshot:
        expected: Snapshot = {
            table.name: {} for table in self.tables.all
        }
        for table, _, rows in batch.rows(self.tables):
            keys, _ = columns_of(table)
            expected[table.name].update((tuple(r[k] for k in keys), r) for r in rows)
        return expected

    def snapshot(self) -> Snapshot:
        """Every row of every live table, keyed by table name and primary key."""
        with self._read() as conn:
            return self._actual_rows(conn)

    def _actual_rows(self, conn: Connection) -> Snapshot:
        actual: Snapshot = {}
        for table in self.tables.all:
            keys = [c.name for c in table.primary_key.columns]
            rows = (row_dict(r._mapping) for r in conn.execute(select(table)))
            actual[table.name] = {tuple(r[k] for k in keys): r for r in rows}
        return actual

    def compare(self, expected: Snapshot, actual: Snapshot) -> list[Difference]:
        """Every difference between two snapshots of the tables, as `verify` finds them.

        Floats are the same to within 1e-9 (relative): the sums in the counters are added in
        batches, and a rebuild, a catch-up and a replay group them differently, so their last
        bits may differ. Everything else is compared exactly. Compare a rebuild with the tables
        it replaced this way, not with `==`.
        """
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
            return self.compare(
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
                for d in self.compare(expected, self._actual_rows(conn))
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
                while more := read(position + 1, PAGE):
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
