"""Set-based row writes on PostgreSQL: one statement per table, whatever the number of rows.

SQLAlchemy's `executemany` sends one INSERT per row (psycopg pipelines them, but the server still
runs each, and SQLAlchemy binds each row in Python). Here a table's rows go as one JSON document
(orjson, in C) that the statement reads back as rows: `INSERT ... SELECT ... FROM
json_to_recordset(%s) ... ON CONFLICT ... DO UPDATE`. Its text is the same for any number of rows,
so psycopg prepares it once. The values stored are the ones SQLAlchemy's executemany stores: JSON
columns as JSON (Python None as JSON null, as SQLAlchemy's `JSON` writes it), integers exact
(read as numeric: the counters' deltas are floats such as 1.0), timestamps in ISO form with their
offset, floats in their shortest exact form.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from sqlalchemy import JSON, Boolean, Column, Connection, DateTime, Float, Integer, String, Table
from sqlalchemy.dialects import postgresql

__all__ = ["PgRows"]

_DIALECT = postgresql.dialect()  # type: ignore[no-untyped-call]


def _column_form(column: Column[Any]) -> tuple[str, str]:
    """(type the JSON value is read as, expression that stores it in the column)."""
    kind = column.type
    name = f'r."{column.name}"'
    if isinstance(kind, JSON):  # JSON null, not SQL NULL, for None (as SQLAlchemy writes it)
        return "json", f"COALESCE({name}, 'null'::json)"
    if isinstance(kind, Boolean):
        return "boolean", name
    if isinstance(kind, Integer):  # BigInteger too; numeric reads 1.0 and big ints exactly
        return "numeric", f"{name}::{kind.compile(dialect=_DIALECT)}"
    if isinstance(kind, Float):
        return "double precision", name
    if isinstance(kind, DateTime | String):  # Text too
        return kind.compile(dialect=_DIALECT), name
    raise TypeError(f"no JSON form for column {column} of type {kind}")


class PgRows:
    """Builds (once per table) and runs the unnesting upsert or insert of a table's rows."""

    def __init__(self) -> None:
        self._statements: dict[tuple[str, tuple[str, ...] | None, bool], _Statement] = {}

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
        statement = self._statements.get(cache_key)
        if statement is None:
            statement = self._statements[cache_key] = _Statement(table, keys, add=add)
        statement.run(conn, rows)


class _Statement:
    """One table's statement that reads its rows from a JSON array."""

    def __init__(self, table: Table, keys: Sequence[str] | None, *, add: bool) -> None:
        columns = list(table.columns)
        forms = [_column_form(c) for c in columns]
        names = [c.name for c in columns]
        quoted = ", ".join(f'"{n}"' for n in names)
        record = ", ".join(f'"{n}" {kind}' for n, (kind, _) in zip(names, forms, strict=True))
        reads = ", ".join(read for _, read in forms)
        sql = (
            f'INSERT INTO "{table.name}" ({quoted}) SELECT {reads} '
            f"FROM json_to_recordset(%s::json) AS r({record})"
        )
        if keys is not None:
            target = ", ".join(f'"{k}"' for k in keys)
            sets = ", ".join(
                f'"{n}" = "{table.name}"."{n}" + EXCLUDED."{n}"'
                if add
                else f'"{n}" = EXCLUDED."{n}"'
                for n in names
                if n not in keys
            )
            sql += f" ON CONFLICT ({target}) DO UPDATE SET {sets}"
        self.sql = sql

    def run(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
        # Column names from SQLAlchemy are `quoted_name`s, a str subclass orjson wants allowed.
        document = orjson.dumps(rows, option=orjson.OPT_NON_STR_KEYS).decode()
        conn.exec_driver_sql(self.sql, (document,))
