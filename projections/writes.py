"""Writing a batch's rows: one statement per table, run with the driver's `executemany` or `COPY`
(PostgreSQL's upserts: one statement for all the rows, read from a JSON array).

The SQL is built once per table and kind of write from the table's definition (so a new table needs
nothing here), and the values go through SQLAlchemy's own bind processors for their column types:
the rows read back exactly as rows written through SQLAlchemy statements would, without the cost
of compiling and processing a statement per row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any, cast

import orjson
from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Connection,
    DateTime,
    Dialect,
    Float,
    Integer,
    String,
    Table,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.types import TypeEngine

from flowstore.projections.batch import INSERT, SUM, UPDATE, columns_of

__all__ = ["PreparedWrites", "RowWriter"]

_Processors = tuple[Callable[[dict[str, Any]], tuple[Any, ...]], Callable[[Any], Any] | None]


class PreparedWrites:
    """A batch's writes ready to send (`RowWriter.prepare`): statements with their parameters
    (and, for UPDATEs, the rows they must change), and (PostgreSQL) tables to COPY rows into,
    each with its rows' value tuples."""

    __slots__ = ("copies", "statements")

    def __init__(self) -> None:
        self.statements: list[tuple[str, Any, int | None]] = []
        self.copies: list[tuple[Table, list[Any]]] = []


