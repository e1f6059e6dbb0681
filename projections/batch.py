"""Applies row changes to an in-memory batch: the one place events become table rows.

A `RowBatch` answers the two questions the fold asks (the instance's current state row, the flow's
attempt count) from what it has applied so far, falling back to a loader (the database) for rows it
has not seen. It accumulates the result by table; `flowstore.projections.sql` writes a batch in a
few statements per table. With loaders that know nothing, a batch fed the whole log *is* the
expected content of every table, which is how `verify` replays the log in memory.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from sqlalchemy import Table

from flowstore.codec import PlainEvent
from flowstore.domain import DomainEvent
from flowstore.projections.ops import ACTIVITY_SPANS, ATTEMPT_KINDS, INSTANCE_KINDS, fold
from flowstore.projections.tables import ProjectionTables

__all__ = ["INSERT", "PUT", "SUM", "UPDATE", "RowBatch", "RowCache", "StateKey", "columns_of"]

StateKey = tuple[str, str]
"""(user_id, flow_id)"""

INSERT, PUT, SUM, UPDATE = "insert", "put", "sum", "update"
"""How a batch's rows of a table reach it: inserted (facts), replacing the row at their key, added
to it (counters), or (UPDATE, `RowBatch.rows` with `changes`) only some columns of a row known to
be there set (each row then holds the key and those columns, the same ones in every row)."""

_KEYS: dict[Table, tuple[list[str], list[str]]] = {}


def columns_of(table: Table) -> tuple[list[str], list[str]]:
    """The primary key's columns and the others, in table order."""
    if table not in _KEYS:
        keys = [c.name for c in table.primary_key.columns]
        _KEYS[table] = (keys, [c.name for c in table.columns if c.name not in keys])
    return _KEYS[table]


def _no_state(_: StateKey) -> dict[str, Any] | None:
    return None


def _no_attempts(_: str) -> int:
    return 0


