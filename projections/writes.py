"""Writing a batch's rows: one statement per table, run with the driver's `executemany` or `COPY`.

The SQL is built once per table and kind of write from the table's definition (so a new table needs
nothing here), and the values go through SQLAlchemy's own bind processors for their column types:
the rows read back exactly as rows written through SQLAlchemy statements would, without the cost
of compiling and processing a statement per row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Connection, Dialect, Table

from flowstore.projections.batch import INSERT, SUM, columns_of

__all__ = ["RowWriter"]

_Processors = list[tuple[str, Callable[[Any], Any] | None]]


class RowWriter:
    """Writes whole rows into tables: inserted, replacing the row at their key, or added to it."""

    def __init__(self, dialect: Dialect) -> None:
        self._dialect = dialect
        self._postgres = dialect.name == "postgresql"
        self._quote = dialect.identifier_preparer.quote
        self._marker = "%s" if self._postgres else "?"
        self._statements: dict[tuple[str, str], str] = {}
        self._processors: dict[str, _Processors] = {}

    def write(
        self, conn: Connection, table: Table, how: str, rows: Sequence[dict[str, Any]]
    ) -> None:
        """Write `rows` (dicts holding every column of `table`) the way `how` says."""
        processors = self._processors_of(table)
        values = [
            tuple(row[c] if p is None else p(row[c]) for c, p in processors) for row in rows
        ]
        if how == INSERT and self._postgres:
            self._copy(conn, table, values)
        else:
            conn.exec_driver_sql(self._statement(table, how), values)

    def _copy(self, conn: Connection, table: Table, values: list[tuple[Any, ...]]) -> None:
        # COPY: the fastest way into PostgreSQL, and transactional like an INSERT.
        columns = ", ".join(self._quote(c.name) for c in table.columns)
        driver: Any = conn.connection.driver_connection
        with (
            driver.cursor() as cursor,
            cursor.copy(f"COPY {self._quote(table.name)} ({columns}) FROM STDIN") as copy,
        ):
            for row in values:
                copy.write_row(row)

    def _processors_of(self, table: Table) -> _Processors:
        if table.name not in self._processors:
            self._processors[table.name] = [
                (c.name, c.type.dialect_impl(self._dialect).bind_processor(self._dialect))
                for c in table.columns
            ]
        return self._processors[table.name]

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
                keys, others = columns_of(table)
                sets = ", ".join(
                    f"{q(c)} = {name}.{q(c)} + excluded.{q(c)}"
                    if how == SUM
                    else f"{q(c)} = excluded.{q(c)}"
                    for c in others
                )
                sql += f" ON CONFLICT ({', '.join(q(k) for k in keys)}) DO UPDATE SET {sets}"
            self._statements[(table.name, how)] = sql
        return self._statements[(table.name, how)]