class RowWriter:
    """Writes whole rows into tables: inserted, replacing the row at their key, or added to it."""

    def __init__(self, dialect: Dialect) -> None:
        self._dialect = dialect
        self._postgres = dialect.name == "postgresql"
        self._quote = dialect.identifier_preparer.quote
        self._marker = "%s" if self._postgres else "?"
        self._statements: dict[tuple[str, str], str] = {}
        self._set_statements: dict[tuple[str, str], str] = {}
        self._updates: dict[tuple[str, tuple[str, ...]], str] = {}
        self._processors: dict[tuple[str, tuple[str, ...] | None], _Processors] = {}

    def write_all(
        self, conn: Connection, writes: Sequence[tuple[Table, str, Sequence[dict[str, Any]]]]
    ) -> None:
        """Write a batch's rows, table by table: `(table, how, rows)` as `write` takes them.

        PostgreSQL: every table's rows in one statement each, all the statements in one pipeline
        (one round trip for the batch), except inserts of many rows, which go by COPY.
        """
        self.run(conn, self.prepare(writes))

    def prepare(
        self, writes: Sequence[tuple[Table, str, Sequence[dict[str, Any]]]]
    ) -> PreparedWrites:
        """What `write_all` sends for `writes`, without a connection: the statements and their
        parameters (tuples, or PostgreSQL's JSON documents), so that a writer holding a lock
        others wait for can prepare them before taking it (`run` then only sends them)."""
        prepared = PreparedWrites()
        for table, how, rows in writes:
            if how == UPDATE:
                if self._postgres:
                    raise ValueError("UPDATE rows are for SQLite (PostgreSQL upserts whole rows)")
                keys, _ = columns_of(table)
                names = (*(c for c in rows[0] if c not in keys), *keys)
                prepared.statements.append(
                    (self._update(table, names), self._values(table, rows, names), len(rows))
                )
            elif self._postgres and (how != INSERT or len(rows) <= _COPY_FROM):
                prepared.statements.append((*self._set_execution(table, how, rows), None))
            elif self._postgres:
                prepared.copies.append((table, self._values(table, rows)))
            else:
                statement = self._statement(table, how)
                prepared.statements.append((statement, self._values(table, rows), None))
        return prepared

    def run(self, conn: Connection, prepared: PreparedWrites) -> None:
        """Send what `prepare` made, in its order (PostgreSQL: the statements in one pipeline)."""
        if not self._postgres:
            for statement, values, changes in prepared.statements:
                changed = conn.exec_driver_sql(statement, values).rowcount
                if changes is not None and changed != changes:
                    # An UPDATE's rows were looked up as there: the tables moved under this
                    # batch. Fail it (the transaction rolls back; a catch-up reads them again).
                    raise RuntimeError(f"{changes - changed} of the rows to update are missing")
            return
        import psycopg  # PostgreSQL only: SQLite installs go without the driver

        if prepared.statements:
            driver: Any = conn.connection.driver_connection
            try:
                with driver.pipeline(), driver.cursor() as cursor:
                    for statement, document, _ in prepared.statements:
                        cursor.execute(statement, document, prepare=True)
            except psycopg.Error as exc:  # as SQLAlchemy raises it (storage_errors knows those)
                raise DBAPIError.instance(None, None, exc, psycopg.Error) from exc
        for table, values in prepared.copies:
            self._copy(conn, table, values)

    def write(
        self, conn: Connection, table: Table, how: str, rows: Sequence[dict[str, Any]]
    ) -> None:
        """Write `rows` (dicts holding every column of `table`) the way `how` says."""
        self.run(conn, self.prepare([(table, how, rows)]))

    def _set_execution(
        self, table: Table, how: str, rows: Sequence[dict[str, Any]]
    ) -> tuple[str, tuple[str]]:
        """PostgreSQL: every row in one statement that reads them from one JSON array.

        `executemany` would have the server parse and run one INSERT per row; this statement's
        text is the same for any number of rows (prepared once), and the rows go as one orjson
        document. The values stored are SQLAlchemy's (`test_row_writer`): JSON columns as JSON
        (None as JSON null, as SQLAlchemy's `JSON` writes it), integers exact (read as numeric:
        summed deltas such as 1.0), floats in their shortest exact form, timestamps with their
        offset. Rows must have distinct keys (PostgreSQL changes a row once per statement).
        """
        if (table.name, how) not in self._set_statements:
            self._set_statements[(table.name, how)] = self._set_statement(table, how)
        # Column names from SQLAlchemy are `quoted_name`s, a str subclass orjson must be let take.
        document = orjson.dumps(rows, option=orjson.OPT_NON_STR_KEYS).decode()
        return self._set_statements[(table.name, how)], (document,)

    def _set_statement(self, table: Table, how: str) -> str:
        q = self._quote
        name = q(table.name)
        columns = [q(c.name) for c in table.columns]
        forms = [_json_form(c, self._dialect) for c in table.columns]
        record = ", ".join(f"{c} {kind}" for c, (kind, _) in zip(columns, forms, strict=True))
        sql = (
            f"INSERT INTO {name} ({', '.join(columns)}) "
            f"SELECT {', '.join(read for _, read in forms)} "
            f"FROM json_to_recordset(%s::json) AS r({record})"
        )
        return sql if how == INSERT else sql + self._on_conflict(table, how)

    def _on_conflict(self, table: Table, how: str) -> str:
        """The upsert's clause: the row at the key replaced by the new one, or added to (SUM)."""
        q = self._quote
        name = q(table.name)
        keys, others = columns_of(table)
        sets = ", ".join(
            f"{q(c)} = {name}.{q(c)} + excluded.{q(c)}"
            if how == SUM
            else f"{q(c)} = excluded.{q(c)}"
            for c in others
        )
        return f" ON CONFLICT ({', '.join(q(k) for k in keys)}) DO UPDATE SET {sets}"

    def _copy(self, conn: Connection, table: Table, values: list[Any]) -> None:
        # COPY: the fastest way into PostgreSQL, and transactional like an INSERT.
        columns = ", ".join(self._quote(c.name) for c in table.columns)
        driver: Any = conn.connection.driver_connection
        with (
            driver.cursor() as cursor,
            cursor.copy(f"COPY {self._quote(table.name)} ({columns}) FROM STDIN") as copy,
        ):
            for row in values:
                copy.write_row(row)

    def _values(
        self, table: Table, rows: Sequence[dict[str, Any]], names: tuple[str, ...] | None = None
    ) -> list[Any]:
        """The rows as tuples in column order (or `names`' order), each value as SQLAlchemy would
        bind it, sorted by the primary key's first column: the inserts then walk the key's
        B-tree in order, each of its pages visited once per batch rather than once per row (a
        rebuild's history rows, a thousand users' interleaved, missed the page cache on every
        row once the table outgrew it). The sort is stable, so rows with the same first column
        keep the fold's order (one instance's history rows: its versions, in order); comparing
        one string rather than a tuple of the whole key makes it three times cheaper. (A SQLite
        rebuild fills its history table without the key, built at the swap: there the sort,
        about 0.1 µs a row, buys nothing.)"""
        found = self._processors.get((table.name, names))
        if found is None:
            found = self._processors[(table.name, names)] = self._tuple_of(table, names)
        as_tuple, key = found
        values = [as_tuple(row) for row in rows]
        if key is not None:
            values.sort(key=key)
        return values

    def _tuple_of(self, table: Table, only: tuple[str, ...] | None = None) -> _Processors:
        """A function from a row to its values' tuple, written out for the table's columns (or
        `only` those; a loop over the columns and their processors cost twice as much), and the
        key's getter."""
        names = list(only) if only is not None else [c.name for c in table.columns]
        processors = [_faster(table.c[name].type, self._dialect) for name in names]
        namespace: dict[str, Any] = {f"p{i}": p for i, p in enumerate(processors) if p}
        items = [
            f"p{i}(row[{name!r}])" if processor else f"row[{name!r}]"
            for i, (name, processor) in enumerate(zip(names, processors, strict=True))
        ]
        exec(f"def as_tuple(row): return ({', '.join(items)},)", namespace)  # our own code
        keys = [names.index(c.name) for c in table.primary_key.columns]
        return namespace["as_tuple"], itemgetter(keys[0]) if keys else None

    def _update(self, table: Table, names: tuple[str, ...]) -> str:
        """SQLite: set `names`' columns but the key, of the row at the key (`names`' last)."""
        if (table.name, names) not in self._updates:
            q = self._quote
            keys, _ = columns_of(table)
            sets = ", ".join(f"{q(c)} = ?" for c in names[: len(names) - len(keys)])
            where = " AND ".join(f"{q(k)} = ?" for k in keys)
            self._updates[(table.name, names)] = f"UPDATE {q(table.name)} SET {sets} WHERE {where}"
        return self._updates[(table.name, names)]

    def _statement(self, table: Table, how: str) -> str:
        if (table.name, how) not in self._statements:
            q = self._quote
            name = q(table.name)
            columns = [q(c.name) for c in table.columns]
            sql = (
                f"INSERT INTO {name} ({', '.join(columns)}) "
                f"VALUES ({', '.join([self._marker] * len(columns))})"
            )
            if how != INSERT:
                sql += self._on_conflict(table, how)
            self._statements[(table.name, how)] = sql
        return self._statements[(table.name, how)]