class RowBatch:
    """Row changes accumulated from a run of events (a `flowstore.projections.ops.RowChanges`)."""

    def __init__(
        self,
        load_state: Callable[[StateKey], dict[str, Any] | None] = _no_state,
        load_attempts: Callable[[str], int] = _no_attempts,
    ) -> None:
        self._load_state = load_state
        self._load_attempts = load_attempts
        self.states: dict[StateKey, dict[str, Any] | None] = {}
        self.loaded: dict[StateKey, dict[str, Any] | None] = {}
        """The state rows as the tables held them before this batch (those it looked up)."""
        self.dirty: set[StateKey] = set()
        self.erased: set[str] = set()
        """Ids of instances whose rows written before this batch must go (before its own rows)."""
        self.inserted: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
        self.sums: defaultdict[str, dict[tuple[Any, ...], dict[str, float]]] = defaultdict(dict)
        # `add_spans`' changes summed by second, spread over their buckets when read (`settle`):
        # a batch's events come a few hundred to the second, so this is one add each, not two.
        self._by_second: defaultdict[str, dict[tuple[str, int, Any], dict[str, float]]] = (
            defaultdict(dict)
        )
        # How many times `repeat` was given each call (in a list: counting in place finds the
        # call's key, which hashes each of its parts, once rather than twice).
        self._repeats: dict[tuple[Callable[..., None], tuple[Any, ...]], list[int]] = {}
        self.puts: defaultdict[str, dict[tuple[Any, ...], dict[str, Any]]] = defaultdict(dict)
        self.forget_before: defaultdict[str, dict[str, int]] = defaultdict(dict)
        """table -> flow_id -> the second below which its rows go"""
        self._attempts: dict[str, int] = {}
        self._key: StateKey = ("", "")
        self.events = 0

    def state(self, key: StateKey) -> dict[str, Any] | None:
        """The current state row of an instance, as far as this batch knows."""
        if key not in self.states:
            self.states[key] = self.loaded[key] = self._load_state(key)
        return self.states[key]

    def apply(self, event: DomainEvent | PlainEvent) -> None:
        """Fold one decoded event (or one read as plain data) into the batch."""
        if type(event) is tuple:
            self.apply_fields(*event)
        else:
            self.apply_fields(type(event).__name__, event.__dict__)

    def apply_fields(self, kind: str, event: Mapping[str, Any]) -> None:
        """Fold one event given as plain data: its class name and its fields."""
        self.events += 1
        if kind not in INSTANCE_KINDS:
            return
        flow = event["flow_id"]
        key = self._key = (event["user_id"], flow)
        attempts = 0
        if kind in ATTEMPT_KINDS:
            if flow not in self._attempts:
                self._attempts[flow] = self._load_attempts(flow)
            attempts = self._attempts[flow]
            self._attempts[flow] = attempts + 1
        states = self.states
        fold(kind, event, states[key] if key in states else self.state(key), attempts, self)

    def apply_all(self, events: Iterable[DomainEvent | PlainEvent]) -> RowBatch:
        """Fold many events; returns self."""
        for event in events:
            self.apply(event)
        return self

    # RowChanges

    def put_state(self, row: dict[str, Any]) -> None:
        """Replace the instance's state row."""
        self.states[self._key] = row
        self.dirty.add(self._key)

    def erase(self, instance_id: str) -> None:
        """Forget the instance's rows: its state (under any user id) and its history."""
        self.erased.add(instance_id)
        for known, copy in self.states.items():
            if known == self._key or (copy is not None and copy["instance_id"] == instance_id):
                self.states[known] = None
                self.dirty.add(known)
        for table, rows in self.inserted.items():
            self.inserted[table] = [r for r in rows if r.get("instance_id") != instance_id]

    def insert(self, table: str, row: dict[str, Any]) -> None:
        """Insert a row."""
        self.inserted[table].append(row)

    def add(self, table: str, key: tuple[Any, ...], deltas: Mapping[str, float]) -> None:
        """Add to the row at `key`."""
        _add(self.sums[table], key, deltas)

    def add_spans(
        self, table: str, flow_id: str, second: int, last: Any, deltas: Mapping[str, float]
    ) -> None:
        """Add to the rows of the buckets holding `second` (summed by second until `settle`)."""
        _add(self._by_second[table], (flow_id, second, last), deltas)

    def repeat(self, changes: Callable[..., None], *key: Any) -> None:
        """Make `changes(self, times, *key)` when the batch settles (`times`: the calls alike)."""
        call = (changes, key)
        times = self._repeats.get(call)
        if times is None:
            self._repeats[call] = [1]
        else:
            times[0] += 1

    def settle(self) -> None:
        """Make the changes `repeat` was given, and spread the changes `add_spans` summed by
        second over their buckets' rows in `sums`."""
        if self._repeats:
            repeats, self._repeats = self._repeats, {}
            for (changes, key), (times,) in repeats.items():
                changes(self, times, *key)
        for table, seconds in self._by_second.items():
            for (flow, second, last), deltas in seconds.items():
                for span in ACTIVITY_SPANS:
                    self.add(table, (flow, span, second - second % span, last), deltas)
        self._by_second.clear()

    def put(self, table: str, key: tuple[Any, ...], row: dict[str, Any]) -> None:
        """Replace the row at `key`."""
        self.puts[table][key] = row

    def forget(self, table: str, flow_id: str, before: int) -> None:
        """Rows of `flow_id` below `before` (their second) go."""
        bounds = self.forget_before[table]
        bounds[flow_id] = max(before, bounds.get(flow_id, before))

    # Reading the result

    def rows(
        self, tables: ProjectionTables, *, changes: bool = False
    ) -> Iterator[tuple[Table, str, list[dict[str, Any]]]]:
        """Every table's rows of this batch as whole rows: (table, INSERT | PUT | SUM, rows).

        `changes`: a state row the tables hold (as looked up, and not erased by this batch) comes
        as an UPDATE of the columns that changed (by groups of rows changing the same columns),
        and not at all when none did: a run's next step changes a few of its eighteen columns,
        and rewriting the others would rewrite their index entries (five indexes) too.
        """
        self.settle()
        states = [row for key in self.dirty if (row := self.states[key]) is not None]
        updates: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        if changes and self.loaded:
            states, updates = self._changes(tables.states, states)
        if states:
            yield tables.states, PUT, states
        for group in updates.values():
            yield tables.states, UPDATE, group
        for name, facts in self.inserted.items():
            if facts:
                yield getattr(tables, name), INSERT, facts
        for name, changed in self.puts.items():
            table = getattr(tables, name)
            put, _ = _whole_rows(table)
            yield table, PUT, [put(k, r) for k, r in changed.items()]
        for name, sums in self.sums.items():
            table = getattr(tables, name)
            _, summed = _whole_rows(table)
            yield table, SUM, [summed(k, d) for k, d in sums.items()]

    def _changes(
        self, table: Table, states: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], dict[tuple[str, ...], list[dict[str, Any]]]]:
        """The state rows to write whole, and the others' changed columns by the columns."""
        keys, _ = columns_of(table)
        changed_in = _changed_columns(table)
        whole: list[dict[str, Any]] = []
        updates: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        loaded, erased = self.loaded, self.erased
        for row in states:
            old = loaded.get((row["user_id"], row["flow_id"]))
            if old is None or old["instance_id"] in erased:  # not in the tables (or deleted)
                whole.append(row)
                continue
            changed = changed_in(row, old)
            if changed:
                update = {k: row[k] for k in keys}
                for c in changed:
                    update[c] = row[c]
                updates.setdefault(changed, []).append(update)
        return whole, updates

    def forget_old(self) -> None:
        """Drop summed rows that fell out of their retention window (in-memory replays)."""
        self.settle()
        for name, bounds in self.forget_before.items():
            sums = self.sums[name]
            for key in [k for k in sums if k[1] < bounds.get(k[0], k[1])]:
                del sums[key]

    @property
    def history(self) -> list[dict[str, Any]]:
        """The `flow_history` rows of this batch."""
        return self.inserted["history"]

    @property
    def attempts(self) -> dict[str, int]:
        """Each flow's attempt count after this batch (for the flows it touched)."""
        return self._attempts

    @property
    def empty(self) -> bool:
        """True when no event changed any row."""
        return not (
            self.dirty
            or self.erased
            or any(self.inserted.values())
            or any(self.sums.values())
            or any(self._by_second.values())
            or bool(self._repeats)
            or any(self.puts.values())
        )


