"""Set-based row writes: one statement per table, whatever the number of rows (both backends).

SQLAlchemy's `executemany` binds every row in Python (JSON columns serialised, SQLite's datetimes
formatted, one parameter set each) and, on PostgreSQL, sends one INSERT per row for the server to
run. Here a table's rows go as one JSON document (orjson, in C) that the statement reads back as
rows: `INSERT ... SELECT ... FROM json_to_recordset(?)` on PostgreSQL, `FROM json_each(?)` on
SQLite, `ON CONFLICT ... DO UPDATE` for upserts. Its text is the same for any number of rows, so it
is prepared once. What is stored is what SQLAlchemy's executemany stores (`test_write_path`
compares them): JSON columns as JSON (Python None as JSON null, as SQLAlchemy's `JSON` writes
it), integers exact (the counters' deltas are floats such as 1.0), floats in their shortest exact
form, timestamps with their offset on PostgreSQL and in SQLAlchemy's own text form on SQLite.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import JSON, Boolean, Column, Connection, DateTime, Float, Integer, String, Table
from sqlalchemy.engine import Dialect

__all__ = ["SetRows"]


def _pg_form(column: Column[Any], dialect: Dialect) -> tuple[str, str]:
    """PostgreSQL: (type the JSON value is read as, expression that stores it in the column)."""
    kind = column.type
    name = f'r."{column.name}"'
    if isinstance(kind, JSON):  # JSON null, not SQL NULL, for None (as SQLAlchemy writes it)
        return "json", f"COALESCE({name}, 'null'::json)"
    if isinstance(kind, Boolean):
        return "boolean", name
    if isinstance(kind, Integer):  # BigInteger too; numeric reads 1.0 and big ints exactly
        return "numeric", f"{name}::{kind.compile(dialect=dialect)}"
    if isinstance(kind, Float):
        return "double precision", name
    if isinstance(kind, DateTime | String):  # Text too
        return kind.compile(dialect=dialect), name
    raise TypeError(f"no JSON form for column {column} of type {kind}")


def _sqlite_read(column: Column[Any]) -> str:
    """SQLite: the expression that reads a column's value from a `json_each` element."""
    path = f"'$.\"{column.name}\"'"
    if isinstance(column.type, JSON):  # the JSON text itself ('null' for None, as SQLAlchemy)
        return f"r.value -> {path}"
    # SQL values: JSON true/false read as 1/0 (how SQLAlchemy stores booleans), numbers as numbers
    # (the column's affinity makes 1.0 an integer, as it does with SQLAlchemy's parameters).
    return f"r.value ->> {path}"


class SetRows:
    """Builds (once per table) and runs the set-based upsert or insert of a table's rows."""

    def __init__(self, dialect: Dialect) -> None:
        self._dialect = dialect
        self._sqlite = dialect.name == "sqlite"
        self._statements: dict[tuple[str, tuple[str, ...] | None, bool], str] = {}
        # SQLite keeps datetimes as text in SQLAlchemy's format: formatted by SQLAlchemy's own
        # bind processor (orjson hands them over), so they read back as they always did.
        process = (
            DateTime(timezone=True).dialect_impl(dialect).bind_processor(dialect)
            if self._sqlite
            else None
        )
        self._default: Callable[[Any], Any] | None = (
            (lambda value: process(value) if isinstance(value, datetime) else _refuse(value))
            if process is not None
            else None
        )
        self._options = orjson.OPT_NON_STR_KEYS | (
            orjson.OPT_PASSTHROUGH_DATETIME if self._sqlite else 0
        )

    def put(
        self,
        conn: Connection,
        table: Table,
        rows: Sequence[dict[str, Any]],
        *,
        keys: Sequence[str] | None,
        add: bool = False,
    ) -> None:
        """Write `rows` (dicts by column name; a missing column is NULL) in one statement.

        `keys` None: a plain insert. Otherwise an upsert on those columns that replaces the other
        columns, or adds to them (`add`). Rows must have distinct keys (PostgreSQL refuses to
        change one row twice in a statement; the batches here are keyed dicts).
        """
        if not rows:
            return
        cache_key = (table.name, tuple(keys) if keys is not None else None, add)
        sql = self._statements.get(cache_key)
        if sql is None:
            sql = self._statements[cache_key] = self._statement(table, keys, add=add)
        # Column names from SQLAlchemy are `quoted_name`s, a str subclass orjson wants allowed.
        document = orjson.dumps(rows, default=self._default, option=self._options).decode()
        conn.exec_driver_sql(sql, (document,))

    def _statement(self, table: Table, keys: Sequence[str] | None, *, add: bool) -> str:
        columns = list(table.columns)
        names = [c.name for c in columns]
        quoted = ", ".join(f'"{n}"' for n in names)
        if self._sqlite:
            reads = ", ".join(_sqlite_read(c) for c in columns)
            # WHERE true: SQLite's parser needs it between a SELECT and ON CONFLICT.
            source = "FROM json_each(?) AS r WHERE true"
        else:
            forms = [_pg_form(c, self._dialect) for c in columns]
            reads = ", ".join(read for _, read in forms)
            record = ", ".join(f'"{n}" {kind}' for n, (kind, _) in zip(names, forms, strict=True))
            source = f"FROM json_to_recordset(%s::json) AS r({record})"
        sql = f'INSERT INTO "{table.name}" ({quoted}) SELECT {reads} {source}'
        if keys is not None:
            target = ", ".join(f'"{k}"' for k in keys)
            sets = ", ".join(
                f'"{n}" = "{table.name}"."{n}" + excluded."{n}"'
                if add
                else f'"{n}" = excluded."{n}"'
                for n in names
                if n not in keys
            )
            sql += f" ON CONFLICT ({target}) DO UPDATE SET {sets}"
        return sql


def _refuse(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