def _json_form(column: Column[Any], dialect: Dialect) -> tuple[str, str]:
    """PostgreSQL: (the type a column's JSON value is read as, the expression that stores it)."""
    kind = column.type
    read = f'r."{column.name}"'
    if isinstance(kind, JSON):  # JSON null, not SQL NULL, for None (as SQLAlchemy writes it)
        return "json", f"COALESCE({read}, 'null'::json)"
    if isinstance(kind, Integer):  # BigInteger too: numeric reads 1.0 and big integers exactly
        return "numeric", f"{read}::{kind.compile(dialect=dialect)}"
    if isinstance(kind, Float):
        return "double precision", read
    if isinstance(kind, Boolean | DateTime | String):  # Text too
        return kind.compile(dialect=dialect), read
    raise TypeError(f"no JSON form for column {column} of type {kind}")


_COPY_FROM = 1000
"""PostgreSQL: inserts of more rows than this go by COPY (a rebuild's pages); fewer (the live
path's batches) by one statement in the batch's pipeline, which COPY cannot join."""

_PROBE = datetime(1987, 6, 5, 4, 3, 2, 1, tzinfo=UTC)
_JSON_PROBES = (None, {"a": [1, 2.5, None, True, "é\"'"], "b": {}})


_TEXTS: dict[int, tuple[datetime, str]] = {}
"""Recent datetimes' SQLite text by the object's id (with the object, so that the id is not
another's while it is here): a transition's time is its state row's `updated_at` and
`entered_at` and its history row's `timestamp`, and a run's `started_at` is the same object in
each of its state rows."""


_DOT = ord(".")


def _sqlite_datetime(value: datetime | None) -> str | None:
    if value is None:
        return None
    found = _TEXTS.get(id(value))
    if found is not None and found[0] is value:
        return found[1]
    # SQLite's DATETIME text: the fields as they are, without the offset. orjson writes them
    # (RFC 3339, `"YYYY-MM-DDTHH:MM:SS.ffffff+HH:MM"`, without the fraction when it is zero) in
    # C, in half the time of `isoformat`'s parts; a zone orjson refuses gets those.
    try:
        json = orjson.dumps(value)
    except orjson.JSONEncodeError:
        text = f"{value.date().isoformat()} {value.time().isoformat('microseconds')}"
    else:
        if json[20] == _DOT:  # a fraction of a second
            text = json[1:27].replace(b"T", b" ", 1).decode()
        else:
            text = json[1:20].replace(b"T", b" ", 1).decode() + ".000000"
    if len(_TEXTS) >= 4096:
        _TEXTS.clear()
    _TEXTS[id(value)] = (value, text)
    return text


_BOOLEANS: dict[Any, Any] = {None: None, True: 1, False: 0}
"""A Boolean column's values as SQLite stores them (SQLAlchemy's bind processor on dialects
without a native boolean: `int` of a value that is None, True or False, else `TypeError`)."""


def _faster(column_type: TypeEngine[Any], dialect: Dialect) -> Callable[[Any], Any] | None:
    """The column type's bind processor, or a faster one that gives the same values.

    SQLite's DATETIME formats in Python, a tenth of a rebuild's time: `isoformat` writes the same
    text in C when the type keeps its default storage format (checked here on a probe value).
    Booleans without a native type (SQLite) become a lookup (checked on the three values).
    """
    processor = column_type.dialect_impl(dialect).bind_processor(dialect)
    if (
        processor is not None
        and dialect.name == "sqlite"
        and isinstance(column_type, DateTime)
        and processor(_PROBE) == _sqlite_datetime(_PROBE)
    ):
        return _sqlite_datetime
    if (
        processor is not None
        and isinstance(column_type, Boolean)
        and not dialect.supports_native_boolean
        and all(repr(processor(v)) == repr(_BOOLEANS[v]) for v in _BOOLEANS)
    ):
        # The same values (1 and 1.0 too, as `True`) and refusals (any other value, or one that
        # cannot be hashed) in one lookup in C rather than two Python calls per value.
        return _BOOLEANS.__getitem__
    serializer = getattr(dialect, "_json_serializer", None)
    if (
        processor is not None
        and serializer is not None
        and isinstance(column_type, JSON)
        and all(processor(value) == serializer(value) for value in _JSON_PROBES)
    ):
        # Rows hold plain data, never SQLAlchemy's null markers (all the wrapper adds): the
        # engine's serializer alone writes the same text, without a call around each value.
        return cast(Callable[[Any], Any], serializer)
    return processor