def _add(rows: dict[Any, dict[str, float]], key: Any, deltas: Mapping[str, float]) -> None:
    """Add `deltas` to the counters of `rows[key]` (a new row starts at zero)."""
    found = rows.get(key)
    if found is None:
        rows[key] = dict(deltas)
    else:
        for name, delta in deltas.items():
            found[name] = found.get(name, 0) + delta


_WholeRow = Callable[[tuple[Any, ...], Mapping[str, Any]], dict[str, Any]]
_WHOLE: dict[Table, tuple[_WholeRow, _WholeRow]] = {}


def _whole_rows(table: Table) -> tuple[_WholeRow, _WholeRow]:
    """Functions from (key, columns) to the whole row: a put's (its columns), and a sum's (the
    deltas, 0 for columns without one), written out for the table's columns."""
    if table not in _WHOLE:
        keys, others = columns_of(table)
        key = ", ".join(f"{k!r}: key[{i}]" for i, k in enumerate(keys))
        summed = ", ".join(f"{c!r}: get({c!r}, 0)" for c in others)
        namespace: dict[str, Any] = {}
        exec(  # our own code
            f"def put(key, row): return {{{key}, **row}}\n"
            f"def summed(key, deltas):\n    get = deltas.get\n    return {{{key}, {summed}}}",
            namespace,
        )
        _WHOLE[table] = (namespace["put"], namespace["summed"])
    return _WHOLE[table]


_EXACT = (str, int, bool)
"""Values whose `==` means the same stored value (unlike floats, 1 == 1.0 and -0.0 == 0.0, or
datetimes, equal in two time zones, or JSON documents, {"n": 1} == {"n": 1.0}): other values
count as unchanged only when they are the very object the row held."""

_CHANGED: dict[Table, Callable[[dict[str, Any], dict[str, Any]], tuple[str, ...]]] = {}


def _changed_columns(table: Table) -> Callable[[dict[str, Any], dict[str, Any]], tuple[str, ...]]:
    """A function from (new row, old row) to the non-key columns whose stored value changed,
    written out for the table's columns (a loop over them costs twice as much)."""
    if table not in _CHANGED:
        _, others = columns_of(table)
        lines = ["def changed(n, o):", "    found = []"]
        for c in others:
            lines += [
                f"    a, b = n[{c!r}], o[{c!r}]",
                "    if a is not b and not (type(a) is type(b) and type(a) in exact and a == b):",
                f"        found.append({c!r})",
            ]
        namespace: dict[str, Any] = {"exact": _EXACT}
        exec("\n".join([*lines, "    return tuple(found)"]), namespace)  # our own code
        _CHANGED[table] = namespace["changed"]
    return _CHANGED[table]


class RowCache:
    """The state rows and attempt counts as this process's last catch-up left them (bounded)."""

    LIMIT = 50_000

    def __init__(self) -> None:
        self.states: dict[StateKey, dict[str, Any] | None] = {}
        self.attempts: dict[str, int] = {}
        self.complete = False
        """Whether the tables hold no row these copies lack (a rebuild's, until the first
        overflow): a row not here then need not be looked for."""

    def clear(self) -> None:
        """Forget every copy (another process may have changed the rows)."""
        self.states.clear()
        self.attempts.clear()
        self.complete = False

    def keep(self, batch: RowBatch) -> None:
        """Keep the rows as `batch` left them (all dropped first when they would exceed LIMIT)."""
        if len(self.states) + len(batch.states) > self.LIMIT:
            self.states.clear()
            self.complete = False
        if batch.erased:  # copies of an erased instance's row under another user id are gone too
            for key, row in list(self.states.items()):
                if row is not None and row["instance_id"] in batch.erased:
                    self.states[key] = None
        self.states.update(batch.states)
        self.attempts.update(batch.attempts)
